//! Bad input changes nothing: every malformed or misdirected request over HTTP and gRPC gets a
//! clear error, and afterwards the event store's global position, the run list and the
//! definitions are exactly as before. Malformed worker messages on the broker are refused or
//! dead-lettered and block nothing. (`http.rs` and `grpc.rs` check the status codes of the common
//! cases; this module adds the cases they lack and the "no state change" half of each.)

use std::collections::BTreeMap;
use std::time::Duration;

use capstan_brokers::nats::{NatsBroker, NatsConfig};
use capstan_brokers::{Broker, Message};
use capstan_proto::grpc::v1 as pb;
use capstan_proto::{AttemptRef, CloudEvent, Finished, TaskResult, topics, types};
use capstan_store::postgres::PostgresStore;
use capstan_store::{Definitions, EventReader, RunFilter, RunIndex};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::Code;

use super::{SHIPYARD, Server, postgres_url};
use crate::faults::services::{BrokerKind, PrivateBroker};

/// What bad input must not change.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    last_position: i64,
    runs: usize,
    definitions: usize,
}

async fn store_of(server: &Server) -> PostgresStore {
    PostgresStore::connect_with_schema(&postgres_url(), &server.schema).await.expect("open the server's schema")
}

async fn snapshot(store: &PostgresStore) -> Snapshot {
    let mut last_position = 0;
    loop {
        let page = store.read_all(last_position, 1000).await.expect("read all events");
        match page.last() {
            Some(e) => last_position = e.position,
            None => break,
        }
    }
    Snapshot {
        last_position,
        runs: store.list_runs(&RunFilter::default()).await.expect("list runs").len(),
        definitions: store.list_definitions("a").await.expect("list definitions").len(),
    }
}

async fn post(server: &Server, headers: &[(&str, &str)], body: Vec<u8>) -> (StatusCode, String) {
    let mut request = reqwest::Client::new().post(format!("{}/v1/events", server.http)).bearer_auth("op-a").body(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body["error"].as_str().unwrap_or_default().to_string())
}

/// A bad HTTP request: what it is, its headers and body, the status and a word the error must say.
type HttpCase = (&'static str, Vec<(&'static str, &'static str)>, Vec<u8>, StatusCode, &'static str);

const STRUCTURED: &[(&str, &str)] = &[("content-type", "application/cloudevents+json")];

