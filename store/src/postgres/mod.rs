//! [`PostgresStore`]: the production backend, shared by every `capstan server` replica.
//!
//! A commit is ONE statement, a call of the PL/pgSQL function `capstan_commit` (migration 0004)
//! run in autocommit: one network round trip whatever the batch size. Each table is written by
//! one statement inside it that `UNNEST`s whole columns bound as arrays. Before, a commit was
//! ten round trips (BEGIN, one per table, the position lock, the version check, COMMIT); on a
//! loaded machine every round trip waits for the scheduler, and three of them were taken while
//! holding the position lock that serializes all appending commits.
//!
//! Global order: a commit that appends increments the single-row counter `event_position` by its
//! event count and takes its positions from the result. The row lock is held until the
//! transaction ends, so appending commits are serialized: positions become visible in commit
//! order without gaps, and a `read_all` watcher never passes a position that commits later (the
//! classic sequence gap problem). The same lock makes the expected-version check race-free:
//! under READ COMMITTED every statement of the function after the increment sees all earlier
//! commits. The lock is taken last, so it is held for the events insert and the WAL flush.
//! Commits that only touch inputs, outbox, timers or the run index do not take it.

mod evaluations;
mod lease;
#[cfg(target_os = "linux")]
mod nodelay;
mod read;

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};
use tracing::debug;

use crate::plan::Plan;
use crate::sql::{db_error, migrate_error, sql_limit};
use crate::{Batch, CommitLog, Committed, Error, Result};

/// Migrations embedded at compile time; they need no database then.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Options for [`PostgresStore::connect_with`].
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// A dedicated schema (created if missing, then used through `search_path`); `None` uses
    /// the connection's default search path.
    pub schema: Option<String>,
    /// Size of the connection pool.
    pub max_connections: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig { schema: None, max_connections: 10 }
    }
}

/// A [`Store`](crate::Store) in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    schema: Option<String>,
    /// Connections for the per-batch statements, without sqlx's ping on release (`lease.rs`).
    lender: std::sync::Arc<lease::Lender>,
}

/// Whether `name` is a plain lower-case identifier, safe to splice into SQL unquoted.
fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

impl PostgresStore {
    /// Connects to `url` (default schema, pool of 10) and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresConfig::default()).await
    }

    /// Connects to `url`, creating and using the schema `schema` (lower-case letters, digits
    /// and `_`), so several stores can share one database.
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Self> {
        let config = PostgresConfig { schema: Some(schema.to_owned()), ..PostgresConfig::default() };
        Self::connect_with(url, config).await
    }

    /// Connects to `url` with `config` and brings the schema up to date.
    pub async fn connect_with(url: &str, config: PostgresConfig) -> Result<Self> {
        let mut options = PgConnectOptions::from_str(url).map_err(|e| Error::Invalid(format!("database URL: {e}")))?;
        if let Some(schema) = &config.schema {
            if !valid_schema(schema) {
                return Err(Error::Invalid(format!("schema name {schema:?} is not a plain identifier")));
            }
            // The schema must exist before connections that put it first on their search path
            // create tables; one short-lived connection makes it.
            let mut conn = PgConnection::connect_with(&options).await.map_err(db_error)?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {schema}")))
                .execute(&mut conn)
                .await
                .map_err(db_error)?;
            conn.close().await.map_err(db_error)?;
            options = options.options([("search_path", schema.as_str())]);
        }
        // No ping before handing out a pooled connection: sqlx's default sends one (a Sync and
        // a wait for ReadyForQuery) before every query, on top of the one it sends when the
        // connection comes back. A connection that died meanwhile fails its query instead, as
        // `Unavailable`, which every caller already retries.
        let mut pool_options =
            PgPoolOptions::new().max_connections(config.max_connections.max(1)).test_before_acquire(false);
        #[cfg(target_os = "linux")]
        if let Some(server) = nodelay::Server::of(&options) {
            pool_options = pool_options.after_connect(move |_, _| {
                Box::pin(async move {
                    nodelay::apply(server);
                    Ok(())
                })
            });
        }
        let lender = std::sync::Arc::new(lease::Lender::new(options.clone(), config.max_connections as usize));
        let pool = pool_options.connect_with(options).await.map_err(db_error)?;
        let store = PostgresStore { pool, schema: config.schema, lender };
        store.migrate().await?;
        debug!(schema = ?store.schema, "connected PostgreSQL store");
        Ok(store)
    }

    /// Applies the embedded migrations that have not run yet (idempotent; `connect*` calls it).
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await.map_err(migrate_error)
    }

    /// The connection pool, for administration and tests.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Drops this store's dedicated schema with everything in it, then closes the pool (for
    /// tests that give every case a fresh schema). Without a dedicated schema it only closes.
    pub async fn drop_schema(self) -> Result<()> {
        if let Some(schema) = &self.schema {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")))
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
        }
        self.lender.close().await;
        self.pool.close().await;
        Ok(())
    }
}

