//! The server's configuration: a TOML file (`capstan server --config capstan.toml`) with
//! `CAPSTAN_*` environment variables on top, so containers can change one setting without a file.
//! Durations are written `300ms`, `10s`, `5m`, `1h`, `7d` (or compounds such as `1h30m`).
//!
//! ```toml
//! builtin_workers = false        # run the shell and echo workers in process (tests, demos)
//! auth = "tokens"                # "tokens" (default: only configured tokens get in) or "none"
//! [store]
//! url = "postgres://capstan@db/capstan"   # or sqlite:PATH, memory:
//! schema = "capstan"             # PostgreSQL only: created if missing
//! input_retention = "7d"         # how long applied input ids are kept to drop redeliveries
//!                                # (the deduplication window); "off" or "0" keeps them forever
//! [broker]
//! kind = "memory"                # memory | nats | kafka | rabbitmq
//! url = ""
//! [listen]
//! grpc = "0.0.0.0:7233"
//! http = "0.0.0.0:8080"
//! [limits]
//! max_payload_bytes = 65536      # trigger data and event data; larger is refused (413)
//! [[tokens]]
//! name = "ci"
//! sha256 = "<hex of sha256(token)>"
//! projects = ["checkout"]        # "*" for every project
//! role = "operator"              # viewer | operator | admin
//! ```
//!
//! The delivery workers run in the server process when their `[workers.*]` section is present
//! (`capstan worker --kind <kind> --config FILE` runs one of them as its own process). Files
//! are keyed by scope (`project`, `project/stage` or `project/stage/service`, the most specific
//! wins) and relative paths are read from the configuration file's directory:
//! ```toml
//! [workers]
//! slots = 8                      # attempts each delivery worker runs at once
//! bids_per_slot = 4              # auction bids each keeps open per slot
//! started_after = "0s"           # report `started` only for attempts running longer than this
//! id_prefix = "capstan-a-"       # worker ids <prefix><kind>, unique per process (default: host name)
//! journal_dir = "/var/lib/capstan/journal"  # award journals: a restart never starts an award twice
//! [workers.evaluation]           # quality gate, task type `evaluation`
//! slo = { sockshop = "slo.yaml" }
//! sli_provider = "prometheus"    # asked when an evaluation has no `sli` input: prometheus | static | none
//! [workers.prometheus]           # get-sli from Prometheus (CAPSTAN_PROMETHEUS_URL)
//! url = "http://prometheus:9090"
//! sli = { sockshop = "sli.yaml" }
//! query_timeout = "30s"
//! [workers.static_sli]           # get-sli with values given in the trigger data
//! types = ["get-sli"]            # every section may change its task types
//! [workers.webhook]              # calls HTTP endpoints, task type `webhook`
//! allowed_hosts = ["hooks.slack.com"]   # CAPSTAN_WEBHOOK_ALLOWED_HOSTS (comma-separated)
//! allow_private = false          # CAPSTAN_WEBHOOK_ALLOW_PRIVATE
//! [workers.get_action]           # Keptn's remediation-service, task type `get-action`
//! remediation = { "sockshop/production" = "remediation.yaml" }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::api::auth::Role;

mod workers;

pub use workers::{
    EvaluationWorkerConfig, GetActionWorkerConfig, PrometheusWorkerConfig, ScopedPaths, StaticSliWorkerConfig,
    WebhookWorkerConfig, WorkersConfig,
};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("tokens[{index}] ({name}): {message}")]
    Token { index: usize, name: String, message: String },
    #[error("workers: {0}")]
    Workers(String),
    #[error("store: {0}")]
    Store(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where events live.
    pub store: StoreConfig,
    /// How inputs and offers travel.
    pub broker: BrokerConfig,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// Size limits of requests.
    pub limits: Limits,
    /// Start the built-in `shell` and `echo` workers in this process.
    pub builtin_workers: bool,
    /// Whether requests must carry a configured token.
    pub auth: AuthMode,
    /// API tokens, stored as SHA-256 hashes.
    pub tokens: Vec<TokenConfig>,
    /// TLS for both APIs (`[tls] cert = "..."`, `key = "..."`, PEM files); plain TCP without it.
    pub tls: Option<crate::api::tls::TlsFiles>,
    /// The delivery workers run in this process.
    pub workers: WorkersConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: StoreConfig::default(),
            broker: BrokerConfig::default(),
            listen: ListenConfig::default(),
            limits: Limits::default(),
            builtin_workers: false,
            auth: AuthMode::Tokens,
            tokens: Vec::new(),
            tls: None,
            workers: WorkersConfig::default(),
        }
    }
}

