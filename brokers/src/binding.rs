//! CloudEvents binary-mode mapping for the protocol bindings: attributes and extensions travel
//! as headers (`ce_id`, `ce-type`, `cloudEvents:source`...), `datacontenttype` as the content
//! type, and `data` as the body. JSON data travels as JSON; a string under a non-JSON content
//! type (`text/plain`) travels as its raw bytes. An event carrying `data_base64` is sent in
//! structured mode instead ([`encode`] picks the mode), and [`decode`] reads either mode, so
//! a producer such as the Python CloudEvents SDK may send structured JSON.

use std::collections::BTreeMap;

use capstan_proto::{CloudEvent, DecodeError, EventData, SPEC_VERSION, valid_extension_name};

use crate::{Error, Result};

/// The header name prefix of a protocol binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderPrefix(pub &'static str);

impl HeaderPrefix {
    /// HTTP and NATS: `ce-id`.
    pub const HTTP: HeaderPrefix = HeaderPrefix("ce-");
    /// Kafka: `ce_id`.
    pub const KAFKA: HeaderPrefix = HeaderPrefix("ce_");
    /// AMQP 0-9-1 (RabbitMQ): `cloudEvents:id`.
    pub const AMQP: HeaderPrefix = HeaderPrefix("cloudEvents:");
    /// AMQP for JMS-friendly clients: `cloudEvents_id` (the binding allows both).
    pub const AMQP_UNDERSCORE: HeaderPrefix = HeaderPrefix("cloudEvents_");
}

/// The content type of a structured-mode CloudEvent in JSON.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The content type of a batch of structured-mode CloudEvents in JSON (a JSON array of them).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// The header that carries `datacontenttype`.
pub const CONTENT_TYPE: &str = "content-type";

/// A binary-mode message: headers (name, value) and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMessage {
    /// Attribute headers, `content-type` included when the event has one.
    pub headers: Vec<(String, String)>,
    /// The data, as JSON bytes; empty when the event has no data.
    pub body: Vec<u8>,
}

/// Whether `event` can be sent in binary mode (it has no base64 data).
pub fn binary_encodable(event: &CloudEvent) -> bool {
    event.data_base64.is_none()
}

/// Maps an event to headers and body; `Error::Invalid` for base64 data.
pub fn to_binary(event: &CloudEvent, prefix: HeaderPrefix) -> Result<BinaryMessage> {
    if !binary_encodable(event) {
        return Err(Error::Invalid("binary mode carries JSON data only; use structured mode".into()));
    }
    let p = prefix.0;
    let mut headers = vec![
        (format!("{p}specversion"), SPEC_VERSION.to_string()),
        (format!("{p}id"), event.id.clone()),
        (format!("{p}source"), event.source.clone()),
        (format!("{p}type"), event.ty.clone()),
    ];
    for (name, value) in [("subject", &event.subject), ("time", &event.time), ("dataschema", &event.dataschema)] {
        if let Some(v) = value {
            headers.push((format!("{p}{name}"), v.clone()));
        }
    }
    for (name, value) in &event.extensions {
        headers.push((format!("{p}{name}"), value.clone()));
    }
    if let Some(ct) = &event.datacontenttype {
        headers.push((CONTENT_TYPE.to_string(), ct.clone()));
    }
    Ok(BinaryMessage { headers, body: body(event) })
}

