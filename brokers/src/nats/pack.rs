//! Packs over NATS (see `crate::pack`): the headers of a pack, and a part's dead letter.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName};
use async_trait::async_trait;

use super::subscription::Original;
use super::{KEY_HEADER, MSG_ID_HEADER, encode, header_bytes};
use crate::binding::{self, BATCH_CONTENT_TYPE};
use crate::pack::{self as packs, DeadLetterPart, KEYS_HEADER, Piece};
use crate::{Error, Message, Result};

/// Encodes the messages of one topic as NATS messages (headers, payload): packs, and a lone
/// message in structured mode. A message over the limit by itself fails the whole call.
pub(super) fn encode_packed(messages: &[&Message], limit: usize) -> Result<Vec<(HeaderMap, Vec<u8>)>> {
    let (topic, id) = messages.iter().fold((0, 0), |(t, i), m| (t.max(m.topic.len()), i.max(m.event.id.len())));
    // Every header line is `name: value\r\n`; the id is `<topic>:pack:<event id>:<count>`.
    let overhead = 12
        + (binding::CONTENT_TYPE.len() + BATCH_CONTENT_TYPE.len() + 4)
        + 4
        + (MSG_ID_HEADER.len() + topic + 6 + id + 1 + 3 + 4);
    let mut out = Vec::new();
    for piece in packs::pieces(messages, overhead, limit)? {
        out.push(match piece {
            Piece::Alone(m) => plain(m, limit)?,
            Piece::Pack(pack) => {
                let mut headers = HeaderMap::new();
                headers.insert(binding::CONTENT_TYPE, BATCH_CONTENT_TYPE);
                headers.insert(KEYS_HEADER, pack.keys.as_str());
                headers.insert(MSG_ID_HEADER, pack.id().as_str());
                checked(headers, pack.body, limit)?
            }
        });
    }
    Ok(out)
}

/// A message alone, in structured mode: three headers, where binary mode has one per
/// attribute, and the client parses (and allocates) every header of every delivery.
pub(super) fn plain(m: &Message, limit: usize) -> Result<(HeaderMap, Vec<u8>)> {
    const CONTENT_TYPE: HeaderName = HeaderName::from_static(binding::CONTENT_TYPE);
    const KEY: HeaderName = HeaderName::from_static(KEY_HEADER);
    const MSG_ID: HeaderName = HeaderName::from_static(MSG_ID_HEADER);
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, binding::STRUCTURED_CONTENT_TYPE);
    headers.insert(KEY, m.key.as_str());
    headers.insert(MSG_ID, format!("{}:{}", m.topic, m.event.id));
    checked(headers, m.event.to_json(), limit)
}

fn checked(headers: HeaderMap, payload: Vec<u8>, limit: usize) -> Result<(HeaderMap, Vec<u8>)> {
    let size = header_bytes(&headers) + payload.len();
    if size > limit {
        return Err(Error::TooLarge { size, limit });
    }
    Ok((headers, payload))
}

/// Whether a delivered NATS message is a pack.
pub(super) fn is_pack(headers: &HeaderMap) -> bool {
    packs::is_pack(headers.get(binding::CONTENT_TYPE).or_else(|| headers.get("Content-Type")).map(|v| v.as_str()))
}

/// The messages of a pack on `topic`.
pub(super) fn decode(headers: &HeaderMap, payload: &[u8], topic: &str) -> Result<Vec<Message>> {
    packs::decode(payload, headers.get(KEYS_HEADER).map(|v| v.as_str()), topic)
}

/// Moves one part of a pack, alone and in binary mode, to the dead-letter stream.
pub(super) struct DeadParts {
    pub(super) js: jetstream::Context,
    pub(super) dead_subject: Arc<str>,
}

#[async_trait]
impl DeadLetterPart for DeadParts {
    async fn dead_letter_part(&self, part: &Message, reason: &str) -> Result<()> {
        let (headers, payload) = encode(part)?;
        let original = Original {
            js: self.js.clone(),
            dead_subject: Arc::clone(&self.dead_subject),
            headers: Some(headers),
            payload: payload.into(),
        };
        original.copy_to_dead_letters(reason).await
    }
}