/// The store section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://...`, `sqlite:PATH` or `memory:`.
    pub url: String,
    /// A PostgreSQL schema to create and use (so several servers or tests share a database).
    pub schema: Option<String>,
    /// How long the ids of applied inputs are kept to drop redeliveries (a duration, or `off`
    /// / `0` to keep them forever). It must outlast the brokers' redelivery window; see
    /// docs/guarantees.md.
    pub input_retention: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { url: "sqlite:.capstan/capstan.db".into(), schema: None, input_retention: "7d".into() }
    }
}

impl StoreConfig {
    /// The input retention; `None` when pruning is off.
    pub fn input_retention(&self) -> Result<Option<Duration>, String> {
        match self.input_retention.trim() {
            "off" | "0" => Ok(None),
            text => match capstan_engine::parse_duration(text).map_err(|e| format!("input_retention: {e}"))? {
                0 => Ok(None),
                ms => Ok(Some(Duration::from_millis(ms))),
            },
        }
    }
}

/// The broker section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// memory, nats, kafka or rabbitmq.
    pub kind: String,
    /// The broker's address (empty for memory).
    pub url: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig { kind: "memory".into(), url: String::new() }
    }
}

/// The listen section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// gRPC address; port 0 picks a free port (printed when ready).
    pub grpc: SocketAddr,
    /// HTTP address; port 0 picks a free port.
    pub http: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig { grpc: SocketAddr::from(([127, 0, 0, 1], 7233)), http: SocketAddr::from(([127, 0, 0, 1], 8080)) }
    }
}

/// Request size limits.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest trigger or event data accepted, in bytes of JSON.
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_payload_bytes: 64 * 1024 }
    }
}

impl Limits {
    /// Room for the envelope around the data (attributes, headers, protobuf framing).
    pub const ENVELOPE_ALLOWANCE: usize = 16 * 1024;

    /// The largest request body accepted.
    pub fn max_body_bytes(&self) -> usize {
        self.max_payload_bytes + Self::ENVELOPE_ALLOWANCE
    }
}

/// Whether callers must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Only configured tokens get in, each to its projects and role.
    Tokens,
    /// Everyone may do everything (loopback development only).
    None,
}

/// One API token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs.
    pub name: String,
    /// Hex SHA-256 of the token (the token itself is never stored).
    pub sha256: String,
    /// Projects the token may act in; `*` for all.
    pub projects: Vec<String>,
    /// What it may do there.
    pub role: Role,
}

impl Config {
    /// Reads a TOML file (if given), then applies `CAPSTAN_*` overrides from `env`.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                Config::parse(&text, &p.display().to_string())?
            }
            None => Config::default(),
        };
        if let Some(dir) = path.and_then(Path::parent) {
            config.workers.resolve_paths(dir);
        }
        config.apply_env(env)?;
        config.check()?;
        Ok(config)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let get = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        if let Some(v) = get("CAPSTAN_STORE") {
            self.store.url = v;
        }
        if let Some(v) = get("CAPSTAN_STORE_SCHEMA") {
            self.store.schema = Some(v);
        }
        if let Some(v) = get("CAPSTAN_INPUT_RETENTION") {
            self.store.input_retention = v;
        }
        if let Some(v) = get("CAPSTAN_BROKER") {
            self.broker.kind = v;
        }
        if let Some(v) = get("CAPSTAN_BROKER_URL") {
            self.broker.url = v;
        }
        if let Some(v) = get("CAPSTAN_GRPC_ADDR") {
            self.listen.grpc = parse_env("CAPSTAN_GRPC_ADDR", &v)?;
        }
        if let Some(v) = get("CAPSTAN_HTTP_ADDR") {
            self.listen.http = parse_env("CAPSTAN_HTTP_ADDR", &v)?;
        }
        if let Some(v) = get("CAPSTAN_MAX_PAYLOAD_BYTES") {
            self.limits.max_payload_bytes = parse_env("CAPSTAN_MAX_PAYLOAD_BYTES", &v)?;
        }
        if let Some(v) = get("CAPSTAN_BUILTIN_WORKERS") {
            self.builtin_workers = parse_env("CAPSTAN_BUILTIN_WORKERS", &v)?;
        }
        if let Some(v) = get("CAPSTAN_PROMETHEUS_URL") {
            self.workers.prometheus.get_or_insert_with(Default::default).url = v;
        }
        if let Some(v) = get("CAPSTAN_WEBHOOK_ALLOWED_HOSTS") {
            let hosts = v.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_string).collect();
            self.workers.webhook.get_or_insert_with(Default::default).allowed_hosts = hosts;
        }
        if let Some(v) = get("CAPSTAN_WEBHOOK_ALLOW_PRIVATE") {
            let allow = parse_env("CAPSTAN_WEBHOOK_ALLOW_PRIVATE", &v)?;
            self.workers.webhook.get_or_insert_with(Default::default).allow_private = allow;
        }
        if let Some(v) = get("CAPSTAN_AUTH") {
            self.auth = match v.as_str() {
                "tokens" => AuthMode::Tokens,
                "none" => AuthMode::None,
                other => {
                    return Err(ConfigError::Env {
                        name: "CAPSTAN_AUTH",
                        message: format!("`{other}` is neither `tokens` nor `none`"),
                    });
                }
            };
        }
        Ok(())
    }

    /// Checks what serde cannot: durations parse, token hashes are 64 hex digits and name some
    /// project.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        self.store.input_retention().map_err(ConfigError::Store)?;
        for (index, t) in self.tokens.iter().enumerate() {
            let problem = |message: &str| ConfigError::Token { index, name: t.name.clone(), message: message.into() };
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                return Err(problem("sha256 must be 64 hex digits (sha256sum of the token)"));
            }
            if t.projects.is_empty() {
                return Err(problem("projects must name at least one project (or \"*\")"));
            }
        }
        self.workers.check().map_err(ConfigError::Workers)
    }
}

