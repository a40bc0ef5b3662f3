//! The write statements of a [`SqliteStore`](super::SqliteStore) commit, each with one SQL text
//! whatever the batch holds.
//!
//! A commit sends SQLite two scripts: [`RECORD_INPUTS`] (`BEGIN IMMEDIATE`, input ids, then the
//! versions the appends need) and [`WRITE`] (events, run index, outbox, timers, then `COMMIT`);
//! evaluation results, rare, go one by one between the two (see `evaluations.rs`). sqlx hands a
//! script to its connection thread as one message, so a commit costs two round trips whatever it
//! holds (four while `BEGIN` and `COMMIT` went on their own). A script stops at its first failing
//! statement, inside the still-open transaction, which the caller then rolls back (`writer.rs`).
//! A script's parameters are plain `?`, bound in the order they appear in its text:
//! sqlx gives each statement of a script the next arguments in line, and a numbered `?NNN` in a
//! later statement can silently stay NULL.
//!
//! A statement takes all its rows as ONE bound parameter, a JSON array with one array of columns
//! per row, which SQLite unpacks with `jsonb_each` and `->>`. Because the text never changes,
//! sqlx's statement cache keeps every statement prepared across commits; multi-row `VALUES`
//! lists made a new text for every batch size, which SQLite parsed and planned again at each
//! commit (and which pushed older statements out of the cache). One parameter also replaces
//! hundreds of bind calls, and SQLite's limit on bound variables no longer splits a batch.
//!
//! `jsonb_each` (not `json_each`) hands each row over as a JSONB blob, which `->>` reads
//! without parsing text again. `ORDER BY rowid` walks the array in order; `jsonb_each` consumes
//! that order itself, so it costs no sort. Payloads (event and timer JSON, outbox bytes) stay out
//! of the JSON: they are concatenated into one BLOB parameter per table ([`Blobs`]), and each
//! row names its slice, which `substr` (counting bytes on a BLOB) cuts out again. SQLite neither
//! parses nor re-renders them, and bytes need no text encoding.
//!
//! A unique violation on an input id is the expected way a duplicate input shows up: the
//! statement fails (SQLite undoes that statement only, and the script stops there), and a lookup
//! inside the still-open transaction names the first id of the batch that was already stored.
//! Events carry no id of their own (see [`crate::event_id`]): they land at the seqs the version
//! check allowed, under the write lock, so nothing else can have taken them.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;
use sqlx::SqliteConnection;

use super::evaluations;
use crate::plan::{Plan, Sequenced};
use crate::sql::db_error;
use crate::{Committed, Error, Result};

/// Serializes rows (tuples, slices or values) as one JSON array.
pub(super) fn json<T: Serialize + ?Sized>(rows: &T) -> Result<String> {
    serde_json::to_string(rows).map_err(|e| Error::Invalid(format!("batch does not encode as JSON: {e}")))
}

/// Variable-size values of a statement, concatenated into one BLOB parameter. A row refers to
/// its value by 1-based start and length, for `substr(blob, start, length)`.
#[derive(Default)]
struct Blobs(Vec<u8>);

impl Blobs {
    /// Appends `bytes`; returns their `(start, length)`.
    fn push(&mut self, bytes: &[u8]) -> (usize, usize) {
        let start = self.0.len() + 1;
        self.0.extend_from_slice(bytes);
        (start, bytes.len())
    }

    /// Appends `value` as JSON text; returns its `(start, length)`.
    fn push_json(&mut self, value: &Value) -> Result<(usize, usize)> {
        let start = self.0.len() + 1;
        serde_json::to_writer(&mut self.0, value)
            .map_err(|e| Error::Invalid(format!("payload does not encode as JSON: {e}")))?;
        Ok((start, self.0.len() + 1 - start))
    }
}

