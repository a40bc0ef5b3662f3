//! The end of an attempt: its verdict, retries with backoff, timeouts, and the timers that drive
//! them.

use serde_json::{Map, Value};

use super::state::TaskPhase;
use super::step::Step;
use super::types::{AttemptOutcome, Event, TaskResult, TaskStatus, TimeoutKind, TimerKind};
use crate::definition::model::RetryPolicy;
use crate::duration::Millis;

/// The delay before retry `attempt` (or re-offer number `attempt`), from 1: the exponential
/// value `initial * coefficient^(attempt-1)`, capped at `max_interval`, with "equal jitter" (a
/// uniform draw between half and all of it). Always within `[min(initial, max)/2, max]`.
pub fn backoff(policy: &RetryPolicy, attempt: u32, random: u64) -> Millis {
    let max = policy.max_interval;
    let initial = policy.initial_interval.min(max);
    let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let grown = initial as f64 * policy.backoff_coefficient.powi(exponent);
    // A coefficient below 1 (or a NaN) must not shrink the delay under the initial interval.
    let full = if grown.is_finite() && grown >= initial as f64 {
        (grown as Millis).min(max)
    } else if grown.is_finite() || grown.is_nan() {
        initial
    } else {
        max
    };
    let half = full / 2;
    half + random % (full - half + 1)
}

/// What one attempt amounts to once every holder's part of it ended.
struct Verdict {
    result: TaskResult,
    output: Value,
    timed_out: bool,
    /// Error kinds reported by the holders.
    errors: Vec<String>,
}

impl Step<'_, '_> {
    /// Ends the current attempt of task `i` with `outcome` for `worker_id` (or for every open
    /// holder when `None`), then retries it or ends the task.
    pub fn conclude_attempt(
        &mut self,
        i: usize,
        worker_id: Option<String>,
        outcome: AttemptOutcome,
        fired: Option<&TimerKind>,
    ) {
        let spec = self.spec(i);
        let attempt = self.task(i).attempt;
        if matches!(outcome, AttemptOutcome::TimedOut { .. }) {
            self.cancel_holders(i, "the attempt timed out");
        }
        self.cancel_attempt_timers(i, fired);
        let verdict = self.verdict(i, worker_id.as_deref(), &outcome);
        let t = self.task(i);
        // A non-idempotent task is never run twice once any attempt started.
        let may_repeat = spec.idempotent || !t.ever_started;
        let retryable = (verdict.timed_out || !verdict.errors.is_empty())
            && !verdict.errors.iter().any(|k| spec.retry.non_retryable.contains(k))
            && attempt < spec.retry.max_attempts
            && may_repeat;
        let retry_at = retryable.then(|| self.now().plus(backoff(&spec.retry, attempt, self.ctx.random)));
        self.emit(Event::AttemptEnded {
            task: spec.name.clone(),
            attempt,
            worker_id,
            outcome,
            retry_at,
            at: self.now(),
        });
        if let Some(at) = retry_at {
            self.set_timer(TimerKind::Retry { task: spec.name.clone(), attempt }, at);
            return;
        }
        let status = match (verdict.timed_out, may_repeat) {
            (false, _) => TaskStatus::Finished,
            (true, true) => TaskStatus::TimedOut,
            (true, false) => TaskStatus::OutcomeUnknown,
        };
        self.end_task(i, status, verdict.result, verdict.output);
    }

    /// Combines the outcomes of every holder of the attempt with the one about to be recorded.
    fn verdict(&self, i: usize, worker_id: Option<&str>, outcome: &AttemptOutcome) -> Verdict {
        let mut v = Verdict { result: TaskResult::Pass, output: Value::Null, timed_out: false, errors: Vec::new() };
        let mut output = Map::new();
        let mut add = |o: &AttemptOutcome| match o {
            AttemptOutcome::Finished { result, output: out, error } => {
                v.result = v.result.worst(*result);
                if let Value::Object(m) = out {
                    output.extend(m.clone());
                }
                if let Some(e) = error {
                    v.result = TaskResult::Fail;
                    v.errors.push(e.kind.clone());
                }
            }
            AttemptOutcome::TimedOut { .. } | AttemptOutcome::Cancelled => {
                v.result = TaskResult::Fail;
                v.timed_out = true;
            }
        };
        let holders = &self.task(i).holders;
        for h in holders {
            match &h.outcome {
                Some(o) => add(o),
                None if worker_id.is_none_or(|w| w == h.worker_id) => add(outcome),
                None => {}
            }
        }
        // Nobody held the attempt (it timed out on offer): the outcome speaks alone.
        if holders.is_empty() {
            add(outcome);
        }
        v.output = if output.is_empty() { Value::Null } else { Value::Object(output) };
        v
    }

    /// A timeout fired for attempt `attempt` of task `i`; moot unless it still applies.
    pub fn on_timeout(&mut self, i: usize, attempt: u32, kind: TimeoutKind, fired: &TimerKind) {
        let t = self.task(i);
        if t.attempt != attempt || !t.attempt_open() {
            return;
        }
        let started = t.holders.iter().any(|h| h.started);
        let applies = match kind {
            TimeoutKind::ScheduleToStart => !started,
            TimeoutKind::StartToClose => !t.holders.is_empty(),
            TimeoutKind::Heartbeat => started,
        };
        if applies {
            self.conclude_attempt(i, None, AttemptOutcome::TimedOut { timeout: kind }, Some(fired));
            self.advance();
        }
    }

    /// The backoff of a failed attempt elapsed: offer the next one (unless paused; `Resume`
    /// re-arms the timer).
    pub fn on_retry(&mut self, i: usize, attempt: u32) {
        let t = self.task(i);
        if t.phase != TaskPhase::Backoff || t.attempt != attempt || self.st.paused {
            return;
        }
        self.offer(i, attempt + 1, 1);
    }

    /// Nobody took the offer in time: award a late bid, or offer again.
    pub fn on_reoffer(&mut self, i: usize, attempt: u32, offer: u32) {
        let t = self.task(i);
        if t.phase != TaskPhase::Offered || t.attempt != attempt || t.offer != offer {
            return;
        }
        if !t.bids.is_empty() {
            self.award_best(i);
        } else {
            self.offer(i, attempt, offer + 1);
        }
    }

    /// `triggeredAfter` elapsed: begin the task (unless paused; `Resume` re-arms the timer).
    pub fn on_delay(&mut self, i: usize) {
        if self.task(i).phase != TaskPhase::Delayed || self.st.paused || self.failing() {
            return;
        }
        self.begin(i);
        self.advance();
    }

    /// A manual approval waited too long: it fails.
    pub fn on_approval_timeout(&mut self, i: usize) {
        if self.task(i).phase != TaskPhase::AwaitingApproval {
            return;
        }
        self.end_task(i, TaskStatus::TimedOut, TaskResult::Fail, Value::Null);
        self.advance();
    }
}
