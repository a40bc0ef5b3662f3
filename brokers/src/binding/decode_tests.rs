//! `from_binary` against the decoder it replaced, which built a JSON object of the attributes
//! and read it with `CloudEvent::from_value`: the same event, or the same error, for random
//! header sets (names in any case, repeated, unprefixed, invalid) and bodies.

use capstan_proto::{CloudEvent, EventData};

use super::*;

/// The decoder before: attributes through a `serde_json` object.
fn through_json<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
    prefix: HeaderPrefix,
) -> Result<CloudEvent> {
    let p = prefix.0.to_ascii_lowercase();
    let mut map = serde_json::Map::new();
    let mut content_type = None;
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if lower == CONTENT_TYPE {
            content_type = Some(value.to_string());
            map.insert("datacontenttype".into(), value.into());
        } else if let Some(attr) = lower.strip_prefix(&p) {
            if matches!(attr, "data" | "data_base64" | "datacontenttype") {
                return Err(Error::Invalid(format!("header {name}: not allowed in binary mode")));
            }
            map.insert(attr.to_string(), value.into());
        }
    }
    let mut data = None;
    if !body.is_empty() {
        if is_json_content_type(content_type.as_deref()) {
            data = Some(EventData::from_json(body).map_err(|e| Error::Invalid(format!("body is not JSON: {e}")))?);
        } else if let Ok(text) = std::str::from_utf8(body) {
            map.insert("data".into(), text.into());
        } else {
            map.insert("data_base64".into(), base64(body).into());
        }
    }
    let mut event =
        CloudEvent::from_value(serde_json::Value::Object(map)).map_err(|e| Error::Invalid(e.to_string()))?;
    if data.is_some() {
        event.data = data;
    }
    Ok(event)
}

/// SplitMix64, seeded per case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick<'t>(&mut self, from: &[&'t str]) -> &'t str {
        from[(self.next() % from.len() as u64) as usize]
    }

    /// Each ASCII letter in upper or lower case at random.
    fn mixed_case(&mut self, s: &str) -> String {
        s.chars().map(|c| if self.next().is_multiple_of(2) { c.to_ascii_uppercase() } else { c }).collect()
    }
}

#[test]
fn decodes_as_the_json_object_decoder_did() {
    const NAMES: &[&str] = &[
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "dataschema",
        "capstanrun",
        "capstantoken",
        "data",
        "data_base64",
        "datacontenttype",
        "Bad-Ext",
        "x",
        "waytoolongforanextension1",
    ];
    const VALUES: &[&str] = &["1.0", "0.3", "", "e1", "r-1", "42", "dev.capstan.task.bid.v1"];
    const TYPES: &[&str] = &["application/json", "text/plain", "application/x+json; charset=utf-8", "Text/JSON"];
    const BODIES: &[&[u8]] = &[b"", b"{\"a\":1}", b"{nope", b"plain text", b"\xff\xfe", b"\"s\""];
    let mut differences = Vec::new();
    for seed in 0..20_000u64 {
        let mut rng = Rng(seed);
        let prefix = [HeaderPrefix::HTTP, HeaderPrefix::KAFKA, HeaderPrefix::AMQP][(rng.next() % 3) as usize];
        let mut headers: Vec<(String, String)> = Vec::new();
        // Mostly a valid core, so that the later checks are reached too.
        if !rng.next().is_multiple_of(4) {
            for (name, value) in [("specversion", "1.0"), ("id", "e1"), ("source", "s"), ("type", "t")] {
                headers.push((format!("{}{name}", prefix.0), value.to_string()));
            }
        }
        for _ in 0..rng.next() % 6 {
            let name = match rng.next() % 5 {
                0 => rng.mixed_case(CONTENT_TYPE),
                1 => rng.pick(NAMES).to_string(),
                _ => {
                    let n = rng.pick(NAMES);
                    let p = rng.mixed_case(prefix.0);
                    rng.mixed_case(&format!("{p}{n}"))
                }
            };
            let value = if name.eq_ignore_ascii_case(CONTENT_TYPE) { rng.pick(TYPES) } else { rng.pick(VALUES) };
            headers.push((name, value.to_string()));
        }
        let body = BODIES[(rng.next() % BODIES.len() as u64) as usize];
        let pairs = || headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let now = from_binary(pairs(), body, prefix).map_err(|e| e.to_string());
        let before = through_json(pairs(), body, prefix).map_err(|e| e.to_string());
        if now != before {
            differences.push(format!("seed {seed}: {headers:?} {body:?}\n  now {now:?}\n  was {before:?}"));
        }
    }
    assert!(differences.is_empty(), "{} differences, first:\n{}", differences.len(), differences[0]);
}
