//! The task state machine: `decide` routes each input to the task it concerns.
//!
//! | state | input | next state | events |
//! |---|---|---|---|
//! | pending | dependencies ended, no `triggeredAfter` | offered | TaskOffered |
//! | pending | dependencies ended, `triggeredAfter` | delayed | TaskDelayed |
//! | pending | dependencies ended, approval automatic | ended(finished) | TaskEnded |
//! | pending | dependencies ended, approval manual | awaiting-approval | ApprovalRequested |
//! | pending / delayed | run failed and nothing in flight | ended(skipped) | TaskEnded |
//! | delayed | timer Delay | offered | TaskOffered |
//! | offered | Bid, policy first, labels met | awarded | TaskAwarded |
//! | offered | Bid, policy lowest-cost / earliest-finish, labels met | offered | BidRecorded |
//! | offered | Bid, policy lowest-cost / earliest-finish, labels met, bid window over | awarded | BidRecorded, TaskAwarded (others: Rejection) |
//! | offered | Bid or Claim, labels not met | offered | - (Rejection) |
//! | offered | timer BidWindow, bids kept | awarded | TaskAwarded (losers: Rejection) |
//! | offered | timer BidWindow, no bid | offered | - (SetTimer Reoffer) |
//! | offered | timer Reoffer | offered | TaskOffered (offer + 1) |
//! | offered | Claim (queue, fanout) | awarded | TaskAwarded |
//! | offered (`claim: false`) | Started / Heartbeat / Finished, the offer's token | as awarded | TaskAwarded (no message), then as below |
//! | offered (`claim: false`) | Finished first, the offer's token | ended(finished) | TaskAwarded, AttemptEnded, TaskEnded |
//! | offered / awarded | timer ScheduleToStart | backoff or ended(timed-out) | AttemptEnded (+ TaskEnded) |
//! | awarded | Claim (queue) | awarded | - (Rejection) |
//! | awarded / running | Claim (fanout, new worker) | unchanged | TaskAwarded |
//! | awarded | Started, holder's token | running | TaskStarted |
//! | awarded / running | Finished, holder's token, no error | ended(finished) | AttemptEnded, TaskEnded |
//! | awarded / running | Finished with error, retries left | backoff | AttemptEnded |
//! | awarded / running | Finished, other fanout holders open | unchanged | AttemptEnded |
//! | awarded / running | timer StartToClose | backoff or ended(timed-out / outcome-unknown) | AttemptEnded (+ TaskEnded) |
//! | running | Heartbeat, holder's token | running | - (SetTimer Heartbeat) |
//! | running | timer Heartbeat | backoff or ended(timed-out / outcome-unknown) | AttemptEnded (+ TaskEnded) |
//! | any | Started / Heartbeat / Finished, not a current token | unchanged | InputRejected |
//! | any | Finished again, from the holder whose part it ended | unchanged | - |
//! | backoff | timer Retry | offered (attempt + 1) | TaskOffered |
//! | awaiting-approval | Approve | ended(finished) | TaskEnded |
//! | awaiting-approval | timer ApprovalTimeout | ended(timed-out) | TaskEnded |
//! | offered / awarded / running / backoff / awaiting-approval | Cancel | ended(cancelled) | (AttemptEnded) TaskEnded |
//! | pending / delayed | Cancel | ended(skipped) | TaskEnded |
//! | ended | any timer | ended | - |
//!
//! `tests/table.rs` walks every row.
//!
//! Before any task: a run with a service starts queued (`RunQueued`, every task pending) and
//! begins only on `Admit` (`RunAdmitted`), which the runtime sends when no other run of the same
//! project, stage and service is running or paused. A queued run can be cancelled, not paused.
//!
//! Fanout attempts have several holders but one set of attempt timers (keys are per attempt):
//! start-to-close runs from the first award, any holder's heartbeat pushes the heartbeat timer,
//! and a timeout ends the parts of every holder still open. Pause only holds back new attempts
//! (first offers, retries, delays, approvals); an attempt already on offer keeps its bid window
//! and re-offers so that it can still be awarded.

use capstan_proto::{AttemptRef, Bid, Claim, DispatchMode, Finished, Progress};

use super::state::{RunState, TaskPhase};
use super::step::Step;
use super::types::{AttemptOutcome, Ctx, Decision, Error, Event, Input, RecordedBid, TimeoutKind, TimerKind};
use crate::definition::model::{AwardPolicy, Task};

