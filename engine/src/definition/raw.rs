//! The file as written: serde structs mirroring the YAML keys, before defaults and validation.
//!
//! Values whose problems should be reported at their stage / sequence / task (durations,
//! selectors, properties, labels, dispatch and award names) are kept as loose YAML here and
//! checked in `build`, so that one bad value does not hide the others. Every struct keeps the keys
//! it does not know in `unknown`: Keptn files tolerate them, Capstan files report them.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawShipyard {
    #[serde(default)]
    pub metadata: RawMetadata,
    pub spec: RawSpec,
}

/// `metadata`; only the name matters, labels and annotations are left alone.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawMetadata {
    #[serde(default)]
    pub name: Option<String>,
}

/// `spec`.
#[derive(Debug, Deserialize)]
pub(super) struct RawSpec {
    #[serde(default)]
    pub stages: Option<Vec<RawStage>>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// One entry of `spec.stages`.
#[derive(Debug, Deserialize)]
pub(super) struct RawStage {
    pub name: String,
    #[serde(default)]
    pub sequences: Option<Vec<RawSequence>>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// One entry of a stage's `sequences`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawSequence {
    pub name: String,
    #[serde(default)]
    pub triggered_on: Option<Vec<RawTrigger>>,
    #[serde(default)]
    pub tasks: Option<Vec<RawTask>>,
    #[serde(default)]
    pub runbook: Option<RawRunbook>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// A sequence's `runbook`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawRunbook {
    #[serde(default)]
    pub remediations: Option<Value>,
    #[serde(default)]
    pub evaluate_after: Option<Value>,
    #[serde(default)]
    pub get_sli: Option<bool>,
    /// A task without a name (it is always `escalation`).
    #[serde(default)]
    pub escalation: Option<Mapping>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// One entry of `triggeredOn`.
#[derive(Debug, Deserialize)]
pub(super) struct RawTrigger {
    pub event: String,
    #[serde(default)]
    pub selector: Option<Value>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// One entry of a sequence's `tasks`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawTask {
    pub name: String,
    #[serde(default, rename = "type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub properties: Option<Value>,
    #[serde(default)]
    pub depends_on: Option<Vec<String>>,
    #[serde(default)]
    pub triggered_after: Option<Value>,
    #[serde(default)]
    pub retry: Option<RawRetry>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    #[serde(default)]
    pub requires: Option<RawRequires>,
    #[serde(default)]
    pub dispatch: Option<Value>,
    #[serde(default)]
    pub award: Option<Value>,
    #[serde(default)]
    pub continue_on_failure: Option<bool>,
    #[serde(default)]
    pub idempotent: Option<bool>,
    #[serde(default)]
    pub claim: Option<bool>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// A task's `retry`; absent keys take the flavor's default.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawRetry {
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub initial_interval: Option<Value>,
    #[serde(default)]
    pub backoff_coefficient: Option<f64>,
    #[serde(default)]
    pub max_interval: Option<Value>,
    #[serde(default)]
    pub non_retryable: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// A task's `timeouts`; absent keys take the flavor's default.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawTimeouts {
    #[serde(default)]
    pub schedule_to_start: Option<Value>,
    #[serde(default)]
    pub start_to_close: Option<Value>,
    #[serde(default)]
    pub heartbeat: Option<Value>,
    #[serde(default)]
    pub bid_window: Option<Value>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// A task's `requires`.
#[derive(Debug, Deserialize)]
pub(super) struct RawRequires {
    #[serde(default)]
    pub labels: Option<BTreeMap<String, Value>>,
    #[serde(flatten)]
    pub unknown: Mapping,
}

/// The text of a YAML scalar (`10s`, `5`, `true`), or `None` for mappings, lists and null.
pub(super) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Tagged(tagged) => scalar_text(&tagged.value),
        Value::Null | Value::Sequence(_) | Value::Mapping(_) => None,
    }
}

/// The keys of `unknown` as they would be written in the file.
pub(super) fn key_names(unknown: &Mapping) -> Vec<String> {
    unknown.keys().map(|key| scalar_text(key).unwrap_or_else(|| format!("{key:?}"))).collect()
}
