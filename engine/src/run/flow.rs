//! Moving a run forward: which tasks are ready, offering and awarding attempts, approvals, and
//! the run's end with its promotions.

use capstan_proto::{Award, DispatchMode, SequenceFinished, TaskOffer, WorkerInfo};
use serde_json::{Map, Value};

use super::state::{RunState, TaskPhase};
use super::step::Step;
use super::types::{Effect, Event, NextSequence, RunMeta, RunStatus, TaskResult, TaskStatus, TimerKind, WorkerMessage};
use crate::definition::model::Task;
use crate::duration::parse_duration;

/// The task type the engine handles itself, without a worker.
pub const APPROVAL_TYPE: &str = "approval";

/// How long a claim-free offer is left to the broker before the engine offers it again. The
/// broker hands an offer whose member went silent to another one by itself (JetStream's ack
/// wait and the in-memory broker's ack deadline are 30 s by default), and a member that took it
/// reports within its award timeout (10 s by default); a sooner re-offer would mostly start a
/// second copy beside a live one. It is for an offer a broker lost.
pub const CLAIM_FREE_REOFFER_MS: u64 = 30_000;

/// The least wait before a queue offer (with claims) is offered again. The offer waits in the
/// broker for a member with room, so a re-offer while it is still queued only puts a copy
/// behind it: each copy a member takes costs a claim round trip and a rejection. With re-offers
/// after the retry backoff alone (0.5-1 s at first), a backlog of more than a second fed
/// itself: 2,048 runs in flight over 32 slots under CPU load stalled for minutes, every slot
/// waiting on claims the flooded engine answered ten seconds later. Like every re-offer it is
/// for an offer a broker lost (published before any member of its type subscribed, or while the
/// broker was down).
pub const QUEUE_REOFFER_MS: u64 = 5_000;

impl Step<'_, '_> {
    /// Starts whatever became ready and ends the run when nothing is left, until a fixed point:
    /// an automatic approval ends at once and may make the next task ready in the same decision.
    pub fn advance(&mut self) {
        loop {
            if self.st.is_over() || self.st.queued {
                return;
            }
            if self.st.tasks.iter().all(|t| matches!(t.phase, TaskPhase::Ended(_))) {
                self.finish_run();
                return;
            }
            if self.ending_result().is_some() {
                // A task decided the run (a runbook's gate passed): the rest is skipped once the
                // work under way has ended.
                if !self.st.tasks.iter().any(|t| t.in_flight()) {
                    self.skip_unstarted();
                    self.finish_run();
                }
                return;
            }
            if self.failing() {
                // A failed task stops new work; the run ends once the work under way has ended.
                if !self.st.tasks.iter().any(|t| t.in_flight()) {
                    self.skip_unstarted();
                    self.finish_run();
                }
                return;
            }
            if self.st.paused {
                return;
            }
            let Some(i) = (0..self.st.tasks.len()).find(|&i| self.is_ready(i)) else {
                return;
            };
            self.start_task(i);
        }
    }

    /// Whether a task ended in a way that fails the run.
    pub fn failing(&self) -> bool {
        self.st.tasks.iter().enumerate().any(|(i, t)| {
            matches!(t.phase, TaskPhase::Ended(_))
                && t.result == Some(TaskResult::Fail)
                && !self.st.spec(i).is_some_and(|s| s.continue_on_failure)
        })
    }

    /// Pending with every dependency ended. A dependency that failed the run never gets here:
    /// `failing` stops the loop first, so "ended" means "ended in a way that lets the run go on".
    fn is_ready(&self, i: usize) -> bool {
        let Some(spec) = self.st.spec(i) else {
            return false;
        };
        self.st.tasks[i].phase == TaskPhase::Pending
            && spec
                .depends_on
                .iter()
                .all(|d| self.st.index(d).is_some_and(|j| matches!(self.st.tasks[j].phase, TaskPhase::Ended(_))))
    }

    fn start_task(&mut self, i: usize) {
        let spec = self.spec(i);
        if let Some(delay) = spec.triggered_after {
            let until = self.now().plus(delay);
            self.emit(Event::TaskDelayed { task: spec.name.clone(), until, at: self.now() });
            self.set_timer(TimerKind::Delay { task: spec.name.clone() }, until);
        } else {
            self.begin(i);
        }
    }

    /// The task's wait is over: an approval is decided, any other task offers attempt 1.
    pub fn begin(&mut self, i: usize) {
        if self.spec(i).task_type == APPROVAL_TYPE {
            self.approval(i);
        } else {
            self.offer(i, 1, 1);
        }
    }

