//! [`SqliteStore`]: the embedded backend (`capstan dev`, `capstan demo`), one SQLite file.
//!
//! Writes go through exactly one connection (`writer.rs`) and start with `BEGIN IMMEDIATE`, so
//! commits are serialized (SQLite allows one writer anyway) and event positions are assigned as
//! `max(position) + 1` inside the transaction: they follow commit order without gaps. Reads use a
//! separate pool of read-only connections, which WAL mode lets run beside the writer (an
//! in-memory database, which has one connection, reads through the writer).
//!
//! Durability: the default is `synchronous = FULL`, which fsyncs the WAL at every commit. In WAL
//! mode `NORMAL` already survives a killed process (committed pages sit in the OS cache and are
//! replayed from the WAL), and loses only the last commits on an OS crash or power cut. Capstan
//! publishes the outbox right after a commit, so a commit lost after publishing would contradict
//! what workers already saw; FULL rules that out. [`SqliteConfig::synchronous_full`] trades it
//! for throughput where that risk is acceptable.

mod commit;
mod evaluations;
mod read;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::plan::Plan;
use crate::sql::{db_error, migrate_error, sql_limit};
use crate::{Batch, CommitLog, Committed, Result};
use writer::{Held, Writer};

/// Migrations embedded at compile time; they need no database then.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Tuning for [`SqliteStore::open_with`].
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// `synchronous = FULL` (fsync every commit) when true, `NORMAL` when false. See the module doc.
    pub synchronous_full: bool,
    /// How long a connection waits for a lock held by another process before failing.
    pub busy_timeout: Duration,
    /// Size of the read-only connection pool.
    pub readers: u32,
    /// Checkpoint the WAL on a connection of its own, every [`CHECKPOINT_EVERY`], instead of
    /// in the writer's commits (SQLite's automatic checkpoint runs inside the commit that
    /// crosses 1,000 pages, on the one thread all writes wait for).
    pub background_checkpoint: bool,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            synchronous_full: true,
            busy_timeout: Duration::from_secs(5),
            readers: 4,
            background_checkpoint: true,
        }
    }
}

