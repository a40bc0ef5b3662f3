//! Packs: several messages of one topic carried by one NATS message (see
//! [`crate::Broker::publish_packed`]). Each JetStream message costs the server a publish, its
//! acknowledgement, a delivery, an ack and a delete, whatever it carries, so a publisher with many
//! messages for one subject (a worker's reports, the engine's awards to one worker) sends them
//! as one.
//!
//! On the wire a pack is a CloudEvents JSON batch: `content-type:
//! application/cloudevents-batch+json`, the payload a JSON array of structured-mode events, and
//! the keys, in the same order, as a JSON array in the `capstan-keys` header. A pack of one
//! message is sent as a plain binary-mode message.
//!
//! A subscriber hands out each event of a pack as a delivery of its own. They share the pack's
//! reply subject: the pack is acked once every part is acked or dead-lettered (a part's dead
//! letter is that event alone, in binary mode, with the reason), and the first part nacked or
//! dropped unsettled NAKs the pack, so it comes again whole.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use async_trait::async_trait;

use super::subscription::{Original, Pending, settle};
use super::{MSG_ID_HEADER, encode, header_bytes};
use crate::binding::{self, BATCH_CONTENT_TYPE};
use crate::{Acker, Delivery, Error, Message, Result};

/// The header carrying the keys of a pack's messages, as a JSON array of strings.
pub const KEYS_HEADER: &str = "capstan-keys";
/// At most this many messages go in one pack, so that a redelivered pack stays small.
pub(super) const MAX_PACK: usize = 512;

/// Encodes the messages of one topic as NATS messages (headers, payload): packs of up to
/// [`MAX_PACK`] messages, each within `limit` bytes, and a lone message plainly. A message
/// over the limit by itself fails the whole call.
pub(super) fn encode_packed(topic: &str, messages: &[Message], limit: usize) -> Result<Vec<(HeaderMap, Vec<u8>)>> {
    if let [only] = messages {
        return plain(only, limit).map(|m| vec![m]);
    }
    let mut out = Vec::new();
    let mut pack: Vec<(&Message, Vec<u8>, String)> = Vec::new();
    // Bytes of the pack so far: the fixed headers, then per part its event and key (each with
    // a separator).
    let fixed = 12 + (binding::CONTENT_TYPE.len() + BATCH_CONTENT_TYPE.len() + 4) + (KEYS_HEADER.len() + 4 + 2);
    let id_header = |first: &Message, n: usize| format!("{topic}:pack:{}:{n}", first.event.id);
    let mut size = 0;
    for m in messages {
        let event = m.event.to_json();
        let key = serde_json::to_string(&m.key).expect("a string always serializes");
        let part = event.len() + key.len() + 2;
        let id_len = MSG_ID_HEADER.len() + 4 + id_header(pack.first().map_or(m, |p| p.0), pack.len() + 1).len();
        if !pack.is_empty() && (pack.len() == MAX_PACK || fixed + id_len + size + part > limit) {
            out.push(finish(&mut pack, topic, limit, &id_header)?);
            size = 0;
        }
        size += part;
        pack.push((m, event, key));
    }
    if !pack.is_empty() {
        out.push(finish(&mut pack, topic, limit, &id_header)?);
    }
    Ok(out)
}

/// A message alone, in binary mode.
fn plain(m: &Message, limit: usize) -> Result<(HeaderMap, Vec<u8>)> {
    let (headers, payload) = encode(m)?;
    let size = header_bytes(&headers) + payload.len();
    if size > limit {
        return Err(Error::TooLarge { size, limit });
    }
    Ok((headers, payload))
}