/// After a failed insert of the input ids `ids` (a JSON array): the first of them, in batch
/// order, that was recorded before. Any other failure maps as usual.
async fn first_recorded_input(conn: &mut SqliteConnection, ids: String, err: sqlx::Error) -> Error {
    if !matches!(&err, sqlx::Error::Database(db) if db.is_unique_violation()) {
        return db_error(err);
    }
    let lookup = "SELECT value FROM json_each(?) AS j \
                  WHERE EXISTS (SELECT 1 FROM processed_inputs WHERE id = j.value) ORDER BY j.rowid LIMIT 1";
    match sqlx::query_scalar::<_, String>(lookup).bind(ids).fetch_optional(&mut *conn).await {
        Ok(Some(id)) => Error::DuplicateInput(id),
        Ok(None) => db_error(err),
        Err(lookup_err) => db_error(lookup_err),
    }
}

/// Begins the write transaction (holding SQLite's write lock from its first statement, so it
/// never fails half-way with a lock upgrade error), records the input ids (a JSON array) with
/// their commit time, then reads the position of the last event stored (0 for none) and the
/// current version of each run in a JSON array. The versions come back as one JSON object rather
/// than as rows, which sqlx would hand over one channel message each.
const RECORD_INPUTS: &str = "\
    BEGIN IMMEDIATE; \
    INSERT INTO processed_inputs (id, processed_at_ms) SELECT value, ? FROM json_each(?); \
    SELECT COALESCE((SELECT MAX(position) FROM events), 0), \
        (SELECT json_group_object(r.value, COALESCE((SELECT MAX(seq) FROM events WHERE run_id = r.value), 0)) \
         FROM json_each(?) AS r)";

/// Events, run index upserts, outbox rows, timer cancels, timer sets, then `COMMIT`. Parameters
/// in order: first event position, event payloads, event rows; run rows; outbox payloads, outbox
/// rows; cancel rows; timer payloads, timer rows.
///
/// `WHERE true` keeps SQLite from reading an upsert's `ON CONFLICT` as a join constraint. Timer
/// cancels are driven by the cancel list: each finds its timer through the primary key, so the
/// statement never scans the table.
const WRITE: &str = "\
    INSERT INTO events (position, run_id, seq, kind, payload, recorded_at_ms) \
    SELECT ? + key, value ->> 0, value ->> 1, value ->> 2, \
        CAST(substr(?, value ->> 3, value ->> 4) AS TEXT), value ->> 5 \
    FROM jsonb_each(?) ORDER BY rowid; \
    INSERT INTO runs (run_id, project, context_id, stage, sequence, service, definition, definition_version, \
        status, result, created_at_ms, updated_at_ms) \
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, \
        value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11 \
    FROM jsonb_each(?) WHERE true \
    ON CONFLICT (run_id) DO UPDATE SET project = excluded.project, context_id = excluded.context_id, \
        stage = excluded.stage, sequence = excluded.sequence, service = excluded.service, \
        definition = excluded.definition, definition_version = excluded.definition_version, \
        status = excluded.status, result = excluded.result, created_at_ms = excluded.created_at_ms, \
        updated_at_ms = excluded.updated_at_ms; \
    INSERT INTO outbox (id, topic, key, payload) \
    SELECT value ->> 0, value ->> 1, value ->> 2, substr(?, value ->> 3, value ->> 4) \
    FROM jsonb_each(?) ORDER BY rowid; \
    DELETE FROM timers WHERE (run_id, key) IN ( \
        SELECT t.run_id, t.key FROM jsonb_each(?) AS c \
        JOIN timers AS t ON t.run_id = c.value ->> 0 AND t.key = c.value ->> 1 \
        WHERE t.fire_at_ms = IFNULL(c.value ->> 2, t.fire_at_ms)); \
    INSERT INTO timers (run_id, key, fire_at_ms, payload) \
    SELECT value ->> 0, value ->> 1, value ->> 2, CAST(substr(?, value ->> 3, value ->> 4) AS TEXT) \
    FROM jsonb_each(?) WHERE true \
    ON CONFLICT (run_id, key) DO UPDATE SET fire_at_ms = excluded.fire_at_ms, payload = excluded.payload; \
    COMMIT";

