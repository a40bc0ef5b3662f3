//! CloudEvents published into a project (gRPC `EventService.Publish` and HTTP `POST /v1/events`):
//! a Keptn-style `sh.keptn.event.<stage>.<sequence>.triggered` or Capstan's
//! `dev.capstan.sequence.triggered.v1` starts that sequence. The event id makes the start
//! idempotent: publishing the same event twice never starts two runs.
//!
//! Problems start the stage's `remediation` sequence: Keptn's `sh.keptn.events.problem` (data
//! `{State, ProblemID, ProblemTitle, ProblemDetails, ImpactedEntity, project, stage, service}`;
//! a `CLOSED` problem starts nothing) and the alerts of an Alertmanager webhook
//! ([`alert_triggers`]). The run's data carries Keptn's `get-action.triggered` shape:
//! `{project, stage, service, problem: {problemTitle, rootCause, problemId, state, ...}}`.

use capstan_proto::{CloudEvent, DecodeError, EventData};
use serde_json::{Map, Value, json};
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
        let context_id = req.context_id.get_or_insert_with(|| Uuid::now_v7().to_string()).clone();
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
    if event.ty == PROBLEM_EVENT {
        return problem_trigger(event, project);
    }
    triggers::trigger_of(event, project).map_err(|e| ApiError::invalid(&e.field, e.message))
}

/// Keptn's problem event type.
pub const PROBLEM_EVENT: &str = "sh.keptn.events.problem";

/// The sequence a problem starts in its stage.
pub const REMEDIATION_SEQUENCE: &str = "remediation";

/// Whether the event is a Keptn problem that is over (`State: CLOSED` or `RESOLVED`), which
/// starts nothing.
pub fn is_closed_problem(event: &CloudEvent) -> bool {
    event.ty == PROBLEM_EVENT
        && event
            .data
            .as_ref()
            .map(EventData::to_value)
            .is_some_and(|d| text(&d, &["State", "state"]).is_some_and(|s| !s.eq_ignore_ascii_case("open")))
}

/// `sh.keptn.events.problem` -> the stage's `remediation` sequence.
fn problem_trigger(event: &CloudEvent, project: &str) -> Result<TriggerRequest, ApiError> {
    let data = event.data.as_ref().map_or(Value::Null, EventData::to_value);
    if !data.is_object() {
        return Err(ApiError::invalid("data", "a problem event needs a JSON object"));
    }
    if is_closed_problem(event) {
        return Err(ApiError::invalid("data.State", "the problem is closed: there is nothing to remediate"));
    }
    let named = [Some(project), text(&data, &["project"]), event.ext(capstan_proto::ext::PROJECT)];
    let mut chosen: Option<&str> = None;
    for p in named.into_iter().flatten().filter(|p| !p.is_empty()) {
        match chosen {
            Some(c) if c != p => {
                return Err(ApiError::invalid(
                    "project",
                    format!("the event names `{p}` but the request is for `{c}`"),
                ));
            }
            _ => chosen = Some(p),
        }
    }
    let project = chosen.ok_or_else(|| ApiError::invalid("project", "no project: set data.project"))?.to_string();
    let stage = text(&data, &["stage"]).ok_or_else(|| ApiError::invalid("data.stage", "the problem names no stage"))?;
    let title = text(&data, &["ProblemTitle", "problemTitle"])
        .ok_or_else(|| ApiError::invalid("data.ProblemTitle", "the problem has no title"))?;
    let mut problem = json!({"problemTitle": title, "state": "OPEN"});
    for (from, to) in [
        ("ProblemID", "problemId"),
        ("PID", "pid"),
        ("ProblemDetails", "problemDetails"),
        ("ImpactedEntity", "impactedEntity"),
        ("ProblemURL", "problemURL"),
        ("Tags", "tags"),
        ("RootCause", "rootCause"),
        ("rootCause", "rootCause"),
    ] {
        if let Some(v) = data.get(from).filter(|v| !v.is_null()) {
            problem[to] = v.clone();
        }
    }
    let service = text(&data, &["service"]).map(str::to_string);
    Ok(TriggerRequest {
        project: project.clone(),
        definition: None,
        stage: stage.to_string(),
        sequence: REMEDIATION_SEQUENCE.into(),
        service: service.clone(),
        data: remediation_data(&project, stage, service.as_deref(), problem, data.get("labels")),
        context_id: event.ext(capstan_proto::ext::KEPTN_CONTEXT).filter(|c| !c.is_empty()).map(str::to_string),
        request_id: Some(format!("event/{}", event.id)),
    })
}

