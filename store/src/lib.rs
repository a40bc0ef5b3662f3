//! Capstan's event store: the truth. Per-run event streams with expected versions, a global
//! position for watchers, the outbox, durable timers, processed-input ids, the run index and
//! definitions, all written by ONE atomic [`Batch`] (group commit). Processed-input ids carry
//! their commit time and are pruned after a retention ([`CommitLog::prune_processed_inputs`]).
//!
//! Backends: [`memory::MemoryStore`] (always), SQLite (`sqlite` feature, embedded default) and
//! PostgreSQL (`postgres` feature, production). [`testing::suite`] is the one conformance suite
//! every backend must pass. The store knows nothing of workflows: payloads are JSON values.

#![warn(missing_docs)]

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod memory;
mod plan;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod conformance;

pub use memory::MemoryStore;

/// A position in the global order of all events (strictly increasing with commit order).
pub type Position = i64;

/// An event to append. Its id is not given but follows from where it lands: see [`event_id`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// The event type.
    pub kind: String,
    /// The event's data, opaque to the store, as the caller serialized it.
    pub payload: RawJson,
    /// Milliseconds since the Unix epoch.
    pub recorded_at_ms: i64,
}

/// Valid JSON text, written as its producer serialized it. Event payloads travel as text from
/// the serializer to the store: no [`Value`] tree is built, copied and dropped for each event
/// on its way to a column that holds text (SQLite) or parses it anyway (PostgreSQL's `jsonb`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// Serializes `value`.
    pub fn new<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Self> {
        serde_json::value::to_raw_value(value).map(RawJson)
    }

    /// The JSON text of a [`Value`], which always serializes.
    pub fn from_value(value: &Value) -> Self {
        RawJson::new(value).expect("a JSON value serializes")
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The text parsed into a [`Value`].
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.as_str()).expect("RawJson holds valid JSON")
    }
}

/// Equal when the JSON values are, whatever the spelling (key order, spaces).
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

/// An event as stored. `seq` numbers a run's events from 1 without gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Place in the global order (1, 2, ... without gaps in every backend).
    pub position: Position,
    /// The stream (run) the event belongs to.
    pub run_id: String,
    /// Place in the run's stream, from 1.
    pub seq: i64,
    /// The CloudEvent id, [`event_id`]`(run_id, seq)`: not stored, since the stream position
    /// already makes it unique.
    pub id: String,
    /// The event type.
    pub kind: String,
    /// The event's data.
    pub payload: Value,
    /// Milliseconds since the Unix epoch, as given when appended.
    pub recorded_at_ms: i64,
}

/// The id of a run's `seq`-th event: `<run_id>:<seq>`. Unique across the store because
/// `(run_id, seq)` is, so no backend stores or indexes it (an index of its own cost every
/// append a third b-tree insert).
pub fn event_id(run_id: &str, seq: i64) -> String {
    format!("{run_id}:{seq}")
}

/// Appends to one run's stream, expecting it to hold exactly `expected_version` events now.
/// Several appends to one run in a batch chain: each expects the version the previous one left.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAppend {
    /// The run (stream) to append to.
    pub run_id: String,
    /// How many events the stream must hold before this append (0 for a new run).
    pub expected_version: i64,
    /// The events, numbered `expected_version + 1..` in order.
    pub events: Vec<NewEvent>,
}

/// The run index: one row per run, kept current by the runtime in the same batch as the events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run id (the key).
    pub run_id: String,
    /// The owning project.
    pub project: String,
    /// Shared by the runs of one promotion chain (Keptn's `shkeptncontext`).
    pub context_id: String,
    /// The stage the run executes in.
    pub stage: String,
    /// The sequence the run executes.
    pub sequence: String,
    /// The service delivered, if any.
    pub service: Option<String>,
    /// The definition's name.
    pub definition: String,
    /// The definition version the run pinned at start.
    pub definition_version: i64,
    /// `running`, `paused`, `finished` or `cancelled`.
    pub status: String,
    /// `pass`, `warning` or `fail` once ended.
    pub result: Option<String>,
    /// When the run started (ms since the epoch); the listing order.
    pub created_at_ms: i64,
    /// When the record last changed (ms since the epoch).
    pub updated_at_ms: i64,
}

impl RunRecord {
    /// Whether the run has ended.
    pub fn is_over(&self) -> bool {
        self.status == "finished" || self.status == "cancelled"
    }
}

/// A message to publish after the commit. `id` is unique (the CloudEvent id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMessage {
    /// The CloudEvent id, for consumers to deduplicate.
    pub id: String,
    /// Where to publish.
    pub topic: String,
    /// Partition / ordering key (the run id).
    pub key: String,
    /// The encoded message (structured-mode CloudEvent JSON).
    pub payload: Vec<u8>,
}

/// An outbox row waiting to be published; `seq` orders rows and names them for deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// Increasing with insertion order; names the row for [`Outbox::outbox_delete`].
    pub seq: i64,
    /// The message to publish.
    pub message: OutboxMessage,
}