/// Writes the whole batch in one transaction, committed unless an error is returned (the
/// caller rolls back then).
pub(super) async fn run(conn: &mut SqliteConnection, plan: &Plan) -> Result<Committed> {
    let (last, current) = record_inputs(conn, plan).await?;
    let sequenced = plan.sequence(&current)?;
    evaluations::insert(conn, &plan.evaluations).await?;
    write(conn, plan, &sequenced, last + 1).await?;
    Ok(if sequenced.is_empty() {
        Committed::default()
    } else {
        Committed { last_position: last + sequenced.len() as i64, events: sequenced.len() }
    })
}

/// Begins the transaction and records the batch's input ids with their commit time, failing
/// with the first one already recorded; returns the position of the last event stored and the
/// current versions of the runs the batch appends to.
pub(super) async fn record_inputs(conn: &mut SqliteConnection, plan: &Plan) -> Result<(i64, HashMap<String, i64>)> {
    let read = sqlx::query_as::<_, (i64, String)>(RECORD_INPUTS)
        .bind(plan.inputs_at_ms)
        .bind(json(&plan.inputs)?)
        .bind(json(&plan.append_run_ids())?)
        .fetch_one(&mut *conn)
        .await;
    let (last, versions) = match read {
        Ok(read) => read,
        Err(err) => {
            return Err(first_recorded_input(conn, json(&plan.inputs)?, err).await);
        }
    };
    let versions =
        serde_json::from_str(&versions).map_err(|e| Error::Invalid(format!("stream versions do not decode: {e}")))?;
    Ok((last, versions))
}

