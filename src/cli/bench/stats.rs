//! What `capstan bench` measures after the fact: latencies derived from the event log's
//! `recorded_at_ms` (the truth the engine wrote, not what the bench saw), and the process's own
//! CPU time and peak memory from /proc.

use std::collections::{BTreeMap, HashMap, HashSet};

use capstan_engine::run::Event;
use capstan_store::StoredEvent;
use serde::{Deserialize, Serialize};

use crate::runtime::codec;

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of the samples (all zero when there are none).
    pub fn of(mut samples: Vec<i64>) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = (q * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1] as f64
        };
        Percentiles { count: samples.len(), p50: at(0.50), p90: at(0.90), p99: at(0.99), max: at(1.0) }
    }
}

/// The latencies of a bench, each a list of samples until summarised.
#[derive(Debug, Default)]
pub struct Latencies {
    /// Client trigger call -> `RunFinished` recorded (the whole run).
    pub run: Vec<i64>,
    /// Client trigger call -> `RunStarted` recorded (admission and the start commit).
    pub admit: Vec<i64>,
    /// Client trigger call -> the run's first `TaskAwarded` recorded.
    pub first_award: Vec<i64>,
    /// Per task: first `TaskOffered` -> `TaskAwarded` of its last attempt.
    pub award: Vec<i64>,
    /// Per task: `TaskAwarded` -> `TaskStarted`.
    pub start: Vec<i64>,
    /// Per task: `TaskStarted` -> `TaskEnded` recorded.
    pub finish: Vec<i64>,
    /// Per task: first `TaskOffered` (the task's trigger) -> `TaskEnded` recorded.
    pub task: Vec<i64>,
    /// Per task with predecessors: the last predecessor's `TaskEnded` -> this task's `TaskStarted`.
    pub step: Vec<i64>,
    /// Attempts beyond the first (retries after a failure or timeout).
    pub retries: usize,
    /// Tasks that ended, in the runs followed.
    pub tasks_ended: usize,
}

/// The summaries, in milliseconds.
#[derive(Debug, Serialize)]
pub struct LatencySummary {
    pub run: Percentiles,
    pub admit: Percentiles,
    pub first_award: Percentiles,
    pub award: Percentiles,
    pub start: Percentiles,
    pub finish: Percentiles,
    pub task: Percentiles,
    pub step: Percentiles,
}

#[derive(Default)]
struct TaskTimes {
    offered: Option<i64>,
    awarded: Option<i64>,
    started: Option<i64>,
    ended: Option<i64>,
}

#[derive(Default)]
struct RunTimes {
    started: Option<i64>,
    first_awarded: Option<i64>,
    finished: Option<i64>,
    tasks: HashMap<String, TaskTimes>,
}

/// Folds stored events of the followed runs into per-run timings.
#[derive(Default)]
pub struct Collector {
    runs: HashMap<String, RunTimes>,
    retries: usize,
}

impl Collector {
    /// Takes one stored event; events of runs not in `followed` are skipped.
    pub fn add(&mut self, stored: &StoredEvent, followed: &HashSet<String>) -> Result<(), codec::CodecError> {
        if !followed.contains(&stored.run_id) {
            return Ok(());
        }
        let at = stored.recorded_at_ms;
        let run = self.runs.entry(stored.run_id.clone()).or_default();
        match codec::decode_event(stored)? {
            Event::RunStarted { .. } => run.started = Some(at),
            Event::RunFinished { .. } => run.finished = Some(at),
            Event::TaskOffered { task, .. } => {
                run.tasks.entry(task).or_default().offered.get_or_insert(at);
            }
            Event::TaskAwarded { task, attempt, .. } => {
                if attempt > 1 {
                    self.retries += 1;
                }
                run.first_awarded.get_or_insert(at);
                run.tasks.entry(task).or_default().awarded = Some(at);
            }
            Event::TaskStarted { task, .. } => run.tasks.entry(task).or_default().started = Some(at),
            Event::TaskEnded { task, .. } => run.tasks.entry(task).or_default().ended = Some(at),
            _ => {}
        }
        Ok(())
    }

