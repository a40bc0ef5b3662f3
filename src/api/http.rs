//! The HTTP front end (axum): `POST /v1/events` takes CloudEvents in structured mode
//! (`application/cloudevents+json`) or binary mode (`ce-*` headers, the data as the body);
//! `GET /healthz` says the process is up and `GET /readyz` that the store answers. Errors are
//! JSON `{"error": "..."}` with a 4xx code that says whose fault it is.
//!
//! `POST /v1/alerts/alertmanager?project=&stage=&service=` takes an Alertmanager webhook
//! notification and starts the stage's `remediation` sequence per firing alert (see
//! [`super::events::alert_triggers`]); it answers 200 with what it started and skipped.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use capstan_proto::{CloudEvent, SPEC_VERSION};
use serde_json::{Value, json};

use super::auth::bearer;
use super::error::ApiError;
use super::events::{AlertTarget, alert_triggers, decode_error, is_closed_problem};
use super::ops::Api;

/// The HTTP routes over `api`.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/events", post(publish))
        .route("/v1/alerts/alertmanager", post(alertmanager))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(api)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({ "error": self.to_string() }))).into_response()
    }
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(api): State<Api>) -> Response {
    // Any cheap read proves the store is reachable; the run id never exists.
    match api.runtime.store().get_run("readyz-probe").await {
        Ok(_) => axum::Json(json!({ "status": "ready" })).into_response(),
        Err(e) => ApiError::Unavailable(format!("store unreachable: {e}")).into_response(),
    }
}

async fn publish(State(api): State<Api>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let limit = api.limits.max_body_bytes();
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(format!("request body is larger than the limit of {limit} bytes")))?;
    let token = token(&headers)?;
    let content_type = header_str(&headers, header::CONTENT_TYPE.as_str())?.unwrap_or_default().to_ascii_lowercase();
    let event = if content_type.starts_with("application/cloudevents-batch") {
        return Err(ApiError::UnsupportedMedia(
            "batched CloudEvents are not accepted; send one event per request".into(),
        ));
    } else if content_type.starts_with("application/cloudevents") {
        structured(&bytes)?
    } else {
        binary(&headers, &content_type, &bytes)?
    };
    if let Some(data) = &event.data {
        api.check_payload("data", &data.to_value())?;
    }
    if is_closed_problem(&event) {
        // Keptn sends closed problems too; they end nothing and start nothing here.
        api.auth.authenticate(token.as_deref())?;
        return Ok((StatusCode::OK, axum::Json(json!({"ignored": "the problem is closed"}))).into_response());
    }
    let published = api.publish(token.as_deref(), "", &event).await?;
    let answer = json!({
        "runId": published.run_id,
        "project": published.project,
        "keptnContext": published.context_id,
    });
    Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
}

async fn alertmanager(
    State(api): State<Api>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = api.limits.max_body_bytes();
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(format!("request body is larger than the limit of {limit} bytes")))?;
    let token = token(&headers)?;
    api.auth.authenticate(token.as_deref())?;
    let target = alert_target(query.as_deref().unwrap_or(""))?;
    let notification: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid("body", format!("not JSON: {e}")))?;
    let (mut started, mut skipped) = (Vec::new(), Vec::new());
    for (alert, trigger) in alert_triggers(&notification, &target)? {
        let mut req = match trigger {
            Ok(req) => req,
            Err(reason) => {
                skipped.push(json!({"alert": alert, "reason": reason}));
                continue;
            }
        };
        let context = req.context_id.get_or_insert_with(|| uuid::Uuid::now_v7().to_string()).clone();
        let project = req.project.clone();
        match api.trigger_once(token.as_deref(), req).await {
            Ok((run_id, true)) => {
                started.push(json!({"alert": alert, "project": project, "runId": run_id, "keptnContext": context}))
            }
            // Alertmanager repeats a notification while the alert fires; one remediation is enough.
            Ok((run_id, false)) => skipped.push(
                json!({"alert": alert, "runId": run_id, "reason": "a remediation of this firing already started"}),
            ),
            Err(e @ ApiError::InvalidArgument { .. } | e @ ApiError::NotFound(_)) => {
                skipped.push(json!({"alert": alert, "reason": e.to_string()}));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((StatusCode::OK, axum::Json(json!({"started": started, "skipped": skipped}))).into_response())
}

/// `project=`, `stage=` and `service=` of a query string (form-encoded).
fn alert_target(query: &str) -> Result<AlertTarget, ApiError> {
    let mut target = AlertTarget::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| ApiError::invalid(key, "is not valid percent-encoding"))?;
        match key {
            "project" => target.project = Some(value),
            "stage" => target.stage = Some(value),
            "service" => target.service = Some(value),
            other => return Err(ApiError::invalid(other, "unknown parameter (project, stage, service)")),
        }
    }
    Ok(target)
}