fn event(fields: Value) -> Vec<u8> {
    let mut e = json!({
        "specversion": "1.0", "id": "x1", "source": "ci", "type": "sh.keptn.event.dev.quick.triggered",
        "data": {"project": "a"},
    });
    for (k, v) in fields.as_object().expect("fields").clone() {
        if v.is_null() {
            e.as_object_mut().expect("object").remove(&k);
        } else {
            e[k] = v;
        }
    }
    serde_json::to_vec(&e).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_over_http_and_grpc_change_nothing() {
    let server = Server::start("");
    let mut c = server.clients(Some("admin-a")).await;
    c.apply("a").await;
    let open = c.trigger("a", "delivery").await;
    c.wait_run(&open, |r| super::waiting(r, "gate")).await;
    let store = store_of(&server).await;
    let before = snapshot(&store).await;

    // HTTP: each case is (what, headers, body, status, a word the error must say).
    let binary = |ct: &'static str| {
        vec![
            ("ce-specversion", "1.0"),
            ("ce-id", "b1"),
            ("ce-source", "ci"),
            ("ce-type", "sh.keptn.event.dev.quick.triggered"),
            ("ce-capstanproject", "a"),
            ("content-type", ct),
        ]
    };
    let big = json!({"project": "a", "blob": "x".repeat(65 * 1024)});
    let http_cases: Vec<HttpCase> = vec![
        ("missing id", STRUCTURED.to_vec(), event(json!({"id": null})), StatusCode::BAD_REQUEST, "id"),
        ("missing source", STRUCTURED.to_vec(), event(json!({"source": null})), StatusCode::BAD_REQUEST, "source"),
        ("missing type", STRUCTURED.to_vec(), event(json!({"type": null})), StatusCode::BAD_REQUEST, "type"),
        ("empty id", STRUCTURED.to_vec(), event(json!({"id": ""})), StatusCode::BAD_REQUEST, "id"),
        (
            "wrong specversion",
            STRUCTURED.to_vec(),
            event(json!({"specversion": "0.3"})),
            StatusCode::BAD_REQUEST,
            "specversion",
        ),
        ("not JSON", STRUCTURED.to_vec(), b"{\"specversion\": ".to_vec(), StatusCode::BAD_REQUEST, "JSON"),
        ("invalid UTF-8", STRUCTURED.to_vec(), b"{\"id\": \"\xc3\x28\"}".to_vec(), StatusCode::BAD_REQUEST, "UTF-8"),
        ("binary data not JSON", binary("application/json"), b"{nope".to_vec(), StatusCode::BAD_REQUEST, "data"),
        (
            "binary data invalid UTF-8",
            binary("application/json"),
            b"{\"k\": \"\xff\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "data",
        ),
        (
            "unknown sequence",
            STRUCTURED.to_vec(),
            event(json!({"type": "sh.keptn.event.dev.nope.triggered"})),
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            "over the payload limit",
            STRUCTURED.to_vec(),
            event(json!({"id": "big", "data": big})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
        ),
    ];
    for (what, headers, body, want, mentions) in http_cases {
        let (status, error) = post(&server, &headers, body).await;
        assert_eq!(status, want, "HTTP {what}: {error}");
        assert!(error.contains(mentions), "HTTP {what}: `{error}` should mention `{mentions}`");
        assert_eq!(snapshot(&store).await, before, "HTTP {what} changed the state");
    }

    // gRPC: malformed CloudEvents, unknown runs and tasks, bad definitions, too much data.
    let ce = |f: &dyn Fn(&mut pb::CloudEvent)| {
        let mut e = pb::CloudEvent {
            id: "g1".into(),
            source: "ci".into(),
            spec_version: "1.0".into(),
            r#type: "sh.keptn.event.dev.quick.triggered".into(),
            data: Some(pb::cloud_event::Data::DataJson(r#"{"project":"a"}"#.into())),
            ..Default::default()
        };
        f(&mut e);
        pb::PublishEventRequest { project: String::new(), event: Some(e) }
    };
    let publish_cases: Vec<(&str, pb::PublishEventRequest, Code, &str)> = vec![
        ("missing id", ce(&|e| e.id.clear()), Code::InvalidArgument, "id"),
        ("missing source", ce(&|e| e.source.clear()), Code::InvalidArgument, "source"),
        ("missing type", ce(&|e| e.r#type.clear()), Code::InvalidArgument, "type"),
        ("wrong specversion", ce(&|e| e.spec_version = "0.3".into()), Code::InvalidArgument, "spec"),
        (
            "data_json not JSON",
            ce(&|e| e.data = Some(pb::cloud_event::Data::DataJson("{nope".into()))),
            Code::InvalidArgument,
            "data",
        ),
        (
            "data over the limit",
            ce(&|e| {
                let blob = format!(r#"{{"project":"a","blob":"{}"}}"#, "x".repeat(65 * 1024));
                e.data = Some(pb::cloud_event::Data::DataJson(blob));
            }),
            Code::ResourceExhausted,
            "",
        ),
        ("no event", pb::PublishEventRequest { project: "a".into(), event: None }, Code::InvalidArgument, "event"),
    ];
    for (what, request, want, mentions) in publish_cases {
        let status = c.events.publish(request).await.expect_err(what);
        assert_eq!(status.code(), want, "gRPC publish {what}: {}", status.message());
        assert!(status.message().contains(mentions), "gRPC publish {what}: `{}`", status.message());
        assert_eq!(snapshot(&store).await, before, "gRPC publish {what} changed the state");
    }

    let unknown = "00000000-0000-0000-0000-000000000000".to_string();
    let r = pb::RunRef { project: "a".into(), run_id: unknown.clone() };
    let cancel = pb::CancelRunRequest { project: "a".into(), run_id: unknown.clone(), reason: "x".into() };
    let approve = |run_id: &str, task: &str| pb::ApproveRequest {
        project: "a".into(),
        run_id: run_id.into(),
        task: task.into(),
        reject: false,
    };
    let answers: Vec<(&str, Result<(), tonic::Status>, Code)> = vec![
        ("cancel an unknown run", c.runs.cancel(cancel).await.map(drop), Code::NotFound),
        ("pause an unknown run", c.runs.pause(r.clone()).await.map(drop), Code::NotFound),
        ("resume an unknown run", c.runs.resume(r).await.map(drop), Code::NotFound),
        ("approve in an unknown run", c.runs.approve(approve(&unknown, "gate")).await.map(drop), Code::NotFound),
        (
            "approve an unknown task",
            c.runs.approve(approve(&open, "no-such-task")).await.map(drop),
            Code::InvalidArgument,
        ),
    ];
    for (what, answer, want) in answers {
        let status = answer.expect_err(what);
        assert_eq!(status.code(), want, "{what}: {}", status.message());
        assert!(!status.message().is_empty(), "{what}: no reason given");
        assert_eq!(snapshot(&store).await, before, "{what} changed the state");
    }

    let cyclic = SHIPYARD.replace(
        "            - name: hello\n              type: echo\n",
        concat!(
            "            - {name: hello, type: echo, dependsOn: [bye]}\n",
            "            - {name: bye, type: echo, dependsOn: [hello]}\n",
        ),
    );
    assert_ne!(cyclic, SHIPYARD, "the cyclic variant must differ");
    let oversized = format!("{SHIPYARD}\n# {}\n", "x".repeat(2 * 1024 * 1024));
    let no_stages = "apiVersion: capstan.dev/v1\nkind: Shipyard\nmetadata: {name: empty}\n".to_string();
    let definitions: Vec<(&str, String, Code, &str)> = vec![
        ("a cyclic definition", cyclic, Code::InvalidArgument, "cycle"),
        ("an oversized definition", oversized, Code::ResourceExhausted, ""),
        ("a definition without stages", no_stages, Code::InvalidArgument, ""),
    ];
    for (what, source, want, mentions) in definitions {
        let status = c.defs.apply(pb::ApplyDefinitionRequest { project: "a".into(), source }).await.expect_err(what);
        assert_eq!(status.code(), want, "{what}: {}", status.message());
        assert!(status.message().contains(mentions), "{what}: `{}` should mention `{mentions}`", status.message());
        assert_eq!(snapshot(&store).await, before, "{what} changed the state");
    }

    // Invalid UTF-8 in a protobuf string field: the request is encoded by hand.
    let status = raw_grpc::publish_with_invalid_utf8(&server.grpc).await;
    // tonic alone answers a body prost cannot decode with Internal; Capstan's codec says whose
    // mistake it is.
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{status:?}");
    assert_eq!(snapshot(&store).await, before, "invalid UTF-8 over gRPC changed the state");

    // The limits are limits, not a refusal of everything: 64 KiB of data is accepted (and that
    // does change the state).
    let blob = |n: usize| json!({"project": "a", "blob": "x".repeat(n)});
    let overhead = serde_json::to_vec(&blob(0)).expect("json").len();
    let (status, error) =
        post(&server, STRUCTURED, event(json!({"id": "ok64", "data": blob(64 * 1024 - overhead)}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{error}");
    assert_eq!(snapshot(&store).await.runs, before.runs + 1);
}

/// A gRPC call whose body is raw protobuf bytes, so that a string field can hold bytes that are
/// not UTF-8 (no generated client can send that).
mod raw_grpc {
    use prost::Message as _;
    use prost::bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    use super::pb;

    #[derive(Default)]
    pub struct Raw;

    pub struct RawEncoder;
    pub struct RawDecoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let mut out = vec![0; src.remaining()];
            src.copy_to_slice(&mut out);
            Ok(Some(out))
        }
    }

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }

    /// Publishes an event whose id is the bytes FF FE FD FC; returns the server's status.
    pub async fn publish_with_invalid_utf8(addr: &str) -> tonic::Status {
        let request = pb::PublishEventRequest {
            project: "a".into(),
            event: Some(pb::CloudEvent {
                id: "\u{1}\u{2}\u{3}\u{4}".into(),
                source: "ci".into(),
                spec_version: "1.0".into(),
                r#type: "sh.keptn.event.dev.quick.triggered".into(),
                data: Some(pb::cloud_event::Data::DataJson(r#"{"project":"a"}"#.into())),
                ..Default::default()
            }),
        };
        let mut bytes = request.encode_to_vec();
        let at = bytes.windows(4).position(|w| w == [1, 2, 3, 4]).expect("the placeholder id");
        bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
        let channel = tonic::transport::Channel::from_shared(addr.to_string()).expect("uri").connect().await;
        let mut grpc = tonic::client::Grpc::new(channel.expect("connect gRPC"));
        grpc.ready().await.expect("gRPC ready");
        let mut req = tonic::Request::new(bytes);
        req.metadata_mut().insert("authorization", "Bearer op-a".parse().expect("ascii"));
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/capstan.v1.EventService/Publish");
        match grpc.unary(req, path, Raw).await {
            Ok(_) => tonic::Status::ok("accepted"),
            Err(status) => status,
        }
    }
}

/// A worker result for a run nobody started, an undecodable payload, an unknown message type
/// and raw bytes that are no CloudEvent at all, published where workers publish: none changes
/// the state, all but the result for an unknown run (which is refused) land in the dead-letter
/// stream with their reason, and the engine keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_worker_messages_on_the_broker_change_nothing_and_block_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = PrivateBroker::start(BrokerKind::Nats, dir.path());
    let server = Server::start(&format!("[broker]\nkind = \"nats\"\nurl = \"{}\"", nats.url()));
    let mut c = server.clients(Some("admin-a")).await;
    c.apply("a").await;
    let first = c.trigger("a", "quick").await;
    c.wait_run(&first, |r| r.status == "finished").await;
    let store = store_of(&server).await;
    let before = snapshot(&store).await;

    let broker = NatsBroker::connect(&nats.url(), NatsConfig::default()).await.expect("connect to NATS");
    let config = NatsConfig::default();
    let mut dead = broker.client().subscribe(format!("{}-dead.>", config.subject_prefix)).await.expect("subscribe");
    let unknown_run = "00000000-0000-0000-0000-00000000dead";
    let finished = Finished {
        attempt: AttemptRef { project: "a".into(), run_id: unknown_run.into(), task: "hello".into(), attempt: 1 },
        worker_id: "intruder".into(),
        token: 1,
        result: TaskResult::Pass,
        output: Value::Null,
        error: None,
    };
    let message = |id: &str, ty: &str, data: Value| Message {
        topic: topics::ENGINE_INPUTS.into(),
        key: unknown_run.into(),
        event: CloudEvent::new(id, "worker/intruder", ty).with_data(data),
    };
    broker
        .publish(vec![
            message("bad-unknown-run", types::TASK_FINISHED, serde_json::to_value(&finished).expect("json")),
            message("bad-payload", types::TASK_FINISHED, json!("not a result")),
            message("bad-type", "dev.capstan.task.nonsense.v1", json!({})),
        ])
        .await
        .expect("publish the bad messages");
    let subject = format!("{}.{}", config.subject_prefix, topics::ENGINE_INPUTS);
    broker.client().publish(subject, b"\xff not a CloudEvent"[..].into()).await.expect("publish raw bytes");
    broker.client().flush().await.expect("flush");

    // The broker dead-letters the raw bytes, the engine the CloudEvents it cannot use; each
    // letter carries its reason. By event id, `raw` for the bytes.
    let mut letters = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while letters.len() < 3 {
        let Ok(letter) = tokio::time::timeout_at(deadline, dead.next()).await else {
            panic!("only {letters:?} reached the dead-letter stream");
        };
        let letter = letter.expect("subscription open");
        let header = |name: &str| letter.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
        // A dead letter is kept as it came: a CloudEvent published alone in structured mode, or
        // the raw bytes.
        let id = match CloudEvent::from_json(&letter.payload) {
            Ok(event) => event.id,
            Err(_) => {
                assert_eq!(letter.payload.as_ref(), b"\xff not a CloudEvent", "kept as it came");
                "raw".into()
            }
        };
        let reason = header(capstan_brokers::nats::DEAD_REASON_HEADER);
        let reason = reason.unwrap_or_else(|| panic!("a dead letter without its reason: {:?}", letter.headers));
        letters.insert(id, reason);
    }
    assert_eq!(letters.keys().map(String::as_str).collect::<Vec<_>>(), ["bad-payload", "bad-type", "raw"]);
    assert!(letters["bad-payload"].contains("does not fit"), "the reason says why: {letters:?}");
    assert!(letters["bad-type"].contains("not an engine input"), "the reason says why: {letters:?}");

    // Nothing blocks: a run started after them goes through the same input stream and ends.
    let second = c.trigger("a", "quick").await;
    c.wait_run(&second, |r| r.status == "finished").await;
    let after = snapshot(&store).await;
    assert_eq!(after.runs, before.runs + 1, "only the second run is new");
    let new_events = store.read_all(before.last_position, 10_000).await.expect("read the new events");
    let strays: Vec<_> = new_events.iter().filter(|e| e.run_id != second).map(|e| (&e.run_id, e.seq)).collect();
    assert!(strays.is_empty(), "the bad messages changed other runs: {strays:?}");
    assert!(store.get_run(unknown_run).await.expect("get run").is_none(), "a result created a run");
    let log = server.log();
    for id in ["bad-payload", "bad-type"] {
        assert!(log.contains(id), "the server did not say why it dead-lettered {id}:\n{log}");
    }
    let late = tokio::time::timeout(Duration::from_millis(500), dead.next()).await;
    assert!(late.is_err(), "a result for an unknown run is refused, not dead-lettered: {late:?}");
}
