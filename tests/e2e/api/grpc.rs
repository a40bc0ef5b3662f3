//! gRPC end to end: definitions, runs (trigger, get, list with pages, watch, approve, pause,
//! resume, cancel), events, evaluations, health, reflection, and the code of every user mistake.

use std::collections::HashMap;

use capstan_proto::grpc::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use super::{SHIPYARD, Server, waiting};

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let status = r.expect_err("the call should fail");
    (status.code(), status.message().to_string())
}

fn trigger(project: &str, stage: &str, sequence: &str) -> pb::TriggerRunRequest {
    pb::TriggerRunRequest {
        project: project.into(),
        stage: stage.into(),
        sequence: sequence.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_and_their_errors() {
    let server = Server::start("");
    let mut c = server.clients(Some("admin-a")).await;
    let bad = c.defs.apply(pb::ApplyDefinitionRequest { project: "a".into(), source: "spec: [".into() }).await;
    assert_eq!(code(bad).0, Code::InvalidArgument);
    let (c0, msg) =
        code(c.defs.apply(pb::ApplyDefinitionRequest { project: String::new(), source: SHIPYARD.into() }).await);
    assert_eq!(c0, Code::InvalidArgument);
    assert!(msg.contains("project"), "{msg}");
    c.apply("a").await;
    let changed = format!("{SHIPYARD}\n# second version\n");
    let v2 =
        c.defs.apply(pb::ApplyDefinitionRequest { project: "a".into(), source: changed }).await.unwrap().into_inner();
    assert_eq!((v2.name.as_str(), v2.version), ("shop", 2));
    let get = pb::GetDefinitionRequest { project: "a".into(), name: String::new(), version: 1 };
    assert_eq!(c.defs.get(get).await.unwrap().into_inner().source, SHIPYARD);
    let versions = c.defs.list_versions(pb::ListDefinitionVersionsRequest { project: "a".into(), name: "shop".into() });
    assert_eq!(versions.await.unwrap().into_inner().versions.len(), 2);
    let missing = pb::GetDefinitionRequest { project: "a".into(), name: "nope".into(), version: 0 };
    assert_eq!(code(c.defs.get(missing).await).0, Code::NotFound);
    let v = c
        .defs
        .validate(pb::ValidateDefinitionRequest { source: "apiVersion: capstan.dev/v1\nkind: Shipyard\n".into() });
    let v = v.await.unwrap().into_inner();
    assert!(!v.valid && !v.problems.is_empty(), "{v:?}");
    let v = c.defs.validate(pb::ValidateDefinitionRequest { source: SHIPYARD.into() }).await.unwrap().into_inner();
    assert!(v.valid && v.summary.contains("delivery"), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_end_to_end_with_error_codes() {
    let server = Server::start("");
    let mut c = server.clients(Some("admin-a")).await;
    c.apply("a").await;
    let run_id = c.trigger("a", "delivery").await;
    let run = c.wait_run(&run_id, |r| waiting(r, "gate")).await;
    assert_eq!((run.project.as_str(), run.status.as_str()), ("a", "running"));

    let approve = |task: &str| pb::ApproveRequest {
        project: String::new(),
        run_id: run_id.clone(),
        task: task.into(),
        reject: false,
    };
    let (c0, msg) = code(c.runs.approve(approve("build")).await);
    assert_eq!(c0, Code::FailedPrecondition, "{msg}");
    let (c0, msg) = code(c.runs.approve(approve("nope")).await);
    assert!(c0 == Code::InvalidArgument && msg.contains("task"), "{c0:?} {msg}");

    // Watch from the start while the approval arrives: the stream ends with the run.
    let watch = pb::WatchRunRequest { project: "a".into(), run_id: run_id.clone(), from_seq: 1 };
    let mut stream = c.runs.watch(watch).await.unwrap().into_inner();
    c.runs.approve(approve("gate")).await.unwrap();
    let mut kinds = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        kinds.push(e.kind);
    }
    assert_eq!(kinds.first().map(String::as_str), Some("run-started"));
    assert_eq!(kinds.last().map(String::as_str), Some("run-finished"), "{kinds:?}");
    let run = c.wait_run(&run_id, |r| r.status == "finished").await;
    assert_eq!(run.result, "pass");
    assert_eq!(code(c.runs.approve(approve("gate")).await).0, Code::FailedPrecondition);
    let cancel = pb::CancelRunRequest { project: String::new(), run_id: run_id.clone(), reason: String::new() };
    assert_eq!(code(c.runs.cancel(cancel).await).0, Code::FailedPrecondition);

    // Naming the wrong project for a run is NotFound, not a leak of the run.
    let wrong = pb::GetRunRequest { project: "other".into(), run_id: run_id.clone() };
    assert_eq!(code(c.runs.get(wrong).await).0, Code::NotFound);
    let unknown = pb::GetRunRequest { project: String::new(), run_id: "no-such-run".into() };
    assert_eq!(code(c.runs.get(unknown).await).0, Code::NotFound);
    let (c0, msg) = code(c.runs.trigger(trigger("a", "", "delivery")).await);
    assert!(c0 == Code::InvalidArgument && msg.starts_with("stage"), "{msg}");
    assert_eq!(code(c.runs.trigger(trigger("a", "dev", "nope")).await).0, Code::NotFound);
    let mut bad_json = trigger("a", "dev", "quick");
    bad_json.data = Some(pb::trigger_run_request::Data::DataJson("{nope".into()));
    let (c0, msg) = code(c.runs.trigger(bad_json).await);
    assert!(c0 == Code::InvalidArgument && msg.contains("data_json"), "{msg}");
    let mut once = trigger("a", "dev", "quick");
    once.request_id = "req-1".into();
    // A repeated request id (a retry after a lost answer) gets the same run, not a second one.
    let first = c.runs.trigger(once.clone()).await.unwrap().into_inner().run_id;
    assert_eq!(c.runs.trigger(once).await.unwrap().into_inner().run_id, first);

    // Pause, resume and cancel an open run.
    let open = c.trigger("a", "delivery").await;
    c.wait_run(&open, |r| waiting(r, "gate")).await;
    let r = pb::RunRef { project: "a".into(), run_id: open.clone() };
    c.runs.pause(r.clone()).await.unwrap();
    assert_eq!(c.wait_run(&open, |r| r.status == "paused").await.status, "paused");
    c.runs.resume(r).await.unwrap();
    let cancel = pb::CancelRunRequest { project: "a".into(), run_id: open.clone(), reason: "test".into() };
    c.runs.cancel(cancel).await.unwrap();
    assert_eq!(c.wait_run(&open, |r| r.status == "cancelled").await.status, "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_and_filters() {
    let server = Server::start("");
    let mut c = server.clients(Some("admin-a")).await;
    c.apply("a").await;
    let mut started = Vec::new();
    for _ in 0..3 {
        started.push(c.trigger("a", "quick").await);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let request =
            pb::ListRunsRequest { project: "a".into(), page_size: 2, page_token: token, ..Default::default() };
        let page = c.runs.list(request).await.unwrap().into_inner();
        seen.extend(page.runs.into_iter().map(|r| r.run_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    started.sort();
    seen.sort();
    assert_eq!(seen, started);
    let filtered = pb::ListRunsRequest { project: "a".into(), sequence: "delivery".into(), ..Default::default() };
    assert!(c.runs.list(filtered).await.unwrap().into_inner().runs.is_empty());
    let bad = pb::ListRunsRequest { project: "a".into(), page_token: "garbage".into(), ..Default::default() };
    let (c0, msg) = code(c.runs.list(bad).await);
    assert!(c0 == Code::InvalidArgument && msg.contains("page_token"), "{msg}");
    let none = pb::ListRunsRequest::default();
    assert_eq!(code(c.runs.list(none).await).0, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_evaluations_limits_health_and_reflection() {
    let mut server = Server::start("");
    let mut c = server.clients(Some("admin-a")).await;
    c.apply("a").await;
    let event = |id: &str, ty: &str, data: &str| pb::CloudEvent {
        id: id.into(),
        source: "test".into(),
        spec_version: "1.0".into(),
        r#type: ty.into(),
        data: Some(pb::cloud_event::Data::DataJson(data.into())),
        ..Default::default()
    };
    let publish = |ev: pb::CloudEvent| pb::PublishEventRequest { project: String::new(), event: Some(ev) };
    let r = c.events.publish(publish(event("e1", "sh.keptn.event.dev.quick.triggered", r#"{"project":"a"}"#))).await;
    let r = r.unwrap().into_inner();
    assert_eq!(c.wait_run(&r.run_id, |r| r.status == "finished").await.result, "pass");
    // The same CloudEvent again (a producer's retry) points at the same run and starts nothing.
    let again =
        c.events.publish(publish(event("e1", "sh.keptn.event.dev.quick.triggered", r#"{"project":"a"}"#))).await;
    assert_eq!(again.unwrap().into_inner().run_id, r.run_id);
    let (c0, msg) = code(c.events.publish(publish(event("e2", "sh.keptn.event.deployment.triggered", "{}"))).await);
    assert!(c0 == Code::InvalidArgument && msg.starts_with("type"), "{msg}");
    let (c0, msg) = code(c.events.publish(publish(event("", "sh.keptn.event.dev.quick.triggered", "{}"))).await);
    assert!(c0 == Code::InvalidArgument && msg.starts_with("id"), "{msg}");

    // 64 KiB of data is accepted; more is ResourceExhausted.
    let blob = |n: usize| format!(r#"{{"blob":"{}"}}"#, "x".repeat(n - 11));
    let mut big = trigger("a", "dev", "quick");
    big.data = Some(pb::trigger_run_request::Data::DataJson(blob(64 * 1024)));
    c.runs.trigger(big.clone()).await.expect("64 KiB of data is within the default limit");
    big.data = Some(pb::trigger_run_request::Data::DataJson(blob(64 * 1024 + 1)));
    assert_eq!(code(c.runs.trigger(big.clone()).await).0, Code::ResourceExhausted);
    big.data = Some(pb::trigger_run_request::Data::DataJson(blob(1024 * 1024)));
    assert_eq!(code(c.runs.trigger(big).await).0, Code::ResourceExhausted);

    let slo = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/engine/tests/fixtures/keptn/slo-quality-gates.yaml"
    ))
    .expect("slo fixture");
    let request = pb::EvaluateRequest {
        slo_yaml: slo,
        values: HashMap::from([("response_time_p95".to_string(), 500.0)]),
        previous: vec![pb::PreviousResult {
            result: "pass".into(),
            values: HashMap::from([("response_time_p95".to_string(), 480.0)]),
        }],
    };
    let e = c.evals.evaluate(request).await.unwrap().into_inner();
    assert_eq!((e.result.as_str(), e.score), ("pass", 100.0), "{}", e.table);
    let bad = pb::EvaluateRequest { slo_yaml: "objectives: 3".into(), ..Default::default() };
    let (c0, msg) = code(c.evals.evaluate(bad).await);
    assert!(c0 == Code::InvalidArgument && msg.starts_with("slo_yaml"), "{msg}");

    let channel = tonic::transport::Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = tonic_health::pb::HealthCheckRequest { service: "capstan.v1.RunService".into() };
    assert_eq!(health.check(check).await.unwrap().into_inner().status, ServingStatus::Serving as i32);
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::iter(vec![ask])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().and_then(|m| m.message_response)
    else {
        panic!("reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in
        ["capstan.v1.RunService", "capstan.v1.DefinitionService", "capstan.v1.EventService", "grpc.health.v1.Health"]
    {
        assert!(names.iter().any(|n| n == wanted), "{wanted} missing from {names:?}");
    }
    drop(c);
    assert!(server.terminate().success(), "graceful shutdown failed:\n{}", server.log());
}
