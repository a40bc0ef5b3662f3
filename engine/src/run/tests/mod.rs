//! Tests of the run state machine, with a small harness: definitions built by hand (the parser
//! lives elsewhere) and a driver that folds each decision's events like the runtime does.

mod features;
mod flows;
mod sim;
mod table;

use std::collections::BTreeMap;
use std::sync::Arc;

use capstan_proto::{AttemptRef, Bid, Claim, Finished, Progress, TaskError};
use serde_json::{Value, json};

use super::*;
use crate::definition::model::{
    AwardPolicy, Definition, DispatchMode, Flavor, RetryPolicy, Sequence, Stage, Task, Timeouts, Trigger,
};
use crate::duration::Timestamp;

/// A task with Capstan's defaults: auction, first bid wins, default retry and timeouts.
fn task(name: &str, deps: &[&str]) -> Task {
    Task {
        name: name.into(),
        task_type: name.into(),
        properties: Default::default(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        retry: RetryPolicy::default(),
        timeouts: Timeouts::default(),
        requires: BTreeMap::new(),
        dispatch: DispatchMode::Auction,
        award: Default::default(),
        continue_on_failure: false,
        idempotent: true,
        claim: true,
        triggered_after: None,
        ends_run_on: Vec::new(),
    }
}

fn sequence(name: &str, triggered_on: Vec<Trigger>, tasks: Vec<Task>) -> Sequence {
    Sequence {
        name: name.into(),
        triggered_on,
        tasks: tasks.into_iter().map(std::sync::Arc::new).collect(),
        runbook: None,
    }
}

fn definition(stages: Vec<(&str, Vec<Sequence>)>) -> Arc<Definition> {
    let stages = stages.into_iter().map(|(name, sequences)| Stage { name: name.into(), sequences }).collect();
    Arc::new(Definition { flavor: Flavor::Capstan, name: "shop".into(), stages })
}

/// One stage `dev` with one sequence `delivery`.
fn single(tasks: Vec<Task>) -> Arc<Definition> {
    definition(vec![("dev", vec![sequence("delivery", vec![], tasks)])])
}

fn meta(stage: &str, sequence: &str) -> RunMeta {
    RunMeta {
        run_id: "r1".into(),
        context_id: "c1".into(),
        project: "p".into(),
        stage: stage.into(),
        sequence: sequence.into(),
        service: None,
        definition: "shop".into(),
        definition_version: 1,
        triggered_by: None,
    }
}

fn worker(id: &str, labels: &[(&str, &str)]) -> WorkerInfo {
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    WorkerInfo { id: id.into(), labels }
}

fn aref(task: &str, attempt: u32) -> AttemptRef {
    AttemptRef { project: "p".into(), run_id: "r1".into(), task: task.into(), attempt }
}

fn bid(task: &str, attempt: u32, w: WorkerInfo, cost: f64, estimated_ms: u64, free: u32) -> Input {
    Input::Bid(Bid { attempt: aref(task, attempt), worker: w, cost, estimated_ms, free_slots: free })
}

fn claim(task: &str, attempt: u32, w: &str) -> Input {
    Input::Claim(Claim { attempt: aref(task, attempt), worker: worker(w, &[]) })
}

fn started(task: &str, attempt: u32, w: &str, token: u64) -> Input {
    Input::Started(Progress { attempt: aref(task, attempt), worker_id: w.into(), token })
}

fn heartbeat(task: &str, attempt: u32, w: &str, token: u64) -> Input {
    Input::Heartbeat(Progress { attempt: aref(task, attempt), worker_id: w.into(), token })
}

fn finished(task: &str, attempt: u32, w: &str, token: u64, result: TaskResult) -> Input {
    finished_with(task, attempt, w, token, result, Value::Null, None)
}

fn failed(task: &str, attempt: u32, w: &str, token: u64, kind: &str) -> Input {
    let error = TaskError { kind: kind.into(), message: "boom".into() };
    finished_with(task, attempt, w, token, TaskResult::Fail, Value::Null, Some(error))
}

fn finished_with(
    task: &str,
    attempt: u32,
    w: &str,
    token: u64,
    result: TaskResult,
    output: Value,
    error: Option<TaskError>,
) -> Input {
    Input::Finished(Finished { attempt: aref(task, attempt), worker_id: w.into(), token, result, output, error })
}

fn timer(kind: TimerKind) -> Input {
    Input::Timer(kind)
}

/// Drives one run like the runtime: decide, then fold the events in.
struct Run {
    state: RunState,
    events: Vec<Event>,
    now: u64,
    random: u64,
}

impl Run {
    fn new(def: Arc<Definition>) -> Self {
        Run { state: RunState::new(def), events: Vec::new(), now: 0, random: 0 }
    }

    /// A started run of stage `dev`, sequence `delivery`.
    fn start(def: Arc<Definition>, data: Value) -> (Self, Decision) {
        let mut run = Run::new(def);
        let d = run.apply(Input::Start { meta: meta("dev", "delivery"), data });
        (run, d)
    }

    /// Decides `input` and folds its events, as the runtime does; checks on the way that
    /// `RunState::apply` ends in the state the fold reaches, and that a refused input leaves
    /// the state as it was.
    fn try_apply(&mut self, input: Input) -> Result<Decision, Error> {
        let ctx = Ctx { now: Timestamp(self.now), random: self.random };
        let mut applied = self.state.clone();
        let in_place = applied.apply(&input, &ctx);
        let d = match self.state.decide(&input, &ctx) {
            Ok(d) => d,
            Err(e) => {
                assert_eq!(applied, self.state, "{input:?} was refused ({e}) but changed the state");
                return Err(e);
            }
        };
        assert_eq!(in_place.as_ref(), Ok(&d), "apply and decide differ on {input:?}");
        for e in &d.events {
            self.state.evolve(e);
        }
        assert_eq!(applied, self.state, "apply and the fold of its events differ on {input:?}");
        self.events.extend(d.events.iter().cloned());
        Ok(d)
    }

    fn apply(&mut self, input: Input) -> Decision {
        match self.try_apply(input.clone()) {
            Ok(d) => d,
            Err(e) => panic!("{input:?} was refused: {e}"),
        }
    }

    fn at(&mut self, now: u64) -> &mut Self {
        self.now = now;
        self
    }

    fn phase(&self, task: &str) -> TaskPhase {
        self.state.task(task).map(|t| t.status).unwrap_or(TaskPhase::Pending)
    }

    fn history(&self) -> String {
        render_history(&self.events)
    }

    /// Awards attempt `attempt` of an auction task with policy `first` to `w`; returns the token.
    fn award(&mut self, task: &str, attempt: u32, w: &str) -> u64 {
        self.apply(bid(task, attempt, worker(w, &[]), 1.0, 10, 1));
        self.state.last_token
    }

    /// Awards, starts and finishes attempt `attempt` of a `first`-auction task.
    fn complete(&mut self, task: &str, attempt: u32, w: &str, result: TaskResult) -> Decision {
        let token = self.award(task, attempt, w);
        self.apply(started(task, attempt, w, token));
        self.apply(finished(task, attempt, w, token, result))
    }
}

/// One short line per effect, for readable assertions.
fn effects(d: &Decision) -> Vec<String> {
    d.effects.iter().map(effect_line).collect()
}

fn effect_line(e: &Effect) -> String {
    match e {
        Effect::Offer(o) => format!("offer {}#{} {:?}", o.attempt.task, o.attempt.attempt, o.dispatch),
        Effect::Send { worker_id, message } => match message {
            WorkerMessage::Award(a) => format!("award {worker_id} token={}", a.token),
            WorkerMessage::Rejection(r) => format!("reject {worker_id}: {}", r.reason),
            WorkerMessage::Cancel(c) => format!("cancel {worker_id}: {}", c.reason),
        },
        Effect::SetTimer { kind, at } => format!("set {} @{}", kind.key(), at.0),
        Effect::CancelTimer { kind } => format!("unset {}", kind.key()),
        Effect::StartRun { stage, sequence, .. } => format!("start-run {stage}.{sequence}"),
        Effect::Notify(n) => format!("notify {}", n.result.as_str()),
    }
}

/// The kinds of the decision's events, kebab-case.
fn kinds(d: &Decision) -> Vec<String> {
    d.events.iter().map(event_kind).collect()
}

fn event_kind(e: &Event) -> String {
    let v = serde_json::to_value(e).unwrap_or(json!({}));
    v["event"].as_str().unwrap_or("?").to_string()
}
