"""Prints the markdown table of benches/compare/run.sh from its JSON lines: one row per system
(medians over the repetitions) and the ratio Capstan / best peer in jobs/s."""
import json
import os
import statistics
import sys

# (file, label) in table order; a file that is missing (peer not run) is skipped.
CAPSTAN = [
    ("capstan-memory", "capstan (PostgreSQL + in-memory broker, {dispatch}, 1 task)"),
    ("capstan-rabbitmq", "capstan (PostgreSQL + RabbitMQ, {dispatch}, 1 task)"),
]
PEERS = [
    ("procrastinate", "procrastinate {version} (PostgreSQL)"),
    ("celery", "Celery {version} (RabbitMQ, rpc:// results, threads pool)"),
    ("graphile", "Graphile Worker {version} (PostgreSQL)"),
    ("graphile-batched", "Graphile Worker {version}, batched (PostgreSQL; local queue, batched completions)"),
]


def load(out, name):
    path = os.path.join(out, f"{name}.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def med(rows, *keys):
    for key in keys:
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            return statistics.median(vals)
    return None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(out):
    rows = []
    for name, label in CAPSTAN:
        runs = load(out, name)
        if runs:
            dispatch = runs[0].get("config", {}).get("dispatch", "queue")
            rows.append((label.format(dispatch=dispatch), len(runs), med(runs, "tasks_per_s"), med(runs, "run_p50_ms"), med(runs, "run_p99_ms"),
                         med(runs, "server_cpu_s"), med(runs, "postgres_cpu_s"), True))
    for name, label in PEERS:
        runs = load(out, name)
        if runs:
            rows.append((label.format(version=runs[0].get("version", "?")), len(runs), med(runs, "jobs_per_s"),
                         med(runs, "p50_ms"), med(runs, "p99_ms"), med(runs, "client_cpu_s"),
                         med(runs, "postgres_cpu_s", "server_cpu_s"), False))
    first = load(out, "capstan-memory") or load(out, "capstan-rabbitmq")
    if first:
        print(f"{first[0]['runs']} jobs, concurrency {first[0]['config']['concurrency']}, medians")
    print("| system | n | jobs/s | p50 ms (submit -> done) | p99 ms | process CPU s | server CPU s (PostgreSQL or RabbitMQ) |")
    print("|---|---|---|---|---|---|---|")
    for label, n, rate, p50, p99, cpu, server, _ in rows:
        print(f"| {label} | {n} | {fmt(rate, ',.0f')} | {fmt(p50, '.0f')} | {fmt(p99, '.0f')} | {fmt(cpu, '.2f')} "
              f"| {fmt(server, '.2f')} |")
    ours = [r for r in rows if r[7] and r[2]]
    peers = [r for r in rows if not r[7] and r[2]]
    if ours and peers:
        best_ours = max(ours, key=lambda r: r[2])
        best_peer = max(peers, key=lambda r: r[2])
        print()
        for r in peers:
            print(f"ratio capstan (best config) / {r[0].split(' (')[0]}: {best_ours[2] / r[2]:.2f}x")
        print(f"ratio capstan (best config) / best peer ({best_peer[0].split(' (')[0]}): "
              f"{best_ours[2] / best_peer[2]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1])