/// The NATS message of the parts gathered so far (taken); a lone part goes plainly.
fn finish(
    pack: &mut Vec<(&Message, Vec<u8>, String)>,
    topic: &str,
    limit: usize,
    id_header: &dyn Fn(&Message, usize) -> String,
) -> Result<(HeaderMap, Vec<u8>)> {
    let parts = std::mem::take(pack);
    if let [(only, _, _)] = parts.as_slice() {
        return plain(only, limit);
    }
    let mut payload = Vec::with_capacity(parts.iter().map(|p| p.1.len() + 1).sum::<usize>() + 1);
    let mut keys = String::with_capacity(parts.iter().map(|p| p.2.len() + 1).sum::<usize>() + 1);
    for (i, (_, event, key)) in parts.iter().enumerate() {
        payload.push(if i == 0 { b'[' } else { b',' });
        payload.extend_from_slice(event);
        keys.push(if i == 0 { '[' } else { ',' });
        keys.push_str(key);
    }
    payload.push(b']');
    keys.push(']');
    let mut headers = HeaderMap::new();
    headers.insert(binding::CONTENT_TYPE, BATCH_CONTENT_TYPE);
    headers.insert(KEYS_HEADER, keys.as_str());
    headers.insert(MSG_ID_HEADER, id_header(parts[0].0, parts.len()).as_str());
    let size = header_bytes(&headers) + payload.len();
    if size > limit {
        // Only a message too large by itself gets here: the pack was cut to fit otherwise.
        return Err(Error::TooLarge { size, limit });
    }
    tracing::trace!(topic, parts = parts.len(), bytes = size, "pack");
    Ok((headers, payload))
}

/// The messages of a pack, with their keys; `Err` with the reason when it is malformed.
pub(super) fn decode_pack(headers: &HeaderMap, payload: &[u8], topic: &str) -> Result<Vec<Message>> {
    let events = binding::decode_batch(payload)?;
    if events.is_empty() {
        return Err(Error::Invalid("an empty pack".into()));
    }
    let keys: Vec<String> = match headers.get(KEYS_HEADER) {
        Some(v) => serde_json::from_str(v.as_str())
            .map_err(|e| Error::Invalid(format!("{KEYS_HEADER} is not a JSON array of strings: {e}")))?,
        None => return Err(Error::Invalid(format!("a pack without {KEYS_HEADER}"))),
    };
    if keys.len() != events.len() {
        return Err(Error::Invalid(format!("a pack of {} events with {} keys", events.len(), keys.len())));
    }
    Ok(events.into_iter().zip(keys).map(|(event, key)| Message { topic: topic.to_string(), key, event }).collect())
}

/// Whether a delivered NATS message is a pack.
pub(super) fn is_pack(headers: &HeaderMap) -> bool {
    headers
        .get(binding::CONTENT_TYPE)
        .or_else(|| headers.get("Content-Type"))
        .is_some_and(|v| binding::is_batch_content_type(v.as_str()))
}

/// One delivery per message of a pack, settled together through `pending`.
pub(super) fn deliveries(
    messages: Vec<Message>,
    redeliveries: u32,
    pending: Arc<Pending>,
    original: Original,
) -> Vec<Delivery> {
    let shared = Arc::new(Shared { pending, original, left: AtomicUsize::new(messages.len()) });
    messages
        .into_iter()
        .map(|m| {
            let message = Arc::new(m);
            let acker =
                PartAcker { pack: Arc::clone(&shared), message: Arc::clone(&message), settled: AtomicBool::new(false) };
            Delivery { message, redeliveries, acker: Box::new(acker) }
        })
        .collect()
}

/// What the parts of one pack share.
struct Shared {
    pending: Arc<Pending>,
    original: Original,
    /// Parts neither acked nor dead-lettered yet.
    left: AtomicUsize,
}

impl Shared {
    async fn settle(&self, kind: AckKind) -> Result<()> {
        match self.pending.take() {
            Some(reply) => settle(&self.pending.client, reply, kind).await,
            None => Ok(()),
        }
    }

    /// One part is done with; the last one acks the pack.
    async fn done(&self) -> Result<()> {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            return self.settle(AckKind::Ack).await;
        }
        Ok(())
    }
}

/// Settles one part of a pack. A second settle is a no-op; dropping it unsettled NAKs the pack.
struct PartAcker {
    pack: Arc<Shared>,
    message: Arc<Message>,
    settled: AtomicBool,
}

