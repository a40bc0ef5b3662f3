//! Criterion benchmarks of the pure core (capstan-engine): folding a run's history, one decision
//! on a very wide DAG, parsing and validating definitions, and SLO scoring. Each is kept short
//! (20 samples, about a second of measurement) so the whole set runs in well under a minute.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use capstan_engine::Definition;
use capstan_engine::Timestamp;
use capstan_engine::run::{Ctx, Effect, Event, Input, RunMeta, RunState, WorkerMessage};
use capstan_engine::slo::{self, PreviousResult};
use capstan_proto::{Claim, Finished, Progress, TaskResult, WorkerInfo};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::json;

/// A Capstan Shipyard with one sequence of tasks given as (name, dependsOn).
fn shipyard(tasks: impl IntoIterator<Item = (String, Vec<String>)>) -> String {
    let mut yaml = String::from(
        "apiVersion: capstan.dev/v1\nkind: Shipyard\nmetadata: {name: bench}\nspec:\n  stages:\n    - name: dev\n      \
         sequences:\n        - name: run\n          tasks:\n",
    );
    for (name, deps) in tasks {
        let _ = writeln!(
            yaml,
            "            - {{name: {name}, type: echo, dispatch: queue, dependsOn: [{}]}}",
            deps.join(", ")
        );
    }
    yaml
}

fn chain(n: usize) -> String {
    shipyard((1..=n).map(|i| (format!("t{i}"), if i == 1 { vec![] } else { vec![format!("t{}", i - 1)] })))
}

/// start -> `width` parallel tasks -> join.
fn fanout(width: usize) -> String {
    let parallel: Vec<String> = (1..=width).map(|i| format!("p{i}")).collect();
    let mut tasks = vec![("start".to_string(), vec![])];
    tasks.extend(parallel.iter().map(|p| (p.clone(), vec!["start".to_string()])));
    tasks.push(("join".to_string(), parallel));
    shipyard(tasks)
}

fn parse(yaml: &str) -> Arc<Definition> {
    Arc::new(capstan_engine::parse(yaml).expect("the bench definition is valid"))
}

fn meta() -> RunMeta {
    RunMeta {
        run_id: "r1".into(),
        context_id: "c1".into(),
        project: "p".into(),
        stage: "dev".into(),
        sequence: "run".into(),
        service: None,
        definition: "bench".into(),
        definition_version: 1,
        triggered_by: None,
    }
}

/// Applies an input the way the runtime does: decide, then fold the new events in.
fn step(state: &mut RunState, input: &Input, now: &mut u64, log: &mut Vec<Event>) -> Vec<Effect> {
    *now += 1;
    let decision = state.decide(input, &Ctx { now: Timestamp(*now), random: *now }).expect("input applies");
    for e in &decision.events {
        state.evolve(e);
    }
    log.extend(decision.events);
    decision.effects
}

/// Runs a whole run through claim, start and finish of every task; returns its events.
fn complete_run(def: Arc<Definition>) -> Vec<Event> {
    let worker = WorkerInfo { id: "w1".into(), labels: BTreeMap::new() };
    let (mut state, mut now, mut log) = (RunState::new(def), 0, Vec::new());
    let mut pending = step(&mut state, &Input::Start { meta: meta(), data: json!({}) }, &mut now, &mut log);
    while let Some(effect) = pending.pop() {
        let next = match effect {
            Effect::Offer(offer) => Input::Claim(Claim { attempt: offer.attempt, worker: worker.clone() }),
            Effect::Send { message: WorkerMessage::Award(award), .. } => {
                let progress = Progress { attempt: award.attempt.clone(), worker_id: "w1".into(), token: award.token };
                pending.extend(step(&mut state, &Input::Started(progress), &mut now, &mut log));
                Input::Finished(Finished {
                    attempt: award.attempt,
                    worker_id: "w1".into(),
                    token: award.token,
                    result: TaskResult::Pass,
                    output: json!({"ok": true}),
                    error: None,
                })
            }
            _ => continue,
        };
        pending.extend(step(&mut state, &next, &mut now, &mut log));
    }
    assert!(state.is_over(), "the driven run ends");
    log
}

