//! `WebhookWorker`: calls an HTTP endpoint for any task type, as Keptn's webhook-service did to
//! drive Jenkins, Slack or GitHub from a sequence.
//!
//! Properties read (see [`TaskContext::property`]); strings are templates (see [`crate::template`],
//! `{{.data.service}}` resolved from the task input):
//! - `url`: the endpoint, http or https. Required.
//! - `method`: `GET`, `POST` (default), `PUT`, `PATCH`, `DELETE`, `HEAD`.
//! - `headers`: an object of header names to (templated) values.
//! - `body`: a template string sent as is (as `application/json` when it is JSON and no
//!   `Content-Type` is given), or an object / array whose strings are templated and which is
//!   sent as JSON.
//! - `timeout`: `"10s"` or seconds, for the whole exchange; else the award's start-to-close
//!   budget or the configured default, whichever is shorter.
//! - `expectStatus`: `200`, `[200, 202]` or `"2xx"`; default `"2xx"`.
//!
//! Output: `{"status": 200, "body": <JSON if the response is JSON, else text>, "truncated": false}`.
//! The body read stops at `max_response_bytes`; a truncated body is kept as text.
//!
//! Results and errors: an expected status passes. Otherwise a 4xx status (except 408 and 429)
//! is `bad-input`, meaning the request itself is wrong and the same request will fail again,
//! so by convention a definition lists `bad-input` in `retry.nonRetryable`. Any other status
//! (5xx, 408, 429, an unexpected 2xx/3xx) is `http-status`, worth retrying. A malformed
//! property, a missing template key or a refused target is `bad-input`; a connection or DNS
//! failure is `connect`; running out of time is `timeout`; `cancelled` when cancelled. No
//! redirect is followed: a 3xx is just a status.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Value, json};

use crate::handler::{Handler, Outcome, TaskContext};
use crate::scope::duration_property;
use crate::template::{render, render_value};
use crate::{Error, Result};

mod guard;
#[cfg(test)]
mod tests;

use guard::GuardedResolver;
pub use guard::{Guard, GuardError};

/// How a [`WebhookWorker`] calls endpoints.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Allow every target, including loopback and private networks (a trusted network only).
    pub allow_private: bool,
    /// Hosts (names or IP literals) allowed even if they resolve to internal addresses.
    pub allowed_hosts: Vec<String>,
    /// How many bytes of a response body are read at most.
    pub max_response_bytes: usize,
    /// The time limit when neither the task nor the award gives one.
    pub default_timeout: Duration,
    /// The `User-Agent` header sent.
    pub user_agent: String,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_private: false,
            allowed_hosts: Vec::new(),
            max_response_bytes: 64 * 1024,
            default_timeout: Duration::from_secs(30),
            user_agent: "capstan-webhook".into(),
        }
    }
}

/// The webhook handler.
#[derive(Debug, Clone)]
pub struct WebhookWorker {
    config: WebhookConfig,
    guard: Arc<Guard>,
    client: reqwest::Client,
}

/// One request, built from the task's properties.
#[derive(Debug)]
struct Call {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
    timeout: Option<Duration>,
    expect: Expect,
}

/// Which statuses pass.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Class(u16),
    Codes(Vec<u16>),
}

impl Expect {
    fn admits(&self, status: u16) -> bool {
        match self {
            Expect::Class(c) => status / 100 == *c,
            Expect::Codes(codes) => codes.contains(&status),
        }
    }
}

impl WebhookWorker {
    /// A webhook handler with the default (strict) configuration.
    pub fn new() -> Result<Self> {
        Self::with_config(WebhookConfig::default())
    }

    /// A webhook handler with the given configuration.
    pub fn with_config(config: WebhookConfig) -> Result<Self> {
        let guard = Arc::new(Guard::new(config.allow_private, &config.allowed_hosts));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(Arc::clone(&guard))))
            .user_agent(config.user_agent.clone())
            .build()
            .map_err(|e| Error::Config(vec![format!("webhook HTTP client: {e}")]))?;
        Ok(WebhookWorker { config, guard, client })
    }

    /// The configuration.
    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    async fn exchange(&self, call: Call) -> Result<(u16, Vec<u8>, bool, Option<String>), Outcome> {
        let mut request = self.client.request(call.method, call.url).headers(call.headers);
        if let Some(body) = call.body {
            request = request.body(body);
        }
        let mut response = request.send().await.map_err(|e| transport_error(&e.without_url()))?;
        let status = response.status().as_u16();
        let content_type =
            response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
        let limit = self.config.max_response_bytes;
        let mut body = Vec::new();
        let mut truncated = false;
        // Read chunk by chunk and stop at the limit: a huge or endless body costs nothing more.
        while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&e.without_url()))? {
            let room = limit - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body, truncated, content_type))
    }
}