    /// The latencies, given the client's trigger time per run and the sequence's DAG edges.
    pub fn finish(self, triggered_ms: &HashMap<String, i64>, depends_on: &BTreeMap<String, Vec<String>>) -> Latencies {
        let mut l = Latencies { retries: self.retries, ..Latencies::default() };
        for (run_id, run) in &self.runs {
            if let Some(t0) = triggered_ms.get(run_id) {
                if let Some(f) = run.finished {
                    l.run.push(f - t0);
                }
                if let Some(s) = run.started {
                    l.admit.push(s - t0);
                }
                if let Some(a) = run.first_awarded {
                    l.first_award.push(a - t0);
                }
            }
            for (name, t) in &run.tasks {
                let span = |a: Option<i64>, b: Option<i64>| a.zip(b).map(|(a, b)| b - a);
                l.award.extend(span(t.offered, t.awarded));
                l.start.extend(span(t.awarded, t.started));
                l.finish.extend(span(t.started, t.ended));
                l.task.extend(span(t.offered, t.ended));
                l.tasks_ended += usize::from(t.ended.is_some());
                let deps = depends_on.get(name).map(Vec::as_slice).unwrap_or_default();
                let prev_end = deps.iter().map(|d| run.tasks.get(d).and_then(|p| p.ended)).collect::<Option<Vec<_>>>();
                if let (Some(ends), Some(started)) = (prev_end, t.started)
                    && let Some(last) = ends.into_iter().max()
                {
                    l.step.push(started - last);
                }
            }
        }
        l
    }
}

impl Latencies {
    /// Percentiles of every latency.
    pub fn summary(self) -> LatencySummary {
        LatencySummary {
            run: Percentiles::of(self.run),
            admit: Percentiles::of(self.admit),
            first_award: Percentiles::of(self.first_award),
            award: Percentiles::of(self.award),
            start: Percentiles::of(self.start),
            finish: Percentiles::of(self.finish),
            task: Percentiles::of(self.task),
            step: Percentiles::of(self.step),
        }
    }
}

/// CPU seconds (user + system, all threads) this process has used so far.
pub fn process_cpu_s() -> Option<f64> {
    cpu_s_of(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// CPU seconds of every process whose command name starts with `prefix` (e.g. the PostgreSQL
/// server's backends), to show the database's share when it runs outside this process.
pub fn cpu_s_of_processes(prefix: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let comm = stat.split_once('(').and_then(|(_, rest)| rest.rsplit_once(')')).map(|(c, _)| c);
        if comm.is_some_and(|c| c.starts_with(prefix))
            && let Some(s) = cpu_s_of(&stat)
        {
            total += s;
            found = true;
        }
    }
    found.then_some(total)
}

/// utime + stime of a /proc/PID/stat line. The counts are in USER_HZ ticks, which Linux fixes at
/// 100 per second for every userspace ABI (so no `sysconf` call, which would need unsafe code).
fn cpu_s_of(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields are counted after its last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name come state (field 3) .. utime is field 14 and stime field 15 of the line.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Peak resident memory of this process in MiB (VmHWM).
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM:")
}

/// Resident memory of this process now, in MiB (VmRSS).
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

/// A `/proc/self/status` line given in kB, as MiB.
fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max, p.count), (50.0, 90.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of(vec![7]).p50, 7.0);
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
    }

    #[test]
    fn cpu_fields_are_read_after_the_command_name() {
        let line = "42 (we (ird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 1 2 3";
        assert_eq!(cpu_s_of(line), Some(3.0));
        assert!(process_cpu_s().is_some());
        assert!(peak_rss_mb().is_some_and(|m| m > 0.0));
    }
}
