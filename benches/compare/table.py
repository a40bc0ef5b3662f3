"""Prints a markdown table of medians from `capstan bench --json` lines, one row per config."""
import json
import statistics
import sys
from collections import defaultdict

FIELDS = [
    ("tasks/s", "tasks_per_s", "{:,.0f}"),
    ("runs/s", "runs_per_s", "{:,.0f}"),
    ("task p50 ms", "p50_ms", "{:.0f}"),
    ("task p99 ms", "p99_ms", "{:.0f}"),
    ("step p50 ms", "step_p50_ms", "{:.0f}"),
    ("run p50 ms", "run_p50_ms", "{:.0f}"),
    ("CPU us/task", "cpu_us_per_task", "{:.0f}"),
    ("PG CPU s", "postgres_cpu_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mb", "{:.0f}"),
    ("inputs/commit", "inputs_per_commit", "{:.1f}"),
    ("commits/s", "commits_per_s", "{:,.0f}"),
]


def main(path):
    groups = defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            c = r["config"]
            groups[(c["store"], c["broker"], c["dispatch"], c["shape"], c["tasks"])].append(r)
    head = ["store", "broker", "dispatch", "shape", "K", "n"] + [f[0] for f in FIELDS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, rows in groups.items():
        cells = [str(k) for k in key] + [str(len(rows))]
        for _, name, fmt in FIELDS:
            vals = [r[name] for r in rows if r.get(name) is not None]
            cells.append(fmt.format(statistics.median(vals)) if vals else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
