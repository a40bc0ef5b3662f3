//! Packs: several messages of one topic carried by one broker message (see
//! [`crate::Broker::publish_packed`]), shared by the brokers that pack (NATS, RabbitMQ). A broker
//! message costs a broker about the same whatever it carries, so a publisher with many
//! messages for one topic (a worker's reports, the engine's awards to one worker) sends them as
//! one.
//!
//! On the wire a pack is a CloudEvents JSON batch: the content type
//! `application/cloudevents-batch+json`, the body a JSON array of structured-mode events, and
//! the keys, in the same order, as a JSON array of strings in the `capstan-keys` header. A
//! lone message goes as a plain message of the broker's binding.
//!
//! A subscriber hands out each event of a pack as a delivery of its own. They share the acker
//! of the broker message: it is acked once every part is acked or dead-lettered (a part's dead
//! letter is that event alone, with the reason), and the first part nacked or dropped unsettled
//! nacks it, so the pack comes again whole.

#![cfg_attr(not(any(feature = "nats", feature = "amqp")), allow(dead_code))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::binding;
use crate::{Acker, Delivery, Error, Message, Result};

/// The header carrying the keys of a pack's messages, as a JSON array of strings.
pub const KEYS_HEADER: &str = "capstan-keys";
/// At most this many messages go in one pack, so that a redelivered pack stays small.
pub const MAX_PACK: usize = 512;

/// What one broker message carries: a message alone, or a pack.
#[derive(Debug)]
pub(crate) enum Piece<'m> {
    /// One message, for the broker's own binding.
    Alone(&'m Message),
    /// Several messages of one topic.
    Pack(Pack<'m>),
}

/// The encoded parts of a pack.
#[derive(Debug)]
pub(crate) struct Pack<'m> {
    /// The JSON array of the events.
    pub(crate) body: Vec<u8>,
    /// The JSON array of the keys (the value of [`KEYS_HEADER`]).
    pub(crate) keys: String,
    /// The messages, in order.
    pub(crate) messages: Vec<&'m Message>,
}

impl Pack<'_> {
    /// A stable id of the pack (for a broker's duplicate detection): topic, first event id and
    /// count.
    pub(crate) fn id(&self) -> String {
        let first = self.messages[0];
        format!("{}:pack:{}:{}", first.topic, first.event.id, self.messages.len())
    }
}

/// The messages grouped by topic, the topics in the order they first come, each topic's
/// messages in order.
pub(crate) fn by_topic(messages: &[Message]) -> Vec<(&str, Vec<&Message>)> {
    let mut topics: Vec<(&str, Vec<&Message>)> = Vec::new();
    for m in messages {
        match topics.iter_mut().find(|(t, _)| *t == m.topic) {
            Some((_, same)) => same.push(m),
            None => topics.push((&m.topic, vec![m])),
        }
    }
    topics
}

/// Cuts the messages (all of one topic) into pieces: packs of up to [`MAX_PACK`] messages whose
/// body, keys and `overhead` (the broker's other bytes per message, such as fixed headers) stay
/// within `limit`, and a message that would be alone in its pack as [`Piece::Alone`], for the
/// broker to encode and check. A message over the limit by itself fails the whole call.
pub(crate) fn pieces<'m>(messages: &[&'m Message], overhead: usize, limit: usize) -> Result<Vec<Piece<'m>>> {
    if let [only] = messages {
        // Alone whatever its size: the broker encodes and checks it in its own binding.
        return Ok(vec![Piece::Alone(only)]);
    }
    let mut out = Vec::new();
    let mut pack: Vec<(&'m Message, Vec<u8>, String)> = Vec::new();
    // Each part costs its event and key plus a separator each; the brackets come once.
    let base = overhead + KEYS_HEADER.len() + 2 + 2;
    let mut size = base;
    for &m in messages {
        let event = m.event.to_json();
        let key = serde_json::to_string(&m.key).expect("a string always serializes");
        let part = event.len() + key.len() + 2;
        if base + part > limit {
            return Err(Error::TooLarge { size: base + part, limit });
        }
        if !pack.is_empty() && (pack.len() == MAX_PACK || size + part > limit) {
            out.push(finish(std::mem::take(&mut pack)));
            size = base;
        }
        size += part;
        pack.push((m, event, key));
    }
    if !pack.is_empty() {
        out.push(finish(pack));
    }
    Ok(out)
}

fn finish(parts: Vec<(&Message, Vec<u8>, String)>) -> Piece<'_> {
    if let [(only, _, _)] = parts.as_slice() {
        return Piece::Alone(only);
    }
    let mut body = Vec::with_capacity(parts.iter().map(|p| p.1.len() + 1).sum::<usize>() + 1);
    let mut keys = String::with_capacity(parts.iter().map(|p| p.2.len() + 1).sum::<usize>() + 1);
    let mut messages = Vec::with_capacity(parts.len());
    for (i, (m, event, key)) in parts.into_iter().enumerate() {
        body.push(if i == 0 { b'[' } else { b',' });
        body.extend_from_slice(&event);
        keys.push(if i == 0 { '[' } else { ',' });
        keys.push_str(&key);
        messages.push(m);
    }
    body.push(b']');
    keys.push(']');
    Piece::Pack(Pack { body, keys, messages })
}

/// Whether a content type says the message is a pack.
pub(crate) fn is_pack(content_type: Option<&str>) -> bool {
    content_type.is_some_and(binding::is_batch_content_type)
}

