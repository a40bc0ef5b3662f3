//! Translation between the engine's words (events, effects, timers) and the store's and broker's
//! rows. Adapters translate and never decide (STYLE.md).

use capstan_brokers::Message;
use capstan_engine::Timestamp;
use capstan_engine::run::{Effect, Event, Input, RunMeta, RunState, TimerKind, WorkerMessage};
use capstan_proto::{CloudEvent, DispatchMode, EventData, TaskOffer, ext, topics, types};
use capstan_store::{NewEvent, OutboxMessage, RawJson, StoredEvent, TimerRow};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The CloudEvent `source` of everything the engine emits.
pub const ENGINE_SOURCE: &str = "capstan/engine";

/// Namespace of the deterministic run ids given to promoted sequences.
const RUN_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6361_7073_7461_6e2d_7275_6e2d_6964_7331);
/// Namespace of the ids of messages sent again after a crash ("capstan-msg-ids1").
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6361_7073_7461_6e2d_6d73_672d_6964_7331);

/// A codec failure: a stored row the runtime cannot read back.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("stored event {id} of run {run_id} is unreadable: {source}")]
    Event { run_id: String, id: String, source: serde_json::Error },
    #[error("timer {key} of run {run_id} is unreadable: {source}")]
    Timer { run_id: String, key: String, source: serde_json::Error },
}

/// Encodes an engine event for its run's stream. Its id follows from the place it lands
/// (`capstan_store::event_id`), so a replayed decision can never store one event twice under
/// two ids.
pub fn encode_event(event: &Event, now_ms: i64) -> NewEvent {
    let payload = RawJson::new(event).expect("engine events always serialize");
    NewEvent { kind: event_kind(&payload), payload, recorded_at_ms: now_ms }
}

/// The type of an encoded event: its `event` tag. serde writes an internally tagged enum's tag
/// first (`{"event":"task-offered",...`), which is read off the text without parsing the rest.
fn event_kind(payload: &RawJson) -> String {
    let text = payload.as_str();
    let leading = text.strip_prefix(r#"{"event":""#).and_then(|rest| rest.split_once('"')).map(|(kind, _)| kind);
    match leading {
        Some(kind) if !kind.contains('\\') => kind.to_string(),
        _ => payload.to_value().get("event").and_then(Value::as_str).unwrap_or("unknown").to_string(),
    }
}

/// Decodes a stored event back into the engine's word.
pub fn decode_event(stored: &StoredEvent) -> Result<Event, CodecError> {
    Event::deserialize(&stored.payload).map_err(|source| CodecError::Event {
        run_id: stored.run_id.clone(),
        id: stored.id.clone(),
        source,
    })
}

/// What a durable timer row holds: an engine timer, or the start of a promoted sequence (kept as
/// a timer on the parent run so that it survives a crash and fires exactly once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "timer_payload", rename_all = "kebab-case")]
pub enum TimerPayload {
    Engine { kind: TimerKind },
    StartRun { meta: RunMeta, data: Value },
}

/// A due timer turned into the input it stands for, addressed to the run that must take it.
#[derive(Debug, Clone, PartialEq)]
pub struct FiredTimer {
    pub target_run: String,
    pub input: Input,
}

/// The timer row for an engine timer.
pub fn engine_timer_row(run_id: &str, kind: &TimerKind, at: Timestamp) -> TimerRow {
    TimerRow {
        run_id: run_id.to_string(),
        key: kind.key(),
        fire_at_ms: at.0 as i64,
        payload: serde_json::to_value(TimerPayload::Engine { kind: kind.clone() })
            .expect("timer payloads always serialize"),
    }
}

/// The timer row (on the parent run) that starts a promoted sequence as soon as possible.
pub fn start_run_row(parent_run: &str, meta: &RunMeta, data: &Value, now_ms: i64) -> TimerRow {
    TimerRow {
        run_id: parent_run.to_string(),
        key: format!("start/{}/{}", meta.stage, meta.sequence),
        fire_at_ms: now_ms,
        payload: serde_json::to_value(TimerPayload::StartRun { meta: meta.clone(), data: data.clone() })
            .expect("timer payloads always serialize"),
    }
}

/// Reads a due timer row.
pub fn decode_timer(row: &TimerRow) -> Result<FiredTimer, CodecError> {
    let payload: TimerPayload = TimerPayload::deserialize(&row.payload).map_err(|source| CodecError::Timer {
        run_id: row.run_id.clone(),
        key: row.key.clone(),
        source,
    })?;
    Ok(match payload {
        TimerPayload::Engine { kind } => FiredTimer { target_run: row.run_id.clone(), input: Input::Timer(kind) },
        TimerPayload::StartRun { meta, data } => {
            FiredTimer { target_run: meta.run_id.clone(), input: Input::Start { meta, data } }
        }
    })
}

/// The id of the run a promotion starts: derived from the parent, so a replay finds it again.
pub fn promoted_run_id(parent_run: &str, stage: &str, sequence: &str) -> String {
    Uuid::new_v5(&RUN_ID_NAMESPACE, format!("{parent_run}/{stage}/{sequence}").as_bytes()).to_string()
}

/// The CloudEvent id of a message the runtime may send again after a crash
/// (`RunState::derived_messages`): derived from what it says, so the copy has the original's id
/// and consumers that deduplicate by id drop it.
fn derived_message_id(name: &str) -> String {
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes()).to_string()
}

