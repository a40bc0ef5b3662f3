//! The CloudEvents Kafka protocol binding, by hand: binary mode (`ce_` headers, `content-type`,
//! the data as the record value) on output, binary or structured mode on input.
//!
//! The mapping works on plain header pairs so it is tested without a broker. Capstan's own
//! delivery headers (`capstan-redeliveries`, `capstan-not-before`) carry no `ce_` prefix, so they
//! never turn into CloudEvent extensions.

use capstan_proto::{CloudEvent, EventData};
use serde_json::{Map, Value};

/// Prefix of CloudEvent attribute headers in binary mode.
const CE_PREFIX: &str = "ce_";
/// The header carrying `datacontenttype` in binary mode and the mode marker in structured mode.
pub(crate) const CONTENT_TYPE: &str = "content-type";
/// Structured-mode content type (a parameter such as `; charset=utf-8` may follow).
const STRUCTURED: &str = "application/cloudevents+json";
/// How often a message was delivered before (set on re-publish by `nack`).
pub(crate) const REDELIVERIES: &str = "capstan-redeliveries";
/// Unix time in milliseconds before which a consumer must not deliver the message.
pub(crate) const NOT_BEFORE: &str = "capstan-not-before";
/// Why a message went to the dead-letter topic.
pub(crate) const DEAD_LETTER_REASON: &str = "capstan-dead-letter-reason";
/// Where a dead-lettered message was read: `topic/partition/offset`.
pub(crate) const DEAD_LETTER_ORIGIN: &str = "capstan-dead-letter-origin";

/// A record as this binding sees it: value and headers, in header order.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Record {
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    /// Bytes this record takes on the wire, near enough for the size limit: value plus headers.
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.value.as_ref().map_or(0, Vec::len) + headers
    }

    /// A numeric Capstan header (redeliveries, not-before); absent or garbled reads as none.
    pub fn number(&self, name: &str) -> Option<u64> {
        std::str::from_utf8(self.header(name)?).ok()?.trim().parse().ok()
    }
}

/// Encodes an event in binary mode. Events whose data is base64 (binary data) go in structured
/// mode instead, which the binding allows and which spares a base64 codec here.
pub(crate) fn encode(event: &CloudEvent) -> Record {
    if event.data_base64.is_some() {
        return Record {
            value: Some(event.to_json()),
            headers: vec![(CONTENT_TYPE.into(), STRUCTURED.as_bytes().to_vec())],
        };
    }
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        ("ce_specversion".into(), capstan_proto::SPEC_VERSION.into()),
        ("ce_id".into(), event.id.clone().into_bytes()),
        ("ce_source".into(), event.source.clone().into_bytes()),
        ("ce_type".into(), event.ty.clone().into_bytes()),
    ];
    let optional = [("ce_subject", &event.subject), ("ce_time", &event.time), ("ce_dataschema", &event.dataschema)];
    for (name, value) in optional {
        if let Some(v) = value {
            headers.push((name.into(), v.clone().into_bytes()));
        }
    }
    for (name, value) in &event.extensions {
        headers.push((format!("{CE_PREFIX}{name}"), value.clone().into_bytes()));
    }
    if let Some(ct) = &event.datacontenttype {
        headers.push((CONTENT_TYPE.into(), ct.clone().into_bytes()));
    }
    // Text data of a non-JSON content type travels as the text itself, not as a JSON string.
    let value = event.data.as_ref().map(|_| crate::binding::body(event));
    Record { value, headers }
}

