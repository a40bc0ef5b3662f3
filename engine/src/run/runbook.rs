//! Native remediation runbooks: the tasks of a run of a `runbook:` sequence, made from the
//! runbook and the problem the run was triggered with.
//!
//! For the matching problem type's actions 1..n the run is the chain
//! `action-1 -> get-sli-1 -> evaluation-1 -> action-2 -> ... -> evaluation-n -> escalation`:
//! - `action-k` has the action's own type (`scaling`, `toggle-feature`, ...), so the worker that
//!   handles that action type performs it; it is non-idempotent (never started twice);
//! - `get-sli-k` waits `evaluateAfter` first (Keptn's `triggeredAfter`), then measures;
//! - `evaluation-k` ends the run with its result as soon as it passes or warns ("resolved");
//! - nothing here fails the run on its way: a failed action or measurement is judged by the
//!   evaluation after it, and when every evaluation failed the escalation runs and the run ends
//!   `fail` ("unresolved").
//!
//! The expansion depends only on the definition and the trigger data, so folding a run's events
//! rebuilds exactly the tasks its decisions used.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::definition::model::{Runbook, Sequence, Task, TaskResult};
use crate::definition::{ESCALATION, model};
use crate::remediation::actions_for;

/// The sequence a run of `sequence` (which has `runbook`) executes for this trigger data.
pub(super) fn expand(sequence: &Sequence, runbook: &Runbook, data: &Value) -> Sequence {
    let (root_cause, title) = problem(data);
    let actions = actions_for(&runbook.remediations, root_cause.as_deref(), &title);
    let mut tasks: Vec<Task> = Vec::new();
    let mut last: Option<String> = None;
    for (k, action) in actions.iter().enumerate() {
        let n = k + 1;
        let mut act = task(&format!("action-{n}"), &action.action, last.take());
        act.idempotent = false;
        act.properties.insert(
            "action".into(),
            json!({
                "action": action.action,
                "name": action.name,
                "description": action.description,
                "value": action.value.clone().unwrap_or(Value::Null),
            }),
        );
        act.properties.insert("remediation".into(), json!({"attempt": n, "of": actions.len()}));
        let mut before_gate = act.name.clone();
        tasks.push(act);
        let mut gate = task(&format!("evaluation-{n}"), crate::slo::EVALUATION_TASK_TYPE, None);
        if runbook.get_sli {
            let mut sli = task(&format!("get-sli-{n}"), "get-sli", Some(before_gate));
            sli.triggered_after = runbook.evaluate_after;
            before_gate = sli.name.clone();
            tasks.push(sli);
        } else {
            gate.triggered_after = runbook.evaluate_after;
        }
        gate.depends_on = vec![before_gate];
        gate.ends_run_on = vec![TaskResult::Pass, TaskResult::Warning];
        last = Some(gate.name.clone());
        tasks.push(gate);
    }
    if let Some(escalation) = &runbook.escalation {
        let mut e = escalation.clone();
        e.name = ESCALATION.to_string();
        e.depends_on = last.into_iter().collect();
        e.continue_on_failure = true;
        tasks.push(e);
    }
    let tasks = tasks.into_iter().map(Arc::new).collect();
    Sequence { name: sequence.name.clone(), triggered_on: Vec::new(), tasks, runbook: Some(runbook.clone()) }
}

/// `(rootCause, problemTitle)` of the trigger data: Keptn's `problem` object, or the same keys
/// at the top level.
fn problem(data: &Value) -> (Option<String>, String) {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let source = data.get("problem").filter(|p| p.is_object()).unwrap_or(data);
    (text(source.get("rootCause")), text(source.get("problemTitle")).unwrap_or_default())
}

/// A runbook task with Capstan's defaults that keeps the run going whatever its result.
fn task(name: &str, task_type: &str, after: Option<String>) -> Task {
    Task {
        name: name.to_string(),
        task_type: task_type.to_string(),
        properties: Map::new(),
        depends_on: after.into_iter().collect(),
        retry: model::RetryPolicy::default(),
        timeouts: model::Timeouts::default(),
        requires: Default::default(),
        dispatch: model::DispatchMode::Auction,
        award: Default::default(),
        continue_on_failure: true,
        idempotent: true,
        claim: true,
        triggered_after: None,
        ends_run_on: Vec::new(),
    }
}
