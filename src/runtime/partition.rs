//! A partition owns a set of runs (by hash of run id) and applies their inputs in batches: load
//! or fold each run's state, let the engine decide, then commit the events, run index rows,
//! outbox rows, timer changes and processed input ids of the WHOLE batch in one transaction
//! (group commit). Only after the commit are inputs acknowledged and callers answered.
//!
//! Batching adapts to load without a fixed linger: a partition takes everything queued when it
//! becomes free, so an idle engine commits each input at once and a busy one commits many inputs
//! per transaction while the previous commit is in flight.
//!
//! Deciding and committing overlap (a two-stage pipeline, `pipeline.rs`) over a store that
//! serializes commits, once enough inputs wait: while batch N commits, the partition decides
//! batch N+1 on top of N's states, which go back into the cache as soon as they are decided. N+1 is handed to the store only once N is known to be committed; if N fails, N+1 is
//! thrown away undecided, the states of both are dropped from the cache (the store is the truth)
//! and both are applied again one after the other the slow way. A state that left the cache
//! early (evicted) is folded from the store without N's events, so N+1's append then fails its
//! expected-version check rather than write over N.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_engine::Timestamp;
use capstan_engine::run::{Ctx, Effect, Event, RunMeta, RunState, RunStatus};
use capstan_store::{Batch, Committed, EvaluationRecord, RunRecord, StoredEvent, StreamAppend, TimerCancel, TimerRow};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::cache::RunCache;
use super::codec;
use super::error::RuntimeError;
use super::faults::{FaultPoint, Faults};
use super::lanes::LaneNote;
use super::outbox_relay::Outgoing;
use super::{Envelope, Reply, Shared};
use gates::{evaluation_record, is_gate, with_previous};

mod deferred;
mod derived;
mod gates;
mod load;
mod pipeline;

pub(super) use load::fold;

use deferred::{DEFER_MIN_MS, Deferred, Setting, Undo};

/// What happened to one input.
#[derive(Debug)]
pub enum Outcome {
    Applied(Applied),
    Refused(RuntimeError),
    Duplicate,
}

/// A successfully applied input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub run_id: String,
    /// Events this input appended (0 for inputs that changed nothing).
    pub events: usize,
    /// The run's version after the input.
    pub version: u64,
}

/// A run being changed by the current batch.
struct Work {
    state: RunState,
    base_version: i64,
    created_at_ms: i64,
    status: &'static str,
    /// Whether the run index row must be written (start, pause, resume, end). Other events do
    /// not change it, and rewriting the heavily indexed row per event is the costliest write.
    index_dirty: bool,
    events: Vec<capstan_store::NewEvent>,
}

/// A decided batch: what to commit, and what to do once it is committed.
struct Prepared {
    outcomes: Vec<Outcome>,
    batch: Batch,
    /// Inputs in the batch, and events it appends (for the metrics).
    inputs: usize,
    event_count: usize,
    /// Runs whose decided states went back into the cache ahead of the commit.
    runs: Vec<String>,
    lane_notes: Vec<LaneNote>,
    /// The messages of `batch.outbox`, and those without rows (`codec::is_advisory`), for the
    /// relay to publish from memory once the batch is committed.
    outgoing: Outgoing,
    earliest_timer: Option<i64>,
    /// What the batch changed among the timers kept in memory.
    undo: Undo,
    /// Timers the batch kept in memory, and timer rows it writes.
    timers_kept: usize,
    timers_written: usize,
}