#[async_trait]
impl Handler for WebhookWorker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let call = match build_call(&task) {
            Ok(call) => call,
            Err(message) => return Outcome::error("bad-input", message),
        };
        if let Err(e) = self.guard.check(&call.url).await {
            let kind = if matches!(e, GuardError::Resolve { .. }) { "connect" } else { "bad-input" };
            tracing::warn!(error = %e, "webhook target refused");
            return Outcome::error(kind, e.to_string());
        }
        let limit = [call.timeout, task.start_to_close()].into_iter().flatten().min();
        let limit = limit.unwrap_or(self.config.default_timeout);
        let expect = call.expect.clone();
        // Only the origin is logged and reported: webhook URLs often carry a secret in their
        // path or query (Slack, GitHub hooks), and error messages end up in the event log.
        let (method, url) = (call.method.clone(), call.url.origin().ascii_serialization());
        tracing::debug!(%method, %url, ?limit, "calling webhook");
        let exchanged = tokio::select! {
            r = tokio::time::timeout(limit, self.exchange(call)) => match r {
                Ok(r) => r,
                Err(_) => return Outcome::error("timeout", format!("{method} {url}: no complete answer within {limit:?}")),
            },
            _ = task.cancelled() => return Outcome::error("cancelled", "cancelled while calling the webhook"),
        };
        let (status, body, truncated, content_type) = match exchanged {
            Ok(parts) => parts,
            Err(outcome) => return outcome,
        };
        let body = decode_body(&body, truncated, content_type.as_deref());
        let output = json!({"status": status, "body": body, "truncated": truncated});
        if expect.admits(status) {
            return Outcome::pass(output);
        }
        let snippet: String = match &body {
            Value::String(s) => s.chars().take(256).collect(),
            other => other.to_string().chars().take(256).collect(),
        };
        let kind =
            if (400..500).contains(&status) && status != 408 && status != 429 { "bad-input" } else { "http-status" };
        tracing::info!(%method, %url, status, kind, "webhook answered with an unexpected status");
        Outcome::error(kind, format!("{method} {url} answered {status}: {snippet}"))
    }
}

/// The request from the task's properties; every problem is an input problem.
fn build_call(task: &TaskContext) -> Result<Call, String> {
    let input = task.input();
    let text = |name: &str| -> Result<Option<String>, String> {
        match task.property(name) {
            None => Ok(None),
            Some(Value::String(s)) => render(s, input).map(Some).map_err(|e| format!("{name}: {e}")),
            Some(_) => Err(format!("{name}: must be a string")),
        }
    };
    let url = text("url")?.ok_or("url: missing")?;
    let url = Url::parse(url.trim()).map_err(|e| format!("url: {url:?} is not a URL: {e}"))?;
    let method = match text("method")? {
        None => Method::POST,
        Some(m) => match m.trim().to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            "HEAD" => Method::HEAD,
            other => return Err(format!("method: {other} is not one of GET POST PUT PATCH DELETE HEAD")),
        },
    };
    let mut headers = HeaderMap::new();
    match task.property("headers") {
        None => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let value = match value {
                    Value::String(s) => render(s, input).map_err(|e| format!("headers.{name}: {e}"))?,
                    other => other.to_string(),
                };
                let name_ok =
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("headers.{name}: bad name"))?;
                let value_ok = HeaderValue::from_str(&value).map_err(|_| format!("headers.{name}: bad value"))?;
                headers.insert(name_ok, value_ok);
            }
        }
        Some(_) => return Err("headers: must be an object".into()),
    }
    let body = match task.property("body") {
        None => None,
        Some(Value::String(s)) => {
            let body = render(s, input).map_err(|e| format!("body: {e}"))?;
            if !headers.contains_key(CONTENT_TYPE) && serde_json::from_str::<Value>(&body).is_ok() {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Some(body.into_bytes())
        }
        Some(structured) => {
            let body = render_value(structured, input).map_err(|e| format!("body: {e}"))?;
            headers.entry(CONTENT_TYPE).or_insert(HeaderValue::from_static("application/json"));
            Some(body.to_string().into_bytes())
        }
    };
    let timeout = task.property("timeout").map(|v| duration_property("timeout", v)).transpose()?;
    let expect = match task.property("expectStatus") {
        None => Expect::Class(2),
        Some(v) => parse_expect(v)?,
    };
    Ok(Call { method, url, headers, body, timeout, expect })
}

fn parse_expect(v: &Value) -> Result<Expect, String> {
    let code = |v: &Value| v.as_u64().filter(|c| (100..600).contains(c)).map(|c| c as u16);
    let bad = || format!("expectStatus: {v} is not a status, a list of statuses or a class like \"2xx\"");
    match v {
        Value::Number(_) => code(v).map(|c| Expect::Codes(vec![c])).ok_or_else(bad),
        Value::Array(items) => items.iter().map(code).collect::<Option<Vec<_>>>().map(Expect::Codes).ok_or_else(bad),
        Value::String(s) => {
            let s = s.trim().to_ascii_lowercase();
            match s.as_bytes() {
                [d @ b'1'..=b'5', b'x', b'x'] => Ok(Expect::Class(u16::from(d - b'0'))),
                _ => s
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..600).contains(c))
                    .map(|c| Expect::Codes(vec![c]))
                    .ok_or_else(bad),
            }
        }
        _ => Err(bad()),
    }
}

/// JSON when the response says JSON and parses completely; else (lossy) text.
fn decode_body(body: &[u8], truncated: bool, content_type: Option<&str>) -> Value {
    let json_type = content_type.is_some_and(|t| t.starts_with("application/json") || t.contains("+json"));
    if json_type
        && !truncated
        && let Ok(v) = serde_json::from_slice(body)
    {
        return v;
    }
    Value::String(String::from_utf8_lossy(body).into_owned())
}

/// A failed exchange (its URL already removed, see `handle`): refused by the resolver (a re-resolution that turned internal),
/// timed out, or could not connect.
fn transport_error(e: &reqwest::Error) -> Outcome {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<GuardError>() {
            return Outcome::error("bad-input", refused.to_string());
        }
        source = s.source();
    }
    let kind = if e.is_timeout() { "timeout" } else { "connect" };
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Outcome::error(kind, message)
}
