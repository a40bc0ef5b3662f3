//! HTTP end to end: CloudEvents in structured and binary mode start sequences; every malformed
//! request gets a 4xx with the reason as JSON; health and readiness.

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::Server;

async fn post(server: &Server, token: Option<&str>, headers: &[(&str, &str)], body: Vec<u8>) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new().post(format!("{}/v1/events", server.http)).body(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// A bad request: what it is, its headers and body, the status and a word the error must say.
type Case = (&'static str, Vec<(&'static str, &'static str)>, Vec<u8>, StatusCode, &'static str);

const STRUCTURED: &[(&str, &str)] = &[("content-type", "application/cloudevents+json")];

fn keptn(id: &str, sequence: &str, data: Value) -> Vec<u8> {
    let event = json!({
        "specversion": "1.0",
        "id": id,
        "source": "https://example.test/ci",
        "type": format!("sh.keptn.event.dev.{sequence}.triggered"),
        "datacontenttype": "application/json",
        "data": data,
    });
    serde_json::to_vec(&event).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_start_sequences_and_errors_say_why() {
    let server = Server::start("");
    let mut c = server.clients(Some("admin-a")).await;
    c.apply("a").await;

    let (status, body) =
        post(&server, Some("op-a"), STRUCTURED, keptn("s1", "quick", json!({"project": "a", "service": "cart"}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let run_id = body["runId"].as_str().expect("runId").to_string();
    let run = c.wait_run(&run_id, |r| r.status == "finished").await;
    assert_eq!((run.service.as_str(), run.result.as_str()), ("cart", "pass"));
    // A replayed event id (a producer's retry) answers with the same run and starts nothing.
    let (status, again) = post(&server, Some("op-a"), STRUCTURED, keptn("s1", "quick", json!({"project": "a"}))).await;
    assert_eq!((status, again["runId"].as_str()), (StatusCode::ACCEPTED, Some(run_id.as_str())), "{again}");

    // Binary mode: attributes in ce-* headers, the project in the capstanproject extension.
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "b1"),
        ("ce-source", "ci"),
        ("ce-type", "sh.keptn.event.dev.quick.triggered"),
        ("ce-capstanproject", "a"),
        ("content-type", "application/json"),
    ];
    let (status, body) = post(&server, Some("op-a"), &binary, br#"{"service":"web"}"#.to_vec()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let cases: Vec<Case> = vec![
        (
            "missing id",
            STRUCTURED.to_vec(),
            br#"{"specversion":"1.0","source":"s","type":"t"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "id",
        ),
        (
            "wrong specversion",
            STRUCTURED.to_vec(),
            br#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "specversion",
        ),
        ("not JSON", STRUCTURED.to_vec(), b"{nope".to_vec(), StatusCode::BAD_REQUEST, "JSON"),
        ("invalid UTF-8", STRUCTURED.to_vec(), b"\xff\xfe{}".to_vec(), StatusCode::BAD_REQUEST, "UTF-8"),
        ("binary data not JSON", binary.to_vec(), b"{nope".to_vec(), StatusCode::BAD_REQUEST, "data"),
        (
            "unknown sequence",
            STRUCTURED.to_vec(),
            keptn("u1", "nope", json!({"project": "a"})),
            StatusCode::NOT_FOUND,
            "nope",
        ),
        ("no project", STRUCTURED.to_vec(), keptn("p1", "quick", json!({})), StatusCode::BAD_REQUEST, "project"),
        (
            "task event",
            STRUCTURED.to_vec(),
            {
                let mut e: Value = serde_json::from_slice(&keptn("t1", "quick", json!({"project": "a"}))).unwrap();
                e["type"] = json!("sh.keptn.event.deployment.triggered");
                serde_json::to_vec(&e).unwrap()
            },
            StatusCode::BAD_REQUEST,
            "type",
        ),
        (
            "no CloudEvent at all",
            vec![("content-type", "text/plain")],
            b"hello".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "ce-",
        ),
    ];
    for (what, headers, body, want, mentions) in cases {
        let (status, answer) = post(&server, Some("op-a"), &headers, body).await;
        let error = answer["error"].as_str().unwrap_or_default();
        assert_eq!(status, want, "{what}: {answer}");
        assert!(error.contains(mentions), "{what}: `{error}` should mention `{mentions}`");
    }

    // 64 KiB of data is accepted by default; more is 413, even far more.
    let blob = |n: usize| json!({"project": "a", "blob": "x".repeat(n)});
    let overhead = serde_json::to_vec(&blob(0)).unwrap().len();
    let exactly = blob(64 * 1024 - overhead);
    assert_eq!(serde_json::to_vec(&exactly).unwrap().len(), 64 * 1024);
    let (status, body) = post(&server, Some("op-a"), STRUCTURED, keptn("big1", "quick", exactly)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = post(&server, Some("op-a"), STRUCTURED, keptn("big2", "quick", blob(65 * 1024))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (status, _) = post(&server, Some("op-a"), STRUCTURED, keptn("big3", "quick", blob(2 * 1024 * 1024))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    for path in ["/healthz", "/readyz"] {
        let response = reqwest::get(format!("{}{path}", server.http)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_needs_a_token_for_the_events_project() {
    let server = Server::start("");
    server.clients(Some("admin-a")).await.apply("a").await;
    let event = keptn("x1", "quick", json!({"project": "a"}));
    let (status, body) = post(&server, None, STRUCTURED, event.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = post(&server, Some("wrong"), STRUCTURED, event.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = post(&server, Some("view-a"), STRUCTURED, event.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = post(&server, Some("op-b"), STRUCTURED, event.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) =
        post(&server, Some("op-a"), &[("content-type", "application/cloudevents+json"), ("x-unused", "1")], event)
            .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}
