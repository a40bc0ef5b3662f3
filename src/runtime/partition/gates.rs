//! Quality gates inside a batch: which effects hand a gate its input, the earlier evaluations of
//! the gate's lane added to that input, and the projection row of a finished evaluation.

use capstan_engine::run::{Effect, Event, RunMeta, RunState, TaskStatus, WorkerMessage};
use capstan_engine::slo;
use capstan_store::EvaluationRecord;
use serde_json::{Value, json};

use super::{Partition, RuntimeError, codec};

impl Partition {
    /// Earlier gate results of the run's project, stage and service, oldest first, as the
    /// evaluation worker reads them (`previousEvaluations`): the store's, then those of the batch
    /// still committing, then any this batch records before them.
    pub(super) async fn previous_evaluations(
        &self,
        meta: &RunMeta,
        in_batch: &[EvaluationRecord],
    ) -> Result<Value, RuntimeError> {
        let stored = self
            .shared
            .store
            .recent_evaluations(&meta.project, &meta.stage, meta.service.as_deref(), slo::PREVIOUS_EVALUATIONS)
            .await?;
        let same_lane =
            |e: &&EvaluationRecord| e.project == meta.project && e.stage == meta.stage && e.service == meta.service;
        let mut list: Vec<&EvaluationRecord> = stored.iter().rev().collect();
        list.extend(self.inflight_evaluations.iter().chain(in_batch).filter(same_lane));
        let skip = list.len().saturating_sub(slo::PREVIOUS_EVALUATIONS);
        Ok(Value::Array(
            list[skip..]
                .iter()
                .map(|e| {
                    json!({
                        "result": e.result,
                        "values": e.evaluation.get("values").cloned().unwrap_or_else(|| json!({})),
                        "score": e.score,
                        "runId": e.run_id,
                        "task": e.task,
                        "at": codec::rfc3339(e.created_at_ms),
                    })
                })
                .collect(),
        ))
    }
}

/// Whether an effect hands a quality gate its input (its offer or its award).
pub(super) fn is_gate(effect: &Effect) -> bool {
    match effect {
        Effect::Offer(o) => o.task_type == slo::EVALUATION_TASK_TYPE,
        Effect::Send { message: WorkerMessage::Award(a), .. } => a.task_type == slo::EVALUATION_TASK_TYPE,
        _ => false,
    }
}

/// The effect with `previousEvaluations` in the gate's input, unless the input has them already
/// (given with the trigger or in the task's properties).
pub(super) fn with_previous(effect: &Effect, previous: Value) -> Effect {
    let mut effect = effect.clone();
    let input = match &mut effect {
        Effect::Offer(o) => &mut o.input,
        Effect::Send { message: WorkerMessage::Award(a), .. } => &mut a.input,
        _ => return effect,
    };
    if let Value::Object(map) = input {
        map.entry("previousEvaluations").or_insert(previous);
    }
    effect
}

/// The projection row of a quality gate that just finished with a scored evaluation.
pub(super) fn evaluation_record(state: &RunState, event: &Event, now_ms: i64) -> Option<EvaluationRecord> {
    let Event::TaskEnded { task, status: TaskStatus::Finished, result, output, .. } = event else {
        return None;
    };
    let evaluation = output.get("evaluation").filter(|e| e.is_object())?;
    if state.task(task)?.task_type != slo::EVALUATION_TASK_TYPE {
        return None;
    }
    let meta = state.meta()?;
    Some(EvaluationRecord {
        run_id: meta.run_id.clone(),
        task: task.clone(),
        project: meta.project.clone(),
        stage: meta.stage.clone(),
        service: meta.service.clone(),
        result: result.as_str().to_string(),
        score: evaluation.get("score").and_then(Value::as_f64),
        evaluation: evaluation.clone(),
        created_at_ms: now_ms,
    })
}
