//! CloudEvents binary-mode mapping for the protocol bindings: attributes and extensions travel
//! as headers (`ce_id`, `ce-type`, `cloudEvents:source`...), `datacontenttype` as the content
//! type, and `data` as the body. Only JSON data (or none) is mapped; an event carrying
//! `data_base64` should be sent in structured mode ([`CloudEvent::to_json`]).

use capstan_proto::{CloudEvent, SPEC_VERSION};

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
}

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
        return Err(Error::Invalid(
            "binary mode carries JSON data only; use structured mode".into(),
        ));
    }
    let p = prefix.0;
    let mut headers = vec![
        (format!("{p}specversion"), SPEC_VERSION.to_string()),
        (format!("{p}id"), event.id.clone()),
        (format!("{p}source"), event.source.clone()),
        (format!("{p}type"), event.ty.clone()),
    ];
    for (name, value) in [
        ("subject", &event.subject),
        ("time", &event.time),
        ("dataschema", &event.dataschema),
    ] {
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
    let body = match &event.data {
        Some(data) => serde_json::to_vec(data).map_err(|e| Error::Invalid(format!("data: {e}")))?,
        None => Vec::new(),
    };
    Ok(BinaryMessage { headers, body })
}

/// Reads an event from headers and body. Header names are matched case-insensitively; headers
/// without the prefix (other than `content-type`) are ignored.
pub fn from_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
    prefix: HeaderPrefix,
) -> Result<CloudEvent> {
    let p = prefix.0.to_ascii_lowercase();
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if lower == CONTENT_TYPE {
            map.insert("datacontenttype".into(), value.into());
        } else if let Some(attr) = lower.strip_prefix(&p) {
            // The data travels in the body; extension names are checked by `from_value`.
            if matches!(attr, "data" | "data_base64" | "datacontenttype") {
                return Err(Error::Invalid(format!(
                    "header {name}: not allowed in binary mode"
                )));
            }
            map.insert(attr.to_string(), value.into());
        }
    }
    if !body.is_empty() {
        let data: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| Error::Invalid(format!("body is not JSON: {e}")))?;
        map.insert("data".into(), data);
    }
    CloudEvent::from_value(serde_json::Value::Object(map))
        .map_err(|e| Error::Invalid(e.to_string()))
}

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
            assert!(
                m.headers
                    .contains(&(format!("{}capstantoken", prefix.0), "42".to_string()))
            );
            let headers = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            assert_eq!(
                from_binary(headers, &m.body, prefix).expect("decodes"),
                event()
            );
        }
        let bare = CloudEvent::new("e2", "s", "t");
        let m = to_binary(&bare, HeaderPrefix::KAFKA).expect("encodable");
        assert!(m.body.is_empty());
        let headers = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(
            from_binary(headers, &m.body, HeaderPrefix::KAFKA).expect("decodes"),
            bare
        );
    }

    #[test]
    fn refuses_what_it_cannot_map() {
        let mut ev = event();
        ev.data_base64 = Some("AAE=".into());
        assert!(matches!(
            to_binary(&ev, HeaderPrefix::HTTP),
            Err(Error::Invalid(_))
        ));
        let missing_id = [
            ("ce-specversion", "1.0"),
            ("ce-source", "s"),
            ("ce-type", "t"),
        ];
        assert!(matches!(
            from_binary(missing_id, b"", HeaderPrefix::HTTP),
            Err(Error::Invalid(_))
        ));
        let ok = [
            ("CE-SpecVersion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("x-other", "v"),
        ];
        assert!(matches!(
            from_binary(ok, b"{nope", HeaderPrefix::HTTP),
            Err(Error::Invalid(_))
        ));
        let bad = [
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("ce-data", "x"),
        ];
        assert!(matches!(
            from_binary(bad, b"", HeaderPrefix::HTTP),
            Err(Error::Invalid(_))
        ));
        assert_eq!(
            from_binary(ok, b"", HeaderPrefix::HTTP)
                .expect("decodes")
                .id,
            "1"
        );
    }
}
