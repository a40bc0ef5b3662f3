//! Fuzzes the CloudEvents decoders: structured JSON (`CloudEvent::from_json`) and the protocol
//! bindings' `decode` (binary mode from headers and a body, or structured by content type) for
//! every header prefix. The input is read as header lines `name: value` (split at the first
//! ": "), an empty line, then the body; without an empty line it is a structured event. Nothing
//! may panic, and an event that decodes must encode and decode again to the same event.
#![no_main]

use capstan_brokers::binding::{self, HeaderPrefix};
use capstan_proto::CloudEvent;
use libfuzzer_sys::fuzz_target;

const PREFIXES: [HeaderPrefix; 4] =
    [HeaderPrefix::HTTP, HeaderPrefix::KAFKA, HeaderPrefix::AMQP, HeaderPrefix::AMQP_UNDERSCORE];

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = CloudEvent::from_json(data) {
        let again = CloudEvent::from_json(&event.to_json()).expect("an encoded event decodes");
        assert_eq!(again, event, "structured JSON does not round-trip");
    }
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (&b""[..], data),
    };
    let Ok(head) = std::str::from_utf8(head) else { return };
    let headers: Vec<(&str, &str)> = head.lines().filter_map(|l| l.split_once(": ")).collect();
    for prefix in PREFIXES {
        let Ok(event) = binding::decode(headers.iter().copied(), None, body, prefix) else { continue };
        let encoded = binding::encode(&event, prefix).expect("a decoded event encodes");
        let again = binding::decode(
            encoded.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            encoded.content_type.as_deref(),
            &encoded.body,
            prefix,
        )
        .expect("an encoded event decodes");
        assert_eq!(again, event, "the {prefix:?} binding does not round-trip");
    }
});
