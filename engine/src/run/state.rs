//! The folded state of a run: `RunState::evolve` applies one event, the accessors read it.
//!
//! `evolve` never fails and never decides: it trusts the events, which `decide` produced from the
//! same state. Unknown task names in events are ignored rather than panicking, because the log is
//! the truth and a state must always be foldable from it.

use std::sync::Arc;

use capstan_proto::AttemptRef;
use serde_json::Value;

use super::types::{AttemptOutcome, Event, RecordedBid, RunMeta, RunStatus, TaskResult, TaskStatus, WorkerInfo};
use crate::definition::model::{Definition, Sequence, Task};
use crate::duration::Timestamp;

/// Where a task is in its life, as shown to the runtime and the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskPhase {
    /// Not ready yet (dependencies open), or ready while the run is paused.
    Pending,
    /// Ready, waiting for `triggeredAfter` to elapse.
    Delayed,
    /// The current attempt is on offer (auction), on the queue, or open for fanout claims.
    Offered,
    /// The current attempt went to a worker that has not reported `started` yet.
    Awarded,
    /// A holder of the current attempt has started it.
    Running,
    /// The last attempt failed; the next one waits for its backoff.
    Backoff,
    /// A manual approval waits for a person.
    AwaitingApproval,
    /// The task reached its end.
    Ended(TaskStatus),
}

/// A read-only view of one task of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskView {
    /// The task's name in its sequence.
    pub name: String,
    /// The type workers subscribe to.
    pub task_type: String,
    /// Where the task is.
    pub status: TaskPhase,
    /// The current (or last) attempt, from 1; 0 before the first offer.
    pub attempt: u32,
    /// The worker holding (or last holding) the current attempt, if any.
    pub worker: Option<String>,
    /// The task's result once it ended with one.
    pub result: Option<TaskResult>,
}

/// One worker awarded the current attempt (several for fanout).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Holder {
    pub worker_id: String,
    pub token: u64,
    pub started: bool,
    /// Set once this holder's part of the attempt ended.
    pub outcome: Option<AttemptOutcome>,
}

/// The state of one task of the run.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TaskState {
    pub phase: TaskPhase,
    pub attempt: u32,
    pub offer: u32,
    /// `Delayed`: when the delay ends; `Backoff`: when the next attempt is due.
    pub until: Option<Timestamp>,
    /// When the current attempt was first offered (its schedule-to-start clock), or when the
    /// approval was requested: what timers are derived from after a crash (`derived.rs`).
    pub offered_at: Option<Timestamp>,
    /// When the current attempt was first awarded (its start-to-close clock).
    pub awarded_at: Option<Timestamp>,
    /// Bids collected for the current attempt (auction policies that wait for the window).
    pub bids: Vec<RecordedBid>,
    /// When the bid window of the current offer closes (auctions).
    pub bid_deadline: Option<Timestamp>,
    /// Holders of the current attempt.
    pub holders: Vec<Holder>,
    /// The fencing token the current attempt's offer carries (`claim: false`): the first
    /// report under it, from whichever worker, makes that worker the holder.
    pub offered_token: Option<u64>,
    /// Whether any attempt was ever awarded: a non-idempotent task is then never offered again.
    /// An award counts as a possible start because a worker acts as soon as it is awarded and its
    /// `started` report can be lost with a crashed engine or broker (found by the fault suite).
    pub ever_started: bool,
    pub result: Option<TaskResult>,
    pub output: Value,
}

impl TaskState {
    fn new() -> Self {
        TaskState {
            phase: TaskPhase::Pending,
            attempt: 0,
            offer: 0,
            until: None,
            offered_at: None,
            awarded_at: None,
            bids: Vec::new(),
            holders: Vec::new(),
            offered_token: None,
            bid_deadline: None,
            ever_started: false,
            result: None,
            output: Value::Null,
        }
    }

    /// Whether a worker may still report on the current attempt.
    pub fn attempt_open(&self) -> bool {
        matches!(self.phase, TaskPhase::Offered | TaskPhase::Awarded | TaskPhase::Running)
    }

    /// Whether work for this task is under way (it keeps a failing run from ending yet).
    pub fn in_flight(&self) -> bool {
        self.attempt_open() || self.phase == TaskPhase::Backoff
    }

    /// Whether a report of `attempt` under `token` takes the attempt: it is claim-free, on
    /// offer, nobody reported yet, and the token is the one its offer carries.
    pub fn binds(&self, attempt: u32, token: u64) -> bool {
        self.attempt == attempt
            && self.phase == TaskPhase::Offered
            && self.holders.is_empty()
            && self.offered_token == Some(token)
    }