/// Where alerts go when their labels do not say: the `?project=&stage=&service=` of the URL.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct AlertTarget {
    pub project: Option<String>,
    pub stage: Option<String>,
    pub service: Option<String>,
}

/// One alert of an Alertmanager notification: the trigger of its remediation, or why none.
pub type AlertTrigger = (String, Result<TriggerRequest, String>);

/// The remediation triggers of an Alertmanager webhook notification (version 4): one per
/// firing alert; resolved alerts start nothing. Project, stage and service come from the URL or
/// the alert's labels (`project`, `stage`, `service`); the problem title is the `alertname`,
/// the root cause a `rootCause` label or annotation. The request id is the alert's fingerprint
/// and start time, so Alertmanager repeating a notification never starts a second
/// remediation, while the same alert firing again later does.
pub fn alert_triggers(body: &Value, target: &AlertTarget) -> Result<Vec<AlertTrigger>, ApiError> {
    let alerts = body
        .get("alerts")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("alerts", "not an Alertmanager notification: no `alerts` list"))?;
    Ok(alerts.iter().enumerate().map(|(i, alert)| alert_trigger(i, alert, target)).collect())
}

fn alert_trigger(i: usize, alert: &Value, target: &AlertTarget) -> AlertTrigger {
    let labels = alert.get("labels").cloned().unwrap_or(Value::Null);
    let annotations = alert.get("annotations").cloned().unwrap_or(Value::Null);
    let name = text(&labels, &["alertname"]).unwrap_or("").to_string();
    let shown = if name.is_empty() { format!("alerts[{i}]") } else { name.clone() };
    let status = text(alert, &["status"]).unwrap_or("firing");
    if status != "firing" {
        return (shown, Err(format!("the alert is {status}: nothing to remediate")));
    }
    let pick = |given: &Option<String>, label: &str| {
        given.clone().filter(|s| !s.is_empty()).or_else(|| text(&labels, &[label]).map(str::to_string))
    };
    let (Some(project), Some(stage)) = (pick(&target.project, "project"), pick(&target.stage, "stage")) else {
        return (shown, Err("no project or stage: give ?project=&stage= or alert labels".into()));
    };
    if name.is_empty() {
        return (shown, Err("the alert has no alertname label".into()));
    }
    let service = pick(&target.service, "service");
    let mut problem = json!({
        "problemTitle": name,
        "state": "OPEN",
        "problemDetails": annotations,
        "labels": labels,
    });
    let root_cause = text(&labels, &["rootCause"]).or_else(|| text(&annotations, &["rootCause"]));
    if let Some(cause) = root_cause {
        problem["rootCause"] = json!(cause);
    }
    for (from, to) in [("fingerprint", "problemId"), ("generatorURL", "problemURL"), ("startsAt", "startsAt")] {
        if let Some(v) = alert.get(from).filter(|v| !v.is_null()) {
            problem[to] = v.clone();
        }
    }
    let identity = format!(
        "{}/{}",
        text(alert, &["fingerprint"]).map_or_else(|| format!("{project}/{stage}/{name}"), str::to_string),
        text(alert, &["startsAt"]).unwrap_or("")
    );
    let trigger = TriggerRequest {
        project: project.clone(),
        definition: None,
        stage: stage.clone(),
        sequence: REMEDIATION_SEQUENCE.into(),
        service: service.clone(),
        data: remediation_data(&project, &stage, service.as_deref(), problem, None),
        context_id: None,
        request_id: Some(format!("alertmanager/{identity}")),
    };
    (shown, Ok(trigger))
}

/// Keptn's `remediation.triggered` data.
fn remediation_data(
    project: &str,
    stage: &str,
    service: Option<&str>,
    problem: Value,
    labels: Option<&Value>,
) -> Value {
    let mut data = Map::new();
    data.insert("project".into(), json!(project));
    data.insert("stage".into(), json!(stage));
    if let Some(service) = service {
        data.insert("service".into(), json!(service));
    }
    data.insert("problem".into(), problem);
    if let Some(labels) = labels.filter(|l| l.is_object()) {
        data.insert("labels".into(), labels.clone());
    }
    Value::Object(data)
}