impl RunState {
    /// Decides what `input` means for this run: new events and the effects they imply. Pure:
    /// the state is unchanged; fold the returned events in with [`RunState::evolve`], or decide
    /// with [`RunState::apply`], which does both without copying the state.
    pub fn decide(&self, input: &Input, ctx: &Ctx) -> Result<Decision, Error> {
        self.clone().apply(input, ctx)
    }

    /// Decides what `input` means for this run and folds the decided events into the state:
    /// exactly [`RunState::decide`] followed by [`RunState::evolve`] of every event, without the
    /// copy of the state that `decide` works on. An input that does not apply changes nothing:
    /// every command and worker message is checked before its first event.
    pub fn apply(&mut self, input: &Input, ctx: &Ctx) -> Result<Decision, Error> {
        let mut step = Step::new(self, ctx);
        let checked = step.route(input);
        debug_assert!(checked.is_ok() || step.out.events.is_empty(), "an input refused after an event: {input:?}");
        checked.map(|()| step.finish())
    }
}

impl Step<'_, '_> {
    /// Hands the input to its command or its task.
    fn route(&mut self, input: &Input) -> Result<(), Error> {
        match input {
            Input::Start { meta, data } => self.start(meta, data),
            Input::Cancel { reason } => self.cancel(reason),
            Input::Admit => self.admit_run(),
            Input::Pause => self.pause(),
            Input::Resume => self.resume(),
            Input::Approve { task, approved, by } => self.approve(task, *approved, by),
            Input::Bid(bid) => self.with_task(&bid.attempt, &bid.worker.id, |s, i| s.on_bid(i, bid)),
            Input::Claim(claim) => self.with_task(&claim.attempt, &claim.worker.id, |s, i| s.on_claim(i, claim)),
            Input::Started(p) => self.with_task(&p.attempt, &p.worker_id, |s, i| s.on_started(i, p)),
            Input::Heartbeat(p) => self.with_task(&p.attempt, &p.worker_id, |s, i| s.on_heartbeat(i, p)),
            // A result that comes again (the broker redelivers it, or the worker sends it again)
            // while its attempt's holders are kept: nothing to record, not even on a run that
            // is over, so the runtime need not keep its id (`Input::idempotent_by_state`).
            Input::Finished(f) if self.st.result_recorded(f) => Ok(()),
            Input::Finished(f) => self.with_task(&f.attempt, &f.worker_id, |s, i| s.on_finished(i, f)),
            Input::Timer(kind) => self.on_timer(kind),
        }
    }
}