fn fold(c: &mut Criterion) {
    // A chain of 200 tasks records 5 events per task (offered, awarded, started, attempt ended,
    // task ended) plus the run's start and finish: about 1,000 events.
    let def = parse(&chain(200));
    let events = complete_run(def.clone());
    assert!((1_000..1_010).contains(&events.len()), "{} events", events.len());
    c.bench_function("fold a 1,000-event run", |b| {
        b.iter(|| {
            let mut state = RunState::new(def.clone());
            for e in &events {
                state.evolve(e);
            }
            state
        })
    });
}

fn decide_wide(c: &mut Criterion) {
    // start -> 9,998 parallel -> join; the run is folded to the point where every parallel task
    // is claimed and started, and one decision finishes one of them.
    let def = parse(&fanout(9_998));
    let worker = WorkerInfo { id: "w1".into(), labels: BTreeMap::new() };
    let (mut state, mut now, mut log) = (RunState::new(def), 0, Vec::new());
    let mut pending = step(&mut state, &Input::Start { meta: meta(), data: json!({}) }, &mut now, &mut log);
    let mut awards = Vec::new();
    while let Some(effect) = pending.pop() {
        match effect {
            Effect::Offer(offer) => {
                let claim = Input::Claim(Claim { attempt: offer.attempt, worker: worker.clone() });
                pending.extend(step(&mut state, &claim, &mut now, &mut log));
            }
            Effect::Send { message: WorkerMessage::Award(award), .. } => {
                let progress = Progress { attempt: award.attempt.clone(), worker_id: "w1".into(), token: award.token };
                step(&mut state, &Input::Started(progress), &mut now, &mut log);
                if award.attempt.task == "start" {
                    let finished = finished(award);
                    pending.extend(step(&mut state, &finished, &mut now, &mut log));
                } else {
                    awards.push(award);
                }
            }
            _ => {}
        }
    }
    assert_eq!(awards.len(), 9_998);
    let input = finished(awards.pop().expect("a running task"));
    let ctx = Ctx { now: Timestamp(now + 1), random: 7 };
    c.bench_function("decide on a 10,000-node DAG (one task finishes)", |b| {
        b.iter(|| state.decide(&input, &ctx).expect("applies"))
    });
}

fn finished(award: capstan_proto::Award) -> Input {
    Input::Finished(Finished {
        attempt: award.attempt,
        worker_id: "w1".into(),
        token: award.token,
        result: TaskResult::Pass,
        output: json!({}),
        error: None,
    })
}

fn parsing(c: &mut Criterion) {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo/shipyard.yaml");
    let realistic = std::fs::read_to_string(fixtures).expect("the demo shipyard");
    let big = chain(1_000);
    c.bench_function("parse + validate the demo shipyard", |b| b.iter(|| capstan_engine::parse(&realistic)));
    c.bench_function("parse + validate a 1,000-task shipyard", |b| b.iter(|| capstan_engine::parse(&big)));
}

fn slo_scoring(c: &mut Criterion) {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/engine/tests/fixtures/keptn/slo-quality-gates.yaml");
    let slo = slo::parse(&std::fs::read_to_string(file).expect("the SLO fixture")).expect("valid");
    let values: BTreeMap<String, f64> = [("response_time_p95".to_string(), 540.0)].into();
    let previous = vec![PreviousResult { result: TaskResult::Pass, values: values.clone() }];
    c.bench_function("score an slo.yaml against a previous result", |b| {
        b.iter_batched(|| values.clone(), |v| slo::evaluate(&slo, &v, &previous), BatchSize::SmallInput)
    });
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300))
}

criterion_group! { name = engine; config = config(); targets = fold, decide_wide, parsing, slo_scoring }
criterion_main!(engine);
