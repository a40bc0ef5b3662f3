//! Sequence triggers carried by CloudEvents: a Keptn-style `sh.keptn.event.<stage>.<sequence>.triggered`
//! or Capstan's `dev.capstan.sequence.triggered.v1`, whether it arrives over HTTP, gRPC or a
//! broker. The event id makes the start idempotent: the same event never starts two runs.

use capstan_proto::{CloudEvent, EventData, SequenceTrigger, ext, types};
use serde_json::Value;

use super::TriggerRequest;

/// Why an event is not a usable sequence trigger, naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TriggerError {
    pub field: String,
    pub message: String,
}

impl TriggerError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        TriggerError { field: field.to_string(), message: message.into() }
    }
}

/// Whether the event type names a sequence trigger at all.
pub fn is_trigger(ty: &str) -> bool {
    ty == types::SEQUENCE_TRIGGERED || keptn_sequence(ty).is_some()
}

/// The trigger an event stands for. `project` (may be empty) must agree with the one the event
/// names in `data.project` or the `capstanproject` extension.
pub fn trigger_of(event: &CloudEvent, project: &str) -> Result<TriggerRequest, TriggerError> {
    let data = event.data.as_ref().map_or(Value::Null, EventData::to_value);
    if !(data.is_object() || data.is_null()) {
        return Err(TriggerError::new("data", "must be a JSON object"));
    }
    let (stage, sequence, service, data, context, named_project) = if event.ty == types::SEQUENCE_TRIGGERED {
        let t: SequenceTrigger = serde_json::from_value(data)
            .map_err(|e| TriggerError::new("data", format!("not a sequence trigger: {e}")))?;
        (t.stage, t.sequence, t.service, t.data, t.context_id, Some(t.project).filter(|p| !p.is_empty()))
    } else if let Some((stage, sequence)) = keptn_sequence(&event.ty) {
        let service = data.get("service").and_then(Value::as_str).map(str::to_string);
        let named = data.get("project").and_then(Value::as_str).map(str::to_string);
        (stage.to_string(), sequence.to_string(), service, data, None, named)
    } else {
        return Err(TriggerError::new(
            "type",
            format!(
                "`{}` is not an event that can be published: expected sh.keptn.event.<stage>.<sequence>.triggered \
                 or {}",
                event.ty,
                types::SEQUENCE_TRIGGERED
            ),
        ));
    };
    let candidates = [non_empty(project), named_project, event.ext(ext::PROJECT).and_then(non_empty)];
    let mut chosen: Option<String> = None;
    for p in candidates.into_iter().flatten() {
        match &chosen {
            Some(c) if *c != p => {
                return Err(TriggerError::new(
                    "project",
                    format!("the event names project `{p}` but the request is for project `{c}`"),
                ));
            }
            Some(_) => {}
            None => chosen = Some(p),
        }
    }
    let project = chosen
        .ok_or_else(|| TriggerError::new("project", "no project: set data.project or the capstanproject extension"))?;
    let context_id = context.or_else(|| event.ext(ext::KEPTN_CONTEXT).or(event.ext(ext::CONTEXT)).and_then(non_empty));
    Ok(TriggerRequest {
        project,
        definition: None,
        stage,
        sequence,
        service,
        data,
        context_id,
        request_id: Some(format!("event/{}", event.id)),
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// `(stage, sequence)` of `sh.keptn.event.<stage>.<sequence>.triggered`. Keptn's task events
/// (`sh.keptn.event.<task>.triggered`) have one part fewer and are not sequence triggers.
pub fn keptn_sequence(ty: &str) -> Option<(&str, &str)> {
    let rest = ty.strip_prefix(types::KEPTN_PREFIX)?.strip_suffix(".triggered")?;
    let (stage, sequence) = rest.split_once('.')?;
    (!stage.is_empty() && !sequence.is_empty() && !sequence.contains('.')).then_some((stage, sequence))
}
