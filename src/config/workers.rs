//! The `[workers]` section of the configuration: which delivery workers `capstan server` runs
//! in its process (and `capstan worker --kind` runs alone), and their files. See the module
//! documentation of [`crate::config`] for the TOML.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The `[workers]` section: which delivery workers run in the process, and their files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Attempts each delivery worker runs at once.
    pub slots: u32,
    /// Auction bids each delivery worker keeps open per slot (the worker SDK's
    /// `WorkerConfig::bids_per_slot`).
    pub bids_per_slot: u32,
    /// Report `started` only for attempts still running after this long, e.g. `20ms` (the
    /// worker SDK's `WorkerConfig::started_after`); `0s` reports every start at once.
    pub started_after: String,
    /// Worker ids are `<prefix><kind>`; unique per process (default: the host name and `-`).
    pub id_prefix: Option<String>,
    /// A directory for the workers' award journals (`<id>.journal`), so that a restarted server
    /// never starts an award twice that its outbox republished after a crash (see the worker
    /// SDK's `WorkerConfig::journal`). Unset: the workers remember awards in memory only.
    pub journal_dir: Option<PathBuf>,
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
            bids_per_slot: 4,
            started_after: "0s".into(),
            id_prefix: None,
            journal_dir: None,
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
        if let Some(d) = &mut self.journal_dir
            && d.is_relative()
        {
            *d = dir.join(&*d);
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

    /// `started_after` as a duration.
    pub fn started_after(&self) -> Result<std::time::Duration, String> {
        capstan_engine::parse_duration(&self.started_after)
            .map(std::time::Duration::from_millis)
            .map_err(|e| format!("started_after: {e}"))
    }

    /// Every problem: a Prometheus without a URL, an unknown provider, bad durations, two
    /// sections answering the same task type.
    pub(super) fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.slots == 0 {
            problems.push("slots: must be at least 1".to_string());
        }
        if self.bids_per_slot == 0 {
            problems.push("bids_per_slot: must be at least 1".to_string());
        }
        if let Err(e) = self.started_after() {
            problems.push(e);
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    #[test]
    fn delivery_workers_from_file_and_environment() {
        let text = r#"
            [workers]
            slots = 2
            bids_per_slot = 2
            started_after = "20ms"
            journal_dir = "journal"
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
        assert_eq!(w.bids_per_slot, 2);
        assert_eq!(w.started_after(), Ok(std::time::Duration::from_millis(20)));
        let defaults = WorkersConfig::default();
        assert_eq!((defaults.bids_per_slot, defaults.started_after()), (4, Ok(std::time::Duration::ZERO)));
        assert_eq!(w.journal_dir.as_deref(), Some(dir.path().join("journal").as_path()));
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
            bids_per_slot = 0
            started_after = "later"
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
            "bids_per_slot: must be at least 1",
            "started_after: ",
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
