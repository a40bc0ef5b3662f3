//! The partition's two-stage pipeline: while one batch commits (in a task of its own), the next
//! may be decided on top of its states; see the module doc of `partition` for when and why.
//! With nothing waiting to be decided, a batch commits in the partition's own task: handing it
//! to another task costs two thread wake-ups per commit, which at one run in flight had moved
//! the median step from 1 ms to 2 ms.

use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_store::Committed;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

use super::{Envelope, FaultPoint, Partition, Prepared, TimerCancel, answer};

/// How often an idle partition looks whether its timers or checkpoint need a write.
const IDLE_LOOK_MS: i64 = 1_000;

/// A batch whose commit is under way in a task of its own.
struct InFlight {
    envs: Vec<Envelope>,
    prepared: Prepared,
    commit: JoinHandle<capstan_store::Result<Committed>>,
}

impl Partition {
    /// Applies inputs until the channel closes or shutdown is signalled; the batches in hand
    /// (the one committing and the one decided behind it) are always finished first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut inflight: Option<InFlight> = None;
        // Decided while `inflight` commits; handed to the store once that one is committed.
        let mut next: Option<(Vec<Envelope>, Prepared)> = None;
        loop {
            // When an idle partition must write kept timers or its checkpoint: at least a few ms
            // away (a clock that does not move cannot spin the loop), and at most a second, to
            // see whether other partitions moved the end of the log (`Deferred::idle`).
            let log_end = self.shared.log_end.load(Ordering::Relaxed);
            let now_ms = self.shared.clock.now_ms();
            self.note_relayed();
            let wake = self.deferred.wake_at(log_end).map_or(IDLE_LOOK_MS, |at| (at - now_ms).clamp(5, IDLE_LOOK_MS));
            tokio::select! {
                biased;
                done = async { (&mut inflight.as_mut().expect("guarded").commit).await }, if inflight.is_some() => {
                    let InFlight { envs, prepared, .. } = inflight.take().expect("guarded");
                    inflight = self.after_commit(envs, prepared, joined(done), next.take()).await;
                }
                env = self.rx.recv(), if next.is_none() && self.may_decide_ahead(inflight.as_ref()) => {
                    let Some(first) = env else { break };
                    // Over a store committing side by side, wait for a slot first: the inputs
                    // queued meanwhile join this batch (see `RuntimeConfig::commit_slots`).
                    let shared = self.shared.clone();
                    let _slot = match &shared.commit_slots {
                        Some(slots) => Some(slots.acquire().await.expect("the slots are never closed")),
                        None => None,
                    };
                    let envs = self.gather(first);
                    match self.prepare(&envs).await {
                        Ok(prepared) if inflight.is_none() => inflight = self.launch(envs, prepared).await,
                        Ok(prepared) => next = Some((envs, prepared)),
                        Err(e) => {
                            // Deciding could not read the store: finish the batch in flight,
                            // then this one the slow way, which retries or refuses with reasons.
                            debug!(partition = self.id, error = %e, "deciding a batch failed");
                            if let Some(InFlight { envs, prepared, commit }) = inflight.take() {
                                inflight = self.after_commit(envs, prepared, joined(commit.await), None).await;
                            }
                            self.process(envs).await;
                        }
                    }
                }
                // Idle: write the kept timers that are due to be written, and the checkpoint.
                _ = tokio::time::sleep(Duration::from_millis(wake as u64)), if inflight.is_none() && next.is_none() => {
                    let log_end = self.shared.log_end.load(Ordering::Relaxed);
                    self.deferred.idle(log_end);
                    if self.deferred.wake_at(log_end).is_some_and(|at| at <= self.shared.clock.now_ms()) {
                        self.process(Vec::new()).await;
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        while let Some(InFlight { envs, prepared, commit }) = inflight.take() {
            inflight = self.after_commit(envs, prepared, joined(commit.await), next.take()).await;
        }
    }

    /// Whether to take the next batch now: always when nothing commits. While a batch commits,
    /// only with a store that serializes commits (SQLite: one writer, which deciding ahead keeps
    /// busy), and only once at least half as many inputs wait as that batch holds. Deciding
    /// ahead on a few inputs splits the load into more, smaller commits, more work per input
    /// for the database without more throughput: PostgreSQL (whose partitions already commit
    /// side by side) lost 17 % with memory and 4-7 % with NATS that way.
    fn may_decide_ahead(&self, inflight: Option<&InFlight>) -> bool {
        inflight.is_none_or(|f| self.decide_ahead && self.rx.len() * 2 >= f.envs.len().min(self.max_batch))
    }

    /// The first envelope and whatever else is queued, up to a batch.
    fn gather(&mut self, first: Envelope) -> Vec<Envelope> {
        let mut envs = vec![first];
        while envs.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(e) => envs.push(e),
                Err(_) => break,
            }
        }
        envs
    }

    /// Hands a decided batch to the store: in a task of its own when inputs wait that could be
    /// decided meanwhile, else right here. A batch that changed nothing is finished at once.
    async fn launch(&mut self, envs: Vec<Envelope>, mut prepared: Prepared) -> Option<InFlight> {
        self.shared.faults.point(FaultPoint::MidBatch).await;
        if prepared.batch.is_empty() {
            self.finish(envs, prepared, None).await;
            return None;
        }
        if !self.decide_ahead || self.rx.is_empty() {
            let batch = std::mem::take(&mut prepared.batch);
            let done = self.shared.store.commit(batch).await.map_err(|e| e.to_string());
            return Box::pin(self.after_commit(envs, prepared, done, None)).await;
        }
        Some(self.spawn_commit(envs, prepared))
    }

    /// Starts a decided batch's commit in a task of its own.
    fn spawn_commit(&mut self, envs: Vec<Envelope>, mut prepared: Prepared) -> InFlight {
        let batch = std::mem::take(&mut prepared.batch);
        self.inflight_inputs = batch.inputs.iter().cloned().collect();
        self.inflight_evaluations = batch.evaluations.clone();
        let store = self.shared.store.clone();
        let commit = tokio::spawn(async move { store.commit(batch).await });
        InFlight { envs, prepared, commit }
    }

    /// Finishes a batch whose commit returned and launches the one decided behind it. A failed
    /// commit drops every state decided ahead of the store and applies both batches again, in
    /// order, the slow way.
    async fn after_commit(
        &mut self,
        envs: Vec<Envelope>,
        prepared: Prepared,
        done: Result<Committed, String>,
        next: Option<(Vec<Envelope>, Prepared)>,
    ) -> Option<InFlight> {
        self.inflight_inputs.clear();
        self.inflight_evaluations.clear();
        let committed = match done {
            Ok(committed) => committed,
            Err(error) => {
                debug!(partition = self.id, error, "commit failed; applying the batch again");
                self.forget_states(&prepared.runs);
                let mut again = None;
                // Undone newest first: the batch decided ahead changed the kept timers last.
                if let Some((next_envs, next)) = next {
                    self.forget_states(&next.runs);
                    self.deferred.undo(next.undo);
                    again = Some(next_envs);
                }
                self.deferred.undo(prepared.undo);
                self.commit_failed(&prepared.outgoing, prepared.timers_kept > 0, &prepared.runs);
                self.process(envs).await;
                if let Some(envs) = again {
                    self.process(envs).await;
                }
                return None;
            }
        };
        let committed = Some(committed);
        match next {
            // The batch decided ahead goes to the writer first, so it does not sit idle while
            // this one's messages and answers go out (their order is kept: the next batch
            // finishes after this one).
            Some((next_envs, next_prepared)) if !next_prepared.batch.is_empty() => {
                self.shared.faults.point(FaultPoint::MidBatch).await;
                let inflight = self.spawn_commit(next_envs, next_prepared);
                self.finish(envs, prepared, committed).await;
                Some(inflight)
            }
            Some((next_envs, next_prepared)) => {
                self.finish(envs, prepared, committed).await;
                self.launch(next_envs, next_prepared).await
            }
            None => {
                self.finish(envs, prepared, committed).await;
                None
            }
        }
    }

    /// Publishes what a batch produced, answers its inputs and releases its timers.
    async fn finish(&mut self, envs: Vec<Envelope>, prepared: Prepared, committed: Option<Committed>) {
        let consumed: Vec<TimerCancel> = envs.iter().filter_map(|e| e.consumed_timer.clone()).collect();
        let outcomes = self.published(prepared, committed).await;
        for (env, outcome) in envs.into_iter().zip(outcomes) {
            answer(&self.shared.faults, env.reply, outcome).await;
        }
        self.shared.forget_timers(&consumed);
    }
}

/// A commit task's outcome, with a task that died counted as a failed commit.
fn joined(done: Result<capstan_store::Result<Committed>, tokio::task::JoinError>) -> Result<Committed, String> {
    match done {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the commit task failed: {e}")),
    }
}
