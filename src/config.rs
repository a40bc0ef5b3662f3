//! The server's configuration: a TOML file (`capstan server --config capstan.toml`) with
//! `CAPSTAN_*` environment variables on top, so containers can change one setting without a file.
//!
//! ```toml
//! builtin_workers = false        # run the shell and echo workers in process (tests, demos)
//! auth = "tokens"                # "tokens" (default: only configured tokens get in) or "none"
//! [store]
//! url = "postgres://capstan@db/capstan"   # or sqlite:PATH, memory:
//! schema = "capstan"             # PostgreSQL only: created if missing
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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::auth::Role;

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
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { url: "sqlite:.capstan/capstan.db".into(), schema: None }
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

    /// Checks what serde cannot: token hashes are 64 hex digits and name some project.
    fn check(&self) -> Result<(), ConfigError> {
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

/// The `[workers]` section: which delivery workers run in the process, and their files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Attempts each delivery worker runs at once.
    pub slots: u32,
    /// The quality gate.
    pub evaluation: Option<EvaluationWorkerConfig>,
    /// The Prometheus SLI provider.
    pub prometheus: Option<PrometheusWorkerConfig>,
    /// The static SLI provider.
    pub static_sli: Option<StaticSliWorkerConfig>,
    /// The webhook caller.
    pub webhook: Option<WebhookWorkerConfig>,
    /// The remediation-action chooser.
    pub get_action: Option<GetActionWorkerConfig>,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            slots: 8,
            evaluation: None,
            prometheus: None,
            static_sli: None,
            webhook: None,
            get_action: None,
        }
    }
}

/// Files per scope key (`project`, `project/stage`, `project/stage/service`).
pub type ScopedPaths = BTreeMap<String, PathBuf>;

/// `[workers.evaluation]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationWorkerConfig {
    /// Task types (default `evaluation`).
    pub types: Vec<String>,
    /// `slo.yaml` files.
    pub slo: ScopedPaths,
    /// Who is asked for values when an evaluation has none: `prometheus`, `static` or `none`.
    /// Default: `prometheus` when `[workers.prometheus]` is configured, else `none`.
    pub sli_provider: Option<String>,
}

impl Default for EvaluationWorkerConfig {
    fn default() -> Self {
        EvaluationWorkerConfig { types: vec!["evaluation".into()], slo: ScopedPaths::new(), sli_provider: None }
    }
}

/// `[workers.prometheus]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusWorkerConfig {
    /// Task types (default `get-sli`).
    pub types: Vec<String>,
    /// Prometheus's base URL.
    pub url: String,
    /// `sli.yaml` files.
    pub sli: ScopedPaths,
    /// Time limit of each query, e.g. `30s`.
    pub query_timeout: String,
}

impl Default for PrometheusWorkerConfig {
    fn default() -> Self {
        PrometheusWorkerConfig {
            types: vec!["get-sli".into()],
            url: String::new(),
            sli: ScopedPaths::new(),
            query_timeout: "30s".into(),
        }
    }
}

/// `[workers.static_sli]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StaticSliWorkerConfig {
    /// Task types (default `get-sli`).
    pub types: Vec<String>,
}

impl Default for StaticSliWorkerConfig {
    fn default() -> Self {
        StaticSliWorkerConfig { types: vec!["get-sli".into()] }
    }
}

/// `[workers.webhook]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookWorkerConfig {
    /// Task types (default `webhook`).
    pub types: Vec<String>,
    /// Allow every target, loopback and private networks included (trusted networks only).
    pub allow_private: bool,
    /// Hosts allowed even when they resolve to internal addresses.
    pub allowed_hosts: Vec<String>,
    /// Largest response body read, in bytes.
    pub max_response_bytes: usize,
    /// Time limit when the task gives none, e.g. `30s`.
    pub default_timeout: String,
}

impl Default for WebhookWorkerConfig {
    fn default() -> Self {
        WebhookWorkerConfig {
            types: vec!["webhook".into()],
            allow_private: false,
            allowed_hosts: Vec::new(),
            max_response_bytes: 64 * 1024,
            default_timeout: "30s".into(),
        }
    }
}

/// `[workers.get_action]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GetActionWorkerConfig {
    /// Task types (default `get-action`).
    pub types: Vec<String>,
    /// `remediation.yaml` files.
    pub remediation: ScopedPaths,
}

impl Default for GetActionWorkerConfig {
    fn default() -> Self {
        GetActionWorkerConfig { types: vec!["get-action".into()], remediation: ScopedPaths::new() }
    }
}

impl WorkersConfig {
    /// Whether any delivery worker is configured.
    pub fn any(&self) -> bool {
        self.evaluation.is_some()
            || self.prometheus.is_some()
            || self.static_sli.is_some()
            || self.webhook.is_some()
            || self.get_action.is_some()
    }

    /// Makes relative file paths relative to `dir` (the configuration file's directory).
    pub fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |paths: &mut ScopedPaths| {
            for p in paths.values_mut() {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        };
        if let Some(e) = &mut self.evaluation {
            resolve(&mut e.slo);
        }
        if let Some(p) = &mut self.prometheus {
            resolve(&mut p.sli);
        }
        if let Some(g) = &mut self.get_action {
            resolve(&mut g.remediation);
        }
    }

    /// The evaluation worker's SLI provider: `prometheus`, `static` or `none`.
    pub fn sli_provider(&self) -> &str {
        match self.evaluation.as_ref().and_then(|e| e.sli_provider.as_deref()) {
            Some(p) => p,
            None if self.prometheus.is_some() => "prometheus",
            None => "none",
        }
    }