    /// Puts attempt `attempt` of task `i` on offer for the `offer`-th time.
    pub fn offer(&mut self, i: usize, attempt: u32, offer: u32) {
        let spec = self.spec(i);
        let now = self.now();
        let auction = spec.dispatch == DispatchMode::Auction;
        let bid_deadline = auction.then(|| now.plus(spec.timeouts.bid_window));
        // A claim-free offer carries its token; a re-offer of the same attempt carries the same.
        let token = (spec.dispatch == DispatchMode::Queue && !spec.claim).then(|| match self.task(i).offered_token {
            Some(token) if offer > 1 => token,
            _ => self.st.last_token + 1,
        });
        self.emit(Event::TaskOffered { task: spec.name.clone(), attempt, offer, bid_deadline, token, at: now });
        // A claim-free offer says until when it may start: the worker drops a stale one.
        let start_by = match (token, spec.timeouts.schedule_to_start) {
            (Some(_), Some(limit)) => self.task(i).offered_at.map(|first| first.plus(limit).0),
            _ => None,
        };
        let meta = self.meta();
        let offer_msg = TaskOffer {
            attempt: self.attempt_ref(i),
            context_id: meta.context_id,
            stage: meta.stage,
            sequence: meta.sequence,
            service: meta.service,
            task_type: spec.task_type.clone(),
            dispatch: spec.dispatch,
            input: self.st.task_input(i),
            requires: spec.requires.clone(),
            bid_deadline_ms: bid_deadline.map(|t| t.0),
            heartbeat_ms: spec.timeouts.heartbeat,
            start_to_close_ms: spec.timeouts.start_to_close,
            token,
            start_by_ms: start_by,
        };
        self.effect(Effect::Offer(offer_msg));
        let task = spec.name.clone();
        // One schedule-to-start timer covers every re-offer of the attempt.
        if let (1, Some(limit)) = (offer, spec.timeouts.schedule_to_start) {
            let kind = TimerKind::ScheduleToStart { task: task.clone(), attempt };
            self.set_timer(kind, now.plus(limit));
        }
        match bid_deadline {
            Some(deadline) => self.set_timer(TimerKind::BidWindow { task, attempt, offer }, deadline),
            None => {
                let mut wait = super::attempt::backoff(&spec.retry, offer, self.ctx.random);
                if token.is_some() {
                    wait = wait.max(CLAIM_FREE_REOFFER_MS);
                } else if spec.dispatch == DispatchMode::Queue {
                    wait = wait.max(QUEUE_REOFFER_MS);
                }
                self.set_timer(TimerKind::Reoffer { task, attempt, offer }, now.plus(wait));
            }
        }
    }

    /// Gives the current attempt of task `i` to `worker` with the next fencing token (or the
    /// one its claim-free offer carries) and sends it the award.
    pub fn award(&mut self, i: usize, worker: WorkerInfo) {
        let token = match self.task(i).offered_token {
            Some(token) if self.task(i).holders.is_empty() => token,
            _ => self.st.last_token + 1,
        };
        self.hand_over(i, worker, token, true);
    }

    /// A claim-free attempt's first report under its offer's token: the attempt is the
    /// reporter's, as if it had claimed it and been awarded. It has the token already, so no
    /// award is sent.
    pub fn bind(&mut self, i: usize, worker_id: &str, token: u64) {
        let worker = WorkerInfo { id: worker_id.to_string(), labels: Default::default() };
        self.hand_over(i, worker, token, false);
    }

    /// Records the award of the current attempt of task `i` (and sends it when `send`), and
    /// moves its timers from waiting for a taker to waiting for the end.
    fn hand_over(&mut self, i: usize, worker: WorkerInfo, token: u64, send: bool) {
        let spec = self.spec(i);
        let first = self.task(i).holders.is_empty();
        let (attempt, offer) = (self.task(i).attempt, self.task(i).offer);
        let worker_id = worker.id.clone();
        self.emit(Event::TaskAwarded { task: spec.name.clone(), attempt, worker, token, at: self.now() });
        if send {
            let award = self.st.award_message(i, &spec, &worker_id, token);
            self.send(&worker_id, WorkerMessage::Award(award));
        }
        if first {
            if spec.dispatch == DispatchMode::Auction {
                self.cancel_timer(TimerKind::BidWindow { task: spec.name.clone(), attempt, offer });
            }
            self.cancel_timer(TimerKind::Reoffer { task: spec.name.clone(), attempt, offer });
            if let Some(limit) = spec.timeouts.start_to_close {
                self.set_timer(TimerKind::StartToClose { task: spec.name.clone(), attempt }, self.now().plus(limit));
            }
        }
    }

