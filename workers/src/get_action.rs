//! `GetActionWorker`: the next remediation action (task type `get-action`), as Keptn's
//! remediation-service answered `get-action.triggered` in the shipyard's `remediation` sequence
//! (get-action -> action -> evaluation, re-triggered on `evaluation.result: fail`).
//!
//! Input read (Keptn's `get-action.triggered` data):
//! - the runbook: property `remediation` (the YAML text, or the same structure as an object),
//!   else the configured `remediation.yaml` for the task's project / stage / service;
//! - `problem`: `{"problemTitle": .., "rootCause": ..}` (Keptn's `ProblemTitle` spelling and a
//!   top-level `problemTitle` / `ProblemTitle`, as a raw problem event carries it, are read too);
//! - `actionIndex`: how many actions this remediation took already (0 when absent).
//!
//! The actions are those of the root cause, else of the problem title, else of `*` / `default`
//! ([`Remediation::actions_for`]). Output: `{"action": {"name", "action", "description",
//! "value"}, "actionIndex": <index + 1>, "problemType": ..}` and the task passes. The engine
//! carries outputs into the run's later tasks (the `action` task reads `action.action` to know
//! what to do) and into the data of the run this one triggers, so the re-triggered get-action
//! sees the raised index: the count lives in the events, no worker keeps state.
//!
//! When no action is left (or none matches) the task finishes with result **fail** and
//! `{"actionIndex": <index>, "remediationExhausted": true, "message": ..}`: the loop ends
//! (the skipped evaluation has no result, so `evaluation.result: fail` no longer matches) and a
//! sequence triggered on `<stage>.remediation.finished` with `get-action.result: fail` can
//! escalate. A missing or invalid runbook is an error of kind `bad-input`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use capstan_engine::remediation::Remediation;
use capstan_proto::TaskOffer;
use serde_json::{Value, json};

use crate::handler::{BidTerms, Handler, Outcome, TaskContext};
use crate::scope::{Scope, ScopedFiles};

/// Where the get-action worker finds `remediation.yaml` files.
#[derive(Debug, Clone, Default)]
pub struct GetActionConfig {
    /// `remediation.yaml` files per project / stage / service.
    pub remediation_files: ScopedFiles,
}

/// The remediation-action chooser.
#[derive(Debug, Clone, Default)]
pub struct GetActionWorker {
    config: GetActionConfig,
}

/// The problem a remediation answers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Problem {
    /// The problem's title, e.g. `Response time degradation`.
    pub title: String,
    /// The root cause, if the monitoring tool names one.
    pub root_cause: Option<String>,
}

impl Problem {
    /// The problem of a task input, in Keptn's spellings.
    pub fn of(input: &Value) -> Problem {
        let text = |v: Option<&Value>, keys: &[&str]| {
            keys.iter()
                .find_map(|k| v.and_then(|v| v.get(*k)).and_then(Value::as_str))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let problem = input.get("problem").or_else(|| input.get("problemDetails"));
        let title = text(problem, &["problemTitle", "ProblemTitle"])
            .or_else(|| text(Some(input), &["problemTitle", "ProblemTitle"]))
            .unwrap_or_default();
        let root_cause =
            text(problem, &["rootCause", "RootCause"]).or_else(|| text(Some(input), &["rootCause", "RootCause"]));
        Problem { title, root_cause }
    }
}

/// The action a `get-action` task chose, as the `action` task finds it in its input.
pub fn chosen_action(input: &Value) -> Option<&str> {
    input.get("action").and_then(|a| a.get("action")).and_then(Value::as_str)
}

/// A bid function for a worker of task type `action` that performs only the named actions
/// (e.g. `["scaling"]`): it bids (or claims) when the chosen action is one of them and the
/// labels meet the offer's requirements, and declines otherwise, so each action goes to its
/// own provider. Use with [`crate::Worker::bid_with`].
pub fn bid_for_actions(
    labels: BTreeMap<String, String>,
    actions: impl IntoIterator<Item = impl Into<String>>,
) -> impl Fn(&TaskOffer, u32) -> Option<BidTerms> + Send + Sync + 'static {
    let actions: Vec<String> = actions.into_iter().map(Into::into).collect();
    move |offer, free| {
        let meets = offer.requires.iter().all(|(k, v)| labels.get(k) == Some(v));
        let ours = chosen_action(&offer.input).is_some_and(|a| actions.iter().any(|n| n == a));
        (meets && ours).then_some(BidTerms { cost: 1.0 / f64::from(free.max(1)), estimated_ms: 0 })
    }
}