/// Reads an event from headers and body. Header names are matched case-insensitively; headers
/// without the prefix (other than `content-type`) are ignored; of a repeated header the last
/// counts. The attributes are taken straight from the headers, checked as
/// [`CloudEvent::from_value`] checks a structured event (the same errors), without building a
/// JSON tree first: this runs for every message a consumer receives.
pub fn from_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
    prefix: HeaderPrefix,
) -> Result<CloudEvent> {
    let mut attrs: [Option<&str>; 7] = [None; 7];
    let mut content_type = None;
    let mut extensions = BTreeMap::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            content_type = Some(value);
            continue;
        }
        let Some(attr) = strip_prefix_ignore_case(name, prefix.0) else { continue };
        // The data travels in the body; extension names are checked below.
        if ["data", "data_base64", "datacontenttype"].iter().any(|n| attr.eq_ignore_ascii_case(n)) {
            return Err(Error::Invalid(format!("header {name}: not allowed in binary mode")));
        }
        match ATTRIBUTES.iter().position(|a| attr.eq_ignore_ascii_case(a)) {
            Some(i) => attrs[i] = Some(value),
            None => {
                let name = match attr.bytes().any(|b| b.is_ascii_uppercase()) {
                    true => capstan_proto::ext::name(&attr.to_ascii_lowercase()),
                    false => capstan_proto::ext::name(attr),
                };
                extensions.insert(name, value.to_string());
            }
        }
    }
    // JSON data is checked and kept as its text (see `EventData`), not parsed into a tree.
    let (mut data, mut data_base64) = (None, None);
    if !body.is_empty() {
        if is_json_content_type(content_type) {
            data = Some(EventData::from_json(body).map_err(|e| Error::Invalid(format!("body is not JSON: {e}")))?);
        } else if let Ok(text) = std::str::from_utf8(body) {
            data = Some(EventData::from(serde_json::Value::String(text.to_string())));
        } else {
            data_base64 = Some(base64(body));
        }
    }
    let [specversion, id, source, ty, subject, time, dataschema] = attrs;
    let invalid = |e: DecodeError| Error::Invalid(e.to_string());
    match specversion {
        None | Some("") => return Err(invalid(DecodeError::Missing("specversion"))),
        Some(SPEC_VERSION) => {}
        Some(other) => return Err(invalid(DecodeError::SpecVersion(other.to_string()))),
    }
    let required = |value: Option<&str>, name: &'static str| match value {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(invalid(DecodeError::Missing(name))),
    };
    let (id, source, ty) = (required(id, "id")?, required(source, "source")?, required(ty, "type")?);
    if let Some(name) = extensions.keys().find(|n| !valid_extension_name(n)) {
        return Err(invalid(DecodeError::ExtensionName(name.to_string())));
    }
    Ok(CloudEvent {
        id,
        source,
        ty,
        subject: subject.map(str::to_string),
        time: time.map(str::to_string),
        datacontenttype: content_type.map(str::to_string),
        dataschema: dataschema.map(str::to_string),
        data,
        data_base64,
        extensions,
    })
}

/// The context attributes a binary-mode header may carry, in the order `from_binary` keeps them.
const ATTRIBUTES: [&str; 7] = ["specversion", "id", "source", "type", "subject", "time", "dataschema"];

/// `name` without `prefix`, compared case-insensitively.
fn strip_prefix_ignore_case<'n>(name: &'n str, prefix: &str) -> Option<&'n str> {
    let head = name.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &name[prefix.len()..])
}

/// The binary-mode body of an event: the data's JSON text, or for text data of a non-JSON
/// content type the text itself.
pub fn body(event: &CloudEvent) -> Vec<u8> {
    match &event.data {
        Some(data) if !is_json_content_type(event.datacontenttype.as_deref()) => match data.as_string() {
            Some(text) => text.into_bytes(),
            None => data.as_str().as_bytes().to_vec(),
        },
        Some(data) => data.as_str().as_bytes().to_vec(),
        None => Vec::new(),
    }
}

/// A message in whichever mode suits the event: headers, body and the content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Attribute headers (binary mode) or none (structured mode); never `content-type`.
    pub headers: Vec<(String, String)>,
    /// The data (binary mode) or the whole event as JSON (structured mode).
    pub body: Vec<u8>,
    /// The message's content type: `datacontenttype`, or the structured-mode type.
    pub content_type: Option<String>,
}

/// Encodes in binary mode when the event allows it, else in structured mode. The content type
/// is returned apart so that AMQP can put it in its own property and NATS in a header.
pub fn encode(event: &CloudEvent, prefix: HeaderPrefix) -> Result<Encoded> {
    if !binary_encodable(event) {
        return Ok(Encoded {
            headers: Vec::new(),
            body: event.to_json(),
            content_type: Some(STRUCTURED_CONTENT_TYPE.to_string()),
        });
    }
    let BinaryMessage { headers, body } = to_binary(event, prefix)?;
    let (content, headers): (Vec<_>, Vec<_>) = headers.into_iter().partition(|(k, _)| k == CONTENT_TYPE);
    Ok(Encoded { headers, body, content_type: content.into_iter().next().map(|(_, v)| v) })
}