impl PartAcker {
    /// Marks this part settled; `false` if it was already.
    fn claim(&self) -> bool {
        !self.settled.swap(true, Ordering::AcqRel)
    }
}

#[async_trait]
impl Acker for PartAcker {
    async fn ack(&self) -> Result<()> {
        if !self.claim() {
            return Ok(());
        }
        self.pack.done().await
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        if !self.claim() {
            return Ok(());
        }
        self.pack.settle(AckKind::Nak((!delay.is_zero()).then_some(delay))).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        if self.settled.load(Ordering::Acquire) || self.pack.pending.is_settled() {
            return Ok(());
        }
        let (headers, payload) = encode(&self.message)?;
        let part = Original { headers: Some(headers), payload: payload.into(), ..self.pack.original.clone() };
        part.copy_to_dead_letters(reason).await?;
        if !self.claim() {
            return Ok(());
        }
        self.pack.done().await
    }
}

impl Drop for PartAcker {
    fn drop(&mut self) {
        if !self.claim() {
            return;
        }
        let Some(reply) = self.pack.pending.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.pack.pending.client.clone();
            runtime.spawn(async move { settle(&client, reply, AckKind::Nak(None)).await.ok() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats::KEY_HEADER;
    use capstan_proto::CloudEvent;

    fn message(i: usize, data_len: usize) -> Message {
        let event = CloudEvent::new(format!("id-{i}"), "test", "t").with_payload(&"x".repeat(data_len)).unwrap();
        Message { topic: "capstan.inputs".into(), key: format!("run \"{i}\""), event }
    }

    #[test]
    fn a_pack_decodes_to_its_messages_and_keys_in_order() {
        let messages: Vec<Message> = (0..5).map(|i| message(i, 10)).collect();
        let encoded = encode_packed("capstan.inputs", &messages, 1 << 20).unwrap();
        assert_eq!(encoded.len(), 1, "five small messages make one pack");
        let (headers, payload) = &encoded[0];
        assert!(is_pack(headers));
        assert_eq!(decode_pack(headers, payload, "capstan.inputs").unwrap(), messages);
    }

    #[test]
    fn packs_are_cut_to_the_size_limit_and_a_lone_part_goes_plainly() {
        let messages: Vec<Message> = (0..7).map(|i| message(i, 300)).collect();
        let limit = 1_200;
        let encoded = encode_packed("capstan.inputs", &messages, limit).unwrap();
        assert!(encoded.len() > 1, "seven messages of ~400 bytes do not fit 1,200 bytes");
        let mut decoded = Vec::new();
        for (headers, payload) in &encoded {
            assert!(header_bytes(headers) + payload.len() <= limit);
            if is_pack(headers) {
                decoded.extend(decode_pack(headers, payload, "capstan.inputs").unwrap());
            } else {
                let pairs: Vec<(String, String)> = headers
                    .iter()
                    .flat_map(|(n, vs)| vs.iter().map(move |v| (n.to_string(), v.as_str().to_string())))
                    .collect();
                let event = binding::decode(
                    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    None,
                    payload,
                    binding::HeaderPrefix::HTTP,
                )
                .unwrap();
                let key = headers.get(KEY_HEADER).unwrap().as_str().to_string();
                decoded.push(Message { topic: "capstan.inputs".into(), key, event });
            }
        }
        assert_eq!(decoded, messages);
    }

    #[test]
    fn a_message_over_the_limit_by_itself_is_too_large() {
        let messages = vec![message(0, 10), message(1, 5_000)];
        assert!(matches!(encode_packed("capstan.inputs", &messages, 2_000), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn a_malformed_pack_is_refused() {
        let messages: Vec<Message> = (0..2).map(|i| message(i, 1)).collect();
        let (mut headers, payload) = encode_packed("t", &messages, 1 << 20).unwrap().remove(0);
        assert!(decode_pack(&headers, b"[{\"id\": 1}]", "t").is_err());
        headers.insert(KEYS_HEADER, "[\"only one\"]");
        assert!(decode_pack(&headers, &payload, "t").is_err());
    }
}