/// The message of an effect that talks to the outside, `None` for the others. The partition
/// commits its outbox row ([`outbox_row`]) and hands the message itself to the relay, so the
/// fast path never parses the row's JSON back (that round trip was ~9 % of the embedded
/// engine's CPU).
pub fn effect_message(meta: &RunMeta, effect: &Effect, time: &str) -> Option<Message> {
    let (topic, event) = match effect {
        Effect::Offer(offer) => (offer_topic(offer), offer_event(offer)),
        Effect::Send { worker_id, message } => (topics::worker(worker_id), worker_event(worker_id, message)),
        Effect::Notify(done) => (
            topics::RUN_EVENTS.to_string(),
            CloudEvent::new(
                derived_message_id(&format!("{}/finished", done.run_id)),
                ENGINE_SOURCE,
                types::SEQUENCE_FINISHED,
            )
            .with_payload(done)
            .expect("payloads serialize")
            .with_ext(ext::PROJECT, &done.project)
            .with_ext(ext::RUN, &done.run_id)
            .with_ext(ext::CONTEXT, &done.context_id)
            .with_ext(ext::KEPTN_CONTEXT, &done.context_id),
        ),
        Effect::SetTimer { .. } | Effect::CancelTimer { .. } | Effect::StartRun { .. } => return None,
    };
    let mut event = event;
    event.time = Some(time.to_string());
    event.extensions.entry(ext::CONTEXT.into()).or_insert_with(|| meta.context_id.clone());
    Some(Message { topic, key: meta.run_id.clone(), event })
}

/// The outbox row that makes a message durable.
pub fn outbox_row(message: &Message) -> OutboxMessage {
    OutboxMessage {
        id: message.event.id.clone(),
        topic: message.topic.clone(),
        key: message.key.clone(),
        payload: message.event.to_json(),
    }
}

/// Whether an effect's message needs no outbox row; it is then published after the commit, best
/// effort, without a row to write and delete:
/// - a rejection (of a late bid or claim, or of a report with a stale token) only lets a worker
///   give up a reservation or a result early. Lost, the worker's reservation runs out by itself
///   and a stale report stays refused;
/// - an offer is a doorbell: every offer arms a re-offer (a queue or fanout offer) or a bid
///   window (an auction, whose close arms a re-offer) until a worker takes the attempt, and a
///   crash sets a lost re-offer again at start, due at once (`RunState::derived_timers`). A lost
///   offer thus only waits for the next one.
///
/// Awards and notifications go without rows too, but not best effort (`is_derived`); cancels
/// keep their rows: nothing would send them again.
pub fn is_advisory(effect: &Effect) -> bool {
    matches!(effect, Effect::Send { message: WorkerMessage::Rejection(_), .. } | Effect::Offer(_))
}

/// Whether an effect's message needs no outbox row because a restart sends it again from the
/// run's state (`RunState::derived_messages`): an award, a notification that a run ended. The
/// relay publishes it after the commit and retries until the broker takes it, and the partition's
/// checkpoint stays before the commit until then (`recovery.rs`).
pub fn is_derived(effect: &Effect) -> bool {
    RunState::derives_message(effect)
}

/// The messages of a state's derived effects (`RunState::derived_messages`), to send again.
pub fn derived_messages(state: &RunState, time: &str) -> Vec<Message> {
    let Some(meta) = state.meta() else { return Vec::new() };
    state.derived_messages().iter().filter_map(|e| effect_message(meta, e, time)).collect()
}

fn offer_topic(offer: &TaskOffer) -> String {
    match offer.dispatch {
        DispatchMode::Queue => topics::queue(&offer.task_type),
        DispatchMode::Auction | DispatchMode::Fanout => topics::tasks(&offer.task_type),
    }
}

fn offer_event(offer: &TaskOffer) -> CloudEvent {
    CloudEvent::new(Uuid::now_v7().to_string(), ENGINE_SOURCE, types::TASK_OFFERED)
        .with_payload(offer)
        .expect("payloads serialize")
        .with_ext(ext::PROJECT, &offer.attempt.project)
        .with_ext(ext::RUN, &offer.attempt.run_id)
        .with_ext(ext::TASK, &offer.attempt.task)
        .with_ext(ext::ATTEMPT, offer.attempt.attempt)
        .with_ext(ext::KEPTN_CONTEXT, &offer.context_id)
}