/// The SQLSTATE `capstan_commit` raises for an input id already recorded.
const DUPLICATE_ID: &str = "CP001";
/// The SQLSTATE `capstan_commit` raises for a run whose version is not the expected one.
const VERSION_CONFLICT: &str = "CP002";

/// Maps an error of the commit call: the two raised by `capstan_commit` itself carry what the
/// caller must know (which id, which run and versions); everything else as [`db_error`].
fn commit_error(err: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &err {
        let code = db.code();
        if code.as_deref() == Some(DUPLICATE_ID) {
            return Error::DuplicateInput(db.message().to_owned());
        }
        if code.as_deref() == Some(VERSION_CONFLICT) {
            let detail = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().and_then(|e| e.detail());
            let mut versions = detail.unwrap_or_default().split(' ').map(str::parse::<i64>);
            if let (Some(Ok(expected)), Some(Ok(actual))) = (versions.next(), versions.next()) {
                return Error::Conflict { run_id: db.message().to_owned(), expected, actual };
            }
        }
    }
    db_error(err)
}

#[async_trait]
impl CommitLog for PostgresStore {
    async fn commit(&self, batch: Batch) -> Result<Committed> {
        let plan = Plan::new(batch)?;
        // Numbers the events from each run's first expected version; this also checks that
        // appends to one run chain. The function checks those versions against the table.
        let expected = plan.first_expected_versions();
        let sequenced = plan.sequence(&expected.iter().cloned().collect::<foldhash::HashMap<_, _>>())?;
        let runs = &plan.runs;
        let run_col = |f: fn(&crate::RunRecord) -> &str| runs.iter().map(f).collect::<Vec<_>>();
        let run_num = |f: fn(&crate::RunRecord) -> i64| runs.iter().map(f).collect::<Vec<_>>();
        let run_opt = |f: fn(&crate::RunRecord) -> Option<&str>| runs.iter().map(f).collect::<Vec<_>>();
        let outbox = &plan.outbox;
        let out_col = |f: fn(&crate::OutboxMessage) -> &str| outbox.iter().map(f).collect::<Vec<_>>();
        let cancels = &plan.cancel_timers;
        let sets = &plan.set_timers;
        let evals = &plan.evaluations;
        let eval_col = |f: fn(&crate::EvaluationRecord) -> &str| evals.iter().map(f).collect::<Vec<_>>();
        let call = sqlx::query_scalar(
            "SELECT capstan_commit($1::text[], $2::bigint, \
             $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], \
             $10::bigint[], $11::text[], $12::text[], $13::bigint[], $14::bigint[], \
             $15::text[], $16::text[], $17::text[], $18::bytea[], \
             $19::text[], $20::text[], $21::bigint[], \
             $22::text[], $23::text[], $24::bigint[], $25::jsonb[], \
             $26::text[], $27::text[], $28::text[], $29::text[], $30::text[], $31::text[], \
             $32::float8[], $33::jsonb[], $34::bigint[], \
             $35::text[], $36::bigint[], \
             $37::text[], $38::bigint[], $39::text[], $40::jsonb[], $41::bigint[])",
        )
        .bind(&plan.inputs)
        .bind(plan.inputs_at_ms)
        .bind(run_col(|r| &r.run_id))
        .bind(run_col(|r| &r.project))
        .bind(run_col(|r| &r.context_id))
        .bind(run_col(|r| &r.stage))
        .bind(run_col(|r| &r.sequence))
        .bind(run_opt(|r| r.service.as_deref()))
        .bind(run_col(|r| &r.definition))
        .bind(run_num(|r| r.definition_version))
        .bind(run_col(|r| &r.status))
        .bind(run_opt(|r| r.result.as_deref()))
        .bind(run_num(|r| r.created_at_ms))
        .bind(run_num(|r| r.updated_at_ms))
        .bind(out_col(|m| &m.id))
        .bind(out_col(|m| &m.topic))
        .bind(out_col(|m| &m.key))
        .bind(outbox.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>())
        .bind(cancels.iter().map(|c| c.run_id.as_str()).collect::<Vec<_>>())
        .bind(cancels.iter().map(|c| c.key.as_str()).collect::<Vec<_>>())
        .bind(cancels.iter().map(|c| c.only_if_fire_at).collect::<Vec<_>>())
        .bind(sets.iter().map(|t| t.run_id.as_str()).collect::<Vec<_>>())
        .bind(sets.iter().map(|t| t.key.as_str()).collect::<Vec<_>>())
        .bind(sets.iter().map(|t| t.fire_at_ms).collect::<Vec<_>>())
        .bind(sets.iter().map(|t| Json(&t.payload)).collect::<Vec<_>>())
        .bind(eval_col(|e| &e.run_id))
        .bind(eval_col(|e| &e.task))
        .bind(eval_col(|e| &e.project))
        .bind(eval_col(|e| &e.stage))
        .bind(eval_col(|e| e.service.as_deref().unwrap_or("")))
        .bind(eval_col(|e| &e.result))
        .bind(evals.iter().map(|e| e.score).collect::<Vec<_>>())
        .bind(evals.iter().map(|e| Json(&e.evaluation)).collect::<Vec<_>>())
        .bind(evals.iter().map(|e| e.created_at_ms).collect::<Vec<_>>())
        .bind(expected.iter().map(|(run, _)| run.as_str()).collect::<Vec<_>>())
        .bind(expected.iter().map(|(_, version)| *version).collect::<Vec<_>>())
        .bind(sequenced.iter().map(|s| s.run_id).collect::<Vec<_>>())
        .bind(sequenced.iter().map(|s| s.seq).collect::<Vec<_>>())
        .bind(sequenced.iter().map(|s| s.event.kind.as_str()).collect::<Vec<_>>())
        .bind(sequenced.iter().map(|s| Json(&s.event.payload)).collect::<Vec<_>>())
        .bind(sequenced.iter().map(|s| s.event.recorded_at_ms).collect::<Vec<_>>());
        let mut lease = self.lender.lend().await?;
        let done = call.fetch_one(lease.conn()).await;
        let last: i64 = lease.settle(done).map_err(commit_error)?;
        if sequenced.is_empty() {
            return Ok(Committed::default());
        }
        Ok(Committed { last_position: last, events: sequenced.len() })
    }