/// Decodes a record in structured or binary mode; the error says why it is not a CloudEvent.
pub(crate) fn decode(record: &Record) -> Result<CloudEvent, String> {
    let content_type = record.header(CONTENT_TYPE).map(|v| String::from_utf8_lossy(v).into_owned());
    if content_type.as_deref().is_some_and(|ct| ct.trim().to_ascii_lowercase().starts_with(STRUCTURED)) {
        let value = record.value.as_deref().unwrap_or_default();
        return CloudEvent::from_json(value).map_err(|e| format!("structured mode: {e}"));
    }
    let mut attributes = Map::new();
    for (name, value) in &record.headers {
        let lower = name.to_ascii_lowercase();
        let Some(attribute) = lower.strip_prefix(CE_PREFIX) else { continue };
        let text = String::from_utf8(value.clone()).map_err(|_| format!("header {name} is not UTF-8"))?;
        attributes.insert(attribute.to_string(), Value::String(text));
    }
    if attributes.is_empty() {
        return Err("neither binary mode (no ce_ headers) nor structured mode (content-type)".into());
    }
    if let Some(ct) = &content_type {
        attributes.insert("datacontenttype".into(), Value::String(ct.clone()));
    }
    let data = match record.value.as_deref() {
        Some(bytes) if crate::binding::is_json_content_type(content_type.as_deref()) => {
            Some(EventData::from_json(bytes).map_err(|e| format!("data is not the JSON its content type says: {e}"))?)
        }
        Some(bytes) => {
            let text = String::from_utf8(bytes.to_vec()).map_err(|_| "non-JSON data that is not UTF-8 text")?;
            Some(EventData::from_value(&Value::String(text)))
        }
        None => None,
    };
    let mut event = CloudEvent::from_value(Value::Object(attributes)).map_err(|e| format!("binary mode: {e}"))?;
    event.data = data;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header(name: &str, value: &str) -> (String, Vec<u8>) {
        (name.to_string(), value.as_bytes().to_vec())
    }

    #[test]
    fn binary_mode_round_trips() {
        let mut event = CloudEvent::new("e1", "/capstan", "dev.capstan.task.triggered.v1")
            .with_data(json!({"stage": "dev", "n": [1, 2]}))
            .with_ext("capstanrun", "run-7");
        event.subject = Some("deploy".into());
        event.time = Some("2026-01-01T00:00:00Z".into());
        let record = encode(&event);
        assert_eq!(record.header("ce_id"), Some(&b"e1"[..]));
        assert_eq!(record.header("ce_capstanrun"), Some(&b"run-7"[..]));
        assert_eq!(record.header("content-type"), Some(&b"application/json"[..]));
        assert_eq!(decode(&record), Ok(event));
    }

    #[test]
    fn no_data_and_text_data_round_trip() {
        let bare = CloudEvent::new("e2", "s", "t");
        assert_eq!(encode(&bare).value, None);
        assert_eq!(decode(&encode(&bare)), Ok(bare));
        let mut text = CloudEvent::new("e3", "s", "t");
        text.datacontenttype = Some("text/plain".into());
        text.data = Some(Value::String("hello".into()).into());
        assert_eq!(encode(&text).value.as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode(&encode(&text)), Ok(text));
    }

    #[test]
    fn base64_data_goes_structured() {
        let mut event = CloudEvent::new("e4", "s", "t");
        event.data_base64 = Some("AAEC".into());
        let record = encode(&event);
        assert_eq!(record.header(CONTENT_TYPE), Some(STRUCTURED.as_bytes()));
        assert_eq!(decode(&record), Ok(event));
    }

    #[test]
    fn structured_mode_is_accepted_on_input() {
        let event = CloudEvent::new("e5", "s", "t").with_data(json!(1)).with_ext("capstanrun", "r");
        let record = Record {
            value: Some(event.to_json()),
            headers: vec![header("Content-Type", "application/cloudevents+json; charset=utf-8")],
        };
        assert_eq!(decode(&record), Ok(event));
    }

    #[test]
    fn capstan_headers_are_not_extensions() {
        let mut record = encode(&CloudEvent::new("e6", "s", "t"));
        record.headers.push(header(REDELIVERIES, "3"));
        record.headers.push(header(NOT_BEFORE, "garbage"));
        assert!(decode(&record).is_ok_and(|e| e.extensions.is_empty()));
        assert_eq!(record.number(REDELIVERIES), Some(3));
        assert_eq!(record.number(NOT_BEFORE), None);
    }

    #[test]
    fn undecodable_records_say_why() {
        let cases = [
            (Record { value: Some(b"plain".to_vec()), headers: vec![] }, "neither binary"),
            (
                Record { value: Some(b"{nope".to_vec()), headers: vec![header(CONTENT_TYPE, STRUCTURED)] },
                "structured mode",
            ),
            (Record { value: None, headers: vec![header("ce_specversion", "1.0"), header("ce_id", "x")] }, "source"),
            (
                Record {
                    value: Some(b"{nope".to_vec()),
                    headers: encode(&CloudEvent::new("e", "s", "t").with_data(json!(1))).headers,
                },
                "not the JSON",
            ),
        ];
        for (record, expected) in cases {
            match decode(&record) {
                Err(reason) => assert!(reason.contains(expected), "{reason:?} should mention {expected:?}"),
                Ok(event) => panic!("decoded {event:?} from {record:?}"),
            }
        }
    }
}