    /// The holder with that worker id and token, if it still owns an open part of the attempt.
    pub fn open_holder(&self, worker_id: &str, token: u64) -> Option<&Holder> {
        self.holders.iter().find(|h| h.token == token && h.worker_id == worker_id && h.outcome.is_none())
    }

    /// The holder with that worker id and token whose part of attempt `attempt` (the current
    /// one) already ended: what a report that comes again is recognised by.
    pub fn ended_holder(&self, attempt: u32, worker_id: &str, token: u64) -> Option<&Holder> {
        if self.attempt != attempt {
            return None;
        }
        self.holders.iter().find(|h| h.token == token && h.worker_id == worker_id && h.outcome.is_some())
    }
}

/// The state of one run: a fold over its events.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub(super) def: Arc<Definition>,
    pub(super) version: u64,
    pub(super) meta: Option<RunMeta>,
    pub(super) data: Value,
    /// Indices of the run's stage and sequence in `def`.
    pub(super) at: Option<(usize, usize)>,
    /// The tasks made for this run from a runbook sequence (see `runbook`); `None` for a
    /// sequence with its own tasks.
    pub(super) expanded: Option<Arc<Sequence>>,
    pub(super) tasks: Vec<TaskState>,
    pub(super) paused: bool,
    /// Waiting in its lane's queue (started, not admitted yet).
    pub(super) queued: bool,
    pub(super) finished: Option<(RunStatus, TaskResult)>,
    /// The highest fencing token issued so far; the next award gets the one after it.
    pub(super) last_token: u64,
}

impl RunState {
    /// An empty state, before `RunStarted`, for a run of `def`.
    pub fn new(def: Arc<Definition>) -> Self {
        RunState {
            def,
            version: 0,
            meta: None,
            data: Value::Null,
            at: None,
            expanded: None,
            tasks: Vec::new(),
            paused: false,
            queued: false,
            finished: None,
            last_token: 0,
        }
    }

    /// How many events have been applied: the expected version for the next append.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Who and what the run is, once started.
    pub fn meta(&self) -> Option<&RunMeta> {
        self.meta.as_ref()
    }

    /// The trigger data the run started with.
    pub fn data(&self) -> &Value {
        &self.data
    }

    /// The definition the run is pinned to.
    pub fn definition(&self) -> &Arc<Definition> {
        &self.def
    }

    /// Whether the run has finished (or was cancelled).
    pub fn is_over(&self) -> bool {
        self.finished.is_some()
    }

    /// How the run ended, if it did.
    pub fn status(&self) -> Option<RunStatus> {
        self.finished.map(|(s, _)| s)
    }

    /// The run's result, once it is over.
    pub fn result(&self) -> Option<TaskResult> {
        self.finished.map(|(_, r)| r)
    }

    /// Whether the run is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether the run waits in its lane's queue.
    pub fn is_queued(&self) -> bool {
        self.queued
    }

