//! The demo definition end to end over each real broker (NATS JetStream, Kafka through Tansu,
//! RabbitMQ) with PostgreSQL as the store: the broker is chosen by name exactly as the server's
//! configuration chooses it.

use std::sync::Arc;
use std::time::Duration;

use capstan::backends::connect_broker_in;
use capstan::cli::demo::{DEMO_PROJECT, DEMO_SHIPYARD};
use capstan::cli::demo_workers;
use capstan::runtime::{Runtime, RuntimeConfig, SystemClock, TriggerRequest};
use capstan_brokers::kafka::{KafkaBroker, KafkaConfig};
use capstan_brokers::namespace::Namespaced;
use capstan_store::postgres::PostgresStore;
use capstan_store::{RunFilter, Store};
use serde_json::json;
use tokio::sync::watch;

fn postgres_url() -> String {
    std::env::var("CAPSTAN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".into())
}

/// Delivers one service through dev, staging and production over `broker`; every stage passes.
async fn deliver_over(broker_kind: &str, url: &str) {
    let schema = format!("e2e_{}_{}", broker_kind, uuid::Uuid::new_v4().simple());
    let pg = PostgresStore::connect_with_schema(&postgres_url(), &schema).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {} is needed (deploy/local/services.sh postgres): {e}", postgres_url())
    });
    let store: Arc<dyn Store> = Arc::new(pg.clone());
    // A namespace of its own, so engines of tests running at the same time never take each
    // other's messages from a shared NATS server or RabbitMQ vhost.
    let namespace = format!("capstantest{}", uuid::Uuid::new_v4().simple());
    let broker = if broker_kind == "kafka" {
        // Short group sessions, as the services README advises for Tansu, so consumer groups
        // settle in seconds rather than tens of seconds.
        let config = KafkaConfig {
            session_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            ..KafkaConfig::new(url)
        };
        let kafka = KafkaBroker::connect(config)
            .await
            .unwrap_or_else(|e| panic!("Kafka is needed (deploy/local/services.sh kafka): {e}"));
        Arc::new(Namespaced::new(kafka, &namespace)) as Arc<dyn capstan_brokers::Broker>
    } else {
        connect_broker_in(broker_kind, url, Some(&namespace))
            .await
            .unwrap_or_else(|e| panic!("{broker_kind} is needed (deploy/local/services.sh {broker_kind}): {e}"))
    };
    let rt = Runtime::start(RuntimeConfig::default(), store.clone(), broker.clone(), Arc::new(SystemClock))
        .await
        .expect("runtime starts");
    let (stop, stop_rx) = watch::channel(false);
    let workers = demo_workers::spawn_all(broker.clone(), stop_rx);
    rt.apply_definition(DEMO_PROJECT, DEMO_SHIPYARD).await.expect("definition");
    let run_id = rt
        .trigger(TriggerRequest {
            project: DEMO_PROJECT.into(),
            stage: "dev".into(),
            sequence: "delivery".into(),
            service: Some("carts".into()),
            data: json!({"service": "carts"}),
            ..TriggerRequest::default()
        })
        .await
        .expect("trigger");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    let production = loop {
        let runs = store
            .list_runs(&RunFilter { project: Some(DEMO_PROJECT.into()), limit: 100, ..RunFilter::default() })
            .await
            .expect("list runs");
        if let Some(p) = runs.iter().find(|r| r.stage == "production" && r.is_over()) {
            break p.clone();
        }
        if let Some(failed) = runs.iter().find(|r| r.is_over() && r.result.as_deref() != Some("pass")) {
            panic!("{broker_kind}: run {} in {} ended {:?}", failed.run_id, failed.stage, failed.result);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{broker_kind}: the delivery of run {run_id} did not reach production"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(production.result.as_deref(), Some("pass"), "{broker_kind}");
    let _ = stop.send(true);
    rt.shutdown().await;
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    pg.drop_schema().await.expect("drop the test schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_over_nats_jetstream() {
    deliver_over("nats", "nats://127.0.0.1:4222").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_over_rabbitmq() {
    deliver_over("rabbitmq", "amqp://guest:guest@127.0.0.1:5672/%2f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_over_kafka() {
    deliver_over("kafka", "127.0.0.1:9092").await;
}
