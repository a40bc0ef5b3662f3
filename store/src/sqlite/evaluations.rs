//! The evaluations projection in SQLite: written inside a commit, read newest first.

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{CHUNK, SqliteStore};
use crate::sql::{db_error, parse_json, sql_limit};
use crate::{EvaluationRecord, Evaluations, Result};

/// Inserts the batch's evaluation results; one already kept for `(run_id, task)` stays.
pub(super) async fn insert(conn: &mut SqliteConnection, evaluations: &[EvaluationRecord]) -> Result<()> {
    for chunk in evaluations.chunks(CHUNK / 2) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO evaluations (run_id, task, project, stage, service, result, score, evaluation, \
             created_at_ms) ",
        );
        qb.push_values(chunk, |mut row, e| {
            row.push_bind(e.run_id.as_str())
                .push_bind(e.task.as_str())
                .push_bind(e.project.as_str())
                .push_bind(e.stage.as_str())
                .push_bind(e.service.as_deref().unwrap_or(""))
                .push_bind(e.result.as_str())
                .push_bind(e.score)
                .push_bind(e.evaluation.to_string())
                .push_bind(e.created_at_ms);
        });
        qb.push(" ON CONFLICT (run_id, task) DO NOTHING");
        qb.build().execute(&mut *conn).await.map_err(db_error)?;
    }
    Ok(())
}

fn record(row: &SqliteRow) -> Result<EvaluationRecord> {
    let service: String = row.try_get("service").map_err(db_error)?;
    let text: String = row.try_get("evaluation").map_err(db_error)?;
    Ok(EvaluationRecord {
        run_id: row.try_get("run_id").map_err(db_error)?,
        task: row.try_get("task").map_err(db_error)?,
        project: row.try_get("project").map_err(db_error)?,
        stage: row.try_get("stage").map_err(db_error)?,
        service: Some(service).filter(|s| !s.is_empty()),
        result: row.try_get("result").map_err(db_error)?,
        score: row.try_get("score").map_err(db_error)?,
        evaluation: parse_json(&text)?,
        created_at_ms: row.try_get("created_at_ms").map_err(db_error)?,
    })
}

#[async_trait]
impl Evaluations for SqliteStore {
    async fn recent_evaluations(
        &self,
        project: &str,
        stage: &str,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EvaluationRecord>> {
        let rows = sqlx::query(
            "SELECT run_id, task, project, stage, service, result, score, evaluation, created_at_ms \
             FROM evaluations WHERE project = ? AND stage = ? AND service = ? ORDER BY seq DESC LIMIT ?",
        )
        .bind(project)
        .bind(stage)
        .bind(service.unwrap_or(""))
        .bind(sql_limit(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db_error)?;
        rows.iter().map(record).collect()
    }
}
