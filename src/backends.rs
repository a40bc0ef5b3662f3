//! Opening the configured store and broker by URL, so every command (server, dev, bench, tests)
//! chooses backends the same way:
//! - store: `memory:`, `sqlite:PATH` (or `sqlite://PATH`), `postgres://...` / `postgresql://...`;
//! - broker: `memory`, `nats` (URL `nats://host:4222`), `kafka` (bootstrap `host:9092`),
//!   `rabbitmq` (URL `amqp://user:pass@host:5672/%2f`).

use std::path::PathBuf;
use std::sync::Arc;

use capstan_brokers::Broker;
use capstan_brokers::memory::MemoryBroker;
use capstan_store::Store;

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown store URL `{0}` (expected memory:, sqlite:PATH or postgres://...)")]
    UnknownStore(String),
    #[error("unknown broker `{0}` (expected memory, nats, kafka or rabbitmq)")]
    UnknownBroker(String),
    #[error("this build has no `{0}` support (cargo feature `{1}`)")]
    NotBuilt(&'static str, &'static str),
    #[error("store: {0}")]
    Store(#[from] capstan_store::Error),
    #[error("broker: {0}")]
    Broker(#[from] capstan_brokers::Error),
}

impl BackendError {
    /// Whether trying again cannot help: the configuration (or the build) has to change.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            BackendError::UnknownStore(_)
                | BackendError::UnknownBroker(_)
                | BackendError::NotBuilt(..)
                | BackendError::Broker(capstan_brokers::Error::Invalid(_))
        )
    }
}

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Memory,
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreUrl {
    /// Parses a store URL.
    pub fn parse(url: &str) -> Result<Self, BackendError> {
        if url == "memory" || url == "memory:" || url == "memory://" {
            Ok(StoreUrl::Memory)
        } else if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            Ok(StoreUrl::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(url.to_string()))
        } else {
            Err(BackendError::UnknownStore(url.to_string()))
        }
    }
}

/// Opens (and migrates) the store a URL names.
pub async fn open_store(url: &str) -> Result<Arc<dyn Store>, BackendError> {
    match StoreUrl::parse(url)? {
        StoreUrl::Memory => Ok(Arc::new(capstan_store::memory::MemoryStore::new())),
        StoreUrl::Sqlite(path) => open_sqlite(path).await,
        StoreUrl::Postgres(url) => open_postgres(&url).await,
    }
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(path: PathBuf) -> Result<Arc<dyn Store>, BackendError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| BackendError::Store(capstan_store::Error::Unavailable(Box::new(e))))?;
    }
    Ok(Arc::new(capstan_store::sqlite::SqliteStore::open(&path).await?))
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(_: PathBuf) -> Result<Arc<dyn Store>, BackendError> {
    Err(BackendError::NotBuilt("SQLite", "sqlite"))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn Store>, BackendError> {
    Ok(Arc::new(capstan_store::postgres::PostgresStore::connect(url).await?))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_: &str) -> Result<Arc<dyn Store>, BackendError> {
    Err(BackendError::NotBuilt("PostgreSQL", "postgres"))
}

/// Connects to the broker of that kind (`url` may be empty for `memory` and the defaults
/// `nats://127.0.0.1:4222`, `127.0.0.1:9092`, `amqp://guest:guest@127.0.0.1:5672/%2f`).
pub async fn connect_broker(kind: &str, url: &str) -> Result<Arc<dyn Broker>, BackendError> {
    connect_broker_in(kind, url, None).await
}

/// Like [`connect_broker`], inside a namespace: deployments (or tests) that share one NATS server
/// or RabbitMQ vhost but must not see each other's messages use different namespaces (NATS: the
/// stream name and subject prefix; RabbitMQ: the exchange; Kafka: a topic prefix).
pub async fn connect_broker_in(
    kind: &str,
    url: &str,
    namespace: Option<&str>,
) -> Result<Arc<dyn Broker>, BackendError> {
    match kind {
        "memory" => Ok(Arc::new(MemoryBroker::new())),
        "nats" => connect_nats(if url.is_empty() { "nats://127.0.0.1:4222" } else { url }, namespace).await,
        "kafka" => {
            let kafka = connect_kafka(if url.is_empty() { "127.0.0.1:9092" } else { url }).await?;
            Ok(match namespace {
                Some(ns) => Arc::new(capstan_brokers::namespace::Namespaced::new(kafka, ns)),
                None => kafka,
            })
        }
        "rabbitmq" | "amqp" => {
            connect_amqp(if url.is_empty() { "amqp://guest:guest@127.0.0.1:5672/%2f" } else { url }, namespace).await
        }
        other => Err(BackendError::UnknownBroker(other.to_string())),
    }
}

/// The JetStream stream of a broker namespace (its subject prefix is the same in lower case).
pub fn nats_stream_of(namespace: &str) -> String {
    namespace.to_uppercase().replace(['.', ' ', '-'], "_")
}

#[cfg(feature = "nats")]
async fn connect_nats(url: &str, namespace: Option<&str>) -> Result<Arc<dyn Broker>, BackendError> {
    use capstan_brokers::nats::{NatsBroker, NatsConfig};
    let mut config = NatsConfig { storage: nats_storage()?, ..NatsConfig::default() };
    if let Some(ns) = namespace {
        config.stream = nats_stream_of(ns);
        config.subject_prefix = ns.to_lowercase().replace(['.', ' ', '-'], "_");
    }
    Ok(Arc::new(NatsBroker::connect(url, config).await?))
}

/// The variable that sets the NATS stream's storage, `file` (the default) or `memory`: a
/// deployment choice, the same for the server and its workers (see docs/brokers.md).
const NATS_STORAGE_ENV: &str = "CAPSTAN_NATS_STORAGE";

/// The storage `NATS_STORAGE_ENV` names, `file` when it is unset or empty.
pub fn nats_storage_name() -> String {
    match std::env::var(NATS_STORAGE_ENV) {
        Ok(text) if !text.trim().is_empty() => text.trim().to_string(),
        _ => "file".into(),
    }
}

/// The storage `NATS_STORAGE_ENV` sets.
#[cfg(feature = "nats")]
fn nats_storage() -> Result<capstan_brokers::nats::NatsStorage, BackendError> {
    nats_storage_name().parse().map_err(BackendError::Broker)
}

#[cfg(not(feature = "nats"))]
async fn connect_nats(_: &str, _: Option<&str>) -> Result<Arc<dyn Broker>, BackendError> {
    Err(BackendError::NotBuilt("NATS", "nats"))
}

#[cfg(feature = "kafka")]
async fn connect_kafka(bootstrap: &str) -> Result<Arc<dyn Broker>, BackendError> {
    use capstan_brokers::kafka::{KafkaBroker, KafkaConfig};
    let bootstrap = bootstrap.strip_prefix("kafka://").unwrap_or(bootstrap);
    let mut config = KafkaConfig::new(bootstrap);
    // Group timings are a deployment choice: short sessions let a group notice a dead member in
    // seconds (tests, small fleets), long ones ride out pauses.
    let ms =
        |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok()).map(std::time::Duration::from_millis);
    if let Some(d) = ms("CAPSTAN_KAFKA_SESSION_TIMEOUT_MS") {
        config.session_timeout = d;
    }
    if let Some(d) = ms("CAPSTAN_KAFKA_HEARTBEAT_MS") {
        config.heartbeat_interval = d;
    }
    Ok(Arc::new(KafkaBroker::connect(config).await?))
}