/// Decodes either mode: a structured content type means the body is the whole event, anything
/// else is binary mode. `content_type` is the message's content type when the protocol keeps it
/// outside the headers (AMQP); NATS passes `None` and a `content-type` header.
pub fn decode<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    content_type: Option<&'a str>,
    body: &[u8],
    prefix: HeaderPrefix,
) -> Result<CloudEvent> {
    let mut all: Vec<(&str, &str)> = headers.into_iter().collect();
    // ONE content type decides the mode and becomes `datacontenttype`: the explicit one, else the
    // first header. Later duplicates are dropped, so a message cannot be read as binary by one
    // header and carry another, structured-mode type that would not decode again.
    let ct = content_type.or_else(|| all.iter().find(|(k, _)| k.eq_ignore_ascii_case(CONTENT_TYPE)).map(|(_, v)| *v));
    if let Some(ct) = ct {
        all.retain(|(k, _)| !k.eq_ignore_ascii_case(CONTENT_TYPE));
        all.push((CONTENT_TYPE, ct));
    }
    match ct.map(media_type) {
        Some(t) if t == STRUCTURED_CONTENT_TYPE => {
            CloudEvent::from_json(body).map_err(|e| Error::Invalid(format!("structured event: {e}")))
        }
        Some(t) if t.starts_with("application/cloudevents") => {
            Err(Error::Invalid(format!("content type {t} is not supported (only single events in JSON)")))
        }
        _ => from_binary(all, body, prefix),
    }
}

/// Decodes a JSON batch; each event is checked as [`CloudEvent::from_value`] checks one, and
/// the first bad one fails the batch. The events are read straight from the text, with no JSON
/// tree in between.
pub fn decode_batch(body: &[u8]) -> Result<Vec<CloudEvent>> {
    serde_json::from_slice(body).map_err(|e| Error::Invalid(format!("bad JSON batch of CloudEvents: {e}")))
}

/// Whether a content type is [`BATCH_CONTENT_TYPE`] (parameters and case aside).
pub fn is_batch_content_type(content_type: &str) -> bool {
    media_type(content_type) == BATCH_CONTENT_TYPE
}

/// Whether a content type carries JSON: none, `application/json`, `text/json` or `*+json`.
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|ct| {
        let t = media_type(ct);
        t == "application/json" || t == "text/json" || t.ends_with("+json")
    })
}

