//! Translation between the gRPC messages and the engine's and store's words. Adapters translate
//! and never decide (STYLE.md): every check lives in `ops`.

use capstan_proto::CloudEvent;
use capstan_proto::grpc::prost_types;
use capstan_proto::grpc::v1 as pb;
use capstan_store::{DefinitionRecord, RunRecord, StoredEvent};
use serde_json::{Map, Number, Value};

use super::error::ApiError;
use super::events::decode_error;
use super::view::TaskView;

/// A protobuf `Struct` as a JSON object.
pub fn struct_to_json(s: &prost_types::Struct) -> Value {
    Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect())
}

fn value_to_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        // Whole numbers come back as integers so that `3` stays `3` in run data, not `3.0`.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => Value::Number(Number::from(*n as i64)),
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map(Value::Number).unwrap_or(Value::Null),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// JSON text as a value; empty text means no data.
pub fn parse_json(field: &str, text: &str) -> Result<Value, ApiError> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|e| ApiError::invalid(field, format!("is not valid JSON: {e}")))
}

/// The trigger data of a `TriggerRunRequest`.
pub fn trigger_data(data: Option<&pb::trigger_run_request::Data>) -> Result<Value, ApiError> {
    match data {
        None => Ok(Value::Null),
        Some(pb::trigger_run_request::Data::DataJson(text)) => parse_json("data_json", text),
        Some(pb::trigger_run_request::Data::DataStruct(s)) => Ok(struct_to_json(s)),
    }
}

/// A gRPC CloudEvent checked like any structured-mode event.
pub fn cloud_event(ev: &pb::CloudEvent) -> Result<CloudEvent, ApiError> {
    let mut map = Map::new();
    let attributes = [
        ("specversion", &ev.spec_version),
        ("id", &ev.id),
        ("source", &ev.source),
        ("type", &ev.r#type),
        ("subject", &ev.subject),
        ("time", &ev.time),
        ("datacontenttype", &ev.datacontenttype),
        ("dataschema", &ev.dataschema),
    ];
    for (name, value) in attributes {
        if !value.is_empty() {
            map.insert(name.into(), Value::String(value.clone()));
        }
    }
    for (name, value) in &ev.extensions {
        if map.contains_key(name) {
            return Err(ApiError::invalid("extensions", format!("`{name}` is a context attribute, not an extension")));
        }
        map.insert(name.clone(), Value::String(value.clone()));
    }
    match &ev.data {
        None => {}
        Some(pb::cloud_event::Data::DataJson(text)) => {
            map.insert("data".into(), parse_json("event.data_json", text)?);
        }
        Some(pb::cloud_event::Data::DataStruct(s)) => {
            map.insert("data".into(), struct_to_json(s));
        }
    }
    CloudEvent::from_value(Value::Object(map)).map_err(decode_error)
}

/// A run record (and its tasks) as the gRPC message.
pub fn run(r: RunRecord, tasks: Vec<TaskView>) -> pb::Run {
    pb::Run {
        run_id: r.run_id,
        project: r.project,
        context_id: r.context_id,
        stage: r.stage,
        sequence: r.sequence,
        service: r.service.unwrap_or_default(),
        definition: r.definition,
        definition_version: r.definition_version,
        status: r.status,
        result: r.result.unwrap_or_default(),
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        tasks: tasks
            .into_iter()
            .map(|t| pb::TaskState {
                name: t.name,
                state: t.state,
                result: t.result,
                attempt: t.attempt,
                worker: t.worker,
            })
            .collect(),
    }
}

/// A stored event as the gRPC message.
pub fn run_event(e: StoredEvent) -> pb::RunEvent {
    pb::RunEvent {
        run_id: e.run_id,
        seq: e.seq,
        position: e.position,
        id: e.id,
        kind: e.kind,
        payload_json: e.payload.to_string(),
        recorded_at_ms: e.recorded_at_ms,
    }
}

/// A gRPC run event back into the store's shape (for clients that reuse the progress printer).
pub fn stored_event(e: &pb::RunEvent) -> Result<StoredEvent, serde_json::Error> {
    Ok(StoredEvent {
        position: e.position,
        run_id: e.run_id.clone(),
        seq: e.seq,
        id: e.id.clone(),
        kind: e.kind.clone(),
        payload: serde_json::from_str(&e.payload_json)?,
        recorded_at_ms: e.recorded_at_ms,
    })
}

/// A definition record as the gRPC message.
pub fn definition(d: DefinitionRecord) -> pb::Definition {
    pb::Definition {
        project: d.project,
        name: d.name,
        version: d.version,
        source: d.source,
        created_at_ms: d.created_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::value::Kind;
    use serde_json::json;

    use super::*;

    #[test]
    fn structs_become_json() {
        let v = |k| prost_types::Value { kind: Some(k) };
        let s = prost_types::Struct {
            fields: BTreeMap::from([
                ("n".to_string(), v(Kind::NumberValue(3.0))),
                ("f".to_string(), v(Kind::NumberValue(0.5))),
                ("s".to_string(), v(Kind::StringValue("x".into()))),
                (
                    "l".to_string(),
                    v(Kind::ListValue(prost_types::ListValue { values: vec![v(Kind::BoolValue(true))] })),
                ),
            ]),
        };
        assert_eq!(struct_to_json(&s), json!({"n": 3, "f": 0.5, "s": "x", "l": [true]}));
    }

    #[test]
    fn grpc_cloud_events_are_checked() {
        let ev = pb::CloudEvent {
            id: "1".into(),
            source: "s".into(),
            spec_version: "0.3".into(),
            r#type: "t".into(),
            ..Default::default()
        };
        assert!(matches!(cloud_event(&ev), Err(ApiError::InvalidArgument { field, .. }) if field == "specversion"));
        let ev = pb::CloudEvent { spec_version: "1.0".into(), id: String::new(), ..ev };
        assert!(matches!(cloud_event(&ev), Err(ApiError::InvalidArgument { field, .. }) if field == "id"));
    }
}
