//! The checker: compares every run's event stream in PostgreSQL with the workers' ledgers and
//! prints, per kind of record (awards, results, run ends), how many were lost, duplicated,
//! unexpected and recovered. It also checks what must hold whatever the faults: every run
//! ended, no gap or repeat in any run's seq (which also keeps event ids, `<run>:<seq>`, unique),
//! and each run's index row equal to the fold of its events.
//!
//! - awards: lost = an award a worker acted on that the store lacks; duplicated = an attempt
//!   awarded twice, or a non-idempotent task started twice (by the store or by the ledgers);
//!   unexpected = an award to an unknown worker or with a token not above the run's previous
//!   ones; recovered = attempts awarded again after a heartbeat or schedule-to-start timeout.
//! - results: lost = a task of an ended run without its end; duplicated = a task or attempt that
//!   ended twice; unexpected = a recorded worker result no ledger line backs (same worker,
//!   attempt, token and result); recovered = late `finished` reports fenced off (the ledger says
//!   finished, the store kept the timeout, and the engine logged `input-rejected` or the report
//!   never reached it).
//! - run ends: lost = a triggered run that never ended; duplicated = a run that ended twice;
//!   unexpected = an index row that disagrees with the fold, or a run nobody triggered;
//!   recovered = runs that ended although a fault was injected while they were open.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use capstan::runtime::codec::decode_event;
use capstan_engine::Definition;
use capstan_engine::run::{AttemptOutcome, Event, RunState, RunStatus, TaskStatus, TimeoutKind};
use capstan_store::{RunFilter, Store};
use serde::Deserialize;

/// One ledger line.
#[derive(Debug, Clone, Deserialize)]
pub struct Action {
    pub action: String,
    pub worker: String,
    pub run: String,
    pub task: String,
    pub attempt: u32,
    pub token: u64,
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub at_ms: u64,
}

/// The four numbers of one kind of record.
#[derive(Debug, Default, Clone, Copy)]
pub struct Row {
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub recovered: usize,
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    pub awards: Row,
    pub results: Row,
    pub run_ends: Row,
    /// Every violation, described (empty when all is well).
    pub problems: Vec<String>,
    pub runs: usize,
    pub events: usize,
    pub rejected_inputs: usize,
    pub outcome_unknown: usize,
    /// Starts of a claim-free offer whose reports the engine did not take: a second copy,
    /// begun before the first report under the offer's token bound the attempt to another
    /// member, or a start whose reports came after its attempt had timed out (docs/protocol.md).
    /// Under claims the same faults show as awards that had to be recovered.
    pub claim_free_untaken: usize,
    pub run_results: BTreeMap<String, usize>,
    /// For each attempt whose worker was lost (killed or stopped) and that was awarded again
    /// after its heartbeat timeout: ms from the loss to the new award.
    pub reoffer_ms: Vec<u64>,
}

impl Report {
    /// Median, p99 and maximum of the re-offer delays, or `None` without any.
    pub fn reoffer_summary(&self) -> Option<(u64, u64, u64)> {
        let mut d = self.reoffer_ms.clone();
        if d.is_empty() {
            return None;
        }
        d.sort_unstable();
        let at = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99), d[d.len() - 1]))
    }

    /// The table the suite prints (and the README quotes).
    pub fn table(&self) -> String {
        let mut t =
            format!("{:<10} {:>6} {:>11} {:>11} {:>10}\n", "records", "lost", "duplicated", "unexpected", "recovered");
        for (name, r) in [("awards", self.awards), ("results", self.results), ("run ends", self.run_ends)] {
            t.push_str(&format!(
                "{name:<10} {:>6} {:>11} {:>11} {:>10}\n",
                r.lost, r.duplicated, r.unexpected, r.recovered
            ));
        }
        t
    }
}

/// Reads the ledgers (a torn last line of a killed worker is skipped: it was never fsynced).
pub fn read_ledgers(paths: &[PathBuf]) -> Vec<Action> {
    let mut actions = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        actions.extend(text.lines().filter_map(|l| serde_json::from_str::<Action>(l).ok()));
    }
    actions
}

/// The names of the definition's tasks that `pick` selects.
fn task_names(def: &Definition, pick: impl Fn(&capstan_engine::definition::model::Task) -> bool) -> HashSet<String> {
    def.stages
        .iter()
        .flat_map(|s| &s.sequences)
        .flat_map(|q| &q.tasks)
        .filter(|t| pick(t))
        .map(|t| t.name.clone())
        .collect()
}