/// The media type without parameters, lower-cased (`Application/JSON; charset=utf-8` ->
/// `application/json`).
fn media_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// Standard base64 with padding, for binary data that arrives under a non-text content type.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod decode_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> CloudEvent {
        let mut ev = CloudEvent::new("e1", "capstan/worker/w1", "dev.capstan.task.bid.v1")
            .with_data(json!({"cost": 1.5}))
            .with_ext("capstanrun", "r1")
            .with_ext("capstantoken", 42);
        ev.subject = Some("deploy".into());
        ev
    }

    #[test]
    fn round_trips_for_every_binding() {
        for prefix in [HeaderPrefix::HTTP, HeaderPrefix::KAFKA, HeaderPrefix::AMQP] {
            let m = to_binary(&event(), prefix).expect("encodable");
            assert!(m.headers.contains(&(format!("{}capstantoken", prefix.0), "42".to_string())));
            let headers = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            assert_eq!(from_binary(headers, &m.body, prefix).expect("decodes"), event());
        }
        let bare = CloudEvent::new("e2", "s", "t");
        let m = to_binary(&bare, HeaderPrefix::KAFKA).expect("encodable");
        assert!(m.body.is_empty());
        let headers = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(from_binary(headers, &m.body, HeaderPrefix::KAFKA).expect("decodes"), bare);
    }

    #[test]
    fn refuses_what_it_cannot_map() {
        let mut ev = event();
        ev.data_base64 = Some("AAE=".into());
        assert!(matches!(to_binary(&ev, HeaderPrefix::HTTP), Err(Error::Invalid(_))));
        let missing_id = [("ce-specversion", "1.0"), ("ce-source", "s"), ("ce-type", "t")];
        assert!(matches!(from_binary(missing_id, b"", HeaderPrefix::HTTP), Err(Error::Invalid(_))));
        let ok = [("CE-SpecVersion", "1.0"), ("ce-id", "1"), ("ce-source", "s"), ("ce-type", "t"), ("x-other", "v")];
        assert!(matches!(from_binary(ok, b"{nope", HeaderPrefix::HTTP), Err(Error::Invalid(_))));
        let bad = [("ce-id", "1"), ("ce-source", "s"), ("ce-type", "t"), ("ce-data", "x")];
        assert!(matches!(from_binary(bad, b"", HeaderPrefix::HTTP), Err(Error::Invalid(_))));
        assert_eq!(from_binary(ok, b"", HeaderPrefix::HTTP).expect("decodes").id, "1");
    }

    #[test]
    fn encode_picks_the_mode_and_decode_reads_both() {
        let m = encode(&event(), HeaderPrefix::HTTP).expect("encodes");
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert!(m.headers.iter().all(|(k, _)| k != CONTENT_TYPE));
        let headers = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let back = decode(headers, m.content_type.as_deref(), &m.body, HeaderPrefix::HTTP);
        assert_eq!(back.expect("decodes"), event());

        let mut binary_data = event();
        binary_data.data = None;
        binary_data.datacontenttype = Some("application/octet-stream".into());
        binary_data.data_base64 = Some("AAE=".into());
        let m = encode(&binary_data, HeaderPrefix::AMQP).expect("encodes");
        assert_eq!(m.content_type.as_deref(), Some(STRUCTURED_CONTENT_TYPE));
        assert!(m.headers.is_empty());
        let back = decode([], m.content_type.as_deref(), &m.body, HeaderPrefix::AMQP);
        assert_eq!(back.expect("decodes"), binary_data);
    }

    #[test]
    fn reads_a_structured_event_as_the_python_sdk_sends_it() {
        // What `cloudevents.conversion.to_structured` produces, content type with a charset.
        let body = br#"{"specversion": "1.0", "id": "A234-1234", "source": "https://example.com/event-producer",
            "type": "com.example.someevent", "datacontenttype": "application/json",
            "time": "2018-04-05T17:31:00Z", "comexampleextension1": "value", "data": {"message": "Hello"}}"#;
        let headers = [("content-type", "application/cloudevents+json; charset=UTF-8")];
        let ev = decode(headers, None, body, HeaderPrefix::HTTP).expect("decodes");
        assert_eq!(ev.id, "A234-1234");
        assert_eq!(ev.ext("comexampleextension1"), Some("value"));
        assert_eq!(ev.data, Some(json!({"message": "Hello"}).into()));
        let missing = br#"{"specversion": "1.0", "source": "s", "type": "t"}"#;
        let err = decode(headers, None, missing, HeaderPrefix::HTTP).expect_err("no id");
        assert!(err.to_string().contains("`id`"), "{err}");
        let batch = [("content-type", "application/cloudevents-batch+json")];
        assert!(matches!(decode(batch, None, b"[]", HeaderPrefix::HTTP), Err(Error::Invalid(_))));
    }

    /// Found by the fuzzer: a binary message with a second content-type header of the structured
    /// kind was read as binary by the first and carried the second, so it did not decode again.
    #[test]
    fn the_first_of_duplicate_content_types_decides() {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "b"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("content-type", "text/plain"),
            ("content-type", "application/cloudevents+json"),
        ];
        let ev = decode(headers, None, b"hi", HeaderPrefix::HTTP).expect("binary by the first");
        assert_eq!(ev.datacontenttype.as_deref(), Some("text/plain"));
        let m = encode(&ev, HeaderPrefix::HTTP).expect("encodes");
        let again = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(decode(again, m.content_type.as_deref(), &m.body, HeaderPrefix::HTTP).expect("decodes"), ev);
    }

    #[test]
    fn text_and_bytes_under_other_content_types() {
        let mut ev = CloudEvent::new("t1", "s", "t");
        ev.datacontenttype = Some("text/plain".into());
        ev.data = Some(json!("hello, world").into());
        let m = encode(&ev, HeaderPrefix::AMQP_UNDERSCORE).expect("encodes");
        assert_eq!(m.body, b"hello, world");
        assert!(m.headers.contains(&("cloudEvents_id".to_string(), "t1".to_string())));
        let headers = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let back = decode(headers, m.content_type.as_deref(), &m.body, HeaderPrefix::AMQP_UNDERSCORE);
        assert_eq!(back.expect("decodes"), ev);

        let headers = [("ce-specversion", "1.0"), ("ce-id", "b"), ("ce-source", "s"), ("ce-type", "t")];
        let back = decode(headers, Some("application/octet-stream"), &[0, 1, 0xff], HeaderPrefix::HTTP);
        assert_eq!(back.expect("decodes").data_base64.as_deref(), Some("AAH/"));
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
    }
}
