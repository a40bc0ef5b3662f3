"""The peer side of benches/compare/run.sh: procrastinate (a PostgreSQL task queue) running N
no-op jobs with C clients, each deferring one job and waiting until it has run before deferring
the next (the same closed loop `capstan bench` drives with --concurrency C). Prints one JSON line.
"""
import argparse
import asyncio
import json
import resource
import time

import procrastinate

from peer_stats import cpu_s_named, percentile


async def main(dsn, jobs, concurrency):
    # Built here rather than at import time on purpose: the script is the whole program.
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn, max_size=concurrency + 4))
    done = {}

    @app.task(name="noop")
    async def noop(i):
        fut = done.get(i)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        worker = asyncio.create_task(
            app.run_worker_async(concurrency=concurrency, wait=True, install_signal_handlers=False)
        )
        await asyncio.sleep(0.5)
        next_job = iter(range(jobs))
        latencies = []
        loop = asyncio.get_running_loop()

        async def client():
            for i in next_job:
                fut = done[i] = loop.create_future()
                t0 = time.perf_counter()
                await noop.defer_async(i=i)
                await fut
                del done[i]
                latencies.append((time.perf_counter() - t0) * 1000.0)

        cpu0, pg0, start = resource.getrusage(resource.RUSAGE_SELF), cpu_s_named("postgres"), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu1, pg1 = resource.getrusage(resource.RUSAGE_SELF), cpu_s_named("postgres")
        worker.cancel()
        try:
            await worker
        except (asyncio.CancelledError, Exception):
            pass
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(
        json.dumps(
            {
                "peer": "procrastinate",
                "version": procrastinate.__version__ if hasattr(procrastinate, "__version__") else "?",
                "jobs": jobs,
                "concurrency": concurrency,
                "elapsed_s": round(elapsed, 3),
                "jobs_per_s": round(jobs / elapsed, 1),
                "p50_ms": round(percentile(latencies, 0.50), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2),
                "client_cpu_s": round(client_cpu, 2),
                "postgres_cpu_s": round(pg1 - pg0, 2),
            }
        )
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args()
    asyncio.run(main(a.dsn, a.jobs, a.concurrency))
