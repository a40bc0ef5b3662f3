//! Evaluation worker tests on Keptn's quality-gate fixture and inline SLO files.

use serde_json::{Value, json};

use super::*;
use crate::test_server::task;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/tests/fixtures/keptn/slo-quality-gates.yaml");

/// A worker with the fixture configured for the whole `sockshop` project.
fn gate() -> EvaluationWorker {
    EvaluationWorker::new(EvaluationConfig {
        slo_files: ScopedFiles::new().with("sockshop", FIXTURE),
        ..EvaluationConfig::default()
    })
}

fn finished(outcome: Outcome) -> (TaskResult, Value) {
    match outcome {
        Outcome::Finished { result, output } => (result, output),
        Outcome::Error(e) => panic!("expected a verdict, got error {e:?}"),
    }
}

#[tokio::test]
async fn the_fixture_passes_a_fast_service() {
    let input = json!({"stage": "staging", "service": "carts", "sli": {"response_time_p95": 512.0}});
    let (result, output) = finished(gate().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Pass);
    assert_eq!(output["score"], json!(100.0));
    assert_eq!(output["evaluation"]["result"], json!("pass"));
    assert_eq!(output["evaluation"]["objectives"][0]["status"], json!("pass"));
    assert!(output.get("result").is_none(), "no top-level result may leak into later inputs");
}

#[tokio::test]
async fn the_fixture_fails_a_regression_against_the_previous_result_as_an_answer() {
    // 590 is under 600 but 18 % slower than the last passing 500: the pass criteria fail, the
    // warning criterion (<=800) holds, the objective scores half, and 50 % is under 75 %.
    let input = json!({
        "sli": {"response_time_p95": 590},
        "previousEvaluations": [
            {"result": "fail", "values": {"response_time_p95": 100.0}},
            {"result": "pass", "values": {"response_time_p95": 500.0}, "score": 100.0}
        ]
    });
    let (result, output) = finished(gate().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Fail);
    assert_eq!(output["score"], json!(50.0));
    let objective = &output["evaluation"]["objectives"][0];
    assert_eq!((objective["status"].clone(), objective["baseline"].clone()), (json!("warning"), json!(500.0)));
    assert_eq!(output["evaluation"]["compared_results"], json!(1));
}

#[tokio::test]
async fn a_missing_sli_fails_the_gate_and_non_numbers_are_listed() {
    let input = json!({"sli": {"response_time_p95": "NaN", "throughput": 3}});
    let (result, output) = finished(gate().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Fail);
    assert_eq!(output["score"], json!(0.0));
    assert!(output["ignoredSli"]["response_time_p95"].as_str().unwrap().contains("finite"));
    let (result, _) = finished(gate().handle(task("evaluation", json!({}))).await);
    assert_eq!(result, TaskResult::Fail);
}

#[tokio::test]
async fn an_inline_slo_can_warn() {
    let slo = r#"
objectives:
  - sli: response_time_p95
    pass: [{criteria: ["<600"]}]
    warning: [{criteria: ["<=800"]}]
  - sli: error_rate
    pass: [{criteria: ["<=0.01"]}]
total_score: {pass: "90%", warning: "75%"}
"#;
    let input = json!({"slo": slo, "sli": {"response_time_p95": 700, "error_rate": 0.0}});
    let (result, output) = finished(gate().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Warning);
    assert_eq!(output["score"], json!(75.0));

    // The same file as an object in the task's properties.
    let as_object: Value = serde_yaml::from_str(slo).unwrap();
    let input = json!({"properties": {"slo": as_object}, "sli": {"response_time_p95": 100, "error_rate": 0.0}});
    let (result, _) = finished(gate().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Pass);
}

#[tokio::test]
async fn a_failed_earlier_task_fails_the_gate_keptns_rule() {
    let input = json!({"result": "failed", "sli": {"response_time_p95": 100.0}});
    let (result, output) = finished(gate().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Fail);
    assert_eq!(output["previousTaskFailed"], json!(true));
    assert_eq!(output["evaluation"]["result"], json!("pass"), "the scores themselves stay visible");
    let input = json!({"result": "pass", "sli": {"response_time_p95": 100.0}});
    assert_eq!(finished(gate().handle(task("evaluation", input)).await).0, TaskResult::Pass);
}

#[tokio::test]
async fn an_earlier_evaluation_output_serves_as_a_baseline() {
    let (_, first) = finished(gate().handle(task("evaluation", json!({"sli": {"response_time_p95": 400.0}}))).await);
    let input = json!({"sli": {"response_time_p95": 430.0}, "previousEvaluations": [first["evaluation"]]});
    let (result, output) = finished(gate().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Pass, "+7.5 % is within +10 %");
    assert_eq!(output["evaluation"]["objectives"][0]["baseline"], json!(400.0));
}

#[tokio::test]
async fn without_any_slo_the_task_passes_unscored() {
    let worker = EvaluationWorker::new(EvaluationConfig::default());
    let (result, output) = finished(worker.handle(task("evaluation", json!({"sli": {"a": 1}}))).await);
    assert_eq!(result, TaskResult::Pass);
    assert_eq!(output["evaluation"], Value::Null);
}

#[tokio::test]
async fn malformed_slo_and_inputs_are_bad_input() {
    let missing_file = EvaluationWorker::new(EvaluationConfig {
        slo_files: ScopedFiles::new().with("sockshop", "/nonexistent/slo.yaml"),
        ..EvaluationConfig::default()
    });
    let Outcome::Error(e) = missing_file.handle(task("evaluation", json!({}))).await else { panic!() };
    assert_eq!(e.kind, "bad-input");
    assert!(e.message.contains("/nonexistent/slo.yaml"), "{}", e.message);
    for input in [
        json!({"slo": "objectives: [{sli: a, pass: [{criteria: [\"<<1\"]}]}]"}),
        json!({"slo": 42}),
        json!({"sli": [1]}),
        json!({"sli": {"response_time_p95": 1}, "previousEvaluations": {"result": "pass"}}),
        json!({"sli": {"response_time_p95": 1}, "previousEvaluations": [{"result": "maybe"}]}),
    ] {
        let Outcome::Error(e) = gate().handle(task("evaluation", input.clone())).await else { panic!("{input}") };
        assert_eq!(e.kind, "bad-input", "{input}");
    }
}

/// A worker with the fixture and a static provider that reads `values` from the input.
fn gate_with_provider() -> EvaluationWorker {
    EvaluationWorker::new(EvaluationConfig {
        slo_files: ScopedFiles::new().with("sockshop", FIXTURE),
        sli_provider: Some(SliProvider::new(crate::StaticSliWorker::new())),
    })
}

#[tokio::test]
async fn without_sli_in_the_input_the_provider_is_asked() {
    let input = json!({"values": {"response_time_p95": 900}});
    let (result, output) = finished(gate_with_provider().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Fail);
    assert_eq!(output["evaluation"]["objectives"][0]["value"], json!(900.0));
    assert!(output.get("sli").is_none(), "fetched values must not be carried on as `sli`");

    // Given values win over the provider.
    let input = json!({"sli": {"response_time_p95": 100}, "values": {"response_time_p95": 900}});
    let (result, _) = finished(gate_with_provider().handle(task("evaluation", input)).await);
    assert_eq!(result, TaskResult::Pass);

    // A provider error is the task's error (the engine's retry rules apply), not a verdict.
    let Outcome::Error(e) = gate_with_provider().handle(task("evaluation", json!({}))).await else { panic!() };
    assert_eq!(e.kind, "bad-input");
    assert!(e.message.starts_with("the SLI provider: "), "{}", e.message);
}
