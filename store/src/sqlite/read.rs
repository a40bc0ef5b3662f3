//! The read side of [`SqliteStore`], plus the small writes outside a batch (outbox deletion,
//! definitions).

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{Connection, QueryBuilder, Row, Sqlite};

use super::SqliteStore;
use super::commit::json;
use crate::sql::{db_error, parse_json, sql_limit};
use crate::{
    DefinitionRecord, Definitions, EventReader, Outbox, OutboxMessage, OutboxRow, Position, Result, RunFilter,
    RunIndex, RunRecord, StoredEvent, TimerRow, Timers,
};

const EVENT_COLUMNS: &str = "position, run_id, seq, kind, payload, recorded_at_ms";
const RUN_COLUMNS: &str = "run_id, project, context_id, stage, sequence, service, definition, \
                           definition_version, status, result, created_at_ms, updated_at_ms";
const DEFINITION_COLUMNS: &str = "project, name, version, source, created_at_ms";

fn event(row: &SqliteRow) -> Result<StoredEvent> {
    let payload: String = row.try_get("payload").map_err(db_error)?;
    let run_id: String = row.try_get("run_id").map_err(db_error)?;
    let seq = row.try_get("seq").map_err(db_error)?;
    Ok(StoredEvent {
        position: row.try_get("position").map_err(db_error)?,
        id: crate::event_id(&run_id, seq),
        run_id,
        seq,
        kind: row.try_get("kind").map_err(db_error)?,
        payload: parse_json(&payload)?,
        recorded_at_ms: row.try_get("recorded_at_ms").map_err(db_error)?,
    })
}

fn run(row: &SqliteRow) -> Result<RunRecord> {
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

fn definition(row: &SqliteRow) -> Result<DefinitionRecord> {
    Ok(DefinitionRecord {
        project: row.try_get("project").map_err(db_error)?,
        name: row.try_get("name").map_err(db_error)?,
        version: row.try_get("version").map_err(db_error)?,
        source: row.try_get("source").map_err(db_error)?,
        created_at_ms: row.try_get("created_at_ms").map_err(db_error)?,
    })
}

#[async_trait]
impl EventReader for SqliteStore {
    async fn read_stream(&self, run_id: &str, from_seq: i64) -> Result<Vec<StoredEvent>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND seq >= ? ORDER BY seq");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(run_id)
            .bind(from_seq)
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_error)?;
        rows.iter().map(event).collect()
    }

    async fn read_streams(&self, run_ids: &[String]) -> Result<Vec<StoredEvent>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One fixed statement (the ids as one JSON array); CROSS JOIN keeps the array as the
        // outer loop, so each run is found through the (run_id, seq) index.
        // The columns are qualified: json_each has columns of the same names.
        let rows = sqlx::query(
            "SELECT e.position, e.run_id, e.seq, e.kind, e.payload, e.recorded_at_ms \
             FROM json_each(?) AS j CROSS JOIN events AS e ON e.run_id = j.value ORDER BY j.rowid, e.seq",
        )
        .bind(json(&crate::distinct(run_ids))?)
        .fetch_all(&mut *self.read().await?)
        .await
        .map_err(db_error)?;
        rows.iter().map(event).collect()
    }

    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<StoredEvent>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(sql_limit(limit))
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_error)?;
        rows.iter().map(event).collect()
    }

    async fn stream_version(&self, run_id: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?")
            .bind(run_id)
            .fetch_one(&mut *self.read().await?)
            .await
            .map_err(db_error)
    }

    async fn inputs_seen(&self, ids: &[String]) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One fixed statement (the ids as one JSON array), so it stays prepared; answered in the
        // caller's order, each id found through the primary key.
        sqlx::query_scalar(
            "SELECT value FROM json_each(?) AS j \
             WHERE EXISTS (SELECT 1 FROM processed_inputs WHERE id = j.value) ORDER BY j.rowid",
        )
        .bind(json(ids)?)
        .fetch_all(&mut *self.read().await?)
        .await
        .map_err(db_error)
    }

    async fn last_position(&self) -> Result<Position> {
        sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&mut *self.read().await?)
            .await
            .map_err(db_error)
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query("SELECT seq, id, topic, key, payload FROM outbox ORDER BY seq LIMIT ?")
            .bind(sql_limit(limit))
            .fetch_all(&mut *self.read().await?)
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
        if seqs.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))")
            .bind(json(seqs)?)
            .execute(&mut *self.writer.hold().await?)
            .await
            .map_err(db_error)?;
        Ok(())
    }
}

