//! The CloudEvents 1.0 envelope in JSON structured mode. Protocol bindings (binary mode over
//! NATS, Kafka, AMQP, HTTP) live in the brokers and the binary and map onto this type.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::EventData;

/// The only CloudEvents version Capstan speaks.
pub const SPEC_VERSION: &str = "1.0";

/// Attribute names of the spec itself; anything else at the top level is an extension.
const CONTEXT_ATTRIBUTES: &[&str] =
    &["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "data", "data_base64"];

/// A CloudEvent. `data` holds JSON (as text, see [`EventData`]); binary data is kept
/// base64-encoded in `data_base64`.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    pub id: String,
    pub source: String,
    pub ty: String,
    pub subject: Option<String>,
    /// RFC 3339 timestamp, as sent.
    pub time: Option<String>,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    pub data: Option<EventData>,
    pub data_base64: Option<String>,
    /// Extension attributes; values are carried as strings, as binary-mode bindings do. The
    /// protocol's own names (`crate::ext`) are lent rather than copied into every event.
    pub extensions: BTreeMap<Cow<'static, str>, String>,
}

/// Why a CloudEvent could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("a CloudEvent must be a JSON object")]
    NotAnObject,
    #[error("required attribute `{0}` is missing or empty")]
    Missing(&'static str),
    #[error("attribute `{0}` must be a string")]
    NotAString(String),
    #[error("specversion `{0}` is not supported (expected 1.0)")]
    SpecVersion(String),
    #[error("extension attribute name `{0}` is invalid (lower-case letters and digits, at most 20)")]
    ExtensionName(String),
    #[error("extension `{0}` must be a string, number or boolean")]
    ExtensionValue(String),
}

impl CloudEvent {
    /// A new event with JSON data and the given required attributes.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Self {
        CloudEvent {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            data_base64: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Sets JSON data (and `datacontenttype: application/json`).
    pub fn with_data(self, data: Value) -> Self {
        self.with_event_data(EventData::from(data))
    }

    /// Sets a payload struct as JSON data, serialized straight to text.
    pub fn with_payload<T: Serialize + ?Sized>(self, payload: &T) -> serde_json::Result<Self> {
        EventData::new(payload).map(|data| self.with_event_data(data))
    }

    /// Sets JSON data already serialized (and `datacontenttype: application/json`).
    pub fn with_event_data(mut self, data: EventData) -> Self {
        self.datacontenttype = Some("application/json".into());
        self.data = Some(data);
        self
    }

    /// Sets an extension attribute.
    pub fn with_ext(mut self, name: &'static str, value: impl ToString) -> Self {
        self.extensions.insert(Cow::Borrowed(name), value.to_string());
        self
    }

    /// An extension attribute's value.
    pub fn ext(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).map(String::as_str)
    }

    /// Decodes a structured-mode JSON CloudEvent, checking the required attributes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        // Read straight from the text (see `Deserialize`); a bad envelope is read again as a
        // JSON value, the rare path, to tell precisely what is wrong with it.
        if let Ok(event) = serde_json::from_slice(bytes) {
            return Ok(event);
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
        Self::from_value(value)
    }

