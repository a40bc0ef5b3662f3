//! The validated definition model that both Capstan and Keptn Shipyard files parse into.
//!
//! Everything here is resolved: defaults are applied, `dependsOn` is explicit for every task (a
//! task without `dependsOn` depends on the task listed before it), durations are milliseconds.
//! A `Definition` is only ever built by `definition::parse`, which validates it first, so the run
//! state machine may rely on: unique task names per sequence, known dependencies, no cycles,
//! `triggeredOn` naming existing stages and sequences.

use std::collections::BTreeMap;
use std::sync::Arc;

pub use capstan_proto::{DispatchMode, TaskResult};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::duration::Millis;

/// Which dialect a file was written in; it decides defaults and promotion rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Flavor {
    /// `capstan.dev/v1`.
    Capstan,
    /// `spec.keptn.sh/0.2.x`; `version` is the full apiVersion string.
    Keptn { version: String },
}

/// A whole Shipyard: stages, each with sequences of tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub flavor: Flavor,
    pub name: String,
    pub stages: Vec<Stage>,
}

/// An environment (dev, staging, production).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub sequences: Vec<Sequence>,
}

/// A DAG of tasks run in one stage, possibly triggered by another sequence finishing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    pub name: String,
    pub triggered_on: Vec<Trigger>,
    /// In file order; `Task::depends_on` gives the DAG edges.
    pub tasks: Vec<Arc<Task>>,
    /// A native remediation runbook: the run's tasks are made from it and the problem the run
    /// was triggered with (see `run::runbook`); `tasks` is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runbook: Option<Runbook>,
}

/// `runbook:` of a sequence: for the problem that triggered the run, try the runbook's actions
/// one by one; after each, wait `evaluateAfter`, get the SLIs and evaluate the SLOs; stop
/// "resolved" at the first evaluation that passes (or warns); when the actions run out, run the
/// escalation and end "unresolved" (result fail).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Runbook {
    /// Problem types and their actions, as in Keptn's remediation.yaml `spec.remediations`.
    pub remediations: Vec<crate::remediation::ProblemRemediation>,
    /// How long to wait after an action before measuring (Keptn's `triggeredAfter`).
    pub evaluate_after: Option<Millis>,
    /// Whether a `get-sli` task runs before each evaluation (else the gate reads SLIs itself).
    pub get_sli: bool,
    /// The task run when no action helped (e.g. a webhook that pages someone).
    pub escalation: Option<Task>,
}

/// `triggeredOn: [{event: "<stage>.<sequence>.finished", selector: {match: {...}}}]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub stage: String,
    pub sequence: String,
    pub selector: Selector,
}

/// Conditions on a finished run's results, all of which must hold. An empty selector means the
/// flavor's default: Keptn fires on pass or warning; Capstan likewise.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Selector {
    pub conditions: Vec<Condition>,
}

/// One `match` entry: `result: pass` or `<task>.result: fail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub subject: ConditionSubject,
    /// The results that satisfy the condition (a YAML string or a list of strings).
    pub any_of: Vec<TaskResult>,
}

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionSubject {
    /// The run's overall result.
    Run,
    /// The result of the named task of the finished run.
    Task(String),
}

/// A DAG node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub name: String,
    /// The type workers subscribe to; defaults to the name.
    pub task_type: String,
    /// Free-form properties, passed to the worker inside the task input.
    pub properties: Map<String, Value>,
    /// Names of tasks of the same sequence that must finish first (resolved, never implicit).
    pub depends_on: Vec<String>,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
    /// Labels a worker must carry (`requires: {labels: {k: v}}`).
    pub requires: BTreeMap<String, String>,
    pub dispatch: DispatchMode,
    pub award: AwardPolicy,
    /// A failure of this task does not fail the run.
    pub continue_on_failure: bool,
    /// `false`: never started twice; a lost worker ends it `outcome-unknown`.
    pub idempotent: bool,
    /// `false` (queue dispatch, idempotent tasks only): the offer carries its fencing token and
    /// the member that receives it starts at once; its first report binds the attempt to it.
    /// Two messages fewer per task; a redelivered offer may start a second copy, whose reports
    /// are refused. `true` (the default): the worker claims and waits for the award.
    #[serde(default = "yes")]
    pub claim: bool,
    /// Keptn's `triggeredAfter`: wait this long after the task becomes ready before offering it.
    pub triggered_after: Option<Millis>,
    /// Ending with one of these results ends the whole run with it: tasks not started yet are
    /// skipped (a runbook's evaluation that passes resolves the remediation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ends_run_on: Vec<TaskResult>,
}

/// Retry with exponential backoff and jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Total attempts including the first; 1 means no retry.
    pub max_attempts: u32,
    pub initial_interval: Millis,
    pub backoff_coefficient: f64,
    pub max_interval: Millis,
    /// Error kinds (`TaskError::kind`) that are never retried.
    pub non_retryable: Vec<String>,
}

/// Timeouts of one attempt. `None` means no such limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeouts {
    /// From first offer to the attempt being started (covers every re-offer).
    pub schedule_to_start: Option<Millis>,
    /// From award to a finished result.
    pub start_to_close: Option<Millis>,
    /// Longest silence allowed between heartbeats of a started attempt.
    pub heartbeat: Option<Millis>,
    /// How long an auction collects bids (policies other than `first`).
    pub bid_window: Millis,
}

/// How an auction picks its winner among acceptable bids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AwardPolicy {
    /// Award at the first acceptable bid, without waiting for the window.
    #[default]
    First,
    /// After the window: the lowest cost.
    LowestCost,
    /// After the window: the smallest estimated duration.
    EarliestFinish,
}

/// Defaults of Capstan files. Keptn files use [`RetryPolicy::keptn`] and [`Timeouts::keptn`].
impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_interval: 1_000,
            backoff_coefficient: 2.0,
            max_interval: 60_000,
            non_retryable: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// Keptn never retried a task.
    pub fn keptn() -> Self {
        RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            schedule_to_start: Some(10 * 60_000),
            start_to_close: Some(60 * 60_000),
            heartbeat: None,
            bid_window: 250,
        }
    }
}

impl Timeouts {
    /// Keptn: a task not started within 10 minutes fails. Capstan adds the one-hour
    /// start-to-close bound so that no task can hang forever (ARCHITECTURE.md invariant).
    pub fn keptn() -> Self {
        Timeouts::default()
    }
}

impl Definition {
    /// The stage of that name.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The sequence `sequence` of stage `stage`.
    pub fn sequence(&self, stage: &str, sequence: &str) -> Option<&Sequence> {
        self.stage(stage)?.sequences.iter().find(|q| q.name == sequence)
    }

    /// Whether Keptn's semantics apply.
    pub fn is_keptn(&self) -> bool {
        matches!(self.flavor, Flavor::Keptn { .. })
    }
}

impl Sequence {
    /// The task of that name.
    pub fn task(&self, name: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.name == name).map(|t| &**t)
    }

    /// The position of the task of that name in `tasks`.
    pub fn task_index(&self, name: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t.name == name)
    }
}

fn yes() -> bool {
    true
}