fn parse_env<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| ConfigError::Env { name, message: format!("`{value}`: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        let text = r#"
            builtin_workers = true
            [store]
            url = "postgres://u@h/db"
            schema = "s1"
            [listen]
            grpc = "127.0.0.1:0"
            [[tokens]]
            name = "ci"
            sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            projects = ["a"]
            role = "operator"
        "#;
        let mut config = Config::parse(text, "test.toml").unwrap();
        let env = HashMap::from([
            ("CAPSTAN_STORE".to_string(), "sqlite:/tmp/x.db".to_string()),
            ("CAPSTAN_HTTP_ADDR".to_string(), "127.0.0.1:9999".to_string()),
        ]);
        config.apply_env(&env).unwrap();
        config.check().unwrap();
        assert_eq!(config.store.url, "sqlite:/tmp/x.db");
        assert_eq!(config.store.schema.as_deref(), Some("s1"));
        assert_eq!(config.listen.http.port(), 9999);
        assert_eq!(config.listen.grpc.port(), 0);
        assert_eq!(config.limits.max_payload_bytes, 65536);
        assert_eq!(config.auth, AuthMode::Tokens);
        assert_eq!(config.tokens[0].role, Role::Operator);
        assert_eq!(config.store.input_retention(), Ok(Some(Duration::from_secs(7 * 24 * 3_600))), "the default");
    }

    #[test]
    fn input_retention_is_a_duration_or_off() {
        let retention = |text: &str| Config::parse(text, "c.toml").unwrap().store.input_retention();
        assert_eq!(retention("[store]\ninput_retention = \"36h\""), Ok(Some(Duration::from_secs(36 * 3_600))));
        assert_eq!(retention("[store]\ninput_retention = \"off\""), Ok(None));
        assert_eq!(retention("[store]\ninput_retention = \"0\""), Ok(None));
        assert_eq!(retention("[store]\ninput_retention = \"0s\""), Ok(None));
        let err = Config::parse("[store]\ninput_retention = \"a week\"", "c.toml").unwrap().check().unwrap_err();
        assert!(err.to_string().contains("store: input_retention"), "{err}");
        let env = HashMap::from([("CAPSTAN_INPUT_RETENTION".to_string(), "2d".to_string())]);
        let mut config = Config::default();
        config.apply_env(&env).unwrap();
        assert_eq!(config.store.input_retention(), Ok(Some(Duration::from_secs(2 * 24 * 3_600))));
    }

    #[test]
    fn bad_settings_are_named() {
        let err = Config::parse("[listen]\ngrpc = \"nowhere\"", "c.toml").unwrap_err();
        assert!(err.to_string().contains("c.toml"), "{err}");
        assert!(Config::parse("colour = 1", "c.toml").is_err());
        let env = HashMap::from([("CAPSTAN_GRPC_ADDR".to_string(), "x".to_string())]);
        let err = Config::default().apply_env(&env).unwrap_err();
        assert!(err.to_string().contains("CAPSTAN_GRPC_ADDR"), "{err}");
        let bad = "[[tokens]]\nname = \"t\"\nsha256 = \"abc\"\nprojects = [\"a\"]\nrole = \"viewer\"";
        let err = Config::parse(bad, "c.toml").unwrap().check().unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
}