impl GetActionWorker {
    /// A get-action worker with the given files.
    pub fn new(config: GetActionConfig) -> Self {
        GetActionWorker { config }
    }

    async fn runbook(&self, task: &TaskContext, scope: &Scope) -> Result<Remediation, String> {
        let text = match task.property("remediation") {
            Some(Value::String(text)) => text.clone(),
            // YAML is a superset of JSON, so an object given inline parses as the same file.
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(_) => return Err("remediation: must be the text of a remediation.yaml or an object".into()),
            None => self.config.remediation_files.read(scope).await?.ok_or_else(|| {
                let at = [Some(scope.project.as_str()), scope.stage.as_deref(), scope.service.as_deref()];
                let at: Vec<&str> = at.into_iter().flatten().collect();
                format!("no remediation.yaml is configured for {}", at.join("/"))
            })?,
        };
        Remediation::parse(&text).map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Handler for GetActionWorker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let scope = Scope::of(&task);
        let runbook = match self.runbook(&task, &scope).await {
            Ok(runbook) => runbook,
            Err(message) => return Outcome::error("bad-input", message),
        };
        let index = match task.input().get("actionIndex") {
            None | Some(Value::Null) => 0,
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => n,
                None => return Outcome::error("bad-input", format!("actionIndex: {v} is not a count")),
            },
        };
        let problem = Problem::of(task.input());
        let actions = runbook.actions_for(problem.root_cause.as_deref(), &problem.title);
        let described = match &problem.root_cause {
            Some(cause) => format!("root cause `{cause}` / problem `{}`", problem.title),
            None => format!("problem `{}`", problem.title),
        };
        let Some(action) = actions.get(index) else {
            let message = if actions.is_empty() {
                format!("no remediation action matches {described} (nor `*` / `default`)")
            } else {
                format!("no action left for {described}: all {} action(s) were taken and it is not resolved", index)
            };
            tracing::info!(run = %task.run_id(), index, "{message}");
            return Outcome::fail(json!({"actionIndex": index, "remediationExhausted": true, "message": message}));
        };
        tracing::info!(run = %task.run_id(), index, action = %action.action, "next remediation action");
        Outcome::pass(json!({
            "action": {
                "name": action.name,
                "action": action.action,
                "description": action.description,
                "value": action.value,
            },
            "actionIndex": index + 1,
            "remediationExhausted": false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::task;
    use capstan_proto::TaskResult;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/tests/fixtures/keptn/remediation.yaml");

    const TWO_ACTIONS: &str = r#"
apiVersion: spec.keptn.sh/0.1.4
kind: Remediation
metadata: {name: two}
spec:
  remediations:
    - problemType: Response time degradation
      actionsOnOpen:
        - {action: scaling, name: scale up, value: 1}
        - {action: toggle-feature, name: disable promotion, value: {EnablePromotion: "off"}}
    - problemType: default
      actionsOnOpen: [{action: escalate}]
"#;

    fn worker() -> GetActionWorker {
        GetActionWorker::new(GetActionConfig { remediation_files: ScopedFiles::new().with("sockshop", FIXTURE) })
    }

    async fn run(w: &GetActionWorker, input: Value) -> (TaskResult, Value) {
        match w.handle(task("get-action", input)).await {
            Outcome::Finished { result, output } => (result, output),
            Outcome::Error(e) => panic!("expected an answer, got {e:?}"),
        }
    }

    #[tokio::test]
    async fn the_fixture_gives_its_one_action_then_runs_out() {
        let problem = json!({"problemTitle": "Response time degradation", "rootCause": "response_time_p90"});
        let (result, output) = run(&worker(), json!({"problem": problem})).await;
        assert_eq!(result, TaskResult::Pass);
        // The root cause wins over the title: its value is the string "1".
        assert_eq!(
            output,
            json!({
                "action": {"name": "scaling", "action": "scaling", "description": "Scale up", "value": "1"},
                "actionIndex": 1,
                "remediationExhausted": false,
            })
        );
        assert_eq!(chosen_action(&output), Some("scaling"));
        let (result, output) = run(&worker(), json!({"problem": problem, "actionIndex": 1})).await;
        assert_eq!(result, TaskResult::Fail);
        assert_eq!(output["remediationExhausted"], json!(true));
        assert_eq!(output["actionIndex"], json!(1));
        let message = output["message"].as_str().unwrap();
        assert!(message.contains("no action left") && message.contains("response_time_p90"), "{message}");
    }

    #[tokio::test]
    async fn the_title_matches_in_keptn_spellings_and_unknown_problems_fail() {
        let (_, output) = run(&worker(), json!({"problem": {"ProblemTitle": "Response time degradation"}})).await;
        assert_eq!(output["action"]["value"], json!(1));
        let (_, output) = run(&worker(), json!({"ProblemTitle": "Response time degradation", "State": "OPEN"})).await;
        assert_eq!(output["action"]["value"], json!(1));
        let (result, output) = run(&worker(), json!({"problem": {"problemTitle": "Disk full"}})).await;
        assert_eq!(result, TaskResult::Fail);
        assert!(output["message"].as_str().unwrap().contains("no remediation action matches"), "{output}");
    }

    #[tokio::test]
    async fn an_inline_runbook_walks_its_actions_in_order() {
        let w = GetActionWorker::default();
        let mut input = json!({"remediation": TWO_ACTIONS, "problem": {"problemTitle": "Response time degradation"}});
        let mut taken = Vec::new();
        loop {
            let (result, output) = run(&w, input.clone()).await;
            if result == TaskResult::Fail {
                assert_eq!(output["actionIndex"], json!(2));
                break;
            }
            taken.push(output["action"]["action"].as_str().unwrap().to_string());
            // What the engine does: the output is merged into the next run's data.
            input["actionIndex"] = output["actionIndex"].clone();
            input["action"] = output["action"].clone();
        }
        assert_eq!(taken, ["scaling", "toggle-feature"]);
        let (_, output) = run(&w, json!({"remediation": TWO_ACTIONS, "problem": {"problemTitle": "?"}})).await;
        assert_eq!(output["action"]["action"], json!("escalate"));
    }

    #[test]
    fn an_action_provider_bids_only_for_its_actions() {
        let offer = |input: Value| TaskOffer {
            attempt: capstan_proto::AttemptRef {
                project: "p".into(),
                run_id: "r".into(),
                task: "action".into(),
                attempt: 1,
            },
            context_id: "c".into(),
            stage: "production".into(),
            sequence: "remediation".into(),
            service: None,
            task_type: "action".into(),
            dispatch: capstan_proto::DispatchMode::Fanout,
            input,
            requires: BTreeMap::new(),
            bid_deadline_ms: None,
            heartbeat_ms: None,
            start_to_close_ms: None,
            token: None,
            start_by_ms: None,
        };
        let bid = bid_for_actions(BTreeMap::new(), ["scaling"]);
        assert!(bid(&offer(json!({"action": {"action": "scaling", "value": 1}})), 1).is_some());
        assert!(bid(&offer(json!({"action": {"action": "toggle-feature"}})), 1).is_none());
        assert!(bid(&offer(json!({})), 1).is_none());
        let mut needs = offer(json!({"action": {"action": "scaling"}}));
        needs.requires.insert("cluster".into(), "eu".into());
        assert!(bid(&needs, 1).is_none(), "labels still count");
    }

    #[tokio::test]
    async fn a_missing_or_bad_runbook_or_index_is_bad_input() {
        let cases = [
            (GetActionWorker::default(), json!({"problem": {"problemTitle": "x"}})),
            (GetActionWorker::default(), json!({"remediation": "kind: Shipyard\nspec: {}\napiVersion: v"})),
            (GetActionWorker::default(), json!({"remediation": 3})),
            (worker(), json!({"actionIndex": -1})),
            (worker(), json!({"actionIndex": "two"})),
        ];
        for (w, input) in cases {
            let Outcome::Error(e) = w.handle(task("get-action", input.clone())).await else { panic!("{input}") };
            assert_eq!(e.kind, "bad-input", "{input}");
        }
        let Outcome::Error(e) = GetActionWorker::default().handle(task("get-action", json!({}))).await else {
            panic!()
        };
        assert_eq!(e.message, "no remediation.yaml is configured for sockshop");
    }
}