/// The messages of a pack on `topic`, with their keys; `Err` with the reason when it is
/// malformed.
pub(crate) fn decode(body: &[u8], keys: Option<&str>, topic: &str) -> Result<Vec<Message>> {
    let events = binding::decode_batch(body)?;
    if events.is_empty() {
        return Err(Error::Invalid("an empty pack".into()));
    }
    let keys: Vec<String> = match keys {
        Some(v) => serde_json::from_str(v)
            .map_err(|e| Error::Invalid(format!("{KEYS_HEADER} is not a JSON array of strings: {e}")))?,
        None => return Err(Error::Invalid(format!("a pack without {KEYS_HEADER}"))),
    };
    if keys.len() != events.len() {
        return Err(Error::Invalid(format!("a pack of {} events with {} keys", events.len(), keys.len())));
    }
    Ok(events.into_iter().zip(keys).map(|(event, key)| Message { topic: topic.to_string(), key, event }).collect())
}

/// How a broker moves one part of a pack, alone, to its dead letters with the reason.
#[async_trait]
pub(crate) trait DeadLetterPart: Send + Sync {
    async fn dead_letter_part(&self, part: &Message, reason: &str) -> Result<()>;
}

/// One delivery per message of a pack, settled together through `whole`, the acker of the
/// broker message that carries them.
pub(crate) fn deliveries(
    messages: Vec<Message>,
    redeliveries: u32,
    whole: Box<dyn Acker>,
    dead: Arc<dyn DeadLetterPart>,
) -> Vec<Delivery> {
    let shared = Arc::new(Shared { whole, dead, left: AtomicUsize::new(messages.len()) });
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
    whole: Box<dyn Acker>,
    dead: Arc<dyn DeadLetterPart>,
    /// Parts neither acked nor dead-lettered yet.
    left: AtomicUsize,
}

impl Shared {
    /// One part is done with; the last one acks the pack.
    async fn done(&self) -> Result<()> {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            return self.whole.ack().await;
        }
        Ok(())
    }
}

/// Settles one part of a pack. A second settle is a no-op; dropping it unsettled nacks the
/// pack at once.
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
        self.pack.whole.nack(delay).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        if self.settled.load(Ordering::Acquire) {
            return Ok(());
        }
        self.pack.dead.dead_letter_part(&self.message, reason).await?;
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
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pack = Arc::clone(&self.pack);
            runtime.spawn(async move { pack.whole.nack(Duration::ZERO).await.ok() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::CloudEvent;

    fn message(i: usize, data_len: usize) -> Message {
        let event = CloudEvent::new(format!("id-{i}"), "test", "t").with_payload(&"x".repeat(data_len)).unwrap();
        Message { topic: "capstan.inputs".into(), key: format!("run \"{i}\""), event }
    }

    fn refs(messages: &[Message]) -> Vec<&Message> {
        messages.iter().collect()
    }

    fn packed(pieces: &[Piece<'_>]) -> Vec<Message> {
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Alone(m) => out.push((*m).clone()),
                Piece::Pack(p) => out.extend(decode(&p.body, Some(&p.keys), "capstan.inputs").unwrap()),
            }
        }
        out
    }

    #[test]
    fn a_pack_decodes_to_its_messages_and_keys_in_order() {
        let messages: Vec<Message> = (0..5).map(|i| message(i, 10)).collect();
        let pieces = pieces(&refs(&messages), 100, 1 << 20).unwrap();
        assert!(matches!(pieces.as_slice(), [Piece::Pack(p)] if p.messages.len() == 5), "{pieces:?}");
        assert_eq!(packed(&pieces), messages);
    }

    #[test]
    fn packs_are_cut_to_the_size_limit_and_a_lone_part_goes_alone() {
        let messages: Vec<Message> = (0..7).map(|i| message(i, 300)).collect();
        let (overhead, limit) = (100, 1_300);
        let pieces = pieces(&refs(&messages), overhead, limit).unwrap();
        assert!(pieces.len() > 1, "seven messages of ~400 bytes do not fit 1,300 bytes");
        for piece in &pieces {
            if let Piece::Pack(p) = piece {
                assert!(overhead + KEYS_HEADER.len() + p.keys.len() + p.body.len() <= limit);
            }
        }
        assert!(pieces.iter().any(|p| matches!(p, Piece::Alone(_))), "an odd one out goes alone: {pieces:?}");
        assert_eq!(packed(&pieces), messages);
    }

    #[test]
    fn a_message_over_the_limit_by_itself_is_too_large() {
        let messages = vec![message(0, 10), message(1, 5_000)];
        assert!(matches!(pieces(&refs(&messages), 100, 2_000), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn a_malformed_pack_is_refused() {
        let messages: Vec<Message> = (0..2).map(|i| message(i, 1)).collect();
        let pieces = pieces(&refs(&messages), 0, 1 << 20).unwrap();
        let [Piece::Pack(p)] = pieces.as_slice() else { panic!("one pack: {pieces:?}") };
        assert!(decode(br#"[{"id": 1}]"#, Some(&p.keys), "t").is_err());
        assert!(decode(&p.body, Some(r#"["only one"]"#), "t").is_err());
        assert!(decode(&p.body, None, "t").is_err());
        assert!(decode(b"[]", Some("[]"), "t").is_err());
    }
}