#[cfg(not(feature = "kafka"))]
async fn connect_kafka(_: &str) -> Result<Arc<dyn Broker>, BackendError> {
    Err(BackendError::NotBuilt("Kafka", "kafka"))
}

#[cfg(feature = "amqp")]
async fn connect_amqp(url: &str, namespace: Option<&str>) -> Result<Arc<dyn Broker>, BackendError> {
    use capstan_brokers::amqp::{AmqpBroker, AmqpConfig};
    let mut config = AmqpConfig::default();
    if let Some(ns) = namespace {
        config.exchange = ns.to_string();
    }
    Ok(Arc::new(AmqpBroker::connect(url, config).await?))
}

#[cfg(not(feature = "amqp"))]
async fn connect_amqp(_: &str, _: Option<&str>) -> Result<Arc<dyn Broker>, BackendError> {
    Err(BackendError::NotBuilt("RabbitMQ", "amqp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        assert_eq!(StoreUrl::parse("memory:").unwrap(), StoreUrl::Memory);
        assert_eq!(StoreUrl::parse("sqlite:/tmp/x.db").unwrap(), StoreUrl::Sqlite("/tmp/x.db".into()));
        assert_eq!(StoreUrl::parse("sqlite:///tmp/x.db").unwrap(), StoreUrl::Sqlite("/tmp/x.db".into()));
        assert!(matches!(StoreUrl::parse("postgres://u@h/db").unwrap(), StoreUrl::Postgres(_)));
        assert!(matches!(StoreUrl::parse("mysql://x"), Err(BackendError::UnknownStore(_))));
    }

    #[tokio::test]
    async fn unknown_brokers_are_refused_by_name() {
        let refused = connect_broker("pigeon", "").await.err();
        assert!(matches!(refused, Some(BackendError::UnknownBroker(_))));
        assert!(refused.is_some_and(|e| e.is_permanent()), "no retry makes a pigeon a broker");
        let unreachable = BackendError::Broker(capstan_brokers::Error::Unavailable("connection refused".into()));
        assert!(!unreachable.is_permanent(), "a broker that is away may come back");
        assert!(connect_broker("memory", "").await.is_ok());
    }
}