/// A [`Store`](crate::Store) in one SQLite file (or in memory, for tests).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Exactly one connection: the only writer.
    writer: Arc<Writer>,
    /// Read-only connections; `None` for an in-memory database, read through the writer.
    reader: Option<SqlitePool>,
    /// Copies the WAL into the database beside the writer; stops with the last clone.
    checkpointer: Option<Arc<Checkpointer>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` with the default [`SqliteConfig`]
    /// and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, SqliteConfig::default()).await
    }

    /// Opens (creating if missing) the database file at `path` with `config`.
    pub async fn open_with(path: &Path, config: SqliteConfig) -> Result<Self> {
        let synchronous = if config.synchronous_full { SqliteSynchronous::Full } else { SqliteSynchronous::Normal };
        let base = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(config.busy_timeout)
            .foreign_keys(true)
            .synchronous(synchronous)
            // Statement journals (multi-row upserts inside a transaction) stay off the disk.
            .pragma("temp_store", "memory");
        let background = config.background_checkpoint;
        let writer_options = base.clone().create_if_missing(true).journal_mode(SqliteJournalMode::Wal);
        // With a checkpointer of its own, the writer checkpoints only if that one falls far behind.
        let writer_options = if background {
            writer_options.pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string())
        } else {
            writer_options
        };
        let mut writer = SqliteConnection::connect_with(&writer_options).await.map_err(db_error)?;
        MIGRATOR.run(&mut writer).await.map_err(migrate_error)?;
        let writer = Arc::new(Writer::own(writer));
        let checkpointer = if background {
            let pool =
                SqlitePoolOptions::new().max_connections(1).connect_with(base.clone()).await.map_err(db_error)?;
            Some(Arc::new(Checkpointer::start(pool)))
        } else {
            None
        };
        // Readers open after the writer so the file exists and is already in WAL mode. No ping
        // before handing one out (sqlx's default, a round trip to the connection's thread before
        // every query): a local file's connection does not go away.
        let reader = SqlitePoolOptions::new()
            .max_connections(config.readers.max(1))
            .test_before_acquire(false)
            .connect_with(base.read_only(true))
            .await
            .map_err(db_error)?;
        debug!(path = %path.display(), "opened SQLite store");
        Ok(SqliteStore { writer, reader: Some(reader), checkpointer })
    }

    /// A private in-memory database (one connection, kept open for the store's lifetime).
    pub async fn open_in_memory() -> Result<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(SqliteConnectOptions::new().in_memory(true).foreign_keys(true))
            .await
            .map_err(db_error)?;
        MIGRATOR.run(&pool).await.map_err(migrate_error)?;
        Ok(SqliteStore { writer: Arc::new(Writer::shared(pool)), reader: None, checkpointer: None })
    }

    /// Closes the connections, waiting for them to finish (checkpointing the WAL).
    pub async fn close(&self) {
        if let Some(c) = &self.checkpointer {
            c.stop().await;
        }
        if let Some(reader) = &self.reader {
            reader.close().await;
        }
        self.writer.close().await;
    }

    /// A connection for reads: a read-only one, or for an in-memory database the writer itself
    /// (after rolling back whatever a cut-short commit left open, which a read on the same
    /// connection would otherwise see).
    async fn read(&self) -> Result<Held<'_>> {
        match &self.reader {
            Some(pool) => Ok(Held::Pooled(pool.acquire().await.map_err(db_error)?)),
            None => self.writer.hold().await,
        }
    }
}

/// How often the background checkpointer copies the WAL into the database file.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The writer's own automatic checkpoint threshold (pages) when a checkpointer runs beside it.
/// The writer then finds most frames already copied, and its checkpoint (which nothing writes
/// beside) is what lets the WAL start over: ~20 MB at most. It also bounds the WAL should the
/// checkpointer stall. At 16,384 pages the WAL grew to 69 MB.
const WRITER_CHECKPOINT_PAGES: u32 = 4_096;

/// A task that checkpoints the WAL (`PASSIVE`: it never waits for, nor blocks, the writer or
/// the readers) on a connection of its own.
#[derive(Debug)]
struct Checkpointer {
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Checkpointer {
    fn start(pool: SqlitePool) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                    warn!(error = %e, "background WAL checkpoint failed; the writer checkpoints past its threshold");
                }
            }
            pool.close().await;
        });
        Checkpointer { stop, task: std::sync::Mutex::new(Some(task)) }
    }

    /// Stops the task and waits until its connection is closed.
    async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[async_trait]
impl CommitLog for SqliteStore {
    fn serializes_commits(&self) -> bool {
        true
    }

    async fn commit(&self, batch: Batch) -> Result<Committed> {
        let plan = Plan::new(batch)?;
        let mut held = self.writer.hold().await?;
        self.writer.begin();
        match commit::run(&mut held, &plan).await {
            Ok(committed) => {
                self.writer.committed();
                Ok(committed)
            }
            Err(e) => {
                self.writer.end(&mut held).await;
                Err(e)
            }
        }
    }

    async fn prune_processed_inputs(&self, before_ms: i64, limit: usize) -> Result<u64> {
        // One statement on the writer: it waits for a commit in progress and holds the write
        // lock only for `limit` rows, found through the index on processed_at_ms.
        let done = sqlx::query(
            "DELETE FROM processed_inputs WHERE id IN (SELECT id FROM processed_inputs \
             WHERE processed_at_ms < ? ORDER BY processed_at_ms LIMIT ?)",
        )
        .bind(before_ms)
        .bind(sql_limit(limit))
        .execute(&mut *self.writer.hold().await?)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{append, appends};
    use crate::{Error, EventReader, NewEvent, RawJson, StreamAppend, TimerRow, Timers};
    use serde_json::{Value, json};

    /// Payloads are stored as JSON text: every kind of JSON value must come back as it went in
    /// (a string stays a string, not its unquoted text).
    #[tokio::test]
    async fn every_kind_of_json_payload_round_trips() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        let payloads =
            [json!("text"), json!("12"), json!(12), json!(1.5), json!(null), json!([1, "a"]), json!({"k": "ü \"q\""})];
        let events = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| NewEvent { kind: format!("k{i}"), payload: RawJson::from_value(p), recorded_at_ms: 7 })
            .collect();
        let timers = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| TimerRow { run_id: "r".into(), key: format!("t{i}"), fire_at_ms: 1, payload: p.clone() })
            .collect();
        let batch = Batch {
            appends: vec![StreamAppend { run_id: "r".into(), expected_version: 0, events }],
            set_timers: timers,
            ..Batch::default()
        };
        store.commit(batch).await.expect("commit");
        let stored: Vec<_> = store.read_stream("r", 1).await.expect("read").into_iter().map(|e| e.payload).collect();
        assert_eq!(stored, payloads);
        let mut due = store.timers_due(1, 100).await.expect("due");
        due.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(due.into_iter().map(|t| t.payload).collect::<Vec<_>>(), payloads);
    }

    /// Events in the database file itself, read from a copy of the file without its WAL (so
    /// only what a checkpoint copied in counts); `None` while the copy is torn mid-checkpoint.
    async fn events_in_main_file(path: &Path, dir: &Path) -> Option<i64> {
        let copy = dir.join("copy.db");
        std::fs::copy(path, &copy).ok()?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(SqliteConnectOptions::new().filename(&copy).read_only(true))
            .await
            .ok()?;
        let n = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events").fetch_one(&pool).await.ok();
        pool.close().await;
        n
    }

    async fn wal_checkpointed_within(config: SqliteConfig, wait: Duration) -> bool {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capstan.db");
        let store = SqliteStore::open_with(&path, config).await.expect("open");
        let events = (0..3)
            .map(|i| NewEvent { kind: format!("k{i}"), payload: RawJson::from_value(&json!(i)), recorded_at_ms: 1 })
            .collect();
        let batch = Batch {
            appends: vec![StreamAppend { run_id: "r".into(), expected_version: 0, events }],
            ..Batch::default()
        };
        store.commit(batch).await.expect("commit");
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if events_in_main_file(&path, dir.path()).await == Some(3) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// A small commit stays in the WAL until a checkpoint: the writer would do it only past its
    /// threshold, the background checkpointer does it within a few of its ticks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_checkpointer_copies_the_wal_into_the_database() {
        let with = SqliteConfig { background_checkpoint: true, ..SqliteConfig::default() };
        assert!(wal_checkpointed_within(with, CHECKPOINT_EVERY * 20).await, "not checkpointed in the background");
        let without = SqliteConfig { background_checkpoint: false, ..SqliteConfig::default() };
        assert!(
            !wal_checkpointed_within(without, CHECKPOINT_EVERY * 5).await,
            "control: without the checkpointer a small commit must stay in the WAL"
        );
    }

    /// A new database file at `path` brought up to migration `version`, for a test to write
    /// rows in the old shape before the store upgrades it.
    async fn database_at(path: &Path, version: i64) -> SqlitePool {
        let old = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(SqliteConnectOptions::new().filename(path).create_if_missing(true))
            .await
            .expect("open");
        MIGRATOR.run_to(version, &old).await.expect("old schema");
        old
    }

    /// A database made before processed inputs had a time upgrades in place: its ids stay
    /// processed, with time 0, so they are the first to be pruned.
    #[tokio::test]
    async fn inputs_from_before_migration_3_are_pruned_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capstan.db");
        let old = database_at(&path, 2).await;
        sqlx::query("INSERT INTO processed_inputs (id) VALUES ('legacy')").execute(&old).await.expect("legacy id");
        old.close().await;

        let store = SqliteStore::open(&path).await.expect("upgrade");
        let batch = Batch { inputs: vec!["fresh".into()], inputs_at_ms: 1_000, ..Batch::default() };
        store.commit(batch).await.expect("commit");
        let both = ["legacy".to_owned(), "fresh".to_owned()];
        assert_eq!(store.inputs_seen(&both).await.expect("seen").len(), 2, "the legacy id is still processed");
        assert_eq!(store.prune_processed_inputs(1_000, 10).await.expect("prune"), 1);
        assert_eq!(store.inputs_seen(&both).await.expect("seen"), ["fresh"]);
        store.close().await;
    }

    /// Events stored while ids were a column of their own (before migration 6) keep their
    /// positions, ids and payloads through the upgrade, and appends go on after them.
    #[tokio::test]
    async fn events_from_before_migration_6_upgrade_in_place() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capstan.db");
        let old = database_at(&path, 5).await;
        sqlx::query(
            "INSERT INTO events (position, run_id, seq, id, kind, payload, recorded_at_ms) \
             VALUES (1, 'r', 1, 'r:1', 'k', '{\"a\":1}', 5), (2, 's', 1, 's:1', 'k', '[2]', 6)",
        )
        .execute(&old)
        .await
        .expect("old events");
        old.close().await;

        let store = SqliteStore::open(&path).await.expect("upgrade");
        let read: Vec<(i64, String, Value)> =
            store.read_all(0, 10).await.expect("read").into_iter().map(|e| (e.position, e.id, e.payload)).collect();
        assert_eq!(read, [(1, "r:1".to_owned(), json!({"a": 1})), (2, "s:1".to_owned(), json!([2]))]);
        let done = store.commit(appends(vec![append("r", 1, &["next"])])).await.expect("append after the upgrade");
        assert_eq!(done.last_position, 3);
        let ids: Vec<String> = store.read_stream("r", 1).await.expect("stream").into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["r:1", "r:2"]);
        store.close().await;
    }

    /// A commit cut short inside its transaction (its future dropped between the script that
    /// begins it and the one that commits it) leaves the transaction open on the writer; the
    /// next holder must roll it back, so the cut batch leaves nothing and the next one lands.
    #[tokio::test]
    async fn a_transaction_left_open_by_a_cut_short_commit_is_rolled_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("capstan.db")).await.expect("open");
        let begin_and_leave = async |store: &SqliteStore, mark: bool| {
            let mut held = store.writer.hold().await.expect("writer");
            if mark {
                store.writer.begin();
            }
            sqlx::raw_sql("BEGIN IMMEDIATE; INSERT INTO processed_inputs (id) VALUES ('cut')")
                .execute(&mut *held)
                .await
                .expect("begin");
        };
        let next = |id: &str| Batch { inputs: vec![id.to_owned()], ..appends(vec![append(id, 0, &[id])]) };

        begin_and_leave(&store, true).await;
        store.commit(next("after")).await.expect("the next commit lands");
        assert_eq!(store.inputs_seen(&["cut".into(), "after".into()]).await.expect("seen"), ["after"]);

        // Control: a transaction left open without the mark makes the next commit fail.
        begin_and_leave(&store, false).await;
        store.commit(next("unmarked")).await.expect_err("BEGIN inside an open transaction");
        // Its failure rolled back what was open, so the writer is usable again.
        store.commit(next("again")).await.expect("writer recovered");
        let ids = ["cut".to_owned(), "unmarked".to_owned(), "again".to_owned()];
        assert_eq!(store.inputs_seen(&ids).await.expect("seen"), ["again"]);
        store.close().await;
    }

    /// An in-memory database reads through its one connection: a read after a cut-short commit
    /// must not see what that commit's open transaction wrote.
    #[tokio::test]
    async fn an_in_memory_read_does_not_see_a_cut_short_commit() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        {
            let mut held = store.writer.hold().await.expect("writer");
            store.writer.begin();
            sqlx::raw_sql("BEGIN IMMEDIATE; INSERT INTO processed_inputs (id) VALUES ('cut')")
                .execute(&mut *held)
                .await
                .expect("begin");
        }
        assert!(store.inputs_seen(&["cut".into()]).await.expect("seen").is_empty(), "read an uncommitted input");
        store.commit(Batch { inputs: vec!["after".into()], ..Batch::default() }).await.expect("commit");
        assert_eq!(store.inputs_seen(&["cut".into(), "after".into()]).await.expect("seen"), ["after"]);
    }

    /// Commits dropped at arbitrary points: each batch is stored whole or not at all, and the
    /// writer keeps working.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_dropped_at_any_point_are_all_or_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("capstan.db")).await.expect("open");
        let batch = |i: usize| {
            let id = format!("b{i}");
            Batch { inputs: vec![id.clone()], ..appends(vec![append(&id, 0, &[&id, &format!("{id}-2")])]) }
        };
        let mut cut = 0;
        for i in 0..60 {
            let wait = Duration::from_micros(50 * (i % 20) as u64);
            let dropped = if wait.is_zero() {
                // Polled once, then dropped: cut at the commit's first wait for the writer's
                // thread. A timer this short fires only on the timer's next tick (1 ms), after
                // which a fast commit may have landed, so the timeouts alone may cut nothing.
                let mut commit = std::pin::pin!(store.commit(batch(i)));
                std::future::poll_fn(|cx| std::task::Poll::Ready(commit.as_mut().poll(cx))).await.is_pending()
            } else {
                tokio::time::timeout(wait, store.commit(batch(i))).await.is_err()
            };
            if dropped {
                cut += 1;
            }
        }
        store.commit(batch(60)).await.expect("a commit after the cut ones");
        assert!(cut > 0, "no commit was cut short; the test proves nothing");
        for i in 0..=60 {
            let id = format!("b{i}");
            let seen = !store.inputs_seen(std::slice::from_ref(&id)).await.expect("seen").is_empty();
            let events = store.read_stream(&id, 1).await.expect("read").len();
            assert!((seen && events == 2) || (!seen && events == 0), "{id}: input seen {seen}, {events} events");
        }
        store.close().await;
    }

    /// Unique violations the commit path did not foresee: only one on an input id means
    /// "applied"; one on a stream seq is a race to retry.
    #[tokio::test]
    async fn unforeseen_unique_violations_map_by_constraint() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        let insert_input = || sqlx::query("INSERT INTO processed_inputs (id) VALUES ('i')");
        insert_input().execute(&mut *store.writer.hold().await.expect("writer")).await.expect("first");
        let err =
            db_error(insert_input().execute(&mut *store.writer.hold().await.expect("writer")).await.expect_err("dup"));
        assert!(matches!(err, Error::DuplicateInput(_)), "{err:?}");

        let insert_event = |position: i64, run: &str| {
            sqlx::query(
                "INSERT INTO events (position, run_id, seq, kind, payload, recorded_at_ms) \
                 VALUES (?, ?, 1, 'k', '{}', 0)",
            )
            .bind(position)
            .bind(run.to_owned())
        };
        insert_event(1, "r").execute(&mut *store.writer.hold().await.expect("writer")).await.expect("first event");
        let err = db_error(
            insert_event(2, "r").execute(&mut *store.writer.hold().await.expect("writer")).await.expect_err("same seq"),
        );
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }
}
