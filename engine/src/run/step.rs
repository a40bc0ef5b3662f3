//! One decision under way: every emitted event is folded into the state at once, so that later
//! steps of the same decision see the effect of earlier ones (a task ending makes the next one
//! ready, which is then offered) with exactly `evolve`'s semantics. `RunState::apply` decides on
//! the caller's state itself; `RunState::decide` on a copy.

use capstan_proto::{AttemptRef, Rejection, TaskCancel};

use super::state::{RunState, TaskState};
use super::types::{Ctx, Decision, Effect, Event, RunMeta, TimerKind, WorkerMessage};
use std::sync::Arc;

use crate::definition::model::Task;
use crate::duration::Timestamp;

/// A decision being built on top of the state it changes.
pub(super) struct Step<'s, 'c> {
    pub st: &'s mut RunState,
    pub ctx: &'c Ctx,
    pub out: Decision,
}

impl<'s, 'c> Step<'s, 'c> {
    /// Starts a decision on `state`, which takes in each event as it is emitted.
    pub fn new(state: &'s mut RunState, ctx: &'c Ctx) -> Self {
        Step { st: state, ctx, out: Decision::default() }
    }

    /// Records an event and folds it into the scratch state.
    pub fn emit(&mut self, event: Event) {
        self.st.evolve(&event);
        self.out.events.push(event);
    }

    /// Adds an effect.
    pub fn effect(&mut self, effect: Effect) {
        self.out.effects.push(effect);
    }

    /// The clock of this decision.
    pub fn now(&self) -> Timestamp {
        self.ctx.now
    }

    /// Asks for a timer at `at`.
    pub fn set_timer(&mut self, kind: TimerKind, at: Timestamp) {
        self.effect(Effect::SetTimer { kind, at });
    }

    /// Drops a timer that became moot.
    pub fn cancel_timer(&mut self, kind: TimerKind) {
        self.effect(Effect::CancelTimer { kind });
    }

    /// Sends a message to one worker.
    pub fn send(&mut self, worker_id: &str, message: WorkerMessage) {
        self.effect(Effect::Send { worker_id: worker_id.to_string(), message });
    }

    /// Tells a worker its bid, claim or report was refused (no event).
    pub fn reject(&mut self, attempt: &AttemptRef, worker_id: &str, reason: &str) {
        let rejection =
            Rejection { attempt: attempt.clone(), worker_id: worker_id.to_string(), reason: reason.to_string() };
        self.send(worker_id, WorkerMessage::Rejection(rejection));
    }

    /// Refuses a report for the record (`InputRejected`) and tells the worker.
    pub fn refuse_report(&mut self, input: &str, attempt: &AttemptRef, worker_id: &str, reason: &str) {
        self.emit(Event::InputRejected {
            input: input.to_string(),
            task: Some(attempt.task.clone()),
            worker_id: Some(worker_id.to_string()),
            reason: reason.to_string(),
            at: self.now(),
        });
        self.reject(attempt, worker_id, reason);
    }

    /// Tells every holder of the task's current attempt that has not finished to stop.
    pub fn cancel_holders(&mut self, i: usize, reason: &str) {
        let attempt = self.attempt_ref(i);
        let open: Vec<String> =
            self.task(i).holders.iter().filter(|h| h.outcome.is_none()).map(|h| h.worker_id.clone()).collect();
        for worker_id in open {
            let cancel =
                TaskCancel { attempt: attempt.clone(), worker_id: Some(worker_id.clone()), reason: reason.to_string() };
            self.send(&worker_id, WorkerMessage::Cancel(cancel));
        }
    }

    /// The run's identity. Only called after the start, which `decide` checks first.
    pub fn meta(&self) -> RunMeta {
        self.st.meta.clone().unwrap_or_else(|| RunMeta {
            run_id: String::new(),
            context_id: String::new(),
            project: String::new(),
            stage: String::new(),
            sequence: String::new(),
            service: None,
            definition: String::new(),
            definition_version: 0,
            triggered_by: None,
        })
    }

    /// Identifies the current attempt of task `i` on the wire.
    pub fn attempt_ref(&self, i: usize) -> AttemptRef {
        self.st.attempt_ref(i)
    }

    /// The state of task `i`; `i` always comes from `RunState::index` or a range over the tasks.
    pub fn task(&self, i: usize) -> &TaskState {
        &self.st.tasks[i]
    }

    /// The definition of task `i` (a clone of its shared handle keeps the borrow off `self`, so
    /// callers may emit while holding it).
    pub fn spec(&self, i: usize) -> Arc<Task> {
        self.st.spec(i).cloned().unwrap_or_else(|| Arc::new(placeholder_task(&self.name(i))))
    }

    /// The name of task `i`.
    pub fn name(&self, i: usize) -> String {
        self.st.task_name(i)
    }

    /// The timers that may still be pending for the current attempt of task `i`.
    pub fn attempt_timers(&self, i: usize) -> Vec<TimerKind> {
        let spec = self.spec(i);
        let t = self.task(i);
        let (task, attempt) = (spec.name.clone(), t.attempt);
        let mut timers = Vec::new();
        let started = t.holders.iter().any(|h| h.started);
        if spec.timeouts.schedule_to_start.is_some() && !started {
            timers.push(TimerKind::ScheduleToStart { task: task.clone(), attempt });
        }
        if spec.timeouts.start_to_close.is_some() && !t.holders.is_empty() {
            timers.push(TimerKind::StartToClose { task: task.clone(), attempt });
        }
        if spec.timeouts.heartbeat.is_some() && started {
            timers.push(TimerKind::Heartbeat { task: task.clone(), attempt });
        }
        if t.holders.is_empty() {
            let offer = t.offer;
            if spec.dispatch == capstan_proto::DispatchMode::Auction {
                timers.push(TimerKind::BidWindow { task: task.clone(), attempt, offer });
            }
            timers.push(TimerKind::Reoffer { task, attempt, offer });
        }
        timers
    }

    /// Cancels every timer of the current attempt of task `i` except `fired` (already gone).
    pub fn cancel_attempt_timers(&mut self, i: usize, fired: Option<&TimerKind>) {
        for kind in self.attempt_timers(i) {
            if fired.is_none_or(|f| f.key() != kind.key()) {
                self.cancel_timer(kind);
            }
        }
    }

    /// The finished decision.
    pub fn finish(self) -> Decision {
        self.out
    }
}

/// Never used in practice: a state only ever indexes tasks of its own sequence. It exists so
/// that a corrupt index degrades to a harmless default instead of a panic.
fn placeholder_task(name: &str) -> Task {
    Task {
        name: name.to_string(),
        task_type: name.to_string(),
        properties: Default::default(),
        depends_on: Vec::new(),
        retry: Default::default(),
        timeouts: Default::default(),
        requires: Default::default(),
        dispatch: Default::default(),
        award: Default::default(),
        continue_on_failure: false,
        idempotent: true,
        claim: true,
        triggered_after: None,
        ends_run_on: Vec::new(),
    }
}
