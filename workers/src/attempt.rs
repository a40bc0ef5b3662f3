//! The worker's voice and the life of one awarded attempt: `started`, heartbeats while the
//! handler runs, then `finished` with the fencing token (nothing after a cancellation, which the
//! engine decided and needs no report of).

use std::sync::Arc;
use std::time::Duration;

use capstan_brokers::{Broker, Delivery, Error as BrokerError, Message};
use capstan_proto::{AttemptRef, Award, Finished, Progress, TaskError, TaskResult, WorkerInfo, ext, topics, types};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::gather::Gather;
use crate::handler::{CancelSignal, Handler, Outcome, RunPlace, TaskContext};
use crate::journal::Journal;

/// Reports that an attempt started; `false` if it could not. A failure is only logged: the
/// handler runs anyway, and the engine hears of the attempt through heartbeats or `finished`,
/// or times it out and fences it off, which makes the result moot but harmless.
async fn send_started(emitter: &Emitter, attempt: &AttemptRef, token: u64, progress: &Progress) -> bool {
    match emitter.send(types::TASK_STARTED, attempt, Some(token), progress).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, task = %attempt.task, "could not send started");
            false
        }
    }
}

/// Builds and sends the worker's CloudEvents to the engine: over a broker that packs messages,
/// gathered into packs (see `gather`).
#[derive(Clone)]
pub(crate) struct Emitter {
    broker: Arc<dyn Broker>,
    gather: Option<Gather>,
    worker: WorkerInfo,
    source: String,
}

impl Emitter {
    pub(crate) fn new(broker: Arc<dyn Broker>, worker: WorkerInfo) -> Self {
        let source = format!("capstan/worker/{}", worker.id);
        let gather = broker.packs().then(|| Gather::start(Arc::clone(&broker)));
        Emitter { broker, gather, worker, source }
    }

