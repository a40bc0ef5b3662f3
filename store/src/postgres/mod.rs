//! [`PostgresStore`]: the production backend, shared by every `capstan server` replica.
//!
//! A commit is one transaction of at most eight statements whatever the batch size: each table
//! is written by one statement that binds whole columns as arrays and `UNNEST`s them.
//!
//! Global order: a commit that appends increments the single-row counter `event_position` by its
//! event count and takes its positions from the result. The row lock is held until the
//! transaction ends, so appending commits are serialized: positions become visible in commit
//! order without gaps, and a `read_all` watcher never passes a position that commits later (the
//! classic sequence gap problem). The same lock makes the expected-version check race-free:
//! under READ COMMITTED every statement after the increment sees all earlier commits. The lock
//! is taken as late as possible (after inputs, run index, outbox and timers are written), so it
//! is held for three statements and the WAL flush. Commits that only touch inputs, outbox,
//! timers or the run index do not take it.

mod evaluations;
mod read;

use std::str::FromStr;

use async_trait::async_trait;
use serde_json::Value;
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
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .connect_with(options)
            .await
            .map_err(db_error)?;
        let store = PostgresStore { pool, schema: config.schema };
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
        self.pool.close().await;
        Ok(())
    }
}

/// Writes the run index, outbox and timer parts of the plan, one statement per table.
async fn write_rest(conn: &mut PgConnection, plan: &Plan) -> Result<()> {
    if !plan.runs.is_empty() {
        let col = |f: fn(&crate::RunRecord) -> &str| plan.runs.iter().map(f).collect::<Vec<_>>();
        let num = |f: fn(&crate::RunRecord) -> i64| plan.runs.iter().map(f).collect::<Vec<_>>();
        let opt = |f: fn(&crate::RunRecord) -> Option<&str>| plan.runs.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO runs (run_id, project, context_id, stage, sequence, service, definition, \
             definition_version, status, result, created_at_ms, updated_at_ms) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::bigint[], $12::bigint[]) \
             ON CONFLICT (run_id) DO UPDATE SET project = excluded.project, \
             context_id = excluded.context_id, stage = excluded.stage, \
             sequence = excluded.sequence, service = excluded.service, \
             definition = excluded.definition, definition_version = excluded.definition_version, \
             status = excluded.status, result = excluded.result, \
             created_at_ms = excluded.created_at_ms, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(col(|r| &r.run_id))
        .bind(col(|r| &r.project))
        .bind(col(|r| &r.context_id))
        .bind(col(|r| &r.stage))
        .bind(col(|r| &r.sequence))
        .bind(opt(|r| r.service.as_deref()))
        .bind(col(|r| &r.definition))
        .bind(num(|r| r.definition_version))
        .bind(col(|r| &r.status))
        .bind(opt(|r| r.result.as_deref()))
        .bind(num(|r| r.created_at_ms))
        .bind(num(|r| r.updated_at_ms))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    if !plan.outbox.is_empty() {
        let col = |f: fn(&crate::OutboxMessage) -> &str| plan.outbox.iter().map(f).collect::<Vec<_>>();
        let payloads: Vec<&[u8]> = plan.outbox.iter().map(|m| m.payload.as_slice()).collect();
        // ORDER BY the ordinality so the serial seq follows the batch order.
        sqlx::query(
            "INSERT INTO outbox (id, topic, key, payload) SELECT id, topic, key, payload \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY \
             AS u (id, topic, key, payload, ord) ORDER BY ord",
        )
        .bind(col(|m| &m.id))
        .bind(col(|m| &m.topic))
        .bind(col(|m| &m.key))
        .bind(payloads)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    if !plan.cancel_timers.is_empty() {
        let runs: Vec<&str> = plan.cancel_timers.iter().map(|c| c.run_id.as_str()).collect();
        let keys: Vec<&str> = plan.cancel_timers.iter().map(|c| c.key.as_str()).collect();
        let guards: Vec<Option<i64>> = plan.cancel_timers.iter().map(|c| c.only_if_fire_at).collect();
        sqlx::query(
            "DELETE FROM timers t USING UNNEST($1::text[], $2::text[], $3::bigint[]) \
             AS c (run_id, key, guard) WHERE t.run_id = c.run_id AND t.key = c.key \
             AND (c.guard IS NULL OR t.fire_at_ms = c.guard)",
        )
        .bind(runs)
        .bind(keys)
        .bind(guards)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    if !plan.set_timers.is_empty() {
        let runs: Vec<&str> = plan.set_timers.iter().map(|t| t.run_id.as_str()).collect();
        let keys: Vec<&str> = plan.set_timers.iter().map(|t| t.key.as_str()).collect();
        let fire_at: Vec<i64> = plan.set_timers.iter().map(|t| t.fire_at_ms).collect();
        let payloads: Vec<Json<&Value>> = plan.set_timers.iter().map(|t| Json(&t.payload)).collect();
        sqlx::query(
            "INSERT INTO timers (run_id, key, fire_at_ms, payload) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::jsonb[]) \
             ON CONFLICT (run_id, key) DO UPDATE SET fire_at_ms = excluded.fire_at_ms, \
             payload = excluded.payload",
        )
        .bind(runs)
        .bind(keys)
        .bind(fire_at)
        .bind(payloads)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

#[async_trait]
impl CommitLog for PostgresStore {
    async fn commit(&self, batch: Batch) -> Result<Committed> {
        let plan = Plan::new(batch)?;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Any early return drops `tx`, which rolls the whole batch back.
        if !plan.inputs.is_empty() {
            let written: Vec<String> = sqlx::query_scalar(
                "INSERT INTO processed_inputs (id, processed_at_ms) SELECT id, $2::bigint FROM UNNEST($1::text[]) \
                 AS u (id) ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .bind(&plan.inputs)
            .bind(plan.inputs_at_ms)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            if let Some(id) = Plan::first_missing(plan.inputs.iter().map(String::as_str), &written) {
                return Err(Error::DuplicateInput(id));
            }
        }
        // Everything that does not need the global order is written before the position lock,
        // so that appending commits hold it for three statements and the flush, not for the
        // whole batch: with several partitions committing, the time inside the lock is what
        // bounds commits per second. Nothing here is visible before COMMIT either way.
        write_rest(&mut tx, &plan).await?;
        evaluations::insert(&mut tx, &plan.evaluations).await?;
        let committed = if plan.has_appends() { append_events(&mut tx, &plan).await? } else { Committed::default() };
        tx.commit().await.map_err(db_error)?;
        Ok(committed)
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

/// Takes the position lock, checks the expected versions (after the lock, so the check sees
/// every earlier appending commit) and inserts the events at their positions.
async fn append_events(conn: &mut PgConnection, plan: &Plan) -> Result<Committed> {
    let count = plan.event_count() as i64;
    let last: i64 = sqlx::query_scalar("UPDATE event_position SET last = last + $1 WHERE id = 1 RETURNING last")
        .bind(count)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
    let first_position = last - count + 1;
    let current: Vec<(String, i64)> =
        sqlx::query_as("SELECT run_id, MAX(seq) FROM events WHERE run_id = ANY($1) GROUP BY run_id")
            .bind(plan.append_run_ids())
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
    let sequenced = plan.sequence(&current.into_iter().collect())?;
    if sequenced.is_empty() {
        return Ok(Committed::default());
    }
    let positions: Vec<i64> = (0..count).map(|i| first_position + i).collect();
    let runs: Vec<&str> = sequenced.iter().map(|s| s.run_id).collect();
    let seqs: Vec<i64> = sequenced.iter().map(|s| s.seq).collect();
    let ids: Vec<&str> = sequenced.iter().map(|s| s.event.id.as_str()).collect();
    let kinds: Vec<&str> = sequenced.iter().map(|s| s.event.kind.as_str()).collect();
    let payloads: Vec<Json<&Value>> = sequenced.iter().map(|s| Json(&s.event.payload)).collect();
    let recorded: Vec<i64> = sequenced.iter().map(|s| s.event.recorded_at_ms).collect();
    let written: Vec<String> = sqlx::query_scalar(
        "INSERT INTO events (position, run_id, seq, id, kind, payload, recorded_at_ms) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::text[], \
         $5::text[], $6::jsonb[], $7::bigint[]) ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(positions)
    .bind(runs)
    .bind(seqs)
    .bind(&ids)
    .bind(kinds)
    .bind(payloads)
    .bind(recorded)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    if let Some(id) = Plan::first_missing(ids.iter().copied(), &written) {
        return Err(Error::DuplicateInput(id));
    }
    Ok(Committed { last_position: first_position + count - 1, events: sequenced.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventReader;

    /// A database made before processed inputs had a time upgrades in place: its ids stay
    /// processed, with time 0, so they are the first to be pruned.
    #[tokio::test]
    async fn inputs_from_before_migration_3_are_pruned_first() {
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
        MIGRATOR.run_to(2, &old).await.expect("schema of migration 2");
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

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("capstan_test_1"));
        assert!(!valid_schema("Capstan"));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema("a;drop"));
        assert!(!valid_schema(""));
    }
}
