//! Projects and access: a token for project A can neither read, list, watch, trigger, approve,
//! steer nor publish anything of project B, over every method; roles limit what it may do in A;
//! calls without a valid token are refused.

use capstan_proto::grpc::v1 as pb;
use tonic::Code;

use super::{Clients, Server, waiting};

fn denied<T: std::fmt::Debug>(what: &str, want: Code, r: Result<tonic::Response<T>, tonic::Status>) {
    match r {
        Ok(ok) => panic!("{what}: allowed, answered {ok:?}"),
        Err(s) => assert_eq!(s.code(), want, "{what}: {}", s.message()),
    }
}

/// Every method aimed at project `b` / its run `run_b`, expecting `want`.
async fn every_method(c: &mut Clients, run_b: &str, want: Code) {
    let source = super::SHIPYARD.to_string();
    denied("apply", want, c.defs.apply(pb::ApplyDefinitionRequest { project: "b".into(), source }).await);
    let get = pb::GetDefinitionRequest { project: "b".into(), name: "shop".into(), version: 0 };
    denied("definition get", want, c.defs.get(get).await);
    let versions = pb::ListDefinitionVersionsRequest { project: "b".into(), name: "shop".into() };
    denied("list versions", want, c.defs.list_versions(versions).await);
    let trigger = pb::TriggerRunRequest {
        project: "b".into(),
        stage: "dev".into(),
        sequence: "quick".into(),
        ..Default::default()
    };
    denied("trigger", want, c.runs.trigger(trigger).await);
    denied("get", want, c.runs.get(pb::GetRunRequest { project: String::new(), run_id: run_b.into() }).await);
    denied("get naming A", want, c.runs.get(pb::GetRunRequest { project: "a".into(), run_id: run_b.into() }).await);
    denied("list", want, c.runs.list(pb::ListRunsRequest { project: "b".into(), ..Default::default() }).await);
    let watch = pb::WatchRunRequest { project: String::new(), run_id: run_b.into(), from_seq: 1 };
    denied("watch", want, c.runs.watch(watch).await);
    let r = pb::RunRef { project: String::new(), run_id: run_b.into() };
    denied("pause", want, c.runs.pause(r.clone()).await);
    denied("resume", want, c.runs.resume(r).await);
    let approve =
        pb::ApproveRequest { project: String::new(), run_id: run_b.into(), task: "gate".into(), reject: false };
    denied("approve", want, c.runs.approve(approve.clone()).await);
    denied("reject", want, c.runs.approve(pb::ApproveRequest { reject: true, ..approve }).await);
    let cancel = pb::CancelRunRequest { project: String::new(), run_id: run_b.into(), reason: "x".into() };
    denied("cancel", want, c.runs.cancel(cancel).await);
    let event = pb::CloudEvent {
        id: format!("evil-{}", want as i32),
        source: "test".into(),
        spec_version: "1.0".into(),
        r#type: "sh.keptn.event.dev.quick.triggered".into(),
        data: Some(pb::cloud_event::Data::DataJson(r#"{"project":"b"}"#.into())),
        ..Default::default()
    };
    let publish = pb::PublishEventRequest { project: String::new(), event: Some(event.clone()) };
    denied("publish", want, c.events.publish(publish).await);
    let ext =
        pb::CloudEvent { data: None, extensions: [("capstanproject".to_string(), "b".to_string())].into(), ..event };
    denied(
        "publish by extension",
        want,
        c.events.publish(pb::PublishEventRequest { project: String::new(), event: Some(ext) }).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_project_a_reaches_nothing_of_project_b() {
    let server = Server::start("");
    let mut b = server.clients(Some("admin-b")).await;
    b.apply("b").await;
    let run_b = b.trigger("b", "delivery").await;
    b.wait_run(&run_b, |r| waiting(r, "gate")).await;
    let mut admin_a = server.clients(Some("admin-a")).await;
    admin_a.apply("a").await;
    let run_a = admin_a.trigger("a", "quick").await;

    for token in ["admin-a", "op-a", "view-a"] {
        let mut c = server.clients(Some(token)).await;
        every_method(&mut c, &run_b, Code::PermissionDenied).await;
        // Listing without a project would cross projects: refused.
        denied("list all", Code::InvalidArgument, c.runs.list(pb::ListRunsRequest::default()).await);
        // A's own listing holds A's run and nothing of B.
        let own = c.runs.list(pb::ListRunsRequest { project: "a".into(), ..Default::default() }).await.unwrap();
        let ids: Vec<String> = own.into_inner().runs.into_iter().map(|r| r.run_id).collect();
        assert_eq!(ids, vec![run_a.clone()], "{token}");
    }
    // Naming A in the request while the event names B is refused too.
    let event = pb::CloudEvent {
        id: "mixed".into(),
        source: "test".into(),
        spec_version: "1.0".into(),
        r#type: "sh.keptn.event.dev.quick.triggered".into(),
        data: Some(pb::cloud_event::Data::DataJson(r#"{"project":"b"}"#.into())),
        ..Default::default()
    };
    let r = admin_a.events.publish(pb::PublishEventRequest { project: "a".into(), event: Some(event) }).await;
    denied("publish with mismatched project", Code::InvalidArgument, r);

    for token in [None, Some("not-a-token")] {
        let mut c = server.clients(token).await;
        every_method(&mut c, &run_b, Code::Unauthenticated).await;
        let validate = pb::ValidateDefinitionRequest { source: super::SHIPYARD.into() };
        denied("validate", Code::Unauthenticated, c.defs.validate(validate).await);
        denied("evaluate", Code::Unauthenticated, c.evals.evaluate(pb::EvaluateRequest::default()).await);
    }

    // B's run was not touched by any of it.
    let run = b.wait_run(&run_b, |r| waiting(r, "gate")).await;
    assert_eq!(run.status, "running");
    let seen = b.runs.list(pb::ListRunsRequest { project: "b".into(), ..Default::default() }).await.unwrap();
    assert_eq!(seen.into_inner().runs.len(), 1, "no run was started in B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_limit_what_a_token_does_in_its_project() {
    let server = Server::start("");
    let mut admin = server.clients(Some("admin-a")).await;
    admin.apply("a").await;
    let run = admin.trigger("a", "delivery").await;
    admin.wait_run(&run, |r| waiting(r, "gate")).await;

    let mut viewer = server.clients(Some("view-a")).await;
    viewer.wait_run(&run, |r| waiting(r, "gate")).await;
    let trigger = pb::TriggerRunRequest {
        project: "a".into(),
        stage: "dev".into(),
        sequence: "quick".into(),
        ..Default::default()
    };
    denied("viewer trigger", Code::PermissionDenied, viewer.runs.trigger(trigger.clone()).await);
    let approve = pb::ApproveRequest { project: "a".into(), run_id: run.clone(), task: "gate".into(), reject: false };
    denied("viewer approve", Code::PermissionDenied, viewer.runs.approve(approve.clone()).await);

    let mut operator = server.clients(Some("op-a")).await;
    let source = super::SHIPYARD.to_string();
    denied(
        "operator apply",
        Code::PermissionDenied,
        operator.defs.apply(pb::ApplyDefinitionRequest { project: "a".into(), source }).await,
    );
    operator.runs.trigger(trigger).await.expect("operators trigger");
    operator.runs.approve(pb::ApproveRequest { reject: true, ..approve }).await.expect("operators approve");
    let done = operator.wait_run(&run, |r| r.status == "finished").await;
    assert_eq!(done.result, "fail", "a rejected approval fails the run");
}