    async fn prune_processed_inputs(&self, before_ms: i64, limit: usize) -> Result<u64> {
        // One short transaction per call. SKIP LOCKED lets replicas that prune at the same time
        // take different rows instead of queueing behind each other.
        let done = sqlx::query(
            "DELETE FROM processed_inputs WHERE id IN (SELECT id FROM processed_inputs \
             WHERE processed_at_ms < $1 ORDER BY processed_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(before_ms)
        .bind(sql_limit(limit))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventReader;

    /// A fresh schema brought up to migration `version`: the test's URL, the schema's name and
    /// a pool on it, for a test to write rows in the old shape before the store upgrades it.
    async fn schema_at(version: i64) -> (String, String, PgPool) {
        let url = std::env::var("CAPSTAN_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".to_owned());
        let schema = format!("capstan_test_{}", uuid::Uuid::new_v4().simple());
        let options = PgConnectOptions::from_str(&url).expect("URL");
        let mut conn = PgConnection::connect_with(&options).await.expect("PostgreSQL is required by this test");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.expect("schema");
        conn.close().await.expect("close");
        let old = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.options([("search_path", schema.as_str())]))
            .await
            .expect("connect");
        MIGRATOR.run_to(version, &old).await.expect("old schema");
        (url, schema, old)
    }

    /// A database made before processed inputs had a time upgrades in place: its ids stay
    /// processed, with time 0, so they are the first to be pruned.
    #[tokio::test]
    async fn inputs_from_before_migration_3_are_pruned_first() {
        let (url, schema, old) = schema_at(2).await;
        sqlx::query("INSERT INTO processed_inputs (id) VALUES ('legacy')").execute(&old).await.expect("legacy id");
        old.close().await;

        let store = PostgresStore::connect_with_schema(&url, &schema).await.expect("upgrade");
        let batch = Batch { inputs: vec!["fresh".into()], inputs_at_ms: 1_000, ..Batch::default() };
        store.commit(batch).await.expect("commit");
        let both = ["legacy".to_owned(), "fresh".to_owned()];
        let before = store.inputs_seen(&both).await.expect("seen").len();
        let pruned = store.prune_processed_inputs(1_000, 10).await.expect("prune");
        let after = store.inputs_seen(&both).await.expect("seen");
        store.drop_schema().await.expect("drop test schema");
        assert_eq!(before, 2, "the legacy id is still processed");
        assert_eq!(pruned, 1);
        assert_eq!(after, ["fresh"]);
    }

    /// Events stored while ids were a column of their own (before migration 8) keep their
    /// positions, ids and payloads through the upgrade, and appends go on after them.
    #[tokio::test]
    async fn events_from_before_migration_8_upgrade_in_place() {
        let (url, schema, old) = schema_at(7).await;
        sqlx::raw_sql(
            "INSERT INTO events (position, run_id, seq, id, kind, payload, recorded_at_ms) \
             VALUES (1, 'r', 1, 'r:1', 'k', '{\"a\":1}', 5), (2, 's', 1, 's:1', 'k', '[2]', 6); \
             UPDATE event_position SET last = 2",
        )
        .execute(&old)
        .await
        .expect("old events");
        old.close().await;

        let store = PostgresStore::connect_with_schema(&url, &schema).await.expect("upgrade");
        let read = store.read_all(0, 10).await.expect("read");
        let done = store.commit(crate::testing::appends(vec![crate::testing::append("r", 1, &["next"])])).await;
        let streamed = store.read_streams(&["r".to_owned()]).await.expect("streams");
        store.drop_schema().await.expect("drop test schema");
        let read: Vec<(i64, String, serde_json::Value)> =
            read.into_iter().map(|e| (e.position, e.id, e.payload)).collect();
        assert_eq!(
            read,
            [(1, "r:1".to_owned(), serde_json::json!({"a": 1})), (2, "s:1".to_owned(), serde_json::json!([2]))]
        );
        assert_eq!(done.expect("append after the upgrade").last_position, 3);
        assert_eq!(streamed.into_iter().map(|e| e.id).collect::<Vec<_>>(), ["r:1", "r:2"]);
    }

    /// The per-batch statements reuse one lent connection, also after the database refused a
    /// batch; a connection that died while idle fails one call as `Unavailable` and is replaced.
    #[tokio::test]
    async fn lent_connections_are_reused_and_replaced_once_dead() {
        let url = std::env::var("CAPSTAN_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".to_owned());
        let schema = format!("capstan_test_{}", uuid::Uuid::new_v4().simple());
        // Named, so that the kill below finds this test's connection and no other test's.
        let url = format!("{url}{}application_name={schema}", if url.contains('?') { '&' } else { '?' });
        let store =
            PostgresStore::connect_with_schema(&url, &schema).await.expect("PostgreSQL is required by this test");
        let batch = |input: &str| Batch { inputs: vec![input.to_owned()], inputs_at_ms: 1, ..Batch::default() };
        for i in 0..20 {
            store.commit(batch(&format!("in-{i}"))).await.expect("commit");
            store.inputs_seen(&[format!("in-{i}")]).await.expect("seen");
        }
        let refused = store.commit(batch("in-3")).await;
        assert!(matches!(refused, Err(Error::DuplicateInput(_))), "{refused:?}");
        assert_eq!(store.lender.opened(), 1, "one connection served every call, the refused one too");

        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'SELECT capstan_%' \
               AND application_name = $1",
        )
        .bind(&schema)
        .fetch_one(store.pool())
        .await
        .expect("terminate the lent connection");
        assert_eq!(killed, 1, "the lent connection is found by its last statement");
        let mut dead = store.commit(batch("after-1")).await;
        for _ in 0..50 {
            // The server may not have closed the socket yet: the first call can still get through.
            if matches!(dead, Err(Error::Unavailable(_))) || store.lender.opened() > 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            dead = store.commit(batch(&format!("after-{}", store.lender.opened() + 1))).await;
        }
        store.commit(batch("after-last")).await.expect("a fresh connection");
        let opened = store.lender.opened();
        store.drop_schema().await.expect("drop test schema");
        assert!(matches!(dead, Err(Error::Unavailable(_))), "the dead connection's call: {dead:?}");
        assert_eq!(opened, 2, "the dead connection was replaced once");
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("capstan_test_1"));
        assert!(!valid_schema("Capstan"));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema("a;drop"));
        assert!(!valid_schema(""));
    }
}