/// The partition service: `run` until shutdown.
pub struct Partition {
    pub id: usize,
    pub rx: mpsc::Receiver<Envelope>,
    pub shared: Arc<Shared>,
    pub cache: RunCache,
    pub max_batch: usize,
    rng: u64,
    /// Input ids of the batch being committed: duplicates to a batch decided meanwhile.
    inflight_inputs: HashSet<String>,
    /// Gate evaluations of the batch being committed.
    inflight_evaluations: Vec<EvaluationRecord>,
    /// Whether a batch may be decided while the previous one commits (see `may_decide_ahead`).
    decide_ahead: bool,
    /// Timers kept in memory until they have lived a while (`deferred.rs`).
    deferred: Deferred,
    /// After a failed commit: the runs whose derived messages it carried or whose timers it kept
    /// in memory, and the hold that keeps the checkpoint before it. The store may have written
    /// it all the same (a lost reply), and the inputs then decide nothing when applied again, so
    /// the timers and messages are derived again from the stored states (`resend_derived`).
    resend: Option<(u64, HashSet<String>)>,
}

impl Partition {
    /// A partition reading envelopes from `rx`.
    pub fn new(
        id: usize,
        rx: mpsc::Receiver<Envelope>,
        shared: Arc<Shared>,
        cache_bytes: usize,
        max_batch: usize,
    ) -> Self {
        let seed = shared.clock.now_ms() as u64 ^ ((id as u64 + 1) << 48);
        let decide_ahead = shared.store.serializes_commits();
        // Every timer before the end of the log at start is in the store (recovery.rs).
        let deferred = Deferred::new(shared.log_end.load(Ordering::Relaxed));
        Partition {
            id,
            rx,
            shared,
            cache: RunCache::new(cache_bytes),
            max_batch,
            rng: seed,
            inflight_inputs: HashSet::new(),
            inflight_evaluations: Vec::new(),
            decide_ahead,
            deferred,
            resend: None,
        }
    }

    /// Drops states decided ahead of a commit that failed: they are folded again from the store.
    fn forget_states(&mut self, runs: &[String]) {
        for run_id in runs {
            self.cache.take(run_id);
        }
    }

    /// Applies a batch; whatever happens, the timers it carried are no longer in flight
    /// afterwards (a timer whose input was not committed fires again from the store).
    async fn process(&mut self, envs: Vec<Envelope>) {
        let consumed: Vec<TimerCancel> = envs.iter().filter_map(|e| e.consumed_timer.clone()).collect();
        self.process_inner(envs).await;
        self.shared.forget_timers(&consumed);
        if let Some((hold, runs)) = self.resend.take() {
            self.resend_derived(hold, runs).await;
        }
    }

