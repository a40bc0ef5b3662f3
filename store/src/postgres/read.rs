//! The read side of [`PostgresStore`], plus the small writes outside a batch (outbox deletion,
//! definitions).

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use super::PostgresStore;
use crate::sql::{db_error, sql_limit};
use crate::{
    DefinitionRecord, Definitions, Error, EventReader, Outbox, OutboxMessage, OutboxRow, Position, Result, RunFilter,
    RunIndex, RunRecord, StoredEvent, TimerRow, Timers,
};

const EVENT_COLUMNS: &str = "position, run_id, seq, kind, payload, recorded_at_ms";
const RUN_COLUMNS: &str = "run_id, project, context_id, stage, sequence, service, definition, \
                           definition_version, status, result, created_at_ms, updated_at_ms";
const DEFINITION_COLUMNS: &str = "project, name, version, source, created_at_ms";

fn event(row: &PgRow) -> Result<StoredEvent> {
    let run_id: String = row.try_get("run_id").map_err(db_error)?;
    let seq = row.try_get("seq").map_err(db_error)?;
    Ok(StoredEvent {
        position: row.try_get("position").map_err(db_error)?,
        id: crate::event_id(&run_id, seq),
        run_id,
        seq,
        kind: row.try_get("kind").map_err(db_error)?,
        payload: row.try_get("payload").map_err(db_error)?,
        recorded_at_ms: row.try_get("recorded_at_ms").map_err(db_error)?,
    })
}

fn run(row: &PgRow) -> Result<RunRecord> {
    let get = |name: &str| row.try_get::<String, _>(name).map_err(db_error);
    Ok(RunRecord {
        run_id: get("run_id")?,
        project: get("project")?,
        context_id: get("context_id")?,
        stage: get("stage")?,
        sequence: get("sequence")?,
        service: row.try_get("service").map_err(db_error)?,
        definition: get("definition")?,
        definition_version: row.try_get("definition_version").map_err(db_error)?,
        status: get("status")?,
        result: row.try_get("result").map_err(db_error)?,
        created_at_ms: row.try_get("created_at_ms").map_err(db_error)?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(db_error)?,
    })
}

fn definition(row: &PgRow) -> Result<DefinitionRecord> {
    Ok(DefinitionRecord {
        project: row.try_get("project").map_err(db_error)?,
        name: row.try_get("name").map_err(db_error)?,
        version: row.try_get("version").map_err(db_error)?,
        source: row.try_get("source").map_err(db_error)?,
        created_at_ms: row.try_get("created_at_ms").map_err(db_error)?,
    })
}

#[async_trait]
impl EventReader for PostgresStore {
    async fn read_stream(&self, run_id: &str, from_seq: i64) -> Result<Vec<StoredEvent>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE run_id = $1 AND seq >= $2 ORDER BY seq");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(run_id)
            .bind(from_seq)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(event).collect()
    }

    async fn read_streams(&self, run_ids: &[String]) -> Result<Vec<StoredEvent>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut lease = self.lender.lend().await?;
        let done = sqlx::query("SELECT * FROM capstan_read_streams($1::text[])")
            .bind(crate::distinct(run_ids))
            .fetch_all(lease.conn())
            .await;
        let rows = lease.settle(done).map_err(db_error)?;
        rows.iter().map(event).collect()
    }

    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<StoredEvent>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(event).collect()
    }

    async fn stream_version(&self, run_id: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0)::bigint FROM events WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }

    async fn inputs_seen(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut lease = self.lender.lend().await?;
        let done = sqlx::query_scalar("SELECT capstan_inputs_seen($1::text[])").bind(ids).fetch_all(lease.conn()).await;
        let found: Vec<String> = lease.settle(done).map_err(db_error)?;
        let seen: std::collections::HashSet<String> = found.into_iter().collect();
        // Answer in the caller's order.
        Ok(ids.iter().filter(|id| seen.contains(*id)).cloned().collect())
    }

    async fn last_position(&self) -> Result<Position> {
        sqlx::query_scalar("SELECT last FROM event_position WHERE id = 1").fetch_one(&self.pool).await.map_err(db_error)
    }
}

#[async_trait]
impl Outbox for PostgresStore {
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query("SELECT seq, id, topic, key, payload FROM outbox ORDER BY seq LIMIT $1")
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                Ok(OutboxRow {
                    seq: row.try_get("seq").map_err(db_error)?,
                    message: OutboxMessage {
                        id: row.try_get("id").map_err(db_error)?,
                        topic: row.try_get("topic").map_err(db_error)?,
                        key: row.try_get("key").map_err(db_error)?,
                        payload: row.try_get("payload").map_err(db_error)?,
                    },
                })
            })
            .collect()
    }

    async fn outbox_delete(&self, seqs: &[i64]) -> Result<()> {
        sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)").bind(seqs).execute(&self.pool).await.map_err(db_error)?;
        Ok(())
    }
}

