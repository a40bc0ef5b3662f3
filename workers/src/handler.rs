//! What a worker's own code sees: the [`Handler`] trait, the [`TaskContext`] it gets, the
//! [`Outcome`] it returns, the cancellation signal, and the terms of a bid.

use std::time::Duration;

use async_trait::async_trait;
use capstan_proto::{Award, TaskError, TaskResult};
use serde_json::Value;
use tokio::sync::watch;

/// The terms a worker bids with; lower cost wins.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BidTerms {
    /// The worker's own notion of cost (e.g. current load).
    pub cost: f64,
    /// Estimated duration in ms.
    pub estimated_ms: u64,
}

/// Performs awarded task attempts.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt to its end. Should return soon after `task.cancelled()` fires; a handler
    /// that does not is dropped after the worker's cancel grace.
    async fn handle(&self, task: TaskContext) -> Outcome;
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task ran and reached a verdict, with its output.
    Finished {
        /// Pass, warning or fail.
        result: TaskResult,
        /// The task's output (a JSON object by convention).
        output: Value,
    },
    /// The task could not be performed; the engine's retry rules apply to the error kind.
    Error(TaskError),
}

impl Outcome {
    /// A passing result.
    pub fn pass(output: Value) -> Self {
        Outcome::Finished { result: TaskResult::Pass, output }
    }

    /// A result with a warning.
    pub fn warning(output: Value) -> Self {
        Outcome::Finished { result: TaskResult::Warning, output }
    }

    /// A failing verdict (not an error: the task ran and judged the subject bad).
    pub fn fail(output: Value) -> Self {
        Outcome::Finished { result: TaskResult::Fail, output }
    }

    /// An error of the given kind (e.g. `timeout`, `exit-code`, `bad-input`).
    pub fn error(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Outcome::Error(TaskError { kind: kind.into(), message: message.into() })
    }
}

/// Tells a handler that its attempt was cancelled (by the engine, or the worker shutting down).
#[derive(Debug, Clone)]
pub struct CancelSignal {
    rx: watch::Receiver<bool>,
}

impl CancelSignal {
    /// A signal and the switch that raises it.
    pub fn new() -> (CancelSwitch, CancelSignal) {
        let (tx, rx) = watch::channel(false);
        (CancelSwitch { tx }, CancelSignal { rx })
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when cancellation is asked for; never if the switch is dropped unraised.
    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Raises a [`CancelSignal`].
#[derive(Debug)]
pub struct CancelSwitch {
    tx: watch::Sender<bool>,
}

impl CancelSwitch {
    /// Raises the signal (idempotent).
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }
}

/// Where an attempt's run stands: stage, sequence, service and context, as the offer the worker
/// answered named them (the award does not repeat them, and a promoted run's input still
/// carries the `stage` of the run that triggered it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunPlace {
    /// The run's stage.
    pub stage: String,
    /// The run's sequence.
    pub sequence: String,
    /// The run's service, if it has one.
    pub service: Option<String>,
    /// The run's context id (Keptn's `shkeptncontext`).
    pub context_id: String,
}

impl RunPlace {
    /// The place an offer names.
    pub fn of(offer: &capstan_proto::TaskOffer) -> Self {
        RunPlace {
            stage: offer.stage.clone(),
            sequence: offer.sequence.clone(),
            service: offer.service.clone(),
            context_id: offer.context_id.clone(),
        }
    }
}

/// One awarded attempt as the handler sees it.
#[derive(Debug, Clone)]
pub struct TaskContext {
    award: Award,
    worker_id: String,
    cancel: CancelSignal,
    place: Option<RunPlace>,
}

impl TaskContext {
    /// A context for an award; the worker makes these, tests and embedders may too.
    pub fn new(award: Award, worker_id: impl Into<String>, cancel: CancelSignal) -> Self {
        TaskContext { award, worker_id: worker_id.into(), cancel, place: None }
    }

    /// Adds where the run stands (known when the worker saw the offer).
    pub fn with_place(mut self, place: Option<RunPlace>) -> Self {
        self.place = place;
        self
    }

    /// Where the run stands, if the worker saw the attempt's offer (not after a restart).
    pub fn place(&self) -> Option<&RunPlace> {
        self.place.as_ref()
    }

    /// The award: attempt reference, token, task type, input and budgets.
    pub fn award(&self) -> &Award {
        &self.award
    }

    /// The task's input (trigger data, dependency outputs and properties).
    pub fn input(&self) -> &Value {
        &self.award.input
    }

    /// A task property: `input.properties.<name>` if the input has a `properties` object, else
    /// `input.<name>`.
    pub fn property(&self, name: &str) -> Option<&Value> {
        let input = &self.award.input;
        match input.get("properties") {
            Some(Value::Object(props)) => props.get(name).or_else(|| input.get(name)),
            _ => input.get(name),
        }
        .filter(|v| !v.is_null())
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.award.attempt.run_id
    }

    /// The attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.award.attempt.attempt
    }

    /// The id of the worker running the attempt.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The start-to-close budget, if the task has one.
    pub fn start_to_close(&self) -> Option<Duration> {
        self.award.start_to_close_ms.map(Duration::from_millis)
    }

    /// Whether the attempt was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Completes when the attempt is cancelled.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}