#[async_trait]
impl Timers for SqliteStore {
    async fn timers_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TimerRow>> {
        let rows = sqlx::query(
            "SELECT run_id, key, fire_at_ms, payload FROM timers WHERE fire_at_ms <= ? \
             ORDER BY fire_at_ms, run_id, key LIMIT ?",
        )
        .bind(now_ms)
        .bind(sql_limit(limit))
        .fetch_all(&mut *self.read().await?)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let payload: String = row.try_get("payload").map_err(db_error)?;
                Ok(TimerRow {
                    run_id: row.try_get("run_id").map_err(db_error)?,
                    key: row.try_get("key").map_err(db_error)?,
                    fire_at_ms: row.try_get("fire_at_ms").map_err(db_error)?,
                    payload: parse_json(&payload)?,
                })
            })
            .collect()
    }

    async fn next_timer_at(&self, after_ms: i64) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT MIN(fire_at_ms) FROM timers WHERE fire_at_ms > ?")
            .bind(after_ms)
            .fetch_one(&mut *self.read().await?)
            .await
            .map_err(db_error)
    }

    async fn timer_checkpoints(&self) -> Result<Vec<(String, Position)>> {
        sqlx::query_as("SELECT name, position FROM timer_checkpoints ORDER BY name")
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_error)
    }

    async fn set_timer_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        sqlx::query(
            "INSERT INTO timer_checkpoints (name, position) VALUES (?, ?) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(name)
        .bind(position)
        .execute(&mut *self.writer.hold().await?)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

#[async_trait]
impl RunIndex for SqliteStore {
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(run_id)
            .fetch_optional(&mut *self.read().await?)
            .await
            .map_err(db_error)?;
        row.as_ref().map(run).transpose()
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1"));
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
        let rows = qb.build().fetch_all(&mut *self.read().await?).await.map_err(db_error)?;
        rows.iter().map(run).collect()
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status NOT IN ('finished', 'cancelled') \
             ORDER BY created_at_ms, run_id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *self.read().await?).await.map_err(db_error)?;
        rows.iter().map(run).collect()
    }
}

#[async_trait]
impl Definitions for SqliteStore {
    async fn put_definition(&self, project: &str, name: &str, source: &str, now_ms: i64) -> Result<i64> {
        // The single writer serializes concurrent puts, so read-then-insert cannot race.
        let mut held = self.writer.hold().await?;
        let mut tx = held.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
        let latest: Option<(i64, String)> = sqlx::query_as(
            "SELECT version, source FROM definitions WHERE project = ? AND name = ? \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(project)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some((version, latest_source)) = &latest
            && latest_source == source
        {
            return Ok(*version);
        }
        let version = latest.map_or(1, |(v, _)| v + 1);
        sqlx::query("INSERT INTO definitions (project, name, version, source, created_at_ms) VALUES (?, ?, ?, ?, ?)")
            .bind(project)
            .bind(name)
            .bind(version)
            .bind(source)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(version)
    }

    async fn get_definition(
        &self,
        project: &str,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<DefinitionRecord>> {
        // A NULL version selects the latest.
        let sql = format!(
            "SELECT {DEFINITION_COLUMNS} FROM definitions WHERE project = ? AND name = ? \
             AND (? IS NULL OR version = ?) ORDER BY version DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(project)
            .bind(name)
            .bind(version)
            .bind(version)
            .fetch_optional(&mut *self.read().await?)
            .await
            .map_err(db_error)?;
        row.as_ref().map(definition).transpose()
    }

    async fn list_definitions(&self, project: &str) -> Result<Vec<DefinitionRecord>> {
        let sql = format!(
            "SELECT {DEFINITION_COLUMNS} FROM definitions d WHERE project = ? AND version = \
             (SELECT MAX(version) FROM definitions l WHERE l.project = d.project AND l.name = d.name) \
             ORDER BY name"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(project)
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_error)?;
        rows.iter().map(definition).collect()
    }
}