    /// The tasks of the run's sequence in file order (empty before the start).
    pub fn tasks(&self) -> impl Iterator<Item = TaskView> + '_ {
        let specs = self.sequence().map(|s| s.tasks.as_slice()).unwrap_or(&[]);
        specs.iter().zip(&self.tasks).map(|(spec, t)| view(spec, t))
    }

    /// The view of one task by name.
    pub fn task(&self, name: &str) -> Option<TaskView> {
        self.tasks().find(|t| t.name == name)
    }

    /// The sequence this run executes, once started.
    pub(super) fn sequence(&self) -> Option<&Sequence> {
        if let Some(expanded) = &self.expanded {
            return Some(expanded);
        }
        let (si, qi) = self.at?;
        self.def.stages.get(si)?.sequences.get(qi)
    }

    /// The task of the run's sequence at position `i`.
    pub(super) fn spec(&self, i: usize) -> Option<&Arc<Task>> {
        self.sequence()?.tasks.get(i)
    }

    /// The position of a task by name.
    pub(super) fn index(&self, name: &str) -> Option<usize> {
        self.sequence()?.task_index(name)
    }

    /// Whether `f` is a result this run already took: the holder it names, under its token,
    /// ended its part of the current attempt with a result. A late result (its part timed out
    /// or was cancelled) or one of a replaced attempt is not.
    pub(super) fn result_recorded(&self, f: &capstan_proto::Finished) -> bool {
        let task = self.index(&f.attempt.task).and_then(|i| self.tasks.get(i));
        task.and_then(|t| t.ended_holder(f.attempt.attempt, &f.worker_id, f.token))
            .is_some_and(|h| matches!(h.outcome, Some(AttemptOutcome::Finished { .. })))
    }

    /// The name of task `i` (empty for an index outside the sequence).
    pub(super) fn task_name(&self, i: usize) -> String {
        self.sequence().and_then(|s| s.tasks.get(i)).map(|t| t.name.clone()).unwrap_or_default()
    }

    /// Identifies the current attempt of task `i` on the wire.
    pub(super) fn attempt_ref(&self, i: usize) -> AttemptRef {
        let meta = self.meta.as_ref();
        AttemptRef {
            project: meta.map(|m| m.project.clone()).unwrap_or_default(),
            run_id: meta.map(|m| m.run_id.clone()).unwrap_or_default(),
            task: self.task_name(i),
            attempt: self.tasks[i].attempt,
        }
    }

    /// About how many bytes the state holds, its own struct included and the definition (shared
    /// by every run pinned to it) excluded: what a cache bounded by memory charges for it. An
    /// estimate from capacities, allocations rounded to 16 bytes and JSON objects counted as
    /// the B-tree nodes they allocate (a one-key object takes a whole 11-slot node).
    pub fn approx_bytes(&self) -> usize {
        let meta = self.meta.as_ref().map_or(0, |m| {
            let optional = [&m.service, &m.triggered_by];
            [&m.run_id, &m.context_id, &m.project, &m.stage, &m.sequence, &m.definition]
                .into_iter()
                .chain(optional.into_iter().flatten())
                .map(|s| alloc(s.capacity()))
                .sum::<usize>()
        });
        let expanded = self.expanded.as_ref().map_or(0, |s| sequence_bytes(s));
        let tasks = alloc(self.tasks.capacity() * size_of::<TaskState>())
            + self.tasks.iter().map(TaskState::heap_bytes).sum::<usize>();
        size_of::<RunState>() + meta + value_bytes(&self.data) + expanded + tasks
    }

    /// Applies one event. The runtime calls this for every stored event, in order.
    pub fn evolve(&mut self, event: &Event) {
        self.version += 1;
        match event {
            Event::RunStarted { meta, data, .. } => self.started(meta, data),
            Event::TaskDelayed { task, until, .. } => {
                if let Some(t) = self.task_mut(task) {
                    t.phase = TaskPhase::Delayed;
                    t.until = Some(*until);
                }
            }
            Event::TaskOffered { task, attempt, offer, token, bid_deadline, at } => {
                self.last_token = self.last_token.max(token.unwrap_or(0));
                if let Some(t) = self.task_mut(task) {
                    t.offered_token = *token;
                    t.bid_deadline = *bid_deadline;
                    if t.attempt != *attempt {
                        t.attempt = *attempt;
                        t.bids.clear();
                        t.holders.clear();
                        t.awarded_at = None;
                    }
                    if *offer == 1 {
                        t.offered_at = Some(*at);
                    }
                    t.offer = *offer;
                    t.until = None;
                    t.phase = TaskPhase::Offered;
                }
            }
            Event::BidRecorded { task, bid, .. } => {
                if let Some(t) = self.task_mut(task) {
                    t.bids.push(bid.clone());
                }
            }
            Event::TaskAwarded { task, worker, token, at, .. } => {
                self.last_token = self.last_token.max(*token);
                if let Some(t) = self.task_mut(task) {
                    if t.holders.is_empty() {
                        t.awarded_at = Some(*at);
                    }
                    t.holders.push(Holder {
                        worker_id: worker.id.clone(),
                        token: *token,
                        started: false,
                        outcome: None,
                    });
                    t.ever_started = true;
                    if t.phase == TaskPhase::Offered {
                        t.phase = TaskPhase::Awarded;
                    }
                }
            }
            Event::TaskStarted { task, token, .. } => {
                if let Some(t) = self.task_mut(task) {
                    if let Some(h) = t.holders.iter_mut().find(|h| h.token == *token) {
                        h.started = true;
                    }
                    t.ever_started = true;
                    t.phase = TaskPhase::Running;
                }
            }
            Event::AttemptEnded { task, worker_id, outcome, retry_at, .. } => {
                if let Some(t) = self.task_mut(task) {
                    for h in t.holders.iter_mut().filter(|h| h.outcome.is_none()) {
                        if worker_id.as_ref().is_none_or(|w| *w == h.worker_id) {
                            h.outcome = Some(outcome.clone());
                        }
                    }
                    if let Some(at) = retry_at {
                        t.phase = TaskPhase::Backoff;
                        t.until = Some(*at);
                    }
                }
            }
            Event::ApprovalRequested { task, at } => {
                if let Some(t) = self.task_mut(task) {
                    t.phase = TaskPhase::AwaitingApproval;
                    t.offered_at = Some(*at);
                }
            }
            Event::TaskEnded { task, status, result, output, .. } => {
                if let Some(t) = self.task_mut(task) {
                    t.phase = TaskPhase::Ended(*status);
                    t.until = None;
                    t.result = has_result(*status).then_some(*result);
                    t.output = output.clone();
                }
            }
            Event::InputRejected { .. } => {}
            Event::RunQueued { .. } => self.queued = true,
            Event::RunAdmitted { .. } => self.queued = false,
            Event::RunPaused { .. } => self.paused = true,
            Event::RunResumed { .. } => self.paused = false,
            Event::RunFinished { status, result, .. } => self.finished = Some((*status, *result)),
        }
    }

    fn started(&mut self, meta: &RunMeta, data: &Value) {
        self.meta = Some(meta.clone());
        self.data = data.clone();
        self.at = self.def.stages.iter().enumerate().find_map(|(si, s)| {
            (s.name == meta.stage)
                .then(|| s.sequences.iter().position(|q| q.name == meta.sequence).map(|qi| (si, qi)))
                .flatten()
        });
        self.expanded =
            self.sequence().and_then(|s| s.runbook.as_ref().map(|r| Arc::new(super::runbook::expand(s, r, data))));
        let count = self.sequence().map_or(0, |s| s.tasks.len());
        self.tasks = (0..count).map(|_| TaskState::new()).collect();
    }

    fn task_mut(&mut self, name: &str) -> Option<&mut TaskState> {
        let i = self.index(name)?;
        self.tasks.get_mut(i)
    }
}

