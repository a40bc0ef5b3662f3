//! The `data` of a [`CloudEvent`](crate::CloudEvent), kept as the JSON text it travels as.
//!
//! A message's data is written once by its sender (serialized straight from a payload struct)
//! and read once by its consumer (deserialized straight into one). In between it is published,
//! sized, queued, cloned into deliveries and dropped, all of which a `serde_json::Value` tree
//! made cost an allocation per key and value; as text it is one allocation. Binary-mode bodies
//! are the text itself, and a body read from a broker is checked to be JSON, not parsed into
//! a tree.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// Valid JSON text: the data of a CloudEvent.
#[derive(Clone)]
pub struct EventData(Box<RawValue>);

impl EventData {
    /// Serializes a payload.
    pub fn new<T: Serialize + ?Sized>(payload: &T) -> serde_json::Result<Self> {
        serde_json::value::to_raw_value(payload).map(EventData)
    }

    /// The JSON text of a value, which always serializes.
    pub fn from_value(value: &Value) -> Self {
        EventData::new(value).expect("a JSON value serializes")
    }

    /// Checks that `text` is one JSON value and keeps it as it is (surrounding whitespace
    /// dropped).
    pub fn from_json(text: &[u8]) -> serde_json::Result<Self> {
        let raw: &RawValue = serde_json::from_slice(text)?;
        Ok(EventData(raw.to_owned()))
    }

    /// JSON text already checked by the parser that read it.
    pub(crate) fn from_raw(raw: Box<RawValue>) -> Self {
        EventData(raw)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The data as a `Value`.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.as_str()).expect("EventData holds valid JSON")
    }

    /// Deserializes the data into a payload.
    pub fn decode<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.as_str())
    }

    /// The string, when the data is a JSON string (text data of a non-JSON content type).
    pub fn as_string(&self) -> Option<String> {
        if self.as_str().starts_with('"') { self.decode().ok() } else { None }
    }
}

impl From<Value> for EventData {
    fn from(value: Value) -> Self {
        EventData::from_value(&value)
    }
}

/// Equal when the JSON values are, whatever the spelling (key order, spaces, escapes).
impl PartialEq for EventData {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

impl std::fmt::Debug for EventData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for EventData {
    /// From a `serde_json` deserializer the text is kept as it is; from any other (a `Value`,
    /// say) the value is read and written again.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(EventData::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_the_text_and_compares_by_value() {
        let data = EventData::from_json(br#" {"b": [1, 2.5, null], "a": "x"} "#).expect("json");
        assert_eq!(data.as_str(), r#"{"b": [1, 2.5, null], "a": "x"}"#);
        assert_eq!(data, EventData::from_value(&json!({"a": "x", "b": [1, 2.5, null]})));
        assert_ne!(data, EventData::from_value(&json!({"a": "y", "b": [1, 2.5, null]})));
        assert_eq!(data.to_value(), json!({"a": "x", "b": [1, 2.5, null]}));
        assert!(EventData::from_json(b"{nope").is_err());
        assert!(EventData::from_json(b"1 2").is_err());
    }

    #[test]
    fn strings_and_payloads() {
        assert_eq!(EventData::from_value(&json!("hi \"you\"")).as_string().as_deref(), Some("hi \"you\""));
        assert_eq!(EventData::from_value(&json!({"a": 1})).as_string(), None);
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct P {
            n: u32,
            s: String,
        }
        let p = P { n: 7, s: "é\n".into() };
        let data = EventData::new(&p).expect("serializes");
        assert_eq!(data.decode::<P>().expect("decodes"), p);
        let encoded = serde_json::to_string(&json!({"data": data})).expect("serializes");
        assert_eq!(encoded, r#"{"data":{"n":7,"s":"é\n"}}"#);
    }
}