    /// Publishes one message; returns once the broker confirmed it.
    pub(crate) async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        match &self.gather {
            Some(gather) => gather.publish(message).await,
            None => self.broker.publish(vec![message]).await,
        }
    }

    pub(crate) fn worker(&self) -> &WorkerInfo {
        &self.worker
    }

    /// An engine input about `attempt`, keyed by its run id, with the protocol's extensions.
    pub(crate) fn message(
        &self,
        ty: &str,
        attempt: &AttemptRef,
        token: Option<u64>,
        data: &impl Serialize,
    ) -> crate::Result<Message> {
        let mut event = capstan_proto::CloudEvent::new(uuid::Uuid::now_v7().to_string(), &self.source, ty)
            .with_payload(data)?
            .with_ext(ext::PROJECT, &attempt.project)
            .with_ext(ext::RUN, &attempt.run_id)
            .with_ext(ext::TASK, &attempt.task)
            .with_ext(ext::ATTEMPT, attempt.attempt)
            .with_ext(ext::WORKER, &self.worker.id);
        if let Some(token) = token {
            event = event.with_ext(ext::TOKEN, token);
        }
        event.subject = Some(attempt.task.clone());
        Ok(Message { topic: topics::ENGINE_INPUTS.to_string(), key: attempt.run_id.clone(), event })
    }

    /// Sends one engine input.
    pub(crate) async fn send(
        &self,
        ty: &str,
        attempt: &AttemptRef,
        token: Option<u64>,
        data: &impl Serialize,
    ) -> crate::Result<()> {
        let message = self.message(ty, attempt, token, data)?;
        self.publish(message).await?;
        Ok(())
    }

    /// Sends `finished`, retrying while the broker is unavailable: losing a result costs the
    /// engine a whole timeout and the task a retry. An output over the broker's limit is replaced
    /// by an `output-too-large` error so the engine still learns how the attempt ended. `false`
    /// if it gave up.
    async fn send_finished(&self, mut finished: Finished) -> bool {
        let mut backoff = Duration::from_millis(100);
        for _ in 0..5 {
            match self.send(types::TASK_FINISHED, &finished.attempt.clone(), Some(finished.token), &finished).await {
                Ok(()) => return true,
                Err(crate::Error::Broker(BrokerError::TooLarge { size, limit })) => {
                    tracing::warn!(size, limit, task = %finished.attempt.task, "output too large for the broker");
                    finished.result = TaskResult::Fail;
                    finished.output = Value::Null;
                    finished.error = Some(TaskError {
                        kind: "output-too-large".into(),
                        message: format!("the result of {size} bytes exceeds the broker's limit of {limit}"),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, task = %finished.attempt.task, "could not send finished; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 4;
                }
            }
        }
        tracing::error!(task = %finished.attempt.task, run = %finished.attempt.run_id, "gave up sending finished");
        false
    }
}

/// That an attempt ended, for the worker's loop.
pub(crate) struct Done {
    pub(crate) attempt: AttemptRef,
    /// The claim-free offer of an attempt that ended unreported, for the loop to hand back
    /// once it has forgotten the attempt (else the offer could come again before that, and
    /// be taken for a copy of an attempt still running).
    pub(crate) lease: Option<Delivery>,
}

/// Tells the worker's loop that an attempt ended, even if its task panicked or was aborted.
/// It also holds the delivery of a claim-free offer, the attempt's lease: acked once the
/// attempt's first report is out (the engine then knows who holds it); a lease still held when
/// the attempt ends goes back with [`Done`], so that another member runs the offer.
pub(crate) struct DoneGuard {
    pub(crate) tx: mpsc::UnboundedSender<Done>,
    pub(crate) attempt: AttemptRef,
    pub(crate) lease: Option<Delivery>,
}

impl DoneGuard {
    /// The attempt reported: its claim-free offer, if any, is done with.
    async fn reported(&mut self) {
        if let Some(delivery) = self.lease.take()
            && let Err(e) = delivery.ack().await
        {
            tracing::warn!(error = %e, "could not ack a claim-free offer");
        }
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        // The loop is gone only when the worker stopped; then nobody needs to know, and the
        // offer, dropped unsettled, goes back to the broker by itself.
        let _ = self.tx.send(Done { attempt: self.attempt.clone(), lease: self.lease.take() });
    }
}

/// Runs an awarded attempt to its end; meant to be spawned, one task per attempt.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_attempt(
    emitter: Emitter,
    journal: Option<Journal>,
    handler: Arc<dyn Handler>,
    award: Award,
    place: Option<RunPlace>,
    cancel: CancelSignal,
    cancel_grace: Duration,
    started_after: Duration,
    mut done: DoneGuard,
) {
    let attempt = award.attempt.clone();
    let token = award.token;
    let worker_id = emitter.worker().id.clone();
    let progress = Progress { attempt: attempt.clone(), worker_id: worker_id.clone(), token };
    if let Some(journal) = &journal
        && let Err(e) = journal.record(&attempt, token).await
    {
        // Starting without the record could start the award twice; failing it lets the engine
        // retry elsewhere (the handler never ran, so even a non-idempotent task may be retried).
        tracing::error!(error = %e, task = %attempt.task, run = %attempt.run_id, "not starting an award the journal could not record");
        let error = TaskError { kind: "worker-journal".into(), message: e.to_string() };
        let finished =
            Finished { attempt, worker_id, token, result: TaskResult::Fail, output: Value::Null, error: Some(error) };
        if emitter.send_finished(finished).await {
            done.reported().await;
        }
        drop(done);
        return;
    }
    let heartbeat = award.heartbeat_ms.map(|ms| Duration::from_millis((ms / 3).max(1)));
    // `started` goes out before the handler runs, or once it has run `started_after` (never
    // later than the first heartbeat would be due); a handler done sooner reports only `finished`.
    let started_after = heartbeat.map_or(started_after, |period| started_after.min(period));
    let mut started = started_after.is_zero();
    if started && send_started(&emitter, &attempt, token, &progress).await {
        done.reported().await;
    }
    let ctx = TaskContext::new(award, worker_id.clone(), cancel.clone()).with_place(place);
    // The handler runs in its own task so that a panic in it becomes a reported error and an
    // abort after the cancel grace really stops it (dropping a child process with it).
    let mut task = tokio::spawn({
        let handler = Arc::clone(&handler);
        async move { handler.handle(ctx).await }
    });
    let far = Duration::from_secs(86_400 * 365);
    let started_due = tokio::time::sleep(started_after);
    tokio::pin!(started_due);
    let period = heartbeat.unwrap_or(far);
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let joined = loop {
        tokio::select! {
            biased;
            joined = &mut task => break Some(joined),
            _ = &mut started_due, if !started => {
                started = true;
                if send_started(&emitter, &attempt, token, &progress).await {
                    done.reported().await;
                }
            }
            _ = ticks.tick(), if heartbeat.is_some() => {
                if let Err(e) = emitter.send(types::TASK_HEARTBEAT, &attempt, Some(token), &progress).await {
                    tracing::warn!(error = %e, task = %attempt.task, "could not send heartbeat");
                }
            }
            _ = cancel.cancelled() => {
                if tokio::time::timeout(cancel_grace, &mut task).await.is_err() {
                    tracing::warn!(task = %attempt.task, "handler ignored cancellation; aborting it");
                    task.abort();
                }
                break None;
            }
        }
    };
    // A handler that returned because of the cancellation (or just as it came) reports
    // nothing: the engine ended the attempt and would only reject the result.
    let Some(joined) = joined.filter(|_| !cancel.is_cancelled()) else {
        tracing::info!(task = %attempt.task, run = %attempt.run_id, "attempt cancelled");
        drop(done);
        return;
    };
    let outcome = joined.unwrap_or_else(|e| {
        tracing::error!(error = %e, task = %attempt.task, "handler panicked");
        Outcome::error("panic", format!("the handler panicked: {e}"))
    });
    let (result, output, error) = match outcome {
        Outcome::Finished { result, output } => (result, output, None),
        Outcome::Error(error) => (TaskResult::Fail, json!(null), Some(error)),
    };
    let finished = Finished { attempt, worker_id, token, result, output, error };
    if emitter.send_finished(finished).await {
        done.reported().await;
    }
    drop(done);
}
