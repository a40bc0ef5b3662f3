"""What the peer scripts measure alike: CPU seconds from /proc and nearest-rank percentiles."""

import os


def cpu_s_of_stat(stat):
    """utime + stime of a /proc/PID/stat line (100 ticks per second on Linux); the fields are
    counted after the command name's last ')', which may hold spaces."""
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def cpu_s_of(pid):
    """CPU seconds of one process."""
    with open(f"/proc/{pid}/stat") as f:
        return cpu_s_of_stat(f.read())


def cpu_s_named(prefix):
    """CPU seconds of every process whose command name starts with `prefix`."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        if name.startswith(prefix):
            total += cpu_s_of_stat(stat)
    return total


def percentile(samples, q):
    """Nearest-rank percentile, q in [0, 1]."""
    samples = sorted(samples)
    rank = max(1, min(len(samples), int(-(-q * len(samples) // 1))))
    return samples[rank - 1]