    /// Every problem: a Prometheus without a URL, an unknown provider, bad durations, two
    /// sections answering the same task type.
    fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.slots == 0 {
            problems.push("slots: must be at least 1".to_string());
        }
        match self.sli_provider() {
            "prometheus" if self.prometheus.is_none() => {
                problems.push("evaluation.sli_provider = \"prometheus\" needs a [workers.prometheus] section".into());
            }
            "prometheus" | "static" | "none" => {}
            other => problems.push(format!("evaluation.sli_provider: `{other}` is not prometheus, static or none")),
        }
        if let Some(p) = &self.prometheus {
            if p.url.trim().is_empty() {
                problems.push("prometheus.url: must be set (or CAPSTAN_PROMETHEUS_URL)".into());
            }
            if let Err(e) = capstan_engine::parse_duration(&p.query_timeout) {
                problems.push(format!("prometheus.query_timeout: {e}"));
            }
        }
        if let Some(w) = &self.webhook
            && let Err(e) = capstan_engine::parse_duration(&w.default_timeout)
        {
            problems.push(format!("webhook.default_timeout: {e}"));
        }
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        for (section, types) in self.sections() {
            if types.is_empty() {
                problems.push(format!("{section}.types: must name at least one task type"));
            }
            for t in types {
                if let Some(other) = owners.insert(t.as_str(), section) {
                    problems
                        .push(format!("task type `{t}` is answered by both [workers.{other}] and [workers.{section}]"));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// The configured sections with their task types.
    pub fn sections(&self) -> Vec<(&'static str, &[String])> {
        let mut out: Vec<(&'static str, &[String])> = Vec::new();
        if let Some(e) = &self.evaluation {
            out.push(("evaluation", &e.types));
        }
        if let Some(p) = &self.prometheus {
            out.push(("prometheus", &p.types));
        }
        if let Some(s) = &self.static_sli {
            out.push(("static_sli", &s.types));
        }
        if let Some(w) = &self.webhook {
            out.push(("webhook", &w.types));
        }
        if let Some(g) = &self.get_action {
            out.push(("get_action", &g.types));
        }
        out
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

#[cfg(test)]
mod workers_tests {
    use super::*;

    #[test]
    fn delivery_workers_from_file_and_environment() {
        let text = r#"
            [workers]
            slots = 2
            [workers.evaluation]
            slo = { sockshop = "slo.yaml", "sockshop/production" = "/etc/capstan/prod-slo.yaml" }
            [workers.prometheus]
            url = "http://prometheus:9090"
            sli = { sockshop = "sli.yaml" }
            [workers.webhook]
            types = ["webhook", "notify"]
            [workers.get_action]
            remediation = { "sockshop/production" = "remediation.yaml" }
        "#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capstan.toml");
        std::fs::write(&path, text).unwrap();
        let env = HashMap::from([
            ("CAPSTAN_PROMETHEUS_URL".to_string(), "http://127.0.0.1:9091".to_string()),
            ("CAPSTAN_WEBHOOK_ALLOWED_HOSTS".to_string(), "hooks.slack.com, ci.example.com".to_string()),
        ]);
        let config = Config::load(Some(&path), &env).unwrap();
        let w = &config.workers;
        assert_eq!(w.slots, 2);
        let evaluation = w.evaluation.as_ref().unwrap();
        assert_eq!(evaluation.types, ["evaluation"]);
        assert_eq!(evaluation.slo["sockshop"], dir.path().join("slo.yaml"), "relative to the file");
        assert_eq!(evaluation.slo["sockshop/production"], PathBuf::from("/etc/capstan/prod-slo.yaml"));
        assert_eq!(w.sli_provider(), "prometheus", "the default once Prometheus is configured");
        assert_eq!(w.prometheus.as_ref().unwrap().url, "http://127.0.0.1:9091");
        let webhook = w.webhook.as_ref().unwrap();
        assert_eq!(webhook.allowed_hosts, ["hooks.slack.com", "ci.example.com"]);
        assert_eq!(webhook.types, ["webhook", "notify"]);
        assert!(!webhook.allow_private);
        assert_eq!(
            w.get_action.as_ref().unwrap().remediation["sockshop/production"],
            dir.path().join("remediation.yaml")
        );
        assert!(w.static_sli.is_none());
        assert!(!Config::default().workers.any());
    }

    #[test]
    fn worker_problems_are_all_named() {
        let text = r#"
            [workers]
            slots = 0
            [workers.evaluation]
            sli_provider = "prometheus"
            [workers.static_sli]
            types = ["get-sli", "evaluation"]
            [workers.webhook]
            default_timeout = "soon"
        "#;
        let err = Config::parse(text, "c.toml").unwrap().check().unwrap_err().to_string();
        for part in [
            "slots: must be at least 1",
            "needs a [workers.prometheus] section",
            "webhook.default_timeout",
            "task type `evaluation` is answered by both [workers.evaluation] and [workers.static_sli]",
        ] {
            assert!(err.contains(part), "{part} missing from: {err}");
        }
        let err = Config::parse("[workers.prometheus]\nsli = {}", "c.toml").unwrap().check().unwrap_err();
        assert!(err.to_string().contains("prometheus.url: must be set"), "{err}");
        assert!(Config::parse("[workers.evaluation]\nslos = {}", "c.toml").is_err(), "unknown keys are refused");
    }
}