/// Checks the triggered runs; `faults_ms` are the moments faults were injected.
pub async fn check(
    store: &Arc<dyn Store>,
    def: &Arc<Definition>,
    triggered: &[String],
    workers: &HashSet<String>,
    actions: &[Action],
    faults_ms: &[u64],
    losses: &[(String, u64)],
) -> Report {
    let mut rep = Report::default();
    let non_idempotent = task_names(def, |t| !t.idempotent);
    let claim_free = task_names(def, |t| !t.claim);
    let by_attempt: HashMap<(&str, &str, u32), Vec<&Action>> = actions.iter().fold(HashMap::new(), |mut m, a| {
        m.entry((a.run.as_str(), a.task.as_str(), a.attempt)).or_default().push(a);
        m
    });
    let indexed = store.list_runs(&RunFilter::default()).await.expect("list runs");
    let triggered_set: HashSet<&String> = triggered.iter().collect();
    for r in &indexed {
        if !triggered_set.contains(&r.run_id) {
            rep.run_ends.unexpected += 1;
            rep.problems.push(format!("run {} in the store was never triggered", r.run_id));
        }
    }
    let mut store_awards: HashSet<(String, String, u32, u64, String)> = HashSet::new();
    for run_id in triggered {
        rep.runs += 1;
        let stored = store.read_stream(run_id, 0).await.expect("read a run's stream");
        rep.events += stored.len();
        let mut state = RunState::new(def.clone());
        let mut events = Vec::new();
        for (i, s) in stored.iter().enumerate() {
            if s.seq != i as i64 + 1 {
                rep.problems.push(format!("run {run_id}: seq {} where {} was due", s.seq, i + 1));
            }
            let e = decode_event(s).expect("every stored event decodes");
            state.evolve(&e);
            events.push(e);
        }
        check_run(&mut rep, run_id, &events, workers, &by_attempt, &non_idempotent, faults_ms, &mut store_awards);
        reoffers(&mut rep, &events, losses);
        let record = store.get_run(run_id).await.expect("get a run");
        let folded_status = match state.status() {
            Some(RunStatus::Finished) => "finished",
            Some(RunStatus::Cancelled) => "cancelled",
            None if state.is_paused() => "paused",
            None => "running",
        };
        let folded_result = state.result().map(|r| r.as_str().to_string());
        match record {
            Some(r) if r.status == folded_status && r.result == folded_result => {}
            other => {
                rep.run_ends.unexpected += 1;
                rep.problems.push(format!(
                    "run {run_id}: index {:?} but its events fold to {folded_status} / {folded_result:?}",
                    other.map(|r| (r.status, r.result))
                ));
            }
        }
        if let Some(res) = state.result() {
            *rep.run_results.entry(res.as_str().to_string()).or_default() += 1;
        }
    }
    // A worker that acted on an award the store does not hold would be a lost award, but for a
    // start of a claim-free offer the engine did not take (its result, had it been recorded,
    // would have failed the checks above).
    for a in actions.iter().filter(|a| a.action == "awarded") {
        let key = (a.run.clone(), a.task.clone(), a.attempt, a.token, a.worker.clone());
        if !store_awards.contains(&key) && claim_free.contains(&a.task) {
            rep.claim_free_untaken += 1;
        } else if !store_awards.contains(&key) {
            rep.awards.lost += 1;
            rep.problems.push(format!("{} acted on an award the store lacks: {key:?}", a.worker));
        }
    }
    // Ledger: a non-idempotent task must never have been started twice in one run.
    let mut starts: HashMap<(&str, &str), Vec<String>> = HashMap::new();
    for a in actions.iter().filter(|a| a.action == "started" && non_idempotent.contains(&a.task)) {
        let who = format!("{} (attempt {}, token {}, at {} ms)", a.worker, a.attempt, a.token, a.at_ms);
        starts.entry((a.run.as_str(), a.task.as_str())).or_default().push(who);
    }
    for ((run, task), by) in starts.into_iter().filter(|(_, by)| by.len() > 1) {
        rep.awards.duplicated += 1;
        rep.problems.push(format!(
            "run {run}: non-idempotent task {task} was started {} times by workers: {}",
            by.len(),
            by.join(", ")
        ));
    }
    rep
}

/// Re-offer delays of one run: an attempt awarded at `a` to worker `w` that ended by its heartbeat
/// timeout, with `w` lost at `l >= a`, and the next attempt awarded at `b >= l`: `b - l`.
fn reoffers(rep: &mut Report, events: &[Event], losses: &[(String, u64)]) {
    let mut awarded: HashMap<(&str, u32), (&str, u64)> = HashMap::new();
    let mut timed_out: HashSet<(&str, u32)> = HashSet::new();
    for e in events {
        match e {
            Event::TaskAwarded { task, attempt, worker, at, .. } => {
                if *attempt > 1
                    && timed_out.contains(&(task.as_str(), attempt - 1))
                    && let Some((w, a)) = awarded.get(&(task.as_str(), attempt - 1))
                    && let Some(lost) =
                        losses.iter().filter(|(id, l)| id == w && *l >= *a && *l <= at.0).map(|(_, l)| *l).min()
                {
                    rep.reoffer_ms.push(at.0 - lost);
                }
                awarded.insert((task.as_str(), *attempt), (worker.id.as_str(), at.0));
            }
            Event::AttemptEnded {
                task,
                attempt,
                outcome: AttemptOutcome::TimedOut { timeout: TimeoutKind::Heartbeat },
                ..
            } => {
                timed_out.insert((task.as_str(), *attempt));
            }
            _ => {}
        }
    }
}

