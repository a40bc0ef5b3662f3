//! CloudEvents published into a project (gRPC `EventService.Publish` and HTTP `POST /v1/events`):
//! a Keptn-style `sh.keptn.event.<stage>.<sequence>.triggered` or Capstan's
//! `dev.capstan.sequence.triggered.v1` starts that sequence. The event id makes the start
//! idempotent: publishing the same event twice never starts two runs.

use capstan_proto::{CloudEvent, DecodeError, SequenceTrigger, ext, types};
use serde_json::Value;
use uuid::Uuid;

use super::auth::Role;
use super::error::ApiError;
use super::ops::Api;
use crate::runtime::TriggerRequest;

/// What publishing an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The project the event went to.
    pub project: String,
    /// The run it started.
    pub run_id: String,
    /// The run's context id (Keptn's `shkeptncontext`).
    pub context_id: String,
}

impl Api {
    /// Publishes `event` into `project` (or the project the event names) and starts the sequence
    /// it triggers (operator).
    pub async fn publish(&self, token: Option<&str>, project: &str, event: &CloudEvent) -> Result<Published, ApiError> {
        // Authenticate first so that an unknown caller learns nothing from validation errors.
        self.auth.authenticate(token)?;
        let mut req = trigger_of(event, project)?;
        self.auth.authorize(token, &req.project, Role::Operator)?;
        let context_id = req.context_id.get_or_insert_with(|| Uuid::new_v4().to_string()).clone();
        let project = req.project.clone();
        let run_id = self.trigger(token, req).await.map_err(|e| match e {
            ApiError::AlreadyExists(_) => ApiError::AlreadyExists(format!("event {} was already accepted", event.id)),
            other => other,
        })?;
        Ok(Published { project, run_id, context_id })
    }
}

/// The trigger an event stands for. `project` (may be empty) must agree with the one the event
/// names in `data.project` or the `capstanproject` extension.
pub fn trigger_of(event: &CloudEvent, project: &str) -> Result<TriggerRequest, ApiError> {
    let data = event.data.clone().unwrap_or(Value::Null);
    if !(data.is_object() || data.is_null()) {
        return Err(ApiError::invalid("data", "must be a JSON object"));
    }
    let (stage, sequence, service, data, context, named_project) = if event.ty == types::SEQUENCE_TRIGGERED {
        let t: SequenceTrigger = serde_json::from_value(data)
            .map_err(|e| ApiError::invalid("data", format!("not a sequence trigger: {e}")))?;
        (t.stage, t.sequence, t.service, t.data, t.context_id, Some(t.project).filter(|p| !p.is_empty()))
    } else if let Some((stage, sequence)) = keptn_sequence(&event.ty) {
        let service = data.get("service").and_then(Value::as_str).map(str::to_string);
        let named = data.get("project").and_then(Value::as_str).map(str::to_string);
        (stage.to_string(), sequence.to_string(), service, data, None, named)
    } else {
        return Err(ApiError::invalid(
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
                return Err(ApiError::invalid(
                    "project",
                    format!("the event names project `{p}` but the request is for project `{c}`"),
                ));
            }
            Some(_) => {}
            None => chosen = Some(p),
        }
    }
    let project = chosen
        .ok_or_else(|| ApiError::invalid("project", "no project: set data.project or the capstanproject extension"))?;
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
fn keptn_sequence(ty: &str) -> Option<(&str, &str)> {
    let rest = ty.strip_prefix(types::KEPTN_PREFIX)?.strip_suffix(".triggered")?;
    let (stage, sequence) = rest.split_once('.')?;
    (!stage.is_empty() && !sequence.is_empty() && !sequence.contains('.')).then_some((stage, sequence))
}

/// The API error for an envelope that is not a valid CloudEvent, naming the attribute.
pub fn decode_error(e: DecodeError) -> ApiError {
    let field = match &e {
        DecodeError::Missing(name) => (*name).to_string(),
        DecodeError::SpecVersion(_) => "specversion".to_string(),
        DecodeError::NotAString(name) | DecodeError::ExtensionName(name) | DecodeError::ExtensionValue(name) => {
            name.clone()
        }
        DecodeError::Json(_) | DecodeError::NotAnObject => "event".to_string(),
    };
    ApiError::invalid(&field, format!("malformed CloudEvent: {e}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(ty: &str, data: Value) -> CloudEvent {
        CloudEvent::new("e1", "test", ty).with_data(data)
    }

    #[test]
    fn keptn_sequence_triggers() {
        let ev = event("sh.keptn.event.dev.delivery.triggered", json!({"project": "p", "service": "cart"}))
            .with_ext("shkeptncontext", "ctx");
        let t = trigger_of(&ev, "").unwrap();
        assert_eq!((t.project.as_str(), t.stage.as_str(), t.sequence.as_str()), ("p", "dev", "delivery"));
        assert_eq!(t.service.as_deref(), Some("cart"));
        assert_eq!(t.context_id.as_deref(), Some("ctx"));
        assert_eq!(t.request_id.as_deref(), Some("event/e1"));
        assert_eq!(keptn_sequence("sh.keptn.event.deployment.triggered"), None);
    }

    #[test]
    fn project_comes_from_one_place_or_agrees() {
        let ev = event("sh.keptn.event.dev.delivery.triggered", json!({})).with_ext("capstanproject", "q");
        assert_eq!(trigger_of(&ev, "").unwrap().project, "q");
        let clash = event("sh.keptn.event.dev.delivery.triggered", json!({"project": "a"}));
        assert!(matches!(trigger_of(&clash, "b"), Err(ApiError::InvalidArgument { field, .. }) if field == "project"));
        let none = event("sh.keptn.event.dev.delivery.triggered", json!({}));
        assert!(matches!(trigger_of(&none, ""), Err(ApiError::InvalidArgument { field, .. }) if field == "project"));
        let other = event("sh.keptn.event.deployment.triggered", json!({"project": "a"}));
        assert!(matches!(trigger_of(&other, ""), Err(ApiError::InvalidArgument { field, .. }) if field == "type"));
    }
}