/// Writes the events (numbered from position `first`, in order) and the run index, outbox and
/// timer parts of the plan, then commits.
pub(super) async fn write(
    conn: &mut SqliteConnection,
    plan: &Plan,
    events: &[Sequenced<'_>],
    first: i64,
) -> Result<()> {
    let mut event_payloads = Blobs::default();
    let mut event_rows = Vec::with_capacity(events.len());
    for s in events {
        let (start, len) = event_payloads.push(s.event.payload.as_str().as_bytes());
        event_rows.push((s.run_id, s.seq, &s.event.kind, start, len, s.event.recorded_at_ms));
    }
    let runs: Vec<_> = plan
        .runs
        .iter()
        .map(|r| {
            (
                &r.run_id,
                &r.project,
                &r.context_id,
                &r.stage,
                &r.sequence,
                &r.service,
                &r.definition,
                r.definition_version,
                &r.status,
                &r.result,
                r.created_at_ms,
                r.updated_at_ms,
            )
        })
        .collect();
    let mut outbox_payloads = Blobs::default();
    let outbox: Vec<_> = plan
        .outbox
        .iter()
        .map(|m| {
            let (start, len) = outbox_payloads.push(&m.payload);
            (&m.id, &m.topic, &m.key, start, len)
        })
        .collect();
    let cancels: Vec<_> = plan.cancel_timers.iter().map(|c| (&c.run_id, &c.key, c.only_if_fire_at)).collect();
    let mut timer_payloads = Blobs::default();
    let mut timers = Vec::with_capacity(plan.set_timers.len());
    for t in &plan.set_timers {
        let (start, len) = timer_payloads.push_json(&t.payload)?;
        timers.push((&t.run_id, &t.key, t.fire_at_ms, start, len));
    }

    let written = sqlx::query(WRITE)
        .bind(first)
        .bind(event_payloads.0)
        .bind(json(&event_rows)?)
        .bind(json(&runs)?)
        .bind(outbox_payloads.0)
        .bind(json(&outbox)?)
        .bind(json(&cancels)?)
        .bind(timer_payloads.0)
        .bind(json(&timers)?)
        .execute(&mut *conn)
        .await;
    written.map(|_| ()).map_err(db_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RawJson;
    use crate::sqlite::SqliteStore;
    use crate::testing::{append, appends};
    use crate::{
        Batch, CommitLog, EventReader, NewEvent, Outbox, OutboxMessage, RunIndex, RunRecord, StreamAppend, TimerRow,
        Timers,
    };
    use serde_json::json;

    /// Text travels inside the rows' JSON and bytes in a BLOB beside it: every string (quotes,
    /// backslashes, control characters, NUL, characters beyond the BMP), every `i64`, NULL and
    /// every byte must come back exactly.
    #[tokio::test]
    async fn columns_round_trip_through_the_row_encoding() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        let odd = |tag: &str| format!("{tag} \"q\" \\ / \u{0} \u{1f} \t\n é 😀 {{[,]}}");
        let run_id = odd("run");
        let events: Vec<NewEvent> = [i64::MIN, -1, 0, i64::MAX]
            .into_iter()
            .enumerate()
            .map(|(i, at)| NewEvent {
                kind: odd(&format!("kind {i}")),
                payload: RawJson::from_value(&json!({ "text": odd("payload"), "n": at })),
                recorded_at_ms: at,
            })
            .collect();
        let run = RunRecord {
            run_id: run_id.clone(),
            project: odd("project"),
            context_id: odd("context"),
            stage: odd("stage"),
            sequence: odd("sequence"),
            service: None,
            definition: odd("definition"),
            definition_version: i64::MAX,
            status: odd("status"),
            result: Some(odd("result")),
            created_at_ms: i64::MIN,
            updated_at_ms: i64::MAX,
        };
        let outbox: Vec<OutboxMessage> = [vec![], vec![0], vec![0xff, 0xfe, 0, b'"', b'\\'], (0..=255).collect()]
            .into_iter()
            .enumerate()
            .map(|(i, payload)| OutboxMessage {
                id: odd(&format!("message {i}")),
                topic: odd("topic"),
                key: odd("key"),
                payload,
            })
            .collect();
        let timers = vec![
            TimerRow { run_id: run_id.clone(), key: odd("early"), fire_at_ms: i64::MIN, payload: json!(odd("t")) },
            TimerRow { run_id: run_id.clone(), key: odd("late"), fire_at_ms: 5, payload: json!(null) },
        ];
        let batch = Batch {
            appends: vec![StreamAppend { run_id: run_id.clone(), expected_version: 0, events: events.clone() }],
            runs: vec![run.clone()],
            inputs: vec![odd("input")],
            outbox: outbox.clone(),
            set_timers: timers.clone(),
            ..Batch::default()
        };
        store.commit(batch).await.expect("commit");

        let stored = store.read_stream(&run_id, 1).await.expect("read");
        let read: Vec<NewEvent> = stored
            .iter()
            .map(|e| NewEvent {
                kind: e.kind.clone(),
                payload: RawJson::from_value(&e.payload),
                recorded_at_ms: e.recorded_at_ms,
            })
            .collect();
        assert_eq!(read, events);
        assert!(stored.iter().all(|e| e.run_id == run_id && e.id == crate::event_id(&run_id, e.seq)));
        assert_eq!(store.get_run(&run_id).await.expect("run"), Some(run));
        let pending: Vec<OutboxMessage> =
            store.outbox_pending(10).await.expect("outbox").into_iter().map(|r| r.message).collect();
        assert_eq!(pending, outbox, "in batch order, bytes intact");
        assert_eq!(store.timers_due(i64::MAX, 10).await.expect("timers"), timers);
        assert_eq!(store.inputs_seen(&[odd("input"), odd("other")]).await.expect("seen"), [odd("input")]);

        // A cancel finds the timer by the same text.
        let cancel = crate::TimerCancel { run_id: run_id.clone(), key: odd("late"), only_if_fire_at: Some(5) };
        store.commit(Batch { cancel_timers: vec![cancel], ..Batch::default() }).await.expect("cancel");
        assert_eq!(store.timers_due(i64::MAX, 10).await.expect("timers"), timers[..1]);
    }

    /// A unique violation that is on no input id (two writers taking one stream seq, which the
    /// write lock rules out in practice) is not a duplicate, and the error stays retryable.
    #[tokio::test]
    async fn a_unique_violation_on_no_id_is_unavailable() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        store.commit(appends(vec![append("r", 0, &["e1"])])).await.expect("first");
        // The same seq again, as a writer with a stale version would write it.
        let plan = Plan::new(appends(vec![append("r", 0, &["e2"])])).expect("plan");
        let stale = plan.sequence(&HashMap::new()).expect("sequenced against version 0");
        let mut held = store.writer.hold().await.expect("writer");
        sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *held).await.expect("begin");
        let err = write(&mut held, &plan, &stale, 2).await.expect_err("seq taken");
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }
}
