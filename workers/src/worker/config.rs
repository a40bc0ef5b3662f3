//! [`WorkerConfig`]: who a worker is, what it takes on, and its timings.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Error, Result};

/// A worker's identity, capacity and timings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker id, unique among the workers of a deployment.
    pub id: String,
    /// Labels the engine matches against a task's `requires`.
    pub labels: BTreeMap<String, String>,
    /// The task types this worker performs.
    pub task_types: Vec<String>,
    /// How many attempts it runs at once.
    pub max_concurrency: u32,
    /// How many auction bids per slot it keeps open. Only the winner of an auction hears of it
    /// soon; the others hold their slot until the rejection comes, a round trip through the
    /// engine. With one slot per open bid, every worker bidding on every offer, a deployment
    /// took at most `max_concurrency` awards per round trip whatever its number of workers, and
    /// under load (a broker's backlog after a restart) bids waited on lost auctions while the
    /// tasks timed out unstarted. An award that finds every slot running waits in the worker
    /// until one frees (or its attempt is cancelled).
    pub bids_per_slot: u32,
    /// How long a claim, or a bid without a bid deadline, waits for its award.
    pub award_timeout: Duration,
    /// Added to an offer's bid deadline before a reservation is given up.
    pub award_grace: Duration,
    /// How long a cancelled handler may take to return before it is dropped.
    pub cancel_grace: Duration,
    /// How long an offer that finds no free slot waits in the worker for one: a queue offer
    /// then goes back to the broker, for another member; an auction offer is dropped (the
    /// engine offers it again). Also how long a queue offer handed back stays away.
    pub queue_retry_delay: Duration,
    /// How long an attempt runs before the worker reports `started`. An attempt whose handler
    /// returns sooner reports only `finished`, saving a message, an input and an event per task
    /// (its history then shows it awarded, then ended); a longer one reports `started` at this
    /// point (at the latest a third of its heartbeat timeout). Zero reports at once. Keep it far
    /// below the tasks' schedule-to-start timeout, which runs until `started` or `finished`.
    /// An attempt of a claim-free offer reports by `award_timeout` at the latest, since its
    /// offer stays unsettled until then.
    pub started_after: Duration,
    /// A file where the worker records every award before its handler starts. Set it for a
    /// worker that runs non-idempotent tasks under a stable id: restarted, it then never starts
    /// an award again that the engine's outbox republished after a crash. One file per worker id.
    pub journal: Option<std::path::PathBuf>,
}

impl WorkerConfig {
    /// A configuration with one slot, no labels and default timings.
    pub fn new(id: impl Into<String>, task_types: impl IntoIterator<Item = impl Into<String>>) -> Self {
        WorkerConfig {
            id: id.into(),
            labels: BTreeMap::new(),
            task_types: task_types.into_iter().map(Into::into).collect(),
            max_concurrency: 1,
            bids_per_slot: 4,
            award_timeout: Duration::from_secs(10),
            award_grace: Duration::from_secs(2),
            cancel_grace: Duration::from_secs(5),
            queue_retry_delay: Duration::from_secs(1),
            started_after: Duration::ZERO,
            journal: None,
        }
    }

    /// Records awards in a journal file (see [`WorkerConfig::journal`]).
    pub fn journal(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.journal = Some(path.into());
        self
    }

    /// Reports `started` only for attempts still running after `after` (see
    /// [`WorkerConfig::started_after`]).
    pub fn started_after(mut self, after: Duration) -> Self {
        self.started_after = after;
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the number of slots.
    pub fn slots(mut self, max_concurrency: u32) -> Self {
        self.max_concurrency = max_concurrency;
        self
    }

    /// Sets how many auction bids per slot may be open (see [`WorkerConfig::bids_per_slot`]).
    pub fn bids_per_slot(mut self, bids: u32) -> Self {
        self.bids_per_slot = bids;
        self
    }

    /// Every problem of the configuration.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.id.trim().is_empty() {
            problems.push("id: must not be empty".to_string());
        }
        if self.task_types.is_empty() {
            problems.push("task_types: at least one task type is needed".to_string());
        }
        for (i, t) in self.task_types.iter().enumerate() {
            if t.trim().is_empty() {
                problems.push(format!("task_types[{i}]: must not be empty"));
            }
        }
        if self.max_concurrency == 0 {
            problems.push("max_concurrency: must be at least 1".to_string());
        }
        if self.bids_per_slot == 0 {
            problems.push("bids_per_slot: must be at least 1".to_string());
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::Config(problems)) }
    }

    /// Whether the labels meet an offer's requirements.
    pub fn meets(&self, requires: &BTreeMap<String, String>) -> bool {
        requires.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}
