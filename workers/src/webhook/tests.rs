//! Webhook worker tests against a server on 127.0.0.1 started by each test: templating,
//! refused targets, status mapping, the response bound, time limits and no redirects.

use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::test_server::{Reply, TestServer, task};

/// A worker allowed to call 127.0.0.1 (by name, as a deployment would allow one internal host).
fn local_worker() -> WebhookWorker {
    WebhookWorker::with_config(WebhookConfig { allowed_hosts: vec!["127.0.0.1".into()], ..WebhookConfig::default() })
        .unwrap()
}

fn error_kind(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Error(e) => &e.kind,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn posts_a_templated_body_with_headers_and_passes_on_2xx() {
    let server = TestServer::start(|_| Reply::json(201, &json!({"queued": true, "id": 7}))).await;
    let input = json!({
        "project": "sockshop", "stage": "dev", "service": "carts",
        "deployment": {"image": "carts:0.13.2"},
        "properties": {
            "url": server.url("/job/{{.data.service}}/build"),
            "headers": {"Authorization": "Bearer abc", "X-Stage": "{{ .data.stage }}"},
            "body": "{\"text\": \"deployed {{.data.deployment.image}} to {{.data.stage}}\"}"
        }
    });
    let outcome = local_worker().handle(task("notify", input)).await;
    assert_eq!(outcome, Outcome::pass(json!({"status": 201, "body": {"queued": true, "id": 7}, "truncated": false})));
    let [request] = server.requests().try_into().unwrap();
    assert_eq!((request.method.as_str(), request.target.as_str()), ("POST", "/job/carts/build"));
    assert_eq!(request.header("authorization"), Some("Bearer abc"));
    assert_eq!(request.header("x-stage"), Some("dev"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body, json!({"text": "deployed carts:0.13.2 to dev"}));
}

#[tokio::test]
async fn a_structured_body_is_sent_as_json_and_get_is_honoured() {
    let server = TestServer::start(|_| Reply::raw(200, "text/plain", b"ok".to_vec())).await;
    let input = json!({"service": "carts", "url": server.url("/hook"), "method": "put",
        "body": {"service": "{{.data.service}}", "replicas": 2}});
    let outcome = local_worker().handle(task("notify", input)).await;
    assert_eq!(outcome, Outcome::pass(json!({"status": 200, "body": "ok", "truncated": false})));
    let request = &server.requests()[0];
    assert_eq!(request.method, "PUT");
    assert_eq!(serde_json::from_slice::<Value>(&request.body).unwrap(), json!({"service": "carts", "replicas": 2}));
}

#[tokio::test]
async fn a_missing_template_key_is_bad_input_and_nothing_is_sent() {
    let server = TestServer::start(|_| Reply::json(200, &json!({}))).await;
    let input = json!({"url": server.url("/x"), "body": "{{.data.deployment.image}}"});
    let outcome = local_worker().handle(task("notify", input)).await;
    let Outcome::Error(e) = &outcome else { panic!("{outcome:?}") };
    assert_eq!(e.kind, "bad-input");
    assert!(e.message.contains("data.deployment.image"), "{}", e.message);
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn malformed_properties_are_bad_input() {
    for input in [
        json!({}),
        json!({"url": "not a url"}),
        json!({"url": "ftp://example.com/x"}),
        json!({"url": "http://example.com", "method": "BREW"}),
        json!({"url": "http://example.com", "headers": ["x"]}),
        json!({"url": "http://example.com", "headers": {"bad header": "x"}}),
        json!({"url": "http://example.com", "timeout": "soon"}),
        json!({"url": "http://example.com", "expectStatus": "2yy"}),
        json!({"url": "http://example.com", "expectStatus": [200, 900]}),
    ] {
        let outcome = local_worker().handle(task("notify", input.clone())).await;
        assert_eq!(error_kind(&outcome), "bad-input", "{input}");
    }
}

#[tokio::test]
async fn internal_targets_are_refused_unless_allowed() {
    // A server really listens on 127.0.0.1 so that a refusal is the guard's doing, not a
    // closed port's; the other targets are refused before any packet is sent.
    let server = TestServer::start(|_| Reply::json(200, &json!({}))).await;
    let port = server.port();
    let strict = WebhookWorker::new().unwrap();
    for url in [
        format!("http://127.0.0.1:{port}/x"),
        format!("http://localhost:{port}/x"),
        format!("http://[::1]:{port}/x"),
        "http://10.1.2.3/x".to_string(),
        "http://192.168.0.10/x".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://[fd00::1]/x".to_string(),
    ] {
        let outcome = strict.handle(task("notify", json!({"url": url}))).await;
        let Outcome::Error(e) = &outcome else { panic!("{url}: {outcome:?}") };
        assert_eq!(e.kind, "bad-input", "{url}");
        assert!(e.message.starts_with("refused target"), "{url}: {}", e.message);
    }
    assert!(server.requests().is_empty());

    let open = WebhookWorker::with_config(WebhookConfig { allow_private: true, ..WebhookConfig::default() }).unwrap();
    let outcome = open.handle(task("notify", json!({"url": format!("http://localhost:{port}/x")}))).await;
    assert!(matches!(outcome, Outcome::Finished { .. }), "{outcome:?}");
    let by_name = WebhookWorker::with_config(WebhookConfig {
        allowed_hosts: vec!["localhost".into()],
        ..WebhookConfig::default()
    })
    .unwrap();
    let outcome = by_name.handle(task("notify", json!({"url": format!("http://localhost:{port}/y")}))).await;
    assert!(matches!(outcome, Outcome::Finished { .. }), "{outcome:?}");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn statuses_map_to_results_and_error_kinds() {
    let server = TestServer::start(|r| {
        let status: u16 = r.target.trim_start_matches('/').parse().unwrap();
        Reply::json(status, &json!({"error": status}))
    })
    .await;
    let worker = local_worker();
    let call = |status: u16, expect: Option<Value>| {
        let mut input = json!({"url": server.url(&format!("/{status}")), "method": "GET"});
        if let Some(expect) = expect {
            input["expectStatus"] = expect;
        }
        worker.handle(task("notify", input))
    };
    assert!(matches!(call(204, None).await, Outcome::Finished { .. }));
    assert_eq!(error_kind(&call(404, None).await), "bad-input");
    assert_eq!(error_kind(&call(401, None).await), "bad-input");
    assert_eq!(error_kind(&call(429, None).await), "http-status");
    assert_eq!(error_kind(&call(408, None).await), "http-status");
    assert_eq!(error_kind(&call(503, None).await), "http-status");
    assert!(matches!(call(404, Some(json!(404))).await, Outcome::Finished { .. }));
    assert!(matches!(call(202, Some(json!([200, 202]))).await, Outcome::Finished { .. }));
    assert!(matches!(call(302, Some(json!("3xx"))).await, Outcome::Finished { .. }));
    assert_eq!(error_kind(&call(200, Some(json!(201))).await), "http-status");
    let Outcome::Error(e) = call(500, None).await else { panic!() };
    assert!(e.message.contains("answered 500") && e.message.contains("\"error\":500"), "{}", e.message);
    assert!(!e.message.contains("/500"), "the path (which may hold a secret) is not reported: {}", e.message);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = TestServer::start(|_| {
        let mut reply = Reply::raw(302, "text/plain", Vec::new());
        reply.headers.push(("Location".into(), "http://169.254.169.254/latest/meta-data".into()));
        reply
    })
    .await;
    let outcome = local_worker().handle(task("notify", json!({"url": server.url("/go")}))).await;
    assert_eq!(error_kind(&outcome), "http-status");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn the_response_read_is_bounded_and_a_cut_body_stays_text() {
    let big = json!({"items": vec!["x".repeat(100); 2000]});
    let server = TestServer::start(move |_| Reply::json(200, &big)).await;
    let worker = WebhookWorker::with_config(WebhookConfig {
        allowed_hosts: vec!["127.0.0.1".into()],
        max_response_bytes: 1024,
        ..WebhookConfig::default()
    })
    .unwrap();
    let Outcome::Finished { output, .. } = worker.handle(task("notify", json!({"url": server.url("/")}))).await else {
        panic!("must pass")
    };
    assert_eq!(output["truncated"], json!(true));
    let body = output["body"].as_str().unwrap();
    assert_eq!(body.len(), 1024);
    assert!(body.starts_with("{\"items\":[\"xxx"));
}

#[tokio::test]
async fn a_silent_endpoint_times_out_and_cancel_stops_the_call() {
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = std::sync::Arc::clone(&arrived);
    let server = TestServer::start(move |_| {
        notify.notify_one();
        Reply { hang: true, ..Reply::raw(200, "text/plain", Vec::new()) }
    })
    .await;
    let input = json!({"url": server.url("/slow"), "timeout": "200ms"});
    let outcome = local_worker().handle(task("notify", input)).await;
    assert_eq!(error_kind(&outcome), "timeout");
    arrived.notified().await;

    let (switch, signal) = crate::handler::CancelSignal::new();
    let ctx = TaskContext::new(task("notify", json!({"url": server.url("/slow")})).award().clone(), "w", signal);
    let worker = local_worker();
    let call = tokio::spawn(async move { worker.handle(ctx).await });
    // Cancel once the server has the request, so the cancel hits the exchange itself.
    arrived.notified().await;
    switch.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(5), call).await.unwrap().unwrap();
    assert_eq!(error_kind(&outcome), "cancelled");
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let outcome = local_worker().handle(task("notify", json!({"url": format!("http://127.0.0.1:{port}/")}))).await;
    assert_eq!(error_kind(&outcome), "connect");
}
