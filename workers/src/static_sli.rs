//! `StaticSliWorker`: answers `get-sli` tasks with values given in the trigger data, for
//! pipelines that measured already (a load test's summary, a CI job's numbers).
//!
//! Reads the input's `values` object, else its `sli` object: `{"<name>": <number or numeric
//! string>}`. `values` comes first because `sli` is also what every provider outputs, and the
//! engine carries outputs into the runs a run promotes: in staging, `sli` may still hold the
//! values dev's get-sli measured, while `values` is what this stage's test reported. Property `indicators` (a list of names) selects some of them; a selected name
//! without a value is reported in `sliErrors`, as is a value that is not a finite number.
//! The output has the providers' shape (see [`crate::sli`]); neither object given is
//! `bad-input`.

use async_trait::async_trait;
use serde_json::Value;

use crate::handler::{Handler, Outcome, TaskContext};
use crate::sli::{SliReport, number, requested};

/// The static SLI provider.
#[derive(Debug, Clone, Default)]
pub struct StaticSliWorker;

impl StaticSliWorker {
    /// A static provider.
    pub fn new() -> Self {
        StaticSliWorker
    }
}

#[async_trait]
impl Handler for StaticSliWorker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let given = match (task.property("values"), task.property("sli")) {
            (Some(Value::Object(map)), _) | (None, Some(Value::Object(map))) => map,
            (Some(_), _) => return Outcome::error("bad-input", "values: must be an object of indicator values"),
            (None, Some(_)) => return Outcome::error("bad-input", "sli: must be an object of indicator values"),
            (None, None) => {
                return Outcome::error(
                    "bad-input",
                    "no SLI values: give an `sli` or `values` object in the trigger data",
                );
            }
        };
        let names = match requested(&task, given.keys().cloned()) {
            Ok(names) => names,
            Err(message) => return Outcome::error("bad-input", message),
        };
        let mut report = SliReport::default();
        for name in names {
            match given.get(&name).filter(|v| !v.is_null()).map(number) {
                Some(Ok(value)) => {
                    report.values.insert(name, value);
                }
                Some(Err(why)) => {
                    report.errors.insert(name, why);
                }
                None => {
                    report.errors.insert(name, "no value given".into());
                }
            }
        }
        report.into_outcome(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::task;
    use serde_json::json;

    async fn run(input: Value) -> Outcome {
        StaticSliWorker::new().handle(task("get-sli", input)).await
    }

    #[tokio::test]
    async fn passes_given_values_through_in_the_provider_shape() {
        let outcome = run(json!({"sli": {"response_time_p95": 512, "error_rate": "0.02"}})).await;
        assert_eq!(
            outcome,
            Outcome::pass(json!({"sli": {"response_time_p95": 512.0, "error_rate": 0.02}, "sliErrors": {}}))
        );
        let outcome = run(json!({"values": {"throughput": 80.5}})).await;
        assert_eq!(outcome, Outcome::pass(json!({"sli": {"throughput": 80.5}, "sliErrors": {}})));
        // A stage's own measurements win over values carried from an earlier stage's get-sli.
        let outcome = run(json!({"values": {"throughput": 3}, "sli": {"throughput": 80.5}})).await;
        assert_eq!(outcome, Outcome::pass(json!({"sli": {"throughput": 3.0}, "sliErrors": {}})));
    }

    #[tokio::test]
    async fn reports_bad_and_missing_values_and_honours_a_selection() {
        let input = json!({
            "sli": {"a": 1, "b": "fast", "c": null, "d": 4},
            "indicators": ["a", "b", "c", "e"]
        });
        let Outcome::Finished { output, .. } = run(input).await else { panic!("must finish") };
        assert_eq!(output["sli"], json!({"a": 1.0}));
        assert_eq!(
            output["sliErrors"],
            json!({"b": "\"fast\" is not a number", "c": "no value given", "e": "no value given"})
        );
    }

    #[tokio::test]
    async fn no_values_or_the_wrong_shape_is_bad_input() {
        for input in [json!({}), json!({"sli": [1, 2]}), json!({"values": 3}), json!({"sli": {}, "indicators": "a"})] {
            let Outcome::Error(e) = run(input.clone()).await else { panic!("{input}") };
            assert_eq!(e.kind, "bad-input", "{input}");
        }
    }
}
