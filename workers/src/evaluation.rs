//! `EvaluationWorker`: the quality gate (task type `evaluation`). Scores SLI values against a
//! Keptn `slo.yaml` with [`capstan_engine::slo`], as Keptn's lighthouse-service did.
//!
//! Input read:
//! - the SLO: property `slo` (the YAML text, or the same structure as an object), else the
//!   configured file for the task's project / stage / service. With neither, the task passes
//!   without scoring (`"evaluation": null`), as Keptn did for a service without an slo.yaml.
//! - `sli`: `{"<name>": <number>}`, the output of the `get-sli` task before this one (the
//!   engine carries outputs into later inputs). Entries that are not finite numbers count as
//!   missing, and a scored objective without a value fails. Without `sli` in the input (Keptn's
//!   remediation sequence has no get-sli task before its evaluation), the configured
//!   [`EvaluationConfig::sli_provider`] is asked with this very task, as Keptn's lighthouse
//!   triggered a get-sli itself; with no provider either, every scored objective fails.
//! - `previousEvaluations`: earlier results, oldest first, as [`PreviousResult`] JSON (an
//!   earlier task's whole `evaluation` object fits), the baseline of relative criteria.
//! - `result`: Keptn's rule: if it says an earlier task failed (`fail`/`failed`), the gate
//!   fails whatever the values, and the output says `previousTaskFailed`.
//!
//! Output: `{"evaluation": <Evaluation JSON>, "score": <0..100>}` (plus `sliErrors` when a
//! provider was asked and missed some), and the task's result is the
//! evaluation's: pass, warning or fail. A failing gate is an answer, not an error; only an
//! unreadable SLO file or malformed input is an error (`bad-input`). The output has no
//! top-level `result` on purpose: carried into a later evaluation's input, it would read as
//! an earlier task's verdict. Nor does it have `sli`: carried into the next run of a
//! remediation loop, stale values would stop the provider from being asked again.

use std::sync::Arc;

use async_trait::async_trait;
use capstan_engine::slo::{self, PreviousResult};
use capstan_proto::TaskResult;
use serde_json::{Value, json};

use crate::handler::{Handler, Outcome, TaskContext};
use crate::scope::{Scope, ScopedFiles};
use crate::sli::{SliReport, number};

/// Where the evaluation worker finds `slo.yaml` files and, when a task brings no values, SLIs.
#[derive(Debug, Clone, Default)]
pub struct EvaluationConfig {
    /// `slo.yaml` files per project / stage / service.
    pub slo_files: ScopedFiles,
    /// Asked for the values when the input has no `sli` (a `get-sli` handler such as the
    /// Prometheus or static provider).
    pub sli_provider: Option<SliProvider>,
}

/// A `get-sli` handler the evaluation worker asks itself.
#[derive(Clone)]
pub struct SliProvider(pub Arc<dyn Handler>);

impl SliProvider {
    /// Wraps a `get-sli` handler.
    pub fn new(handler: impl Handler) -> Self {
        SliProvider(Arc::new(handler))
    }
}

impl std::fmt::Debug for SliProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SliProvider(..)")
    }
}

/// The quality-gate handler.
#[derive(Debug, Clone, Default)]
pub struct EvaluationWorker {
    config: EvaluationConfig,
}

impl EvaluationWorker {
    /// An evaluation worker with the given files.
    pub fn new(config: EvaluationConfig) -> Self {
        EvaluationWorker { config }
    }

    /// The SLO text for a task, if any.
    async fn slo_text(&self, task: &TaskContext) -> Result<Option<String>, String> {
        match task.property("slo") {
            Some(Value::String(text)) => Ok(Some(text.clone())),
            // YAML is a superset of JSON, so an object given inline parses as the same file.
            Some(v @ Value::Object(_)) => Ok(Some(v.to_string())),
            Some(_) => Err("slo: must be the text of an slo.yaml or an object".into()),
            None => self.config.slo_files.read(&Scope::of(task)).await,
        }
    }
}

#[async_trait]
impl Handler for EvaluationWorker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let text = match self.slo_text(&task).await {
            Ok(Some(text)) => text,
            Ok(None) => {
                tracing::info!(run = %task.run_id(), "no slo.yaml for this task; passing without a gate");
                return Outcome::pass(
                    json!({"evaluation": null, "score": null, "skipped": "no slo.yaml is configured or given"}),
                );
            }
            Err(message) => return Outcome::error("bad-input", message),
        };
        let slo = match slo::parse(&text) {
            Ok(slo) => slo,
            Err(e) => return Outcome::error("bad-input", e.to_string()),
        };
        let has_sli = task.input().get("sli").is_some_and(|v| !v.is_null());
        let (SliReport { values, errors: ignored }, provider_errors) = match (&self.config.sli_provider, has_sli) {
            (Some(provider), false) => match provider.0.handle(task.clone()).await {
                Outcome::Finished { output, .. } => match sli_values(&output) {
                    Ok(report) => {
                        let missing = output.get("sliErrors").filter(|e| e.as_object().is_some_and(|m| !m.is_empty()));
                        (report, missing.cloned())
                    }
                    Err(message) => return Outcome::error("bad-input", format!("the SLI provider: {message}")),
                },
                // Prometheus being down is worth a retry, not a failed gate.
                Outcome::Error(e) => return Outcome::error(e.kind, format!("the SLI provider: {}", e.message)),
            },
            _ => match sli_values(task.input()) {
                Ok(report) => (report, None),
                Err(message) => return Outcome::error("bad-input", message),
            },
        };
        let previous: Vec<PreviousResult> = match task.input().get("previousEvaluations") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => match serde_json::from_value(v.clone()) {
                Ok(previous) => previous,
                Err(e) => return Outcome::error("bad-input", format!("previousEvaluations: {e}")),
            },
        };
        let evaluation = slo::evaluate(&slo, &values, &previous);
        let previous_failed = task
            .input()
            .get("result")
            .and_then(Value::as_str)
            .and_then(TaskResult::parse)
            .is_some_and(|r| r == TaskResult::Fail);
        let result = if previous_failed { TaskResult::Fail } else { evaluation.result };
        tracing::info!(
            run = %task.run_id(), score = evaluation.score, result = result.as_str(), previous_failed, "evaluated"
        );
        let mut output = json!({"evaluation": evaluation, "score": evaluation.score});
        if previous_failed {
            output["previousTaskFailed"] = json!(true);
        }
        if !ignored.is_empty() {
            output["ignoredSli"] = json!(ignored);
        }
        if let Some(missing) = provider_errors {
            output["sliErrors"] = missing;
        }
        Outcome::Finished { result, output }
    }
}

/// The SLI values of the input, and the entries that were not numbers (with why) as errors.
fn sli_values(input: &Value) -> Result<SliReport, String> {
    let mut report = SliReport::default();
    match input.get("sli") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, v) in map {
                match number(v) {
                    Ok(n) => {
                        report.values.insert(name.clone(), n);
                    }
                    Err(why) => {
                        report.errors.insert(name.clone(), why);
                    }
                }
            }
        }
        Some(_) => return Err("sli: must be an object of indicator values".into()),
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