impl TaskState {
    /// The bytes this task's state holds outside its own struct.
    fn heap_bytes(&self) -> usize {
        let bids = alloc(self.bids.capacity() * size_of::<RecordedBid>())
            + self.bids.iter().map(|b| worker_bytes(&b.worker)).sum::<usize>();
        let holders = alloc(self.holders.capacity() * size_of::<Holder>())
            + self.holders.iter().map(|h| alloc(h.worker_id.capacity())).sum::<usize>();
        bids + holders + value_bytes(&self.output)
    }
}

/// A heap allocation of `n` bytes: rounded up to the allocator's 16-byte size classes.
fn alloc(n: usize) -> usize {
    if n == 0 { 0 } else { n.next_multiple_of(16) }
}

/// A `BTreeMap` of `len` entries of `entry` bytes (key and value): leaves of 11 slots, whole
/// for up to 11 entries and about two thirds full once they split.
fn btree(len: usize, entry: usize) -> usize {
    let nodes = match len {
        0 => 0,
        1..=11 => 1,
        _ => len.div_ceil(8),
    };
    nodes * alloc(16 + 11 * entry)
}

fn worker_bytes(w: &WorkerInfo) -> usize {
    alloc(w.id.capacity())
        + btree(w.labels.len(), 2 * size_of::<String>())
        + w.labels.iter().map(|(k, v)| alloc(k.capacity()) + alloc(v.capacity())).sum::<usize>()
}

/// The bytes a JSON value holds outside its own `Value`.
fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => alloc(s.capacity()),
        Value::Array(items) => {
            alloc(items.capacity() * size_of::<Value>()) + items.iter().map(value_bytes).sum::<usize>()
        }
        Value::Object(map) => map_bytes(map),
    }
}

fn map_bytes(map: &serde_json::Map<String, Value>) -> usize {
    btree(map.len(), size_of::<String>() + size_of::<Value>())
        + map.iter().map(|(k, v)| alloc(k.capacity()) + value_bytes(v)).sum::<usize>()
}

/// A sequence made for one run (a runbook's expansion): its own struct and its tasks.
fn sequence_bytes(s: &Sequence) -> usize {
    let task = |t: &Task| {
        alloc(size_of::<Task>() + 2 * size_of::<usize>())
            + alloc(t.name.capacity())
            + alloc(t.task_type.capacity())
            + map_bytes(&t.properties)
            + alloc(t.depends_on.capacity() * size_of::<String>())
            + t.depends_on.iter().map(|d| alloc(d.capacity())).sum::<usize>()
    };
    alloc(size_of::<Sequence>())
        + alloc(s.name.capacity())
        + alloc(s.tasks.capacity() * size_of::<Arc<Task>>())
        + s.tasks.iter().map(|t| task(t)).sum::<usize>()
}

/// Skipped tasks never produced a result; every other end carries one (fail when unknown).
pub(super) fn has_result(status: TaskStatus) -> bool {
    status != TaskStatus::Skipped
}

fn view(spec: &Task, t: &TaskState) -> TaskView {
    TaskView {
        name: spec.name.clone(),
        task_type: spec.task_type.clone(),
        status: t.phase,
        attempt: t.attempt,
        worker: t.holders.last().map(|h| h.worker_id.clone()),
        result: t.result,
    }
}