#[async_trait]
impl Timers for PostgresStore {
    async fn timers_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TimerRow>> {
        let rows = sqlx::query(
            "SELECT run_id, key, fire_at_ms, payload FROM timers WHERE fire_at_ms <= $1 \
             ORDER BY fire_at_ms, run_id, key LIMIT $2",
        )
        .bind(now_ms)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                Ok(TimerRow {
                    run_id: row.try_get("run_id").map_err(db_error)?,
                    key: row.try_get("key").map_err(db_error)?,
                    fire_at_ms: row.try_get("fire_at_ms").map_err(db_error)?,
                    payload: row.try_get("payload").map_err(db_error)?,
                })
            })
            .collect()
    }

    async fn next_timer_at(&self, after_ms: i64) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT MIN(fire_at_ms) FROM timers WHERE fire_at_ms > $1")
            .bind(after_ms)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }

    async fn timer_checkpoints(&self) -> Result<Vec<(String, Position)>> {
        sqlx::query_as("SELECT name, position FROM timer_checkpoints ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)
    }

    async fn set_timer_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        sqlx::query(
            "INSERT INTO timer_checkpoints (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(name)
        .bind(position)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

#[async_trait]
impl RunIndex for PostgresStore {
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = $1");
        let row =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(run_id).fetch_optional(&self.pool).await.map_err(db_error)?;
        row.as_ref().map(run).transpose()
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        let mut qb = QueryBuilder::<Postgres>::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1"));
        let equals = [
            ("project", &filter.project),
            ("stage", &filter.stage),
            ("sequence", &filter.sequence),
            ("service", &filter.service),
            ("status", &filter.status),
            ("context_id", &filter.context_id),
        ];
        for (column, value) in equals {
            if let Some(value) = value {
                qb.push(format!(" AND {column} = ")).push_bind(value.as_str());
            }
        }
        if let Some((at, id)) = &filter.before {
            qb.push(" AND (created_at_ms < ")
                .push_bind(*at)
                .push(" OR (created_at_ms = ")
                .push_bind(*at)
                .push(" AND run_id < ")
                .push_bind(id.as_str())
                .push("))");
        }
        qb.push(" ORDER BY created_at_ms DESC, run_id DESC");
        if filter.limit > 0 {
            qb.push(" LIMIT ").push_bind(sql_limit(filter.limit));
        }
        let rows = qb.build().fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(run).collect()
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status NOT IN ('finished', 'cancelled') \
             ORDER BY created_at_ms, run_id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(run).collect()
    }
}

#[async_trait]
impl Definitions for PostgresStore {
    async fn put_definition(&self, project: &str, name: &str, source: &str, now_ms: i64) -> Result<i64> {
        // Two replicas may put the same definition at once: the loser's insert hits the primary
        // key and does nothing, and it reads again (then usually finds its own source as latest).
        for _ in 0..5 {
            let latest: Option<(i64, String)> = sqlx::query_as(
                "SELECT version, source FROM definitions WHERE project = $1 AND name = $2 \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(project)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            if let Some((version, latest_source)) = &latest
                && latest_source == source
            {
                return Ok(*version);
            }
            let version = latest.map_or(1, |(v, _)| v + 1);
            let inserted: Option<i64> = sqlx::query_scalar(
                "INSERT INTO definitions (project, name, version, source, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING version",
            )
            .bind(project)
            .bind(name)
            .bind(version)
            .bind(source)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            if let Some(version) = inserted {
                return Ok(version);
            }
        }
        Err(Error::Unavailable(format!("definition {project}/{name}: too many concurrent versions").into()))
    }

    async fn get_definition(
        &self,
        project: &str,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<DefinitionRecord>> {
        // A NULL version selects the latest.
        let sql = format!(
            "SELECT {DEFINITION_COLUMNS} FROM definitions WHERE project = $1 AND name = $2 \
             AND ($3::bigint IS NULL OR version = $3) ORDER BY version DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(project)
            .bind(name)
            .bind(version)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        row.as_ref().map(definition).transpose()
    }

    async fn list_definitions(&self, project: &str) -> Result<Vec<DefinitionRecord>> {
        let sql = format!(
            "SELECT {DEFINITION_COLUMNS} FROM definitions d WHERE project = $1 AND version = \
             (SELECT MAX(version) FROM definitions l WHERE l.project = d.project AND l.name = d.name) \
             ORDER BY name"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(project).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(definition).collect()
    }
}
