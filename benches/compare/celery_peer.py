"""The Celery side of benches/compare/run.sh: Celery on RabbitMQ running N no-op jobs with C
clients, each sending one job and waiting for its result before sending the next (the closed
loop `capstan bench` drives with --concurrency C). The worker is a separate `celery worker`
process with the threads pool and C threads; results come back over the `rpc://` backend
(a reply queue per client thread, nothing stored). Prints one JSON line.

    CELERY_PEER_BROKER=amqp://guest:guest@127.0.0.1:5672// python celery_peer.py --jobs 2000 --concurrency 64

The module is also the worker's app (`celery -A celery_peer worker`), configured by the same
environment (CELERY_PEER_BROKER, CELERY_PEER_QUEUE).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import celery

from peer_stats import cpu_s_named, cpu_s_of, percentile

BROKER = os.environ.get("CELERY_PEER_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("CELERY_PEER_QUEUE", "capstan-compare")

app = celery.Celery("celery_peer", broker=BROKER, backend="rpc://")
app.conf.update(
    task_default_queue=QUEUE,
    result_persistent=False,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(i):
    return i


def main(jobs, concurrency):
    # Messages left by an interrupted earlier run would be counted as work.
    app.control.purge()
    env = dict(os.environ, CELERY_PEER_BROKER=BROKER, CELERY_PEER_QUEUE=QUEUE)
    here = os.path.dirname(os.path.abspath(__file__))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_peer", "worker", "--pool", "threads",
         "--concurrency", str(concurrency), "--queues", QUEUE, "--without-gossip", "--without-mingle",
         "--without-heartbeat", "--loglevel", "WARNING"],
        cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr,
    )
    try:
        # The first job waits until the worker consumes the queue; it is not counted.
        noop.apply_async(args=(-1,)).get(timeout=120)
        latencies = []
        lock = threading.Lock()
        counter = iter(range(jobs))

        def client():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                got = noop.apply_async(args=(i,)).get(timeout=120)
                dt = (time.perf_counter() - t0) * 1000.0
                assert got == i, f"job {i} returned {got}"
                with lock:
                    latencies.append(dt)

        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        w0, mq0, start = cpu_s_of(worker.pid), cpu_s_named("beam.smp"), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        w1, mq1 = cpu_s_of(worker.pid), cpu_s_named("beam.smp")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert len(latencies) == jobs, f"{len(latencies)} of {jobs} jobs came back"
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(
        json.dumps(
            {
                "peer": "celery",
                "version": celery.__version__,
                "jobs": jobs,
                "concurrency": concurrency,
                "elapsed_s": round(elapsed, 3),
                "jobs_per_s": round(jobs / elapsed, 1),
                "p50_ms": round(statistics.median(latencies), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2),
                "client_cpu_s": round(client_cpu + (w1 - w0), 2),
                "server_cpu_s": round(mq1 - mq0, 2),
            }
        )
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args()
    main(a.jobs, a.concurrency)
