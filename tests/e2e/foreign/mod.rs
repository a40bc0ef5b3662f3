//! Events from producers that are not Capstan: a Python script using the CloudEvents SDK and
//! nats-py publishes a Keptn-style `sh.keptn.event.dev.delivery.triggered` straight to NATS, and
//! the engine (NATS + PostgreSQL) starts and finishes that sequence.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use capstan::backends::connect_broker_in;
use capstan::cli::demo_workers;
use capstan::runtime::{Runtime, RuntimeConfig, SystemClock};
use capstan_store::postgres::PostgresStore;
use capstan_store::{RunFilter, Store};
use tokio::sync::watch;

const ECHO: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: foreign}
spec:
  stages:
    - name: dev
      sequences:
        - name: delivery
          tasks:
            - {name: deploy, type: echo}
            - {name: test, type: echo}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_cloudevents_producer_triggers_a_sequence_over_nats() {
    let url = std::env::var("CAPSTAN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".into());
    let schema = format!("e2e_foreign_{}", uuid::Uuid::new_v4().simple());
    let pg = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is needed (deploy/local/services.sh postgres): {e}"));
    let store: Arc<dyn Store> = Arc::new(pg.clone());
    let namespace = format!("capstanpy{}", uuid::Uuid::new_v4().simple());
    let broker = connect_broker_in("nats", "nats://127.0.0.1:4222", Some(&namespace))
        .await
        .unwrap_or_else(|e| panic!("NATS is needed (deploy/local/services.sh nats): {e}"));
    let rt = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .expect("runtime starts");
    let (stop, stop_rx) = watch::channel(false);
    let workers = demo_workers::spawn_builtin(broker, stop_rx);
    rt.apply_definition("py", ECHO).await.expect("definition");

    // The subject of the engine's input topic in this namespace: `<prefix>.capstan.inputs`.
    let subject = format!("{namespace}.capstan.inputs");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/foreign/run.sh");
    let event_id = uuid::Uuid::new_v4().to_string();
    for _ in 0..2 {
        // Sent twice: the event id makes the second one a no-op.
        let out = Command::new("bash")
            .arg(&script)
            .args(["nats://127.0.0.1:4222", &subject, "py", &event_id])
            .output()
            .expect("python runs");
        assert!(out.status.success(), "publisher failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let runs = loop {
        let runs = store
            .list_runs(&RunFilter { project: Some("py".into()), limit: 10, ..RunFilter::default() })
            .await
            .expect("list");
        if runs.iter().any(|r| r.is_over()) {
            break runs;
        }
        assert!(tokio::time::Instant::now() < deadline, "the Python trigger never started a run that ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Give a duplicate a moment to (not) start a second run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = store
        .list_runs(&RunFilter { project: Some("py".into()), limit: 10, ..RunFilter::default() })
        .await
        .expect("list");
    assert_eq!(all.len(), 1, "one event, one run: {all:?}");
    let run = &runs[0];
    assert_eq!((run.stage.as_str(), run.sequence.as_str()), ("dev", "delivery"));
    assert_eq!(run.service.as_deref(), Some("carts"));
    assert_eq!(run.context_id, "python-context-1", "Keptn's shkeptncontext becomes the context id");
    assert_eq!(run.result.as_deref(), Some("pass"));

    let _ = stop.send(true);
    rt.shutdown().await;
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    pg.drop_schema().await.expect("drop schema");
}