    /// An approval task: decided by the worst result of the tasks it depends on.
    fn approval(&mut self, i: usize) {
        let spec = self.spec(i);
        let before = spec
            .depends_on
            .iter()
            .filter_map(|d| self.st.index(d).and_then(|j| self.st.tasks[j].result))
            .fold(TaskResult::Pass, TaskResult::worst);
        let mode = match before {
            TaskResult::Pass => spec.properties.get("pass"),
            TaskResult::Warning => spec.properties.get("warning"),
            // Keptn's approval does not wait for a person after a failure: it fails.
            TaskResult::Fail => None,
        };
        if mode.and_then(Value::as_str) == Some("manual") {
            self.emit(Event::ApprovalRequested { task: spec.name.clone(), at: self.now() });
            let timeout = spec.properties.get("timeout").and_then(Value::as_str);
            if let Some(limit) = timeout.and_then(|t| parse_duration(t).ok()) {
                self.set_timer(TimerKind::ApprovalTimeout { task: spec.name.clone() }, self.now().plus(limit));
            }
        } else {
            self.end_task(i, TaskStatus::Finished, before, Value::Null);
        }
    }

    /// Records the end of a task.
    pub fn end_task(&mut self, i: usize, status: TaskStatus, result: TaskResult, output: Value) {
        self.emit(Event::TaskEnded { task: self.name(i), status, result, output, at: self.now() });
    }

    /// Tasks that never got under way end `Skipped`; their pending timers become moot.
    pub fn skip_unstarted(&mut self) {
        for i in 0..self.st.tasks.len() {
            let name = self.name(i);
            match self.task(i).phase {
                TaskPhase::Pending => {}
                TaskPhase::Delayed => self.cancel_timer(TimerKind::Delay { task: name }),
                TaskPhase::AwaitingApproval => self.cancel_timer(TimerKind::ApprovalTimeout { task: name }),
                _ => continue,
            }
            self.end_task(i, TaskStatus::Skipped, TaskResult::Fail, Value::Null);
        }
    }

    /// The result of the first task whose end ends the run (`ends_run_on`), if one did.
    fn ending_result(&self) -> Option<TaskResult> {
        self.st.tasks.iter().enumerate().find_map(|(i, t)| {
            let result = t.result?;
            let ends = matches!(t.phase, TaskPhase::Ended(TaskStatus::Finished))
                && self.st.spec(i).is_some_and(|s| s.ends_run_on.contains(&result));
            ends.then_some(result)
        })
    }

    /// The run result: the worst result that counts. A failure of a `continueOnFailure` task
    /// does not count; skipped and cancelled tasks have nothing to say.
    fn run_result(&self) -> TaskResult {
        if let Some(result) = self.ending_result() {
            return result;
        }
        if self.st.sequence().is_some_and(|s| s.runbook.is_some()) {
            // No gate passed: the remediation is unresolved, whatever the escalation said.
            return TaskResult::Fail;
        }
        let mut result = TaskResult::Pass;
        for (i, t) in self.st.tasks.iter().enumerate() {
            let counted = match (t.phase, t.result) {
                (TaskPhase::Ended(TaskStatus::Cancelled | TaskStatus::Skipped), _) => None,
                (_, Some(TaskResult::Fail)) if self.st.spec(i).is_some_and(|s| s.continue_on_failure) => None,
                (_, r) => r,
            };
            result = counted.map_or(result, |r| result.worst(r));
        }
        result
    }

    /// Ends the run: `RunFinished`, the promotions it triggers, and the notification.
    pub fn finish_run(&mut self) {
        let result = self.run_result();
        let meta = self.meta();
        let def = self.st.def.clone();
        let results = |name: &str| self.st.index(name).and_then(|j| self.st.tasks[j].result);
        let next: Vec<NextSequence> = def
            .followers(&meta.stage, &meta.sequence, result, &results)
            .into_iter()
            .map(|(stage, sequence)| NextSequence { stage: stage.name.clone(), sequence: sequence.name.clone() })
            .collect();
        self.emit(Event::RunFinished { status: RunStatus::Finished, result, next: next.clone(), at: self.now() });
        let data = self.st.carried_data(0..self.st.tasks.len());
        for n in next {
            self.effect(Effect::StartRun {
                context_id: meta.context_id.clone(),
                project: meta.project.clone(),
                stage: n.stage,
                sequence: n.sequence,
                service: meta.service.clone(),
                data: data.clone(),
                triggered_by: meta.run_id.clone(),
            });
        }
        self.notify(result);
    }