    /// Encodes as a structured-mode JSON CloudEvent.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a CloudEvent always serializes")
    }

    /// Decodes from a JSON value (structured mode).
    pub fn from_value(value: Value) -> Result<Self, DecodeError> {
        let Value::Object(mut map) = value else {
            return Err(DecodeError::NotAnObject);
        };
        check_spec_version(take_string(&mut map, "specversion")?.as_deref())?;
        let id = required(take_string(&mut map, "id")?, "id")?;
        let source = required(take_string(&mut map, "source")?, "source")?;
        let ty = required(take_string(&mut map, "type")?, "type")?;
        let subject = take_string(&mut map, "subject")?;
        let time = take_string(&mut map, "time")?;
        let datacontenttype = take_string(&mut map, "datacontenttype")?;
        let dataschema = take_string(&mut map, "dataschema")?;
        let data_base64 = take_string(&mut map, "data_base64")?;
        let data = map.remove("data").map(EventData::from);
        let mut extensions = BTreeMap::new();
        for (name, value) in map {
            if let Some(text) = extension_text(&name, value)? {
                extensions.insert(crate::ext::name(&name), text);
            }
        }
        Ok(CloudEvent { id, source, ty, subject, time, datacontenttype, dataschema, data, data_base64, extensions })
    }

    /// The optional string attributes, by name (set or not).
    pub fn optional_attributes(&self) -> [(&'static str, &Option<String>); 5] {
        [
            ("subject", &self.subject),
            ("time", &self.time),
            ("datacontenttype", &self.datacontenttype),
            ("dataschema", &self.dataschema),
            ("data_base64", &self.data_base64),
        ]
    }

    /// The structured-mode JSON object.
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("specversion".into(), SPEC_VERSION.into());
        map.insert("id".into(), self.id.clone().into());
        map.insert("source".into(), self.source.clone().into());
        map.insert("type".into(), self.ty.clone().into());
        for (name, value) in self.optional_attributes() {
            if let Some(v) = value {
                map.insert(name.into(), v.clone().into());
            }
        }
        if let Some(data) = &self.data {
            map.insert("data".into(), data.to_value());
        }
        for (name, value) in &self.extensions {
            map.insert(name.to_string(), value.clone().into());
        }
        Value::Object(map)
    }

    /// Decodes `data` into a payload struct (no data reads as `null`).
    pub fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.data {
            Some(data) => data.decode(),
            None => T::deserialize(&Value::Null),
        }
    }
}

/// CloudEvents extension names: lower-case ASCII letters and digits, at most 20 characters.
pub fn valid_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && !CONTEXT_ATTRIBUTES.contains(&name)
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn take_string(map: &mut Map<String, Value>, name: &str) -> Result<Option<String>, DecodeError> {
    match map.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(DecodeError::NotAString(name.to_string())),
    }
}

/// A required attribute's value: present and not empty.
fn required(value: Option<String>, name: &'static str) -> Result<String, DecodeError> {
    match value {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(DecodeError::Missing(name)),
    }
}

fn check_spec_version(specversion: Option<&str>) -> Result<(), DecodeError> {
    match specversion {
        None | Some("") => Err(DecodeError::Missing("specversion")),
        Some(SPEC_VERSION) => Ok(()),
        Some(other) => Err(DecodeError::SpecVersion(other.to_string())),
    }
}

/// An extension's value as text (`None` for `null`, which is as good as absent), after checking
/// its name.
fn extension_text(name: &str, value: Value) -> Result<Option<String>, DecodeError> {
    if !valid_extension_name(name) {
        return Err(DecodeError::ExtensionName(name.to_string()));
    }
    match value {
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        Value::Null => Ok(None),
        _ => Err(DecodeError::ExtensionValue(name.to_string())),
    }
}

/// One top-level member of the structured encoding, borrowed from the event.
#[derive(Clone, Copy)]
enum Member<'a> {
    Text(&'a str),
    Json(&'a EventData),
}

impl Serialize for Member<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Member::Text(t) => serializer.serialize_str(t),
            Member::Json(v) => v.serialize(serializer),
        }
    }
}

impl Serialize for CloudEvent {
    /// The same JSON as [`CloudEvent::to_value`] (members in key order, an extension named like
    /// a context attribute wins), written from borrowed fields: publishing, sizing and storing
    /// an event no longer clone its data into a `Value` tree first.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut members: BTreeMap<&str, Member<'_>> = BTreeMap::new();
        members.insert("specversion", Member::Text(SPEC_VERSION));
        members.insert("id", Member::Text(&self.id));
        members.insert("source", Member::Text(&self.source));
        members.insert("type", Member::Text(&self.ty));
        for (name, value) in self.optional_attributes() {
            if let Some(v) = value {
                members.insert(name, Member::Text(v));
            }
        }
        if let Some(data) = &self.data {
            members.insert("data", Member::Json(data));
        }
        for (name, value) in &self.extensions {
            members.insert(name, Member::Text(value));
        }
        let mut map = serializer.serialize_map(Some(members.len()))?;
        for (name, member) in &members {
            map.serialize_entry(name, member)?;
        }
        map.end()
    }
}

