//! The evaluations projection in PostgreSQL: written inside a commit (by `capstan_commit`), read
//! newest first.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::PostgresStore;
use crate::sql::{db_error, sql_limit};
use crate::{EvaluationRecord, Evaluations, Result};

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
