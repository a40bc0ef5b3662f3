//! `PrometheusSliWorker`: answers `get-sli` tasks by querying Prometheus's HTTP API, as Keptn's
//! prometheus-service did, with Keptn's `sli.yaml`.
//!
//! Where the queries come from, first found wins:
//! - property `indicators` as an object `{name: PromQL}` (inline definitions);
//! - property `sliFile`: the text of an `sli.yaml` (inline, not a path: a task must not make
//!   the worker read files of its choosing);
//! - the configured [`ScopedFiles`] for the task's project / stage / service.
//!
//! Property `indicators` as a list of names selects some of them (a name not defined is
//! reported). Each query gets `$PROJECT $STAGE $SERVICE $DEPLOYMENT $DURATION_SECONDS` replaced
//! (see [`crate::sli`]) and is run as an instant query at the end of the time frame
//! (`start`, `end`, `timeframe`; default the last 5 minutes), one after the other.
//!
//! Per indicator, no sample, several series, a non-finite value or a query Prometheus rejects
//! (4xx) is reported in `sliErrors`. Prometheus being unreachable, slow or failing (5xx) is an
//! error of kind `unavailable` for the whole task, so the engine retries rather than letting a
//! gate judge an outage. Missing definitions or malformed properties are `bad-input`. The
//! Prometheus URL comes from the configuration only, so it is trusted and not SSRF-checked.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::Value;

use crate::handler::{Handler, Outcome, TaskContext};
use crate::scope::{Scope, ScopedFiles};
use crate::sli::{SliFile, SliReport, TimeFrame, number, placeholders, requested, substitute};
use crate::{Error, Result};

/// Where the Prometheus SLI provider finds Prometheus and the `sli.yaml` files.
#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// Prometheus's base URL, e.g. `http://prometheus.monitoring:9090`.
    pub url: String,
    /// `sli.yaml` files per project / stage / service.
    pub sli_files: ScopedFiles,
    /// The time limit of each query.
    pub query_timeout: Duration,
    /// How many bytes of a query answer are read at most.
    pub max_response_bytes: usize,
    /// Basic-auth user and password, if Prometheus needs them.
    pub basic_auth: Option<(String, String)>,
}

impl PrometheusConfig {
    /// A configuration for the Prometheus at `url`, with no files and default limits.
    pub fn new(url: impl Into<String>) -> Self {
        PrometheusConfig {
            url: url.into(),
            sli_files: ScopedFiles::new(),
            query_timeout: Duration::from_secs(30),
            max_response_bytes: 1024 * 1024,
            basic_auth: None,
        }
    }
}

/// The Prometheus SLI provider.
#[derive(Debug, Clone)]
pub struct PrometheusSliWorker {
    config: PrometheusConfig,
    endpoint: reqwest::Url,
    client: reqwest::Client,
}

/// Why one query gave no value.
enum QueryError {
    /// Prometheus answered, without a usable value.
    NoValue(String),
    /// Prometheus could not be asked.
    Unavailable(String),
}