/// A durable timer, unique by `(run_id, key)`; setting it again replaces `fire_at_ms` and payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerRow {
    /// The run the timer belongs to.
    pub run_id: String,
    /// Names the timer within its run.
    pub key: String,
    /// When it is due (ms since the epoch).
    pub fire_at_ms: i64,
    /// What the runtime needs when it fires.
    pub payload: Value,
}

/// Removes a timer. With `only_if_fire_at`, only if it still has that fire time (so consuming a
/// fired timer never deletes one that was set again meanwhile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerCancel {
    /// The timer's run.
    pub run_id: String,
    /// The timer's key.
    pub key: String,
    /// Delete only if the timer still fires at this time.
    pub only_if_fire_at: Option<i64>,
}

/// The result of a quality gate (an `evaluation` task), kept so that later evaluations of the
/// same project, stage and service can compare against it (Keptn's relative criteria).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationRecord {
    /// The run whose task evaluated.
    pub run_id: String,
    /// The evaluation task's name in its sequence.
    pub task: String,
    /// The owning project.
    pub project: String,
    /// The stage evaluated.
    pub stage: String,
    /// The service evaluated, if any.
    pub service: Option<String>,
    /// `pass`, `warning` or `fail`.
    pub result: String,
    /// The score, 0 to 100, when the gate scored.
    pub score: Option<f64>,
    /// The whole evaluation as the gate reported it (every SLI value, score and criteria).
    pub evaluation: Value,
    /// When the evaluation was recorded (ms since the epoch).
    pub created_at_ms: i64,
}

/// Everything one group commit writes, atomically: all or nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Stream appends, checked against their expected versions.
    pub appends: Vec<StreamAppend>,
    /// Upserts of the run index (by `run_id`; the last one of a run in the batch wins).
    pub runs: Vec<RunRecord>,
    /// Ids of the inputs applied by this batch; an id already recorded fails the batch with
    /// `Error::DuplicateInput`.
    pub inputs: Vec<String>,
    /// When `inputs` were applied (ms since the epoch), recorded with them so that
    /// [`CommitLog::prune_processed_inputs`] can forget them once the retention has passed.
    pub inputs_at_ms: i64,
    /// Messages to publish after the commit, in this order.
    pub outbox: Vec<OutboxMessage>,
    /// Timers to set (upsert by `(run_id, key)`; the last one of a key in the batch wins).
    /// Applied after `cancel_timers`, so cancelling and setting one key in a batch keeps the
    /// new timer.
    pub set_timers: Vec<TimerRow>,
    /// Timers to delete, applied before `set_timers`.
    pub cancel_timers: Vec<TimerCancel>,
    /// Evaluation results to keep (unique by `(run_id, task)`; a repeat is ignored).
    pub evaluations: Vec<EvaluationRecord>,
}

impl Batch {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.appends.iter().all(|a| a.events.is_empty())
            && self.runs.is_empty()
            && self.inputs.is_empty()
            && self.outbox.is_empty()
            && self.set_timers.is_empty()
            && self.cancel_timers.is_empty()
            && self.evaluations.is_empty()
    }
}

/// What a successful commit reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Committed {
    /// The global position of the last event written (0 if none).
    pub last_position: Position,
    /// How many events were written.
    pub events: usize,
}

/// Filters for listing runs. Runs come newest first; `before` pages (a `created_at_ms, run_id`
/// cursor given by the last row of the previous page).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunFilter {
    /// Only runs of this project.
    pub project: Option<String>,
    /// Only runs in this stage.
    pub stage: Option<String>,
    /// Only runs of this sequence.
    pub sequence: Option<String>,
    /// Only runs of this service.
    pub service: Option<String>,
    /// Only runs with this status.
    pub status: Option<String>,
    /// Only runs of this promotion chain.
    pub context_id: Option<String>,
    /// Only runs strictly before this `(created_at_ms, run_id)` in the listing order.
    pub before: Option<(i64, String)>,
    /// At most this many runs; 0 means no limit.
    pub limit: usize,
}

/// A stored definition version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionRecord {
    /// The owning project.
    pub project: String,
    /// The definition's name.
    pub name: String,
    /// 1, 2, ... per `(project, name)`.
    pub version: i64,
    /// The YAML text as applied.
    pub source: String,
    /// When this version was stored (ms since the epoch).
    pub created_at_ms: i64,
}

/// What went wrong; each variant tells the caller what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another writer appended first: reload the stream and decide again.
    #[error("run {run_id}: expected version {expected}, found {actual}")]
    Conflict {
        /// The run whose stream moved.
        run_id: String,
        /// The version the append expected.
        expected: i64,
        /// The version found.
        actual: i64,
    },
    /// The input was already applied: drop it.
    #[error("input {0} was already applied")]
    DuplicateInput(String),
    /// Bad data from the caller; retrying will not help.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The backend is unreachable or failed: retry later.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `ids` without repeats, in the order of their first appearance.
fn distinct(ids: &[String]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::new();
    ids.iter().map(String::as_str).filter(|id| seen.insert(*id)).collect()
}