/// Whether a worker's labels meet a task's requirements: every required key with an equal value.
pub fn meets_requirements(task: &Task, labels: &std::collections::BTreeMap<String, String>) -> bool {
    task.requires.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Step<'_, '_> {
    /// Routes a worker's message to its task. On a run that is over, the worker only hears a
    /// rejection: the log does not grow after the end.
    fn with_task(
        &mut self,
        attempt: &AttemptRef,
        worker_id: &str,
        handle: impl FnOnce(&mut Self, usize),
    ) -> Result<(), Error> {
        if self.st.meta.is_none() {
            return Err(Error::NotStarted);
        }
        let i = self.st.index(&attempt.task).ok_or_else(|| Error::UnknownTask(attempt.task.clone()))?;
        if self.st.is_over() {
            self.reject(attempt, worker_id, "the run is over");
        } else {
            handle(self, i);
        }
        Ok(())
    }

    fn on_bid(&mut self, i: usize, bid: &Bid) {
        let spec = self.spec(i);
        let t = self.task(i);
        let worker = &bid.worker.id;
        let again = t.attempt == bid.attempt.attempt
            && (t.bids.iter().any(|b| b.worker.id == *worker) || t.holders.iter().any(|h| h.worker_id == *worker));
        let refusal = if spec.dispatch != DispatchMode::Auction {
            Some("the task is not auctioned: claim it")
        } else if again {
            // The same worker on the same attempt again (a redelivered bid): its first bid
            // stands, or already won. A rejection would make it drop its reservation or even
            // cancel the attempt it holds.
            return;
        } else if t.phase != TaskPhase::Offered || t.attempt != bid.attempt.attempt {
            Some("the attempt is not on offer")
        } else if !meets_requirements(&spec, &bid.worker.labels) {
            Some("the worker's labels do not meet the task's requirements")
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.reject(&bid.attempt, &bid.worker.id, reason);
            return;
        }
        if spec.award == AwardPolicy::First {
            self.award(i, bid.worker.clone());
            return;
        }
        let recorded = RecordedBid {
            worker: bid.worker.clone(),
            cost: bid.cost,
            estimated_ms: bid.estimated_ms,
            free_slots: bid.free_slots,
        };
        let closed = t.bid_deadline.is_some_and(|deadline| self.now() >= deadline);
        self.emit(Event::BidRecorded { task: spec.name.clone(), attempt: t.attempt, bid: recorded, at: self.now() });
        if closed {
            // The window is over (a worker that was full kept the offer and bid once a slot
            // freed): no better bid is coming before the re-offer, so the best kept one wins now.
            self.award_best(i);
        }
    }

    /// Awards the best kept bid and tells the others they lost.
    pub fn award_best(&mut self, i: usize) {
        let policy = self.spec(i).award;
        let mut bids = self.task(i).bids.clone();
        bids.sort_by(|a, b| {
            let (cost, time) = (a.cost.total_cmp(&b.cost), a.estimated_ms.cmp(&b.estimated_ms));
            let metric = match policy {
                AwardPolicy::EarliestFinish => time.then(cost),
                AwardPolicy::First | AwardPolicy::LowestCost => cost.then(time),
            };
            metric.then(b.free_slots.cmp(&a.free_slots)).then(a.worker.id.cmp(&b.worker.id))
        });
        let mut bids = bids.into_iter();
        let Some(winner) = bids.next() else { return };
        self.award(i, winner.worker);
        let attempt = self.attempt_ref(i);
        for loser in bids {
            self.reject(&attempt, &loser.worker.id, "another bid won");
        }
    }

    fn on_claim(&mut self, i: usize, claim: &Claim) {
        let spec = self.spec(i);
        let t = self.task(i);
        let worker = &claim.worker.id;
        let refusal = if spec.dispatch == DispatchMode::Auction {
            Some("the task is auctioned: bid for it")
        } else if t.attempt == claim.attempt.attempt && t.holders.iter().any(|h| h.worker_id == *worker) {
            // The same worker on the same attempt again (a redelivered claim): it holds or held
            // the attempt already, and a rejection would cancel the work it is doing.
            return;
        } else if !t.attempt_open() || t.attempt != claim.attempt.attempt {
            Some("the attempt is not open")
        } else if spec.dispatch == DispatchMode::Queue && t.phase != TaskPhase::Offered {
            Some("the attempt was already claimed")
        } else if !meets_requirements(&spec, &claim.worker.labels) {
            Some("the worker's labels do not meet the task's requirements")
        } else {
            None
        };
        match refusal {
            Some(reason) => self.reject(&claim.attempt, worker, reason),
            None => self.award(i, claim.worker.clone()),
        }
    }

    /// Checks that a report comes from an open holder of the current attempt; refuses it
    /// for the record otherwise.
    fn admit(&mut self, i: usize, input: &str, attempt: &AttemptRef, worker_id: &str, token: u64) -> bool {
        let t = self.task(i);
        let current = t.attempt == attempt.attempt && t.attempt_open();
        if current && t.open_holder(worker_id, token).is_some() {
            return true;
        }
        if t.binds(attempt.attempt, token) {
            // A claim-free offer: the first report under its token takes the attempt.
            self.bind(i, worker_id, token);
            return true;
        }
        let reason = if current { "stale or unknown fencing token" } else { "the attempt is no longer open" };
        self.refuse_report(input, attempt, worker_id, reason);
        false
    }

    fn on_started(&mut self, i: usize, p: &Progress) {
        let ended_after_start =
            self.task(i).ended_holder(p.attempt.attempt, &p.worker_id, p.token).is_some_and(|h| h.started);
        if ended_after_start {
            // A redelivered `started` of a holder whose part already ended: nothing to record.
            return;
        }
        if !self.admit(i, "started", &p.attempt, &p.worker_id, p.token) {
            return;
        }
        let already = self.task(i).open_holder(&p.worker_id, p.token).is_some_and(|h| h.started);
        if already {
            // A repeated `started` is as good as a heartbeat.
            self.on_heartbeat(i, p);
            return;
        }
        let spec = self.spec(i);
        let attempt = self.task(i).attempt;
        let first = !self.task(i).holders.iter().any(|h| h.started);
        self.emit(Event::TaskStarted {
            task: spec.name.clone(),
            attempt,
            worker_id: p.worker_id.clone(),
            token: p.token,
            at: self.now(),
        });
        if first && spec.timeouts.schedule_to_start.is_some() {
            self.cancel_timer(TimerKind::ScheduleToStart { task: spec.name.clone(), attempt });
        }
        if let Some(limit) = spec.timeouts.heartbeat {
            self.set_timer(TimerKind::Heartbeat { task: spec.name.clone(), attempt }, self.now().plus(limit));
        }
    }

    fn on_heartbeat(&mut self, i: usize, p: &Progress) {
        if self.task(i).binds(p.attempt.attempt, p.token) {
            // The receiver of a claim-free offer works on it from the start: its first
            // heartbeat says as much as a `started`, and leaves no unstarted holder behind.
            self.on_started(i, p);
            return;
        }
        if !self.admit(i, "heartbeat", &p.attempt, &p.worker_id, p.token) {
            return;
        }
        let spec = self.spec(i);
        let started = self.task(i).open_holder(&p.worker_id, p.token).is_some_and(|h| h.started);
        if let (Some(limit), true) = (spec.timeouts.heartbeat, started) {
            let attempt = self.task(i).attempt;
            self.set_timer(TimerKind::Heartbeat { task: spec.name.clone(), attempt }, self.now().plus(limit));
        }
    }

    fn on_finished(&mut self, i: usize, f: &Finished) {
        if !self.admit(i, "finished", &f.attempt, &f.worker_id, f.token) {
            return;
        }
        let outcome = AttemptOutcome::Finished { result: f.result, output: f.output.clone(), error: f.error.clone() };
        let others_open = self.task(i).holders.iter().any(|h| h.token != f.token && h.outcome.is_none());
        if others_open {
            // Fanout: the task waits for every holder; this one's part is recorded now.
            let attempt = self.task(i).attempt;
            self.emit(Event::AttemptEnded {
                task: self.name(i),
                attempt,
                worker_id: Some(f.worker_id.clone()),
                outcome,
                retry_at: None,
                at: self.now(),
            });
            return;
        }
        self.conclude_attempt(i, Some(f.worker_id.clone()), outcome, None);
        self.advance();
    }

    fn on_timer(&mut self, kind: &TimerKind) -> Result<(), Error> {
        if self.st.meta.is_none() {
            return Err(Error::NotStarted);
        }
        let name = match kind {
            TimerKind::BidWindow { task, .. }
            | TimerKind::Reoffer { task, .. }
            | TimerKind::ScheduleToStart { task, .. }
            | TimerKind::StartToClose { task, .. }
            | TimerKind::Heartbeat { task, .. }
            | TimerKind::Retry { task, .. }
            | TimerKind::Delay { task }
            | TimerKind::ApprovalTimeout { task } => task,
        };
        let i = self.st.index(name).ok_or_else(|| Error::UnknownTask(name.clone()))?;
        if self.st.is_over() {
            return Ok(());
        }
        match kind {
            TimerKind::BidWindow { attempt, offer, .. } => self.on_bid_window(i, *attempt, *offer),
            TimerKind::Reoffer { attempt, offer, .. } => self.on_reoffer(i, *attempt, *offer),
            TimerKind::ScheduleToStart { attempt, .. } => {
                self.on_timeout(i, *attempt, TimeoutKind::ScheduleToStart, kind)
            }
            TimerKind::StartToClose { attempt, .. } => self.on_timeout(i, *attempt, TimeoutKind::StartToClose, kind),
            TimerKind::Heartbeat { attempt, .. } => self.on_timeout(i, *attempt, TimeoutKind::Heartbeat, kind),
            TimerKind::Retry { attempt, .. } => self.on_retry(i, *attempt),
            TimerKind::Delay { .. } => self.on_delay(i),
            TimerKind::ApprovalTimeout { .. } => self.on_approval_timeout(i),
        }
        Ok(())
    }

    /// The bid window closed: award the best bid, or wait and offer again.
    fn on_bid_window(&mut self, i: usize, attempt: u32, offer: u32) {
        let t = self.task(i);
        if t.phase != TaskPhase::Offered || t.attempt != attempt || t.offer != offer {
            return;
        }
        if !t.bids.is_empty() {
            self.award_best(i);
            return;
        }
        let spec = self.spec(i);
        let wait = super::attempt::backoff(&spec.retry, offer, self.ctx.random);
        self.set_timer(TimerKind::Reoffer { task: spec.name.clone(), attempt, offer }, self.now().plus(wait));
    }
}
