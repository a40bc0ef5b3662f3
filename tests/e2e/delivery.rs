//! Keptn-grade delivery end to end, in process: the real delivery workers (evaluation, static
//! and Prometheus SLI providers, get-action) built from a `[workers]` configuration as
//! `capstan server` builds them, test workers for deployment, test, release, rollback, action
//! and notification, and a test clock that jumps over `triggeredAfter` waits.
//!
//! - examples/delivery/shipyard.yaml: a gate that passes promotes dev -> staging -> production,
//!   where a manual approval waits for a person; a failing gate blocks (staging never starts);
//!   a warning waits for a person whose rejection ends the delivery and rolls staging back.
//! - Keptn's own form with the sockshop shipyard UNCHANGED: the remediation sequence
//!   re-triggers itself on `evaluation.result: fail` until an action fixes the SLI, or until
//!   get-action runs out of actions (unresolved); the Capstan example escalates then.

mod bench;

use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_engine::run::{Event, Input, NextSequence, render_history};
use capstan_proto::TaskResult;
use capstan_store::RunFilter;
use serde_json::{Value, json};

use self::bench::{Bench, Setup, next_of, output_of, path, read, render, result, rounds, steps};
use crate::support::history;

fn example() -> Setup<'static> {
    Setup {
        shipyard: read("examples/delivery/shipyard.yaml"),
        slo: "examples/delivery/slo.yaml",
        sli: "examples/delivery/sli-prometheus.yaml",
        remediation: "examples/delivery/remediation.yaml",
        fixes: &[],
    }
}