/// The write side: one atomic group commit.
#[async_trait]
pub trait CommitLog: Send + Sync {
    /// Writes the whole batch or nothing. Checks every expected version and input id first.
    async fn commit(&self, batch: Batch) -> Result<Committed>;

    /// Forgets up to `limit` processed-input ids recorded before `before_ms` (strictly), oldest
    /// first, and returns how many it forgot. A forgotten id is no longer reported by
    /// [`EventReader::inputs_seen`] nor refused by a commit, so callers prune only past the
    /// window in which an input can be redelivered. The limit bounds the work (and the locks) of
    /// one call: a large backlog is pruned by calling again while a full `limit` comes back.
    async fn prune_processed_inputs(&self, before_ms: i64, limit: usize) -> Result<u64>;

    /// Whether commits run one at a time whatever the caller does (one writer, as SQLite).
    /// Writers then gain nothing from committing concurrently and batch better alone.
    fn serializes_commits(&self) -> bool {
        false
    }
}

/// The read side of event streams.
#[async_trait]
pub trait EventReader: Send + Sync {
    /// A run's events with `seq >= from_seq`, in order.
    async fn read_stream(&self, run_id: &str, from_seq: i64) -> Result<Vec<StoredEvent>>;
    /// The whole streams of `run_ids`, as one read: the runs in the order given (each once; an
    /// unknown run has no events), each run's events in `seq` order. What a batch needs of the
    /// runs it finds in no cache costs one round trip instead of one per run.
    async fn read_streams(&self, run_ids: &[String]) -> Result<Vec<StoredEvent>> {
        let mut events = Vec::new();
        for run_id in distinct(run_ids) {
            events.extend(self.read_stream(run_id, 1).await?);
        }
        Ok(events)
    }
    /// Up to `limit` events of all runs with `position > after`, in position order.
    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<StoredEvent>>;
    /// How many events the run's stream holds (0 for an unknown run).
    async fn stream_version(&self, run_id: &str) -> Result<i64>;
    /// Which of these input ids were already applied.
    async fn inputs_seen(&self, ids: &[String]) -> Result<Vec<String>>;
    /// The position of the last event written (0 for an empty store).
    async fn last_position(&self) -> Result<Position>;
}

/// The outbox: rows written by commits, published and deleted by the relay.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Up to `limit` unpublished rows, oldest first.
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>>;
    /// Deletes published rows (unknown seqs are ignored).
    async fn outbox_delete(&self, seqs: &[i64]) -> Result<()>;
}

/// Durable timers.
#[async_trait]
pub trait Timers: Send + Sync {
    /// Up to `limit` timers with `fire_at_ms <= now_ms`, earliest first.
    async fn timers_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TimerRow>>;
    /// The earliest fire time after `after_ms`, if any. The timer service asks for the timers
    /// after the ones it already handed out, which stay in the table until their partition
    /// commits them away.
    async fn next_timer_at(&self, after_ms: i64) -> Result<Option<i64>>;
    /// Every timer checkpoint, by name. A runtime that keeps some timers in memory records
    /// under its name the position up to which every timer it set is in the table (or moot);
    /// after a crash it derives again the timers of the runs written after the lowest one.
    async fn timer_checkpoints(&self) -> Result<Vec<(String, Position)>>;
    /// Records (or replaces) one timer checkpoint.
    async fn set_timer_checkpoint(&self, name: &str, position: Position) -> Result<()>;
}

/// The run index.
#[async_trait]
pub trait RunIndex: Send + Sync {
    /// One run's record.
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>>;
    /// Runs matching the filter, newest first (`created_at_ms` desc, then `run_id` desc).
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>>;
    /// Runs not yet finished or cancelled (to resume at start), oldest first.
    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>>;
}

/// Versioned, immutable definitions.
#[async_trait]
pub trait Definitions: Send + Sync {
    /// Stores `source` as the next version unless it equals the latest one; returns the version.
    async fn put_definition(&self, project: &str, name: &str, source: &str, now_ms: i64) -> Result<i64>;
    /// A version, or the latest when `version` is `None`.
    async fn get_definition(&self, project: &str, name: &str, version: Option<i64>)
    -> Result<Option<DefinitionRecord>>;
    /// Latest version of every definition of a project, by name.
    async fn list_definitions(&self, project: &str) -> Result<Vec<DefinitionRecord>>;
}

/// Results of earlier quality gates.
#[async_trait]
pub trait Evaluations: Send + Sync {
    /// The last `limit` evaluations of a project, stage and service (`None`: runs without a
    /// service), newest first.
    async fn recent_evaluations(
        &self,
        project: &str,
        stage: &str,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EvaluationRecord>>;
}

/// A whole store.
pub trait Store: CommitLog + EventReader + Outbox + Timers + RunIndex + Definitions + Evaluations + 'static {}
impl<T: CommitLog + EventReader + Outbox + Timers + RunIndex + Definitions + Evaluations + 'static> Store for T {}
