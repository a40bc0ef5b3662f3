//! Prometheus SLI provider tests against a fake Prometheus on 127.0.0.1 that answers in the
//! shape of `/api/v1/query`.

use serde_json::{Value, json};

use super::*;
use crate::test_server::{Recorded, Reply, TestServer, task};

const FIXTURE: &str = include_str!("../../../engine/tests/fixtures/keptn/sli-config-prometheus.yaml");

fn vector(values: &[&str]) -> Value {
    let result: Vec<Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"metric": {"pod": i.to_string()}, "value": [1714564800.0, v]}))
        .collect();
    json!({"status": "success", "data": {"resultType": "vector", "result": result}})
}

/// A fake Prometheus: the answer depends on a word in the query.
fn fake(r: &Recorded) -> Reply {
    let query = r.query("query").unwrap_or_default();
    if r.target.split('?').next() != Some("/api/v1/query") {
        return Reply::json(404, &json!({"status": "error", "error": "not found"}));
    }
    let pick = |word: &str| query.contains(word);
    if pick("quantile(0.5,") {
        Reply::json(200, &vector(&["212.5"]))
    } else if pick("quantile(0.9,") {
        Reply::json(200, &vector(&["480"]))
    } else if pick("quantile(0.95,") {
        Reply::json(200, &vector(&["590.25"]))
    } else if pick("scalar_one") {
        Reply::json(200, &json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "1"]}}))
    } else if pick("empty") {
        Reply::json(200, &vector(&[]))
    } else if pick("many") {
        Reply::json(200, &vector(&["1", "2"]))
    } else if pick("nan") {
        Reply::json(200, &vector(&["NaN"]))
    } else if pick("broken") {
        Reply::json(400, &json!({"status": "error", "errorType": "bad_data", "error": "parse error at char 7"}))
    } else if pick("outage") {
        Reply::raw(503, "text/plain", b"overloaded".to_vec())
    } else {
        Reply::json(200, &vector(&["0"]))
    }
}

fn worker(server: &TestServer) -> PrometheusSliWorker {
    PrometheusSliWorker::new(PrometheusConfig::new(server.url("/"))).unwrap()
}

fn passed(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Finished { result: capstan_proto::TaskResult::Pass, output } => output,
        other => panic!("expected a pass, got {other:?}"),
    }
}

#[tokio::test]
async fn queries_every_fixture_indicator_with_keptn_placeholders_at_the_end_of_the_frame() {
    let server = TestServer::start(fake).await;
    let input = json!({
        "project": "sockshop", "stage": "staging", "service": "carts",
        "start": "2024-05-01T11:50:00Z", "end": "2024-05-01T12:00:00Z",
        "sliFile": FIXTURE
    });
    let output = passed(worker(&server).handle(task("get-sli", input)).await);
    assert_eq!(
        output["sli"],
        json!({"response_time_p50": 212.5, "response_time_p90": 480.0, "response_time_p95": 590.25})
    );
    assert_eq!(output["sliErrors"], json!({}));
    assert_eq!(
        (output["start"].as_str(), output["end"].as_str()),
        (Some("2024-05-01T11:50:00.000Z"), Some("2024-05-01T12:00:00.000Z"))
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    let p95 = requests.iter().map(|r| r.query("query").unwrap()).find(|q| q.contains("0.95")).unwrap();
    assert_eq!(
        p95,
        r#"histogram_quantile(0.95, sum by(le) (rate(http_response_time_milliseconds_bucket{handler="ItemsController.addToCart",job="carts-sockshop-staging"}[600s])))"#
    );
    assert!(requests.iter().all(|r| r.query("time").as_deref() == Some("1714564800.000")));
}

#[tokio::test]
async fn indicators_without_a_value_are_reported_not_invented() {
    let server = TestServer::start(fake).await;
    let input = json!({
        "service": "carts",
        "indicators": {
            "ok": "scalar_one", "empty": "sum(empty)", "many": "many", "nan": "nan",
            "broken": "broken(", "needs_stage": "up{stage=\"$STAGE\"}"
        }
    });
    let output = passed(worker(&server).handle(task("get-sli", input)).await);
    assert_eq!(output["sli"], json!({"ok": 1.0}));
    let errors = output["sliErrors"].as_object().unwrap();
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["broken", "empty", "many", "nan", "needs_stage"]);
    assert!(errors["empty"].as_str().unwrap().starts_with("no data"));
    assert!(errors["many"].as_str().unwrap().contains("2 series"));
    assert!(errors["nan"].as_str().unwrap().contains("not a finite number"));
    assert!(errors["broken"].as_str().unwrap().contains("parse error at char 7"));
    assert!(errors["needs_stage"].as_str().unwrap().contains("$STAGE"));
    // The query that could not be built was never sent.
    assert_eq!(server.requests().len(), 5);
}

#[tokio::test]
async fn a_list_of_names_selects_indicators_of_the_configured_file() {
    let server = TestServer::start(fake).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sli.yaml");
    std::fs::write(&path, FIXTURE).unwrap();
    let mut config = PrometheusConfig::new(server.url(""));
    config.sli_files = ScopedFiles::new().with("sockshop/staging", &path);
    let worker = PrometheusSliWorker::new(config).unwrap();
    let input = json!({"stage": "staging", "service": "carts", "indicators": ["response_time_p90", "throughput"]});
    let output = passed(worker.handle(task("get-sli", input)).await);
    assert_eq!(output["sli"], json!({"response_time_p90": 480.0}));
    assert_eq!(output["sliErrors"], json!({"throughput": "not defined in the sli.yaml"}));

    // Another stage has no file configured: nothing to query is an input problem.
    let Outcome::Error(e) = worker.handle(task("get-sli", json!({"stage": "dev", "service": "carts"}))).await else {
        panic!("must fail")
    };
    assert_eq!(e.kind, "bad-input");
    assert!(e.message.contains("no SLI definitions"), "{}", e.message);
}

#[tokio::test]
async fn an_outage_is_a_retryable_error_not_a_verdict() {
    let server = TestServer::start(fake).await;
    let input = json!({"indicators": {"a": "scalar_one", "b": "outage"}});
    let Outcome::Error(e) = worker(&server).handle(task("get-sli", input.clone())).await else { panic!("must fail") };
    assert_eq!(e.kind, "unavailable");
    assert!(e.message.starts_with("b: ") && e.message.contains("503"), "{}", e.message);

    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let down = PrometheusSliWorker::new(PrometheusConfig::new(format!("http://127.0.0.1:{port}"))).unwrap();
    let Outcome::Error(e) = down.handle(task("get-sli", input)).await else { panic!("must fail") };
    assert_eq!(e.kind, "unavailable");
}

#[tokio::test]
async fn bad_properties_and_configuration_are_refused() {
    let server = TestServer::start(fake).await;
    for input in [
        json!({"indicators": {"a": 1}}),
        json!({"sliFile": "indicators: {}"}),
        json!({"sliFile": 3}),
        json!({"indicators": {"a": "up"}, "timeframe": "forever"}),
    ] {
        let Outcome::Error(e) = worker(&server).handle(task("get-sli", input.clone())).await else { panic!("{input}") };
        assert_eq!(e.kind, "bad-input", "{input}");
    }
    assert!(server.requests().is_empty());
    assert!(PrometheusSliWorker::new(PrometheusConfig::new("prometheus:9090")).is_err());
}
