//! The words of the run state machine: inputs, events, effects, timers.

use capstan_proto::{Award, Bid, Claim, Finished, Progress, Rejection, TaskCancel, TaskError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use capstan_proto::{SequenceFinished, TaskOffer, TaskResult, WorkerInfo};

use crate::duration::Timestamp;

/// Who and what a run is. Fixed by `RunStarted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunMeta {
    pub run_id: String,
    pub context_id: String,
    pub project: String,
    pub stage: String,
    pub sequence: String,
    #[serde(default)]
    pub service: Option<String>,
    /// The definition name and version the run is pinned to.
    pub definition: String,
    pub definition_version: u32,
    /// The run whose end triggered this one (promotion), if any.
    #[serde(default)]
    pub triggered_by: Option<String>,
}

/// What the runtime feeds into `decide`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "kebab-case")]
pub enum Input {
    /// Start the run with its trigger data. A run with a service waits in its lane's queue
    /// (`RunQueued`) until the runtime admits it.
    Start { meta: RunMeta, data: Value },
    /// The run's lane (project, stage, service) is free: a queued run begins its tasks.
    Admit,
    /// A worker bids for an offered attempt (auction).
    Bid(Bid),
    /// A worker claims a queued attempt (queue) or joins a fanout task.
    Claim(Claim),
    /// The token holder began the attempt.
    Started(Progress),
    /// The token holder is alive.
    Heartbeat(Progress),
    /// The token holder reports the attempt's end.
    Finished(Finished),
    /// A durable timer fired.
    Timer(TimerKind),
    /// Cancel the run: every open task ends `cancelled`.
    Cancel { reason: String },
    /// Start nothing new until resumed; running attempts go on.
    Pause,
    /// Undo `Pause`.
    Resume,
    /// A person approves or rejects a manual approval task.
    Approve { task: String, approved: bool, by: String },
}

impl Input {
    /// Whether the run's state alone recognises this input when it comes again, so that the
    /// runtime need not record its id: a worker's claim, bid, report or heartbeat names its
    /// attempt (a report also its fencing token), and applying one a second time right after
    /// the first decides nothing new (no event, no rejection to the worker). A `finished` is
    /// recognised as long as its attempt's holders are kept, that is until a retry replaces the
    /// attempt; a result that comes again after that is refused for the record
    /// (`InputRejected`), as a late one is, and never taken twice.
    pub fn idempotent_by_state(&self) -> bool {
        matches!(self, Input::Claim(_) | Input::Bid(_) | Input::Started(_) | Input::Heartbeat(_) | Input::Finished(_))
    }
}

/// The context of one `decide` call: the clock and a random draw (for jitter), both from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    pub now: Timestamp,
    /// A uniformly random 64-bit number drawn by the runtime for this input.
    pub random: u64,
}

/// Why a timed-out attempt timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutKind {
    ScheduleToStart,
    StartToClose,
    Heartbeat,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AttemptOutcome {
    /// The worker reported a result (possibly with an error).
    Finished {
        result: TaskResult,
        #[serde(default)]
        output: Value,
        #[serde(default)]
        error: Option<TaskError>,
    },
    /// A timeout fired.
    TimedOut { timeout: TimeoutKind },
    /// The run was cancelled while the attempt was open.
    Cancelled,
}

/// The final state of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskStatus {
    /// Ended with a result (pass / warning / fail), see `TaskEnded::result`.
    Finished,
    /// Failed after its retries through timeouts.
    TimedOut,
    /// Ended by cancellation of the run.
    Cancelled,
    /// Never started because the run failed or was cancelled first.
    Skipped,
    /// A non-idempotent task whose worker was lost: it may or may not have acted.
    OutcomeUnknown,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Finished,
    Cancelled,
}

/// A sequence started because this run ended (promotion), recorded in `RunFinished`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NextSequence {
    pub stage: String,
    pub sequence: String,
}

/// The facts of a run, appended to its stream in order. `evolve` folds them into `RunState`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    RunStarted {
        meta: RunMeta,
        data: Value,
        at: Timestamp,
    },
    /// A task became ready but waits (`triggeredAfter`) before its first offer.
    TaskDelayed {
        task: String,
        until: Timestamp,
        at: Timestamp,
    },
    /// An attempt was put on offer (auction, fanout) or on the queue. `offer` counts re-offers
    /// of the same attempt from 1. `token` is the fencing token a claim-free queue offer
    /// (`claim: false`) carries: the first report under it binds the attempt to its sender.
    TaskOffered {
        task: String,
        attempt: u32,
        offer: u32,
        #[serde(default)]
        bid_deadline: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<u64>,
        at: Timestamp,
    },
    /// A bid kept for an auction whose policy waits for the window to close.
    BidRecorded {
        task: String,
        attempt: u32,
        bid: RecordedBid,
        at: Timestamp,
    },
    /// The attempt went to a worker with a fencing token.
    TaskAwarded {
        task: String,
        attempt: u32,
        worker: WorkerInfo,
        token: u64,
        at: Timestamp,
    },
    TaskStarted {
        task: String,
        attempt: u32,
        worker_id: String,
        token: u64,
        at: Timestamp,
    },
    /// An attempt ended; `retry_at` is set when another attempt will follow.
    AttemptEnded {
        task: String,
        attempt: u32,
        #[serde(default)]
        worker_id: Option<String>,
        outcome: AttemptOutcome,
        #[serde(default)]
        retry_at: Option<Timestamp>,
        at: Timestamp,
    },
    /// A manual approval task waits for a person.
    ApprovalRequested {
        task: String,
        at: Timestamp,
    },
    /// A task reached its end; `result` is set for `Finished` (fail for timed-out / unknown).
    TaskEnded {
        task: String,
        status: TaskStatus,
        result: TaskResult,
        #[serde(default)]
        output: Value,
        at: Timestamp,
    },
    /// A report was refused (stale fencing token, run already over, ...), kept for the record.
    InputRejected {
        input: String,
        #[serde(default)]
        task: Option<String>,
        #[serde(default)]
        worker_id: Option<String>,
        reason: String,
        at: Timestamp,
    },
    /// The run waits for its lane: another run of the same project, stage and service holds it.
    RunQueued {
        at: Timestamp,
    },
    /// The lane is the run's now: its first tasks start.
    RunAdmitted {
        at: Timestamp,
    },
    RunPaused {
        at: Timestamp,
    },
    RunResumed {
        at: Timestamp,
    },
    RunFinished {
        status: RunStatus,
        result: TaskResult,
        #[serde(default)]
        next: Vec<NextSequence>,
        at: Timestamp,
    },
}