    /// Applies a batch, splitting it when one input spoils the commit of the others.
    async fn process_inner(&mut self, envs: Vec<Envelope>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.attempt(&envs).await {
                Ok(outcomes) => {
                    for (env, outcome) in envs.into_iter().zip(outcomes) {
                        answer(&self.shared.faults, env.reply, outcome).await;
                    }
                    return;
                }
                Err(RuntimeError::Store(capstan_store::Error::Conflict { .. }))
                | Err(RuntimeError::Store(capstan_store::Error::DuplicateInput(_)))
                    if envs.len() > 1 =>
                {
                    // One input's conflict must not hold up the others: apply them one by one.
                    for env in envs {
                        Box::pin(self.process_inner(vec![env])).await;
                    }
                    return;
                }
                Err(RuntimeError::Store(capstan_store::Error::DuplicateInput(id))) => {
                    debug!(partition = self.id, %id, "input already applied");
                    let env = envs.into_iter().next().expect("one envelope");
                    answer(&self.shared.faults, env.reply, Outcome::Duplicate).await;
                    return;
                }
                Err(RuntimeError::Store(capstan_store::Error::Unavailable(e))) => {
                    // The store is the truth: without it nothing may be acknowledged. Hold the
                    // inputs and retry; brokers redeliver if we die meanwhile.
                    warn!(partition = self.id, error = %e, ?backoff, "store unavailable; retrying batch");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(RuntimeError::Store(capstan_store::Error::Conflict { run_id, expected, actual })) => {
                    // Someone else wrote this run (another server took over): reload and retry.
                    warn!(partition = self.id, %run_id, expected, actual, "version conflict; reloading run");
                    if backoff > Duration::from_secs(2) {
                        let env = envs.into_iter().next().expect("one envelope");
                        let err = RuntimeError::Store(capstan_store::Error::Conflict { run_id, expected, actual });
                        answer(&self.shared.faults, env.reply, Outcome::Refused(err)).await;
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(other) => {
                    // Not retryable (unreadable history, invalid store data): refuse every input
                    // of the batch with the reason rather than loop.
                    warn!(partition = self.id, error = %other, "batch failed");
                    let text = other.to_string();
                    for env in envs {
                        let err = RuntimeError::NotFound(format!("a usable state ({text})"));
                        answer(&self.shared.faults, env.reply, Outcome::Refused(err)).await;
                    }
                    return;
                }
            }
        }
    }

    /// Decides every input of the batch and commits the result, with nothing else in flight.
    async fn attempt(&mut self, envs: &[Envelope]) -> Result<Vec<Outcome>, RuntimeError> {
        let mut prepared = self.prepare(envs).await?;
        self.shared.faults.point(FaultPoint::MidBatch).await;
        let committed = !prepared.batch.is_empty();
        let mut done = None;
        if committed {
            match self.shared.store.commit(std::mem::take(&mut prepared.batch)).await {
                Ok(c) => done = Some(c),
                Err(e) => {
                    self.forget_states(&prepared.runs);
                    self.deferred.undo(prepared.undo);
                    self.commit_failed(&prepared.outgoing, prepared.timers_kept > 0, &prepared.runs);
                    return Err(e.into());
                }
            }
        }
        Ok(self.published(prepared, done).await)
    }

    /// After the commit (if the batch had anything to commit): hands the lane service, the
    /// outbox relay and the timer service their part, and returns the inputs' outcomes.
    async fn published(&mut self, mut prepared: Prepared, committed: Option<Committed>) -> Vec<Outcome> {
        self.deferred.settled(prepared.undo, committed);
        if let Some(c) = committed.filter(|c| c.events > 0 && !prepared.outgoing.derived.is_empty()) {
            // Derived messages only come with events: the commit is after the checkpoint.
            let hold = self.deferred.hold(c.last_position - c.events as i64);
            prepared.outgoing.held = Some((self.id, hold));
        }
        if let Some(c) = committed.filter(|c| c.events > 0) {
            self.shared.log_end.fetch_max(c.last_position, Ordering::Relaxed);
        }
        if committed.is_some() {
            self.shared.faults.point(FaultPoint::AfterCommit).await;
            self.shared.metrics.record_commit(prepared.inputs, prepared.event_count);
            self.shared.metrics.timers_written.fetch_add(prepared.timers_written as u64, Ordering::Relaxed);
        }
        self.shared.metrics.timers_kept.fetch_add(prepared.timers_kept as u64, Ordering::Relaxed);
        self.write_checkpoint();
        for note in prepared.lane_notes {
            // The lane service may be gone at shutdown; it rebuilds from the run index.
            let _ = self.shared.lane_tx.send(note);
        }
        if !prepared.outgoing.is_empty() {
            // The relay may be gone at shutdown; the rows are in the table for the next start,
            // and the derived messages, held behind the checkpoint, are derived again then.
            let _ = self.shared.outbox_tx.send(prepared.outgoing);
        }
        if let Some(at) = prepared.earliest_timer {
            self.shared.timer_wake(at);
        }
        prepared.outcomes
    }

    /// Decides every input of the batch on top of the cached states (those of a batch still
    /// committing included) and puts the new states back into the cache at once; a caller whose
    /// commit then fails must drop them with [`Self::forget_states`].
    async fn prepare(&mut self, envs: &[Envelope]) -> Result<Prepared, RuntimeError> {
        let now_ms = self.shared.clock.now_ms();
        let time = codec::rfc3339(now_ms);
        let ids: Vec<String> = envs.iter().filter_map(|e| e.recorded_id().cloned()).collect();
        // Which inputs were applied before, and the streams of the runs in no cache: two reads
        // at once, each one round trip for the whole batch.
        let mut streams: HashMap<String, Vec<StoredEvent>> =
            envs.iter().filter(|e| !self.cache.contains(&e.run_id)).map(|e| (e.run_id.clone(), Vec::new())).collect();
        let uncached: Vec<String> = streams.keys().cloned().collect();
        let store = &self.shared.store;
        let (seen, stored) = tokio::try_join!(
            async { if ids.is_empty() { Ok(Vec::new()) } else { store.inputs_seen(&ids).await } },
            async { if uncached.is_empty() { Ok(Vec::new()) } else { store.read_streams(&uncached).await } },
        )?;
        let mut seen: HashSet<String> = seen.into_iter().collect();
        for event in stored {
            if let Some(stream) = streams.get_mut(&event.run_id) {
                stream.push(event);
            }
        }
        seen.extend(ids.iter().filter(|id| self.inflight_inputs.contains(*id)).cloned());

        let mut work: HashMap<String, Work> = HashMap::new();
        let mut outcomes = Vec::with_capacity(envs.len());
        let mut batch = Batch { inputs_at_ms: now_ms, ..Batch::default() };
        let mut outgoing = Outgoing::default();
        // Last write wins per timer key, in effect order; None means "delete". A set carries
        // whether it may be kept in memory (see `deferred.rs`).
        let mut timers: BTreeMap<(String, String), Option<Setting>> = BTreeMap::new();
        let mut guarded: Vec<TimerCancel> = Vec::new();
        let mut lane_notes: Vec<LaneNote> = Vec::new();

        for env in envs {
            if let Some(t) = &env.consumed_timer {
                guarded.push(t.clone());
            }
            if let Some(id) = env.recorded_id()
                && !seen.insert(id.clone())
            {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            if !work.contains_key(&env.run_id) {
                match self.load(&env.run_id, &env.input, streams.remove(&env.run_id)).await {
                    Ok(w) => {
                        work.insert(env.run_id.clone(), w);
                    }
                    Err(e) => {
                        outcomes.push(Outcome::Refused(e));
                        continue;
                    }
                }
            }
            let w = work.get_mut(&env.run_id).expect("loaded above");
            if let (Some(project), Some(meta)) = (&env.project, w.state.meta())
                && &meta.project != project
            {
                outcomes.push(Outcome::Refused(RuntimeError::WrongProject { run_id: env.run_id.clone() }));
                continue;
            }
            let ctx = Ctx { now: Timestamp(now_ms as u64), random: self.next_random() };
            // Decided on the working state itself, which takes in the events as they are
            // decided; an input that does not apply leaves it as it was.
            let decision = match w.state.apply(&env.input, &ctx) {
                Ok(d) => d,
                Err(e) => {
                    outcomes.push(Outcome::Refused(e.into()));
                    continue;
                }
            };
            for event in &decision.events {
                w.events.push(codec::encode_event(event, now_ms));
                let status = match event {
                    Event::RunStarted { .. } => {
                        w.created_at_ms = now_ms;
                        Some("running")
                    }
                    Event::RunQueued { .. } => Some("queued"),
                    Event::RunAdmitted { .. } => Some("running"),
                    Event::RunPaused { .. } => Some("paused"),
                    Event::RunResumed { .. } => Some("running"),
                    Event::RunFinished { status: RunStatus::Finished, .. } => Some("finished"),
                    Event::RunFinished { status: RunStatus::Cancelled, .. } => Some("cancelled"),
                    _ => None,
                };
                if let Some(status) = status {
                    w.status = status;
                    w.index_dirty = true;
                }
                if let Some(note) = lane_note(&w.state, event) {
                    lane_notes.push(note);
                }
                if let Some(record) = evaluation_record(&w.state, event, now_ms) {
                    batch.evaluations.push(record);
                }
            }
            if !decision.events.is_empty()
                && let Some(id) = env.recorded_id()
            {
                batch.inputs.push(id.clone());
            }
            let meta = w.state.meta().ok_or(RuntimeError::Refused(capstan_engine::run::Error::NotStarted))?;
            for effect in &decision.effects {
                match effect {
                    Effect::SetTimer { kind, at } => {
                        // Kept in memory only when a crash cannot lose it for good: the engine
                        // derives it from the state, and this commit's events for the run put
                        // the run after the checkpoint.
                        let keep = !decision.events.is_empty()
                            && w.state.derives(kind)
                            && at.0 as i64 >= now_ms + DEFER_MIN_MS;
                        let setting = match keep {
                            true => Setting::Keep { kind: kind.clone(), fire_at_ms: at.0 as i64 },
                            false => Setting::Write(codec::engine_timer_row(&env.run_id, kind, *at)),
                        };
                        timers.insert((env.run_id.clone(), kind.key()), Some(setting));
                    }
                    Effect::CancelTimer { kind } => {
                        timers.insert((env.run_id.clone(), kind.key()), None);
                    }
                    Effect::StartRun { context_id, project, stage, sequence, service, data, triggered_by } => {
                        let child = RunMeta {
                            run_id: codec::promoted_run_id(triggered_by, stage, sequence),
                            context_id: context_id.clone(),
                            project: project.clone(),
                            stage: stage.clone(),
                            sequence: sequence.clone(),
                            service: service.clone(),
                            definition: meta.definition.clone(),
                            definition_version: meta.definition_version,
                            triggered_by: Some(triggered_by.clone()),
                        };
                        let row = codec::start_run_row(&env.run_id, &child, data, now_ms);
                        timers.insert((row.run_id.clone(), row.key.clone()), Some(Setting::Write(row)));
                    }
                    other => {
                        let gate;
                        let effect = if is_gate(other) {
                            let previous = self.previous_evaluations(meta, &batch.evaluations).await?;
                            gate = with_previous(other, previous);
                            &gate
                        } else {
                            other
                        };
                        if let Some(message) = codec::effect_message(meta, effect, &time) {
                            if codec::is_advisory(effect) {
                                outgoing.advisory.push(message);
                            } else if codec::is_derived(effect) {
                                outgoing.derived.push(message);
                            } else {
                                batch.outbox.push(codec::outbox_row(&message));
                                outgoing.stored.push(message);
                            }
                        }
                    }
                }
            }
            outcomes.push(Outcome::Applied(Applied {
                run_id: env.run_id.clone(),
                events: decision.events.len(),
                version: w.state.version(),
            }));
        }

        // Nothing above may fail from here on: the kept timers change with no way back but
        // `undo`.
        let mut undo = Undo::default();
        let mut written: Vec<TimerRow> = Vec::new();
        let mut timers_kept = 0;
        for (key, row) in timers {
            match row {
                Some(Setting::Keep { kind, fire_at_ms }) => {
                    // The fired row this may replace is deleted by its guard, kept below.
                    match self.deferred.keep(key, kind, fire_at_ms, now_ms, &mut undo) {
                        Some(row) => written.push(row),
                        None => timers_kept += 1,
                    }
                }
                Some(Setting::Write(row)) => {
                    self.deferred.write_through(&key, &mut undo);
                    written.push(row);
                }
                None => {
                    if self.deferred.cancel(&key, &mut undo) {
                        let (run_id, key) = key;
                        batch.cancel_timers.push(TimerCancel { run_id, key, only_if_fire_at: None });
                    }
                }
            }
        }
        self.deferred.flush_due(now_ms, &mut undo, &mut written);
        let mut earliest_timer: Option<i64> = None;
        for row in written {
            earliest_timer = Some(earliest_timer.map_or(row.fire_at_ms, |t| t.min(row.fire_at_ms)));
            guarded.retain(|g| !(g.run_id == row.run_id && g.key == row.key));
            batch.set_timers.push(row);
        }
        batch.cancel_timers.extend(guarded);

        for (run_id, w) in &mut work {
            if w.events.is_empty() {
                continue;
            }
            let meta = w.state.meta().expect("a run with events has started");
            if w.index_dirty {
                batch.runs.push(RunRecord {
                    run_id: run_id.clone(),
                    project: meta.project.clone(),
                    context_id: meta.context_id.clone(),
                    stage: meta.stage.clone(),
                    sequence: meta.sequence.clone(),
                    service: meta.service.clone(),
                    definition: meta.definition.clone(),
                    definition_version: i64::from(meta.definition_version),
                    status: w.status.to_string(),
                    result: w.state.result().map(|r| r.as_str().to_string()),
                    created_at_ms: w.created_at_ms,
                    updated_at_ms: now_ms,
                });
            }
            batch.appends.push(StreamAppend {
                run_id: run_id.clone(),
                expected_version: w.base_version,
                events: std::mem::take(&mut w.events),
            });
        }

        let event_count: usize = batch.appends.iter().map(|a| a.events.len()).sum();
        let mut runs = Vec::with_capacity(work.len());
        for (run_id, w) in work {
            let version = i64::try_from(w.state.version()).unwrap_or(i64::MAX);
            if !w.state.is_over() {
                runs.push(run_id.clone());
                let cached =
                    super::cache::Cached { state: w.state, version, created_at_ms: w.created_at_ms, status: w.status };
                let evicted = self.cache.put(run_id, cached);
                if evicted > 0 {
                    self.shared.metrics.runs_evicted.fetch_add(evicted as u64, Ordering::Relaxed);
                }
            }
        }
        let timers_written = batch.set_timers.len();
        Ok(Prepared {
            outcomes,
            batch,
            inputs: envs.len(),
            event_count,
            runs,
            lane_notes,
            outgoing,
            earliest_timer,
            undo,
            timers_kept,
            timers_written,
        })
    }

    /// splitmix64: the random draw handed to the engine for backoff jitter.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// What the lane service must hear of an event: a run with a service queued or ended.
fn lane_note(state: &RunState, event: &Event) -> Option<LaneNote> {
    let meta = state.meta()?;
    let service = meta.service.as_ref()?;
    let lane = (meta.project.clone(), meta.stage.clone(), service.clone());
    let run_id = meta.run_id.clone();
    match event {
        Event::RunQueued { .. } => Some(LaneNote::Queued { lane, run_id }),
        Event::RunFinished { .. } => Some(LaneNote::Ended { lane, run_id }),
        _ => None,
    }
}

/// Answers the sender of an input once its fate is sealed.
async fn answer(faults: &Faults, reply: Reply, outcome: Outcome) {
    match reply {
        Reply::None => {
            if let Outcome::Refused(e) = &outcome {
                debug!(error = %e, "input refused");
            }
        }
        Reply::Delivery(delivery) => {
            if let Outcome::Refused(e) = &outcome {
                // A worker's message that does not apply is settled too: redelivering it
                // would be refused again. The refusal is logged (and recorded by the engine
                // when it concerns a fencing token).
                debug!(error = %e, id = %delivery.message.event.id, "worker input refused");
            }
            faults.point(FaultPoint::BeforeAck).await;
            if let Err(e) = delivery.ack().await {
                warn!(error = %e, "ack failed; the broker will redeliver it and the run's state will recognise it");
            }
        }
        Reply::Api(tx) => {
            let result = match outcome {
                Outcome::Applied(a) => Ok(a),
                Outcome::Refused(e) => Err(e),
                Outcome::Duplicate => Err(RuntimeError::Duplicate("request".into())),
            };
            let _ = tx.send(result);
        }
    }
}