/// Reads the structured encoding straight into the event, with the checks of
/// [`CloudEvent::from_value`] (and its messages): `data` is kept as the text it came as, and no
/// JSON tree is built on the way, which a batch of many events would pay for each of them.
impl<'de> Deserialize<'de> for CloudEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EventVisitor)
    }
}

/// The string attributes of the spec besides `data`, in the order the reader destructures them.
const STRING_ATTRIBUTES: [&str; 9] =
    ["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "data_base64"];

struct EventVisitor;

/// A member name, lent by the text when it has no escapes (serde's `Cow` always copies).
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an attribute name")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }

            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> serde::de::Visitor<'de> for EventVisitor {
    type Value = CloudEvent;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a CloudEvent (a JSON object)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<CloudEvent, A::Error> {
        use serde::de::Error;
        let fail = |e: DecodeError| A::Error::custom(e);
        let mut attrs: [Option<String>; 9] = Default::default();
        let mut data = None;
        let mut extensions = BTreeMap::new();
        while let Some(Key(name)) = map.next_key()? {
            if name == "data" {
                data = Some(EventData::from_raw(map.next_value()?));
                continue;
            }
            let value: Value = map.next_value()?;
            if let Some(i) = STRING_ATTRIBUTES.iter().position(|a| *a == name) {
                attrs[i] = match value {
                    Value::Null => None,
                    Value::String(s) => Some(s),
                    _ => return Err(fail(DecodeError::NotAString(name.into_owned()))),
                };
                continue;
            }
            match extension_text(&name, value).map_err(fail)? {
                Some(text) => _ = extensions.insert(crate::ext::name(&name), text),
                None => _ = extensions.remove(name.as_ref()),
            }
        }
        let [specversion, id, source, ty, subject, time, datacontenttype, dataschema, data_base64] = attrs;
        check_spec_version(specversion.as_deref()).map_err(fail)?;
        let id = required(id, "id").map_err(fail)?;
        let source = required(source, "source").map_err(fail)?;
        let ty = required(ty, "type").map_err(fail)?;
        Ok(CloudEvent { id, source, ty, subject, time, datacontenttype, dataschema, data, data_base64, extensions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Serializing writes exactly the bytes of the `Value` encoding: key order, optional
    /// attributes, nested data, and an extension that shadows a context attribute.
    #[test]
    fn serializing_matches_the_value_encoding_byte_for_byte() {
        let mut full = CloudEvent::new("id-1", "src", "t.ype")
            .with_data(json!({"z": [1, 2.5, null, "\u{7}\"q\""], "a": {"b": true}}))
            .with_ext("zeta", "last")
            .with_ext("aardvark", "first")
            .with_ext("capstanrun", "r-1");
        full.subject = Some("subj".into());
        full.time = Some("2026-11-27T10:00:00Z".into());
        full.datacontenttype = Some("application/json".into());
        full.dataschema = Some("https://schema".into());
        let mut shadowed = CloudEvent::new("id-2", "src", "t");
        shadowed.extensions.insert("source".into(), "from-an-extension".into());
        let mut binary = CloudEvent::new("id-3", "src", "t");
        binary.data_base64 = Some("AAEC".into());
        for event in [full, shadowed, binary, CloudEvent::new("id-4", "s", "t")] {
            let direct = serde_json::to_vec(&event).expect("serializes");
            let via_value = serde_json::to_vec(&event.to_value()).expect("serializes");
            assert_eq!(String::from_utf8_lossy(&direct), String::from_utf8_lossy(&via_value));
            assert_eq!(event.to_json(), via_value);
        }
    }

    #[test]
    fn round_trips_with_extensions() {
        let ev = CloudEvent::new("1", "/capstan", "t").with_data(json!({"a": 1})).with_ext("capstanrun", "r1");
        let back = CloudEvent::from_json(&ev.to_json()).unwrap();
        assert_eq!(back, ev);
    }

    /// Numbers in the data keep every bit through an encode and a decode. serde_json's default
    /// float parser may be off by one unit in the last place (found by the cloudevent fuzz
    /// target with 300000000000001200012807); the workspace turns on its `float_roundtrip`.
    #[test]
    fn data_numbers_round_trip_exactly() {
        for text in ["300000000000001200012807", "3.000000000000012e23", "0.1", "1e-300", "-2.5e300"] {
            let json = format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","data":{text}}}"#);
            let ev = CloudEvent::from_json(json.as_bytes()).expect("decodes");
            let back = CloudEvent::from_json(&ev.to_json()).expect("decodes");
            assert_eq!(back, ev, "{text}");
        }
    }

    #[test]
    fn rejects_bad_envelopes() {
        let cases = [
            (json!({"id": "1", "source": "s", "type": "t"}), DecodeError::Missing("specversion")),
            (
                json!({"specversion": "0.3", "id": "1", "source": "s", "type": "t"}),
                DecodeError::SpecVersion("0.3".into()),
            ),
            (json!({"specversion": "1.0", "source": "s", "type": "t"}), DecodeError::Missing("id")),
            (json!({"specversion": "1.0", "id": "1", "type": "t"}), DecodeError::Missing("source")),
            (json!({"specversion": "1.0", "id": "1", "source": "s"}), DecodeError::Missing("type")),
            (
                json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "Bad": "x"}),
                DecodeError::ExtensionName("Bad".into()),
            ),
            (json!([1]), DecodeError::NotAnObject),
        ];
        for (input, expected) in cases {
            assert_eq!(CloudEvent::from_value(input.clone()).unwrap_err(), expected, "{input}");
        }
        assert!(matches!(CloudEvent::from_json(b"{nope"), Err(DecodeError::Json(_))));
    }

    /// The direct reader (`Deserialize`, which batches use) accepts and refuses what
    /// `from_value` does, with the same message, and lends the protocol's extension names.
    #[test]
    fn reading_straight_from_text_checks_as_from_value_does() {
        let texts = [
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":[1,{"b":null}]},"capstanrun":"r"}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":null,"subject":null}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","capstan\u0072un":"escaped","x1":true,"x2":2.5}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","x":"a","x":null}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","x":null,"x":"b"}"#,
            r#"{"id":"1","source":"s","type":"t"}"#,
            r#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":3}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad":"x"}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","x":{"nested":1}}"#,
            r#"[1]"#,
        ];
        for text in texts {
            let direct = serde_json::from_str::<CloudEvent>(text);
            let value: Value = serde_json::from_str(text).expect("valid JSON");
            match CloudEvent::from_value(value) {
                Ok(expected) => assert_eq!(direct.expect(text), expected, "{text}"),
                Err(DecodeError::NotAnObject) => assert!(direct.is_err(), "{text}"),
                Err(e) => {
                    let message = direct.expect_err(text).to_string();
                    assert!(message.starts_with(&e.to_string()), "{text}: {message} / {e}");
                }
            }
        }
        let ev: CloudEvent = serde_json::from_str(texts[2]).unwrap();
        assert_eq!(ev.ext(crate::ext::RUN), Some("escaped"));
        let lent =
            |ev: &CloudEvent, name: &str| ev.extensions.keys().any(|k| k == name && matches!(k, Cow::Borrowed(_)));
        assert!(lent(&ev, crate::ext::RUN), "a protocol name is lent, not copied");
        assert!(!lent(&ev, "x1"));
    }

    #[test]
    fn numeric_extensions_become_strings() {
        let ev = CloudEvent::from_value(
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "capstanattempt": 2}),
        )
        .unwrap();
        assert_eq!(ev.ext("capstanattempt"), Some("2"));
    }
}