    /// Tells watchers that the run ended.
    pub fn notify(&mut self, result: TaskResult) {
        self.effect(Effect::Notify(sequence_finished(&self.meta(), result)));
    }
}

/// What a task is given, read from the state alone.
impl RunState {
    /// The award of task `i`'s current attempt to `worker_id` under `token`: what `decide`
    /// sends, and what `RunState::derived_messages` sends again after a crash.
    pub(super) fn award_message(&self, i: usize, spec: &Task, worker_id: &str, token: u64) -> Award {
        Award {
            attempt: self.attempt_ref(i),
            worker_id: worker_id.to_string(),
            token,
            task_type: spec.task_type.clone(),
            input: self.task_input(i),
            heartbeat_ms: spec.timeouts.heartbeat,
            start_to_close_ms: spec.timeouts.start_to_close,
        }
    }

    /// Trigger data, then the outputs of the tasks task `i` depends on (transitively, in file
    /// order: Keptn carries everything forward), then the task's own properties; later wins.
    /// `project`, `stage` and `service` are always the run's.
    pub(super) fn task_input(&self, i: usize) -> Value {
        let mut ancestors = vec![false; self.tasks.len()];
        let mut stack = vec![i];
        while let Some(k) = stack.pop() {
            for d in self.spec(k).map(|s| s.depends_on.as_slice()).unwrap_or(&[]) {
                if let Some(j) = self.index(d).filter(|&j| !ancestors[j]) {
                    ancestors[j] = true;
                    stack.push(j);
                }
            }
        }
        // Filled from the highest precedence down, each key taken once: the run's names, the
        // task's properties, the outputs from the last ancestor back, then the trigger data.
        // Merging upwards cloned every overridden entry too, and in a chain every output
        // carries the data before it, so that grew with the square of the chain's length.
        let mut map = Map::new();
        // Keptn's event data always names its project, stage and service; tools (SLO and SLI
        // files per service, remediation runbooks) find their configuration by them. The
        // run's own win: a promoted run's data still names the stage it came from.
        if let Some(meta) = &self.meta {
            map.insert("project".into(), Value::from(meta.project.clone()));
            map.insert("stage".into(), Value::from(meta.stage.clone()));
            if let Some(service) = &meta.service {
                map.insert("service".into(), Value::from(service.clone()));
            }
        }
        if let Some(spec) = self.spec(i) {
            fill(&mut map, &spec.properties);
        }
        self.fill_carried(&mut map, (0..ancestors.len()).filter(|&j| ancestors[j]));
        Value::Object(map)
    }

    /// Trigger data merged (shallow, later wins) with the outputs of the given tasks.
    pub(super) fn carried_data(&self, tasks: impl DoubleEndedIterator<Item = usize>) -> Value {
        let mut map = Map::new();
        self.fill_carried(&mut map, tasks);
        Value::Object(map)
    }

    /// Adds to `map` what it lacks of the given tasks' outputs, the last task first, then of the
    /// trigger data: the shallow merge in which later wins, under what `map` already holds.
    fn fill_carried(&self, map: &mut Map<String, Value>, tasks: impl DoubleEndedIterator<Item = usize>) {
        for j in tasks.rev() {
            if let Value::Object(output) = &self.tasks[j].output {
                fill(map, output);
            }
        }
        if let Value::Object(data) = &self.data {
            fill(map, data);
        }
    }
}

/// Adds the entries of `from` whose keys `map` lacks.
fn fill(map: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (key, value) in from {
        if !map.contains_key(key) {
            map.insert(key.clone(), value.clone());
        }
    }
}

/// The notification that the run of `meta` ended with `result`; also what
/// `RunState::derived_messages` sends again after a crash.
pub(super) fn sequence_finished(meta: &RunMeta, result: TaskResult) -> SequenceFinished {
    SequenceFinished {
        project: meta.project.clone(),
        run_id: meta.run_id.clone(),
        context_id: meta.context_id.clone(),
        stage: meta.stage.clone(),
        sequence: meta.sequence.clone(),
        service: meta.service.clone(),
        result,
    }
}