fn measured(dev_p95: u64, staging_p95: u64) -> Value {
    json!({
        "dev": {"response_time_p95": dev_p95, "error_rate": 0.0, "throughput": 120},
        "staging": {"response_time_p95": staging_p95, "error_rate": 0.002, "throughput": 300},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_gate_promotes_to_an_approval_and_a_failing_gate_blocks() {
    let bench = Bench::start(example()).await;

    // carts measures well everywhere: dev and staging pass their gates, production waits for a
    // person before it deploys anything.
    let carts = bench.deliver("carts", measured(310, 420)).await;
    bench
        .wait_for(&carts, "production to wait for its approval", |runs| {
            runs.iter()
                .any(|(r, e)| r.stage == "production" && e.iter().any(|e| matches!(e, Event::ApprovalRequested { .. })))
        })
        .await;
    let runs = bench.runs(&carts).await;
    let stages: Vec<_> = runs.iter().map(|r| format!("{}.{}", r.stage, r.sequence)).collect();
    assert_eq!(stages, ["dev.delivery", "staging.delivery", "production.delivery"]);
    let dev = history(&*bench.store, &runs[0].run_id).await;
    assert_eq!(
        steps(&dev),
        [
            "run-started",
            "task-started deployment#1",
            "attempt-ended deployment#1 pass",
            "task-ended deployment finished pass",
            "task-started test#1",
            "attempt-ended test#1 pass",
            "task-ended test finished pass",
            "task-started get-sli#1",
            "attempt-ended get-sli#1 pass",
            "task-ended get-sli finished pass",
            "task-started evaluation#1",
            "attempt-ended evaluation#1 pass",
            "task-ended evaluation finished pass",
            "task-started release#1",
            "attempt-ended release#1 pass",
            "task-ended release finished pass",
            "run-finished finished pass next=staging.delivery",
        ]
        .map(|s| s.replace("run-started", &format!("run-started {} dev.delivery", runs[0].run_id)))
        .as_slice(),
        "{}",
        render_history(&dev)
    );
    assert_eq!(output_of(&dev, "evaluation")["score"], json!(100.0));
    let staging = history(&*bench.store, &runs[1].run_id).await;
    assert_eq!(output_of(&staging, "evaluation")["evaluation"]["objectives"][0]["value"], json!(420.0));
    assert!(steps(&staging).contains(&"task-ended approval finished pass".to_string()), "a pass approves itself");
    assert!(bench.calls("production", "deployment").is_empty(), "nothing is deployed before the approval");

    // Approval through the runtime's command API, as `capstan approve` sends it.
    let prod = &runs[2].run_id;
    let approve = Input::Approve { task: "approval".into(), approved: true, by: "alice".into() };
    bench.rt.command("sockshop", prod, approve).await.expect("approve");
    bench.wait_for(&carts, "production to finish", |runs| runs.iter().all(|(r, _)| r.is_over())).await;
    let prod_events = history(&*bench.store, prod).await;
    let prod_steps = steps(&prod_events);
    assert_eq!(prod_steps[1..3], ["approval-requested approval", "task-ended approval finished pass"]);
    assert_eq!(output_of(&prod_events, "approval"), &json!({"approval": {"approved": true, "by": "alice"}}));
    assert_eq!(prod_steps.last().map(String::as_str), Some("run-finished finished pass"));
    assert_eq!(bench.calls("production", "deployment").len(), 1);

    // orders is too slow in dev: its gate fails, the run fails, staging never starts.
    let orders = bench.deliver("orders", measured(950, 420)).await;
    bench.wait_for(&orders, "dev to end", |runs| runs.iter().all(|(r, _)| r.is_over())).await;
    // A promotion would be recorded in the dev run's end; give a wrongly started one time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = bench.runs(&orders).await;
    assert_eq!(runs.len(), 1, "only dev ran: {runs:?}");
    let dev = history(&*bench.store, &runs[0].run_id).await;
    assert_eq!(result(&runs[0]), TaskResult::Fail);
    let dev_steps = steps(&dev);
    assert!(dev_steps.contains(&"task-ended evaluation finished fail".to_string()), "{dev_steps:#?}");
    assert!(dev_steps.contains(&"task-ended release skipped".to_string()), "{dev_steps:#?}");
    assert_eq!(dev_steps.last().map(String::as_str), Some("run-finished finished fail"));
    assert_eq!(output_of(&dev, "evaluation")["evaluation"]["objectives"][0]["status"], json!("fail"));
    assert!(bench.calls("staging", "deployment").iter().all(|c| c.input["service"] != "orders"));
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_waits_for_a_person_and_a_rejection_ends_the_delivery() {
    let bench = Bench::start(example()).await;
    // 700 ms in staging is a warning (half the response-time score: 75 %), so the staging
    // approval (`warning: manual`) waits.
    let carts = bench.deliver("carts", measured(300, 700)).await;
    bench
        .wait_for(&carts, "staging to wait for its approval", |runs| {
            runs.iter()
                .any(|(r, e)| r.stage == "staging" && e.iter().any(|e| matches!(e, Event::ApprovalRequested { .. })))
        })
        .await;
    let staging = bench.runs(&carts).await[1].clone();
    let events = history(&*bench.store, &staging.run_id).await;
    assert_eq!(output_of(&events, "evaluation")["score"], json!(75.0));
    assert!(steps(&events).contains(&"task-ended evaluation finished warning".to_string()));
    assert!(bench.calls("staging", "release").is_empty());

    let reject = Input::Approve { task: "approval".into(), approved: false, by: "bob".into() };
    bench.rt.command("sockshop", &staging.run_id, reject).await.expect("reject");
    let runs = bench.drive(&carts).await;
    let stages: Vec<_> =
        runs.iter().map(|(r, _)| format!("{}.{} {}", r.stage, r.sequence, result(r).as_str())).collect();
    assert_eq!(stages, ["dev.delivery pass", "staging.delivery fail", "staging.rollback pass"], "{}", render(&runs));
    let staging_steps = steps(&runs[1].1);
    let tail: Vec<&str> = staging_steps.iter().rev().take(3).rev().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "task-ended approval finished fail",
            "task-ended release skipped",
            "run-finished finished fail next=staging.rollback"
        ]
    );
    assert!(bench.calls("staging", "release").is_empty() && bench.calls("production", "deployment").is_empty());
    assert_eq!(bench.calls("staging", "rollback").len(), 1);
    bench.stop().await;
}

/// Keptn's sockshop shipyard, unchanged, with its SLO and SLI files.
fn keptn(remediation: &'static str, fixes: &'static [&'static str]) -> Setup<'static> {
    Setup {
        shipyard: read("engine/tests/fixtures/keptn/shipyard-sockshop.yaml"),
        slo: "engine/tests/fixtures/keptn/slo-quality-gates.yaml",
        sli: "engine/tests/fixtures/keptn/sli-config-prometheus.yaml",
        remediation,
        fixes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keptn_remediation_loops_until_the_second_action_fixes_the_service() {
    // The sockshop shipyard unchanged; remediation.yaml with two actions for the problem (the
    // fixture's own has one per problem type: see the next test).
    let bench = Bench::start(keptn("examples/delivery/remediation.yaml", &["toggle-feature"])).await;
    let context = bench.problem("Response time degradation", None).await;
    let runs = bench.drive(&context).await;
    assert_eq!(
        rounds(&runs),
        [
            ("scaling".into(), "fail".into(), "production.remediation fail".into()),
            ("toggle-feature".into(), "pass".into(), "production.remediation pass".into()),
        ],
        "{}",
        render(&runs)
    );
    // Every step is in the event log: the action chosen, performed, the wait, the evaluation.
    let first = steps(&runs[0].1);
    let expected = [
        "task-started get-action#1",
        "attempt-ended get-action#1 pass",
        "task-ended get-action finished pass",
        "task-started action#1",
        "attempt-ended action#1 pass",
        "task-ended action finished pass",
        "task-delayed evaluation",
        "task-started evaluation#1",
        "attempt-ended evaluation#1 fail",
        "task-ended evaluation finished fail",
        "run-finished finished fail next=production.remediation",
    ];
    assert_eq!(first[1..], expected, "{}", render_history(&runs[0].1));
    assert_eq!(output_of(&runs[0].1, "evaluation")["evaluation"]["objectives"][0]["value"], json!(900.0));
    let second = &runs[1].1;
    assert_eq!(output_of(second, "get-action")["actionIndex"], json!(2));
    assert_eq!(output_of(second, "get-action")["action"]["value"], json!({"EnablePromotion": "off"}));
    assert_eq!(output_of(second, "evaluation")["evaluation"]["objectives"][0]["value"], json!(300.0));
    assert_eq!(steps(second).last().map(String::as_str), Some("run-finished finished pass"));
    // The action worker saw the action get-action chose and the problem it answers.
    let actions = bench.calls("production", "action");
    assert_eq!(actions.len(), 2);
    assert_eq!(actions[1].input["action"]["action"], "toggle-feature");
    let providers: Vec<&str> = actions.iter().map(|c| c.worker.as_str()).collect();
    assert_eq!(providers, ["scaler", "toggler"], "each action went to the provider that performs it");
    assert_eq!(actions[1].input["problem"]["problemTitle"], "Response time degradation");
    assert_eq!(bench.service.p95.load(Ordering::SeqCst), 300);
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keptn_fixture_remediation_runs_out_of_actions_and_stays_unresolved() {
    // The fixture's shipyard and remediation.yaml unchanged: the root cause response_time_p90
    // has one action (scale up by "1"); it does not help, the loop comes round once more, and
    // get-action has nothing left: the remediation ends unresolved.
    let bench = Bench::start(keptn("engine/tests/fixtures/keptn/remediation.yaml", &[])).await;
    let context = bench.problem("Response time degradation", Some("response_time_p90")).await;
    let runs = bench.drive(&context).await;
    assert_eq!(
        rounds(&runs),
        [
            ("scaling".into(), "fail".into(), "production.remediation fail".into()),
            ("-".into(), "skipped".into(), "production.remediation fail".into()),
        ],
        "{}",
        render(&runs)
    );
    assert_eq!(output_of(&runs[0].1, "get-action")["action"]["value"], json!("1"), "the root cause's action");
    let exhausted = output_of(&runs[1].1, "get-action");
    assert_eq!(exhausted["remediationExhausted"], json!(true));
    let message = exhausted["message"].as_str().expect("a message");
    assert!(message.contains("no action left") && message.contains("response_time_p90"), "{message}");
    assert_eq!(
        steps(&runs[1].1)[1..],
        [
            "task-started get-action#1",
            "attempt-ended get-action#1 fail",
            "task-ended get-action finished fail",
            "task-ended action skipped",
            "task-ended evaluation skipped",
            "run-finished finished fail",
        ]
    );
    assert_eq!(bench.calls("production", "action").len(), 1);
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_remediation_escalates_when_no_action_helps() {
    let bench = Bench::start(example()).await;
    let context = bench.problem("Response time degradation", None).await;
    let runs = bench.drive(&context).await;
    let summary: Vec<String> =
        runs.iter().map(|(r, _)| format!("{}.{} {}", r.stage, r.sequence, result(r).as_str())).collect();
    assert_eq!(
        summary,
        [
            "production.remediation fail",
            "production.remediation fail",
            "production.remediation fail",
            "production.escalation pass",
        ],
        "{}",
        render(&runs)
    );
    assert_eq!(rounds(&runs[..3])[2].0, "-");
    assert_eq!(next_of(&runs[2].1), [NextSequence { stage: "production".into(), sequence: "escalation".into() }]);
    // The notification got the whole story: who, where, and why it gave up.
    let notify = bench.calls("production", "notify");
    assert_eq!(notify.len(), 1);
    assert_eq!(notify[0].input["service"], "carts");
    assert!(
        notify[0].input["message"].as_str().unwrap_or("").contains("all 2 action(s) were taken"),
        "{:?}",
        notify[0].input
    );
    bench.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_keptn_problems_over_http_start_remediations() {
    use capstan::api::auth::Auth;
    use capstan::api::{Api, ApiServer};
    let bench = Bench::start(keptn("examples/delivery/remediation.yaml", &["scaling"])).await;
    let api = Api { runtime: bench.rt.clone(), auth: Auth::disabled(), limits: Default::default() };
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let server = ApiServer::start(api, any, any, None).await.expect("API starts");
    let http = format!("http://{}", server.http_addr());
    let client = reqwest::Client::new();

    // An Alertmanager notification, the project in the URL, the rest in the alert's labels.
    let notification = json!({"version": "4", "status": "firing", "receiver": "capstan", "alerts": [{
        "status": "firing", "fingerprint": "a1b2", "startsAt": "2026-11-27T01:00:00Z",
        "labels": {"alertname": "Response time degradation", "stage": "production", "service": "carts"},
        "annotations": {"summary": "p95 over 600 ms"},
    }]});
    let url = format!("{http}/v1/alerts/alertmanager?project=sockshop");
    let answer: Value = client.post(&url).json(&notification).send().await.expect("post").json().await.expect("json");
    let context = answer["started"][0]["keptnContext"].as_str().expect("started").to_string();
    let runs = bench.drive(&context).await;
    assert_eq!(rounds(&runs), [("scaling".into(), "pass".into(), "production.remediation pass".into())]);
    assert_eq!(runs[0].0.service.as_deref(), Some("carts"));
    let action = &bench.calls("production", "action")[0];
    assert_eq!(action.input["problem"]["problemDetails"]["summary"], "p95 over 600 ms");
    // Alertmanager repeats the notification while the alert fires: no second remediation.
    let again: Value = client.post(&url).json(&notification).send().await.expect("post").json().await.expect("json");
    assert_eq!(again["started"], json!([]));
    assert_eq!(again["skipped"][0]["reason"], "a remediation of this firing already started");

    // Keptn's problem event on the CloudEvents endpoint; a closed one starts nothing.
    let problem = |id: &str, state: &str| {
        json!({"specversion": "1.0", "id": id, "source": "dynatrace", "type": "sh.keptn.events.problem",
               "data": {"State": state, "ProblemID": "762", "ProblemTitle": "Response time degradation",
                        "project": "sockshop", "stage": "production", "service": "orders"}})
    };
    let post = |body: Value| {
        client
            .post(format!("{http}/v1/events"))
            .header("content-type", "application/cloudevents+json")
            .body(body.to_string())
            .send()
    };
    let response = post(problem("p1", "OPEN")).await.expect("post");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let answer: Value = response.json().await.expect("json");
    let runs = bench.drive(answer["keptnContext"].as_str().expect("context")).await;
    assert_eq!(rounds(&runs), [("scaling".into(), "pass".into(), "production.remediation pass".into())]);
    assert_eq!(runs[0].0.service.as_deref(), Some("orders"));
    let response = post(problem("p2", "CLOSED")).await.expect("post");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let filter = RunFilter { sequence: Some("remediation".into()), ..RunFilter::default() };
    assert_eq!(bench.store.list_runs(&filter).await.expect("list").len(), 2, "the closed problem started nothing");
    server.stop().await;
    bench.stop().await;
}

#[test]
fn capstan_validate_accepts_every_example_file() {
    let dir = path("examples/delivery");
    let mut names: Vec<_> = std::fs::read_dir(&dir).expect("examples").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    let mut summaries = Vec::new();
    for name in &names {
        let file = dir.join(name);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
            .args(["validate", "-f", &file.display().to_string()])
            .output()
            .expect("capstan runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}: {text}", file.display());
        summaries.push(text.lines().nth(1).unwrap_or_default().to_string());
    }
    assert_eq!(
        summaries,
        [
            "server configuration; delivery workers: evaluation (evaluation), prometheus (get-sli-prometheus), \
             static_sli (get-sli), webhook (webhook), get_action (get-action)",
            "remediation carts-remediation: Response time degradation (2 action(s)), Failure rate increase (1 \
             action(s)), default (1 action(s))",
            "sockshop (capstan.dev/v1)",
            "sli: error_rate, response_time_p95, throughput",
            "slo: 3 objective(s)",
        ],
        "{names:?}"
    );
    // A broken file is named with its problem.
    let bad = tempfile::tempdir().expect("tempdir");
    let toml = bad.path().join("capstan.toml");
    std::fs::write(&toml, "[workers.get_action]\nremediation = { sockshop = \"missing.yaml\" }\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["validate", "-f", &toml.display().to_string()])
        .output()
        .expect("capstan runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("workers.get_action.remediation.sockshop") && text.contains("missing.yaml"), "{text}");
}
