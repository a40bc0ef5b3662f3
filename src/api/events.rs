//! CloudEvents published into a project (gRPC `EventService.Publish` and HTTP `POST /v1/events`):
//! a Keptn-style `sh.keptn.event.<stage>.<sequence>.triggered` or Capstan's
//! `dev.capstan.sequence.triggered.v1` starts that sequence. The event id makes the start
//! idempotent: publishing the same event twice never starts two runs.

use capstan_proto::{CloudEvent, DecodeError};
use uuid::Uuid;

use super::auth::Role;
use super::error::ApiError;
use super::ops::Api;
use crate::runtime::{TriggerRequest, triggers};

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

/// The trigger an event stands for (see `runtime::triggers`), as an API error when unusable.
pub fn trigger_of(event: &CloudEvent, project: &str) -> Result<TriggerRequest, ApiError> {
    triggers::trigger_of(event, project).map_err(|e| ApiError::invalid(&e.field, e.message))
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
    use crate::runtime::triggers::keptn_sequence;
    use serde_json::Value;
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