fn worker_event(worker_id: &str, message: &WorkerMessage) -> CloudEvent {
    let (ty, data, attempt, token) = match message {
        WorkerMessage::Award(a) => (types::TASK_AWARDED, EventData::new(a), &a.attempt, Some(a.token)),
        WorkerMessage::Rejection(r) => (types::TASK_REJECTED, EventData::new(r), &r.attempt, None),
        WorkerMessage::Cancel(c) => (types::TASK_CANCELLED, EventData::new(c), &c.attempt, None),
    };
    let id = match message {
        WorkerMessage::Award(a) => derived_message_id(&format!(
            "{}/{}/{}/award/{}",
            a.attempt.run_id, a.attempt.task, a.attempt.attempt, a.token
        )),
        WorkerMessage::Rejection(_) | WorkerMessage::Cancel(_) => Uuid::now_v7().to_string(),
    };
    let mut event = CloudEvent::new(id, ENGINE_SOURCE, ty)
        .with_event_data(data.expect("payloads serialize"))
        .with_ext(ext::PROJECT, &attempt.project)
        .with_ext(ext::RUN, &attempt.run_id)
        .with_ext(ext::TASK, &attempt.task)
        .with_ext(ext::ATTEMPT, attempt.attempt)
        .with_ext(ext::WORKER, worker_id);
    if let Some(token) = token {
        event = event.with_ext(ext::TOKEN, token);
    }
    event
}

/// Why a CloudEvent from the broker is not an engine input.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("event type `{0}` is not an engine input")]
    UnknownType(String),
    #[error("event {id} ({ty}): data does not fit: {source}")]
    Data { id: String, ty: String, source: serde_json::Error },
}

/// An engine input decoded from a worker's CloudEvent, with the run it is for.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedInput {
    pub run_id: String,
    pub project: String,
    pub input: Input,
}

/// Decodes a worker's CloudEvent (bid, claim, started, heartbeat, finished).
pub fn decode_input(event: &CloudEvent) -> Result<DecodedInput, InputError> {
    fn data<T: serde::de::DeserializeOwned>(event: &CloudEvent) -> Result<T, InputError> {
        event.payload().map_err(|source| InputError::Data { id: event.id.clone(), ty: event.ty.clone(), source })
    }
    let (attempt, input) = match event.ty.as_str() {
        types::TASK_BID => {
            let bid: capstan_proto::Bid = data(event)?;
            (bid.attempt.clone(), Input::Bid(bid))
        }
        types::TASK_CLAIM => {
            let claim: capstan_proto::Claim = data(event)?;
            (claim.attempt.clone(), Input::Claim(claim))
        }
        types::TASK_STARTED => {
            let p: capstan_proto::Progress = data(event)?;
            (p.attempt.clone(), Input::Started(p))
        }
        types::TASK_HEARTBEAT => {
            let p: capstan_proto::Progress = data(event)?;
            (p.attempt.clone(), Input::Heartbeat(p))
        }
        types::TASK_FINISHED => {
            let f: capstan_proto::Finished = data(event)?;
            (f.attempt.clone(), Input::Finished(f))
        }
        other => return Err(InputError::UnknownType(other.to_string())),
    };
    Ok(DecodedInput { run_id: attempt.run_id, project: attempt.project, input })
}

/// RFC 3339 (UTC, milliseconds) for CloudEvent `time`, without a date-time crate.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's well-known algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_651_200_123), "2026-11-26T00:00:00.123Z");
        assert_eq!(rfc3339(951_825_600_000), "2000-02-29T12:00:00.000Z");
    }

    #[test]
    fn an_encoded_event_is_its_json_under_the_type_of_its_tag() {
        let events = [
            Event::RunQueued { at: Timestamp(5) },
            Event::TaskDelayed { task: "deploy".into(), until: Timestamp(9), at: Timestamp(5) },
            Event::RunFinished {
                status: capstan_engine::run::RunStatus::Finished,
                result: capstan_engine::run::TaskResult::Warning,
                next: Vec::new(),
                at: Timestamp(7),
            },
        ];
        for event in events {
            let encoded = encode_event(&event, 11);
            let value = serde_json::to_value(&event).expect("serializes");
            assert_eq!(Some(encoded.kind.as_str()), value["event"].as_str(), "{event:?}");
            assert_eq!(encoded.payload.to_value(), value);
            assert_eq!(encoded.recorded_at_ms, 11);
            let stored = StoredEvent {
                position: 1,
                run_id: "r".into(),
                seq: 1,
                id: "r:1".into(),
                kind: encoded.kind,
                payload: value,
                recorded_at_ms: 11,
            };
            assert_eq!(decode_event(&stored).expect("decodes"), event);
        }
        // A tag not in front, or spelled with an escape, is still found by parsing.
        let moved = RawJson::new(&serde_json::json!({ "at": 1, "event": "run-queued" })).expect("json");
        assert_eq!(event_kind(&moved), "run-queued");
        let escaped = RawJson::new(&serde_json::json!({ "event": "run\"queued" })).expect("json");
        assert_eq!(event_kind(&escaped), "run\"queued");
    }

    #[test]
    fn promoted_ids_are_stable_and_distinct() {
        let a = promoted_run_id("r1", "staging", "delivery");
        assert_eq!(a, promoted_run_id("r1", "staging", "delivery"));
        assert_ne!(a, promoted_run_id("r1", "production", "delivery"));
        assert_ne!(a, promoted_run_id("r2", "staging", "delivery"));
    }
}
