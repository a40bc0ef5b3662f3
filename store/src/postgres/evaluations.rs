//! The evaluations projection in PostgreSQL: written inside a commit, read newest first.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::PostgresStore;
use crate::sql::{db_error, sql_limit};
use crate::{EvaluationRecord, Evaluations, Result};

/// Inserts the batch's evaluation results; one already kept for `(run_id, task)` stays.
pub(super) async fn insert(conn: &mut PgConnection, evaluations: &[EvaluationRecord]) -> Result<()> {
    if evaluations.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&EvaluationRecord) -> &str| evaluations.iter().map(f).collect::<Vec<&str>>();
    let scores: Vec<Option<f64>> = evaluations.iter().map(|e| e.score).collect();
    let bodies: Vec<Json<&Value>> = evaluations.iter().map(|e| Json(&e.evaluation)).collect();
    let created: Vec<i64> = evaluations.iter().map(|e| e.created_at_ms).collect();
    sqlx::query(
        "INSERT INTO evaluations (run_id, task, project, stage, service, result, score, evaluation, created_at_ms) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::float8[], $8::jsonb[], $9::bigint[]) ON CONFLICT (run_id, task) DO NOTHING",
    )
    .bind(col(|e| &e.run_id))
    .bind(col(|e| &e.task))
    .bind(col(|e| &e.project))
    .bind(col(|e| &e.stage))
    .bind(col(|e| e.service.as_deref().unwrap_or("")))
    .bind(col(|e| &e.result))
    .bind(scores)
    .bind(bodies)
    .bind(created)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

fn record(row: &PgRow) -> Result<EvaluationRecord> {
    let service: String = row.try_get("service").map_err(db_error)?;
    Ok(EvaluationRecord {
        run_id: row.try_get("run_id").map_err(db_error)?,
        task: row.try_get("task").map_err(db_error)?,
        project: row.try_get("project").map_err(db_error)?,
        stage: row.try_get("stage").map_err(db_error)?,
        service: Some(service).filter(|s| !s.is_empty()),
        result: row.try_get("result").map_err(db_error)?,
        score: row.try_get("score").map_err(db_error)?,
        evaluation: row.try_get("evaluation").map_err(db_error)?,
        created_at_ms: row.try_get("created_at_ms").map_err(db_error)?,
    })
}

#[async_trait]
impl Evaluations for PostgresStore {
    async fn recent_evaluations(
        &self,
        project: &str,
        stage: &str,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EvaluationRecord>> {
        let rows = sqlx::query(
            "SELECT run_id, task, project, stage, service, result, score, evaluation, created_at_ms \
             FROM evaluations WHERE project = $1 AND stage = $2 AND service = $3 ORDER BY seq DESC LIMIT $4",
        )
        .bind(project)
        .bind(stage)
        .bind(service.unwrap_or(""))
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(record).collect()
    }
}