impl PrometheusSliWorker {
    /// A provider; fails if the URL is not an http(s) URL.
    pub fn new(config: PrometheusConfig) -> Result<Self> {
        let base = reqwest::Url::parse(config.url.trim_end_matches('/'))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| Error::Config(vec![format!("prometheus url: {:?} is not an http(s) URL", config.url)]))?;
        let endpoint = reqwest::Url::parse(&format!("{}/api/v1/query", base.as_str().trim_end_matches('/')))
            .map_err(|e| Error::Config(vec![format!("prometheus url: {e}")]))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.query_timeout)
            .build()
            .map_err(|e| Error::Config(vec![format!("prometheus HTTP client: {e}")]))?;
        Ok(PrometheusSliWorker { config, endpoint, client })
    }

    /// The query definitions for a task.
    async fn definitions(&self, task: &TaskContext, scope: &Scope) -> Result<SliFile, String> {
        if let Some(Value::Object(inline)) = task.property("indicators") {
            let indicators = inline
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|q| (k.clone(), q.to_string()))
                        .ok_or(format!("indicators.{k}: must be a query string"))
                })
                .collect::<Result<_, _>>()?;
            return Ok(SliFile { spec_version: String::new(), indicators });
        }
        if let Some(text) = task.property("sliFile") {
            return SliFile::parse(text.as_str().ok_or("sliFile: must be the text of an sli.yaml")?);
        }
        match self.config.sli_files.read(scope).await? {
            Some(text) => SliFile::parse(&text),
            None => Err(format!(
                "no SLI definitions: give `indicators` or `sliFile`, or configure an sli.yaml for project {}",
                scope.project
            )),
        }
    }

    /// Runs one instant query at `time` and returns its single value.
    async fn query(&self, promql: &str, time: f64) -> Result<f64, QueryError> {
        let mut request =
            self.client.get(self.endpoint.clone()).query(&[("query", promql), ("time", &format!("{time:.3}"))]);
        if let Some((user, password)) = &self.config.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        let unavailable = |e: reqwest::Error| QueryError::Unavailable(format!("prometheus: {e}"));
        let mut response = request.send().await.map_err(unavailable)?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            body.extend_from_slice(&chunk);
            if body.len() > self.config.max_response_bytes {
                return Err(QueryError::NoValue(format!("answer over {} bytes", self.config.max_response_bytes)));
            }
        }
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        if status.is_server_error() {
            return Err(QueryError::Unavailable(format!("prometheus answered {status}")));
        }
        let Some(answer) = parsed else {
            return Err(QueryError::NoValue(format!("prometheus answered {status} without JSON")));
        };
        if answer["status"] != "success" {
            let error = answer["error"].as_str().unwrap_or("no error message");
            return Err(QueryError::NoValue(format!("prometheus refused the query ({status}): {error}")));
        }
        sample(&answer["data"]).map_err(QueryError::NoValue)
    }
}

/// The one value of an instant query's `data`: a scalar, or a vector of exactly one series.
fn sample(data: &Value) -> Result<f64, String> {
    let value = match data["resultType"].as_str() {
        Some("scalar") => &data["result"],
        Some("vector") => match data["result"].as_array().map(Vec::as_slice) {
            Some([]) => return Err("no data: the query returned no series".into()),
            Some([one]) => &one["value"],
            Some(many) => {
                return Err(format!("the query returned {} series; an SLI query must return one", many.len()));
            }
            None => return Err("malformed vector result".into()),
        },
        other => return Err(format!("unsupported result type {other:?}; use an instant vector or scalar")),
    };
    // A sample is `[<unix time>, "<value>"]`.
    number(&value[1])
}

#[async_trait]
impl Handler for PrometheusSliWorker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let scope = Scope::of(&task);
        let frame = match TimeFrame::of(&task, SystemTime::now()) {
            Ok(frame) => frame,
            Err(message) => return Outcome::error("bad-input", message),
        };
        let file = match self.definitions(&task, &scope).await {
            Ok(file) => file,
            Err(message) => return Outcome::error("bad-input", message),
        };
        let names = match requested(&task, file.indicators.keys().cloned()) {
            Ok(names) => names,
            Err(message) => return Outcome::error("bad-input", message),
        };
        let vars = placeholders(&task, &scope, &frame);
        let mut report = SliReport::default();
        for name in names {
            let Some(template) = file.indicators.get(&name) else {
                report.errors.insert(name, "not defined in the sli.yaml".into());
                continue;
            };
            let promql = match substitute(template, &vars) {
                Ok(q) => q,
                Err(e) => {
                    report.errors.insert(name, e);
                    continue;
                }
            };
            tracing::debug!(indicator = %name, query = %promql, "querying prometheus");
            let result = tokio::select! {
                r = self.query(&promql, frame.end) => r,
                _ = task.cancelled() => return Outcome::error("cancelled", "cancelled while querying prometheus"),
            };
            match result {
                Ok(value) => {
                    report.values.insert(name, value);
                }
                Err(QueryError::NoValue(why)) => {
                    report.errors.insert(name, why);
                }
                Err(QueryError::Unavailable(why)) => {
                    tracing::warn!(indicator = %name, error = %why, "prometheus unavailable");
                    return Outcome::error("unavailable", format!("{name}: {why}"));
                }
            }
        }
        report.into_outcome(Some(&frame))
    }
}

#[cfg(test)]
mod tests;