fn text<'v>(value: &'v Value, keys: &[&str]) -> Option<&'v str> {
    keys.iter().find_map(|k| value.get(*k).and_then(Value::as_str)).map(str::trim).filter(|s| !s.is_empty())
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
    fn a_keptn_problem_starts_the_stages_remediation() {
        let data = json!({
            "State": "OPEN", "ProblemID": "762", "ProblemTitle": "Response time degradation",
            "ImpactedEntity": "carts-primary", "project": "sockshop", "stage": "production", "service": "carts",
            "labels": {"team": "cart"}
        });
        let ev = event(PROBLEM_EVENT, data).with_ext("shkeptncontext", "ctx");
        let t = trigger_of(&ev, "").unwrap();
        assert_eq!(
            (t.project.as_str(), t.stage.as_str(), t.sequence.as_str()),
            ("sockshop", "production", "remediation")
        );
        assert_eq!(t.service.as_deref(), Some("carts"));
        assert_eq!(t.context_id.as_deref(), Some("ctx"));
        assert_eq!(t.request_id.as_deref(), Some("event/e1"));
        assert_eq!(
            t.data,
            json!({"project": "sockshop", "stage": "production", "service": "carts", "labels": {"team": "cart"},
                   "problem": {"problemTitle": "Response time degradation", "state": "OPEN", "problemId": "762",
                               "impactedEntity": "carts-primary"}})
        );
        let closed =
            event(PROBLEM_EVENT, json!({"State": "CLOSED", "ProblemTitle": "x", "project": "p", "stage": "s"}));
        assert!(is_closed_problem(&closed));
        assert!(
            matches!(trigger_of(&closed, ""), Err(ApiError::InvalidArgument { field, .. }) if field == "data.State")
        );
        let no_stage = event(PROBLEM_EVENT, json!({"ProblemTitle": "x", "project": "p"}));
        assert!(
            matches!(trigger_of(&no_stage, ""), Err(ApiError::InvalidArgument { field, .. }) if field == "data.stage")
        );
        let clash = event(PROBLEM_EVENT, json!({"ProblemTitle": "x", "project": "p", "stage": "s"}));
        assert!(matches!(trigger_of(&clash, "q"), Err(ApiError::InvalidArgument { field, .. }) if field == "project"));
    }

    #[test]
    fn firing_alerts_start_remediations_and_resolved_ones_do_not() {
        let body = json!({"version": "4", "status": "firing", "alerts": [
            {"status": "firing", "fingerprint": "f1", "startsAt": "2026-01-01T00:00:00Z",
             "labels": {"alertname": "Response time degradation", "stage": "production", "service": "carts"},
             "annotations": {"summary": "p95 over 600 ms", "rootCause": "response_time_p90"}},
            {"status": "resolved", "labels": {"alertname": "Old"}},
            {"status": "firing", "labels": {"alertname": "No stage"}},
        ]});
        let target = AlertTarget { project: Some("sockshop".into()), ..AlertTarget::default() };
        let triggers = alert_triggers(&body, &target).unwrap();
        assert_eq!(triggers.len(), 3);
        let (name, first) = &triggers[0];
        assert_eq!(name, "Response time degradation");
        let first = first.as_ref().unwrap();
        assert_eq!(
            (first.project.as_str(), first.stage.as_str(), first.sequence.as_str()),
            ("sockshop", "production", "remediation")
        );
        assert_eq!(first.request_id.as_deref(), Some("alertmanager/f1/2026-01-01T00:00:00Z"));
        assert_eq!(first.data["problem"]["rootCause"], json!("response_time_p90"));
        assert_eq!(first.data["problem"]["problemTitle"], json!("Response time degradation"));
        assert_eq!(first.data["service"], json!("carts"));
        assert!(triggers[1].1.as_ref().unwrap_err().contains("resolved"));
        assert!(triggers[2].1.as_ref().unwrap_err().contains("no project or stage"));
        assert!(alert_triggers(&json!({"status": "firing"}), &target).is_err());
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