fn percent_decode(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// The caller's token: `Authorization: Bearer <token>`, or Keptn's `x-token` header.
fn token(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    if let Some(value) = header_str(headers, "authorization")? {
        return bearer(&value)
            .map(|t| Some(t.to_string()))
            .ok_or_else(|| ApiError::Unauthenticated("Authorization must be `Bearer <token>`".into()));
    }
    header_str(headers, "x-token")
}

fn header_str(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .map(|s| Some(s.to_string()))
            .map_err(|_| ApiError::invalid(name, "header is not valid UTF-8")),
    }
}

/// A structured-mode event: the whole body is the event as JSON.
fn structured(bytes: &Bytes) -> Result<CloudEvent, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ApiError::invalid("body", format!("is not valid UTF-8: {e}")))?;
    let mut value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid("body", format!("malformed CloudEvent: not valid JSON: {e}")))?;
    // JSON data sent as a string (some SDKs do) is read as the JSON it holds.
    let json_data = value.get("datacontenttype").and_then(Value::as_str).is_none_or(is_json);
    if json_data && let Some(Value::String(s)) = value.get("data") {
        let parsed = serde_json::from_str(s).map_err(|e| ApiError::invalid("data", format!("is not JSON: {e}")))?;
        value["data"] = parsed;
    }
    CloudEvent::from_value(value).map_err(decode_error)
}

/// A binary-mode event: attributes in `ce-*` headers, the data as the body.
fn binary(headers: &HeaderMap, content_type: &str, bytes: &Bytes) -> Result<CloudEvent, ApiError> {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else { continue };
        let text = std::str::from_utf8(value.as_bytes())
            .map_err(|_| ApiError::invalid(name.as_str(), "header is not valid UTF-8"))?;
        map.insert(attribute.to_string(), Value::String(text.to_string()));
    }
    if map.is_empty() {
        return Err(ApiError::UnsupportedMedia(format!(
            "send application/cloudevents+json (structured mode) or ce-* headers (binary mode, specversion {SPEC_VERSION}); \
             got Content-Type `{content_type}` without ce-* headers"
        )));
    }
    if !bytes.is_empty() {
        if !content_type.is_empty() && !is_json(content_type) {
            return Err(ApiError::UnsupportedMedia(format!("data must be JSON, not `{content_type}`")));
        }
        let text =
            std::str::from_utf8(bytes).map_err(|e| ApiError::invalid("data", format!("is not valid UTF-8: {e}")))?;
        let data: Value =
            serde_json::from_str(text).map_err(|e| ApiError::invalid("data", format!("is not JSON: {e}")))?;
        map.insert("data".into(), data);
        map.insert("datacontenttype".into(), Value::String("application/json".into()));
    }
    CloudEvent::from_value(Value::Object(map)).map_err(decode_error)
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn alert_targets_come_from_the_query() {
        let t = alert_target("project=sock%20shop&stage=production&service=carts+x").unwrap();
        assert_eq!(
            (t.project.as_deref(), t.stage.as_deref(), t.service.as_deref()),
            (Some("sock shop"), Some("production"), Some("carts x"))
        );
        assert!(alert_target("").unwrap().project.is_none());
        assert!(
            matches!(alert_target("colour=red"), Err(ApiError::InvalidArgument { field, .. }) if field == "colour")
        );
        assert!(alert_target("stage=%zz").is_err());
    }

    #[test]
    fn binary_mode_reads_headers_and_json_body() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("ce-capstanproject", "p"),
        ] {
            headers.insert(k, HeaderValue::from_static(v));
        }
        let ev = binary(&headers, "application/json", &Bytes::from_static(br#"{"a":1}"#)).unwrap();
        assert_eq!(ev.ext("capstanproject"), Some("p"));
        assert_eq!(ev.data, Some(json!({"a": 1}).into()));
        let err = binary(&headers, "application/json", &Bytes::from_static(b"{nope")).unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument { ref field, .. } if field == "data"), "{err}");
        assert!(matches!(
            binary(&headers, "text/plain", &Bytes::from_static(b"x")),
            Err(ApiError::UnsupportedMedia(_))
        ));
    }

    #[test]
    fn structured_mode_names_what_is_wrong() {
        let err = structured(&Bytes::from_static(b"\xff\xfe")).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
        let err = structured(&Bytes::from_static(br#"{"specversion":"1.0","source":"s","type":"t"}"#)).unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument { ref field, .. } if field == "id"), "{err}");
        let err =
            structured(&Bytes::from_static(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":"{x"}"#))
                .unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument { ref field, .. } if field == "data"), "{err}");
    }
}