/// The per-run checks of awards, results and the run's end.
#[allow(clippy::too_many_arguments)]
fn check_run(
    rep: &mut Report,
    run_id: &str,
    events: &[Event],
    workers: &HashSet<String>,
    ledger: &HashMap<(&str, &str, u32), Vec<&Action>>,
    non_idempotent: &HashSet<String>,
    faults_ms: &[u64],
    store_awards: &mut HashSet<(String, String, u32, u64, String)>,
) {
    let mut awards: HashMap<(String, u32), (u64, String)> = HashMap::new();
    // Tokens grow per task: a claim-free offer takes its token when offered, so awards of
    // parallel tasks may bind in another order than their tokens.
    let mut last_tokens: HashMap<String, u64> = HashMap::new();
    let mut attempt_ends: HashMap<(String, u32), AttemptOutcome> = HashMap::new();
    let mut task_ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut started: BTreeMap<String, usize> = BTreeMap::new();
    let (mut run_ends, mut begin, mut end) = (0, 0, 0);
    for e in events {
        match e {
            Event::RunStarted { at, .. } => begin = at.0,
            Event::TaskAwarded { task, attempt, worker, token, .. } => {
                if awards.insert((task.clone(), *attempt), (*token, worker.id.clone())).is_some() {
                    rep.awards.duplicated += 1;
                    rep.problems.push(format!("run {run_id}: {task} attempt {attempt} awarded twice"));
                }
                let last_token = last_tokens.insert(task.clone(), *token).unwrap_or(0);
                if !workers.contains(&worker.id) || *token <= last_token {
                    rep.awards.unexpected += 1;
                    rep.problems.push(format!("run {run_id}: award of {task} to {} with token {token}", worker.id));
                }
                store_awards.insert((run_id.into(), task.clone(), *attempt, *token, worker.id.clone()));
                if *attempt > 1
                    && let Some(AttemptOutcome::TimedOut { timeout }) = attempt_ends.get(&(task.clone(), attempt - 1))
                    && matches!(timeout, TimeoutKind::Heartbeat | TimeoutKind::ScheduleToStart)
                {
                    rep.awards.recovered += 1;
                }
            }
            Event::TaskStarted { task, .. } => *started.entry(task.clone()).or_default() += 1,
            Event::AttemptEnded { task, attempt, outcome, .. }
                if attempt_ends.insert((task.clone(), *attempt), outcome.clone()).is_some() =>
            {
                rep.results.duplicated += 1;
                rep.problems.push(format!("run {run_id}: {task} attempt {attempt} ended twice"));
            }
            Event::TaskEnded { task, status, .. } => {
                *task_ends.entry(task.clone()).or_default() += 1;
                if *status == TaskStatus::OutcomeUnknown {
                    rep.outcome_unknown += 1;
                }
            }
            Event::InputRejected { .. } => rep.rejected_inputs += 1,
            Event::RunFinished { at, .. } => {
                run_ends += 1;
                end = at.0;
            }
            _ => {}
        }
    }
    for task in non_idempotent {
        if started.get(task).copied().unwrap_or(0) > 1 {
            rep.awards.duplicated += 1;
            rep.problems.push(format!("run {run_id}: non-idempotent {task} recorded as started twice"));
        }
    }
    // Every recorded worker result must be backed by the ledger of the worker that held the token.
    for ((task, attempt), outcome) in &attempt_ends {
        let lines = ledger.get(&(run_id, task.as_str(), *attempt)).map(Vec::as_slice).unwrap_or(&[]);
        let finished: Vec<&&Action> = lines.iter().filter(|a| a.action == "finished").collect();
        match outcome {
            AttemptOutcome::Finished { result, error, .. } => {
                let want = match error {
                    Some(e) => format!("error:{}", e.kind),
                    None => result.as_str().to_string(),
                };
                let award = awards.get(&(task.clone(), *attempt));
                let backed = finished.iter().any(|a| {
                    award.is_some_and(|(t, w)| *t == a.token && *w == a.worker) && a.result.as_deref() == Some(&want)
                });
                if !backed {
                    rep.results.unexpected += 1;
                    rep.problems
                        .push(format!("run {run_id}: {task} attempt {attempt} result {want} not in any ledger"));
                }
            }
            _ => rep.results.recovered += finished.len(),
        }
    }
    let ends: usize = task_ends.values().sum();
    rep.results.duplicated += ends.saturating_sub(task_ends.len());
    if run_ends > 0 && task_ends.len() < 6 {
        rep.results.lost += 6 - task_ends.len();
        rep.problems.push(format!("run {run_id}: only {} tasks ended: {task_ends:?}", task_ends.len()));
    }
    match run_ends {
        0 => {
            rep.run_ends.lost += 1;
            rep.problems.push(format!("run {run_id} never ended"));
        }
        1 => {
            if faults_ms.iter().any(|f| *f >= begin && *f <= end) {
                rep.run_ends.recovered += 1;
            }
        }
        n => {
            rep.run_ends.duplicated += n - 1;
            rep.problems.push(format!("run {run_id} ended {n} times"));
        }
    }
}