/// A bid as kept in the run's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedBid {
    pub worker: WorkerInfo,
    pub cost: f64,
    pub estimated_ms: u64,
    pub free_slots: u32,
}

/// A durable timer of a run. The runtime stores it under `(run_id, kind.key())`; setting a key
/// again replaces the earlier fire time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "kebab-case")]
pub enum TimerKind {
    /// The auction's bid window closes.
    BidWindow {
        task: String,
        attempt: u32,
        offer: u32,
    },
    /// Nobody bid or claimed: offer again.
    Reoffer {
        task: String,
        attempt: u32,
        offer: u32,
    },
    ScheduleToStart {
        task: String,
        attempt: u32,
    },
    StartToClose {
        task: String,
        attempt: u32,
    },
    Heartbeat {
        task: String,
        attempt: u32,
    },
    /// Backoff elapsed: start the next attempt.
    Retry {
        task: String,
        attempt: u32,
    },
    /// `triggeredAfter` elapsed.
    Delay {
        task: String,
    },
    /// A manual approval waited too long.
    ApprovalTimeout {
        task: String,
    },
}

impl TimerKind {
    /// A key unique within the run, stable across versions: the store's timer id.
    pub fn key(&self) -> String {
        match self {
            TimerKind::BidWindow { task, attempt, .. } => format!("bid-window/{task}/{attempt}"),
            TimerKind::Reoffer { task, attempt, .. } => format!("reoffer/{task}/{attempt}"),
            TimerKind::ScheduleToStart { task, attempt } => format!("schedule-to-start/{task}/{attempt}"),
            TimerKind::StartToClose { task, attempt } => format!("start-to-close/{task}/{attempt}"),
            TimerKind::Heartbeat { task, attempt } => format!("heartbeat/{task}/{attempt}"),
            TimerKind::Retry { task, attempt } => format!("retry/{task}/{attempt}"),
            TimerKind::Delay { task } => format!("delay/{task}"),
            TimerKind::ApprovalTimeout { task } => format!("approval-timeout/{task}"),
        }
    }
}

/// A message from the engine to one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum WorkerMessage {
    Award(Award),
    Rejection(Rejection),
    Cancel(TaskCancel),
}

/// What the runtime must do after committing a decision's events. Effects are data; the runtime
/// turns them into outbox rows, timer rows and new runs in the same transaction as the events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "kebab-case")]
pub enum Effect {
    /// Publish an offer to the workers of `offer.task_type` (broadcast for auction and fanout,
    /// competing for queue, as `offer.dispatch` says).
    Offer(TaskOffer),
    /// Send a message to one worker.
    Send { worker_id: String, message: WorkerMessage },
    /// Ask for `Input::Timer(kind)` at `at` (replaces an earlier timer with the same key).
    SetTimer { kind: TimerKind, at: Timestamp },
    /// The timer is moot.
    CancelTimer { kind: TimerKind },
    /// Start another sequence in the same context (promotion). The runtime derives the new run's
    /// id deterministically from this run's id, stage and sequence, so a replay starts it once.
    StartRun {
        context_id: String,
        project: String,
        stage: String,
        sequence: String,
        #[serde(default)]
        service: Option<String>,
        data: Value,
        triggered_by: String,
    },
    /// Tell watchers the run ended.
    Notify(SequenceFinished),
}

/// The output of `decide`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub events: Vec<Event>,
    pub effects: Vec<Effect>,
}

/// An input that does not apply to the run. Nothing is recorded; the caller reports it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("run has not started")]
    NotStarted,
    #[error("run {0} has already started")]
    AlreadyStarted(String),
    #[error("sequence `{sequence}` of stage `{stage}` is not in definition `{definition}`")]
    UnknownSequence { definition: String, stage: String, sequence: String },
    #[error("task `{0}` is not part of this run's sequence")]
    UnknownTask(String),
    #[error("task `{task}` is not waiting for an approval")]
    NotAwaitingApproval { task: String },
    #[error("run is already over")]
    RunOver,
    #[error("run is queued behind another run of the same project, stage and service; cancel it or wait")]
    Queued,
    #[error("project `{got}` does not own this run (it belongs to `{expected}`)")]
    WrongProject { expected: String, got: String },
}
