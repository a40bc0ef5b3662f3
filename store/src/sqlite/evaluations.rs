//! The evaluations projection in SQLite: written inside a commit, read newest first.

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::SqliteStore;
use crate::sql::{db_error, parse_json, sql_limit};
use crate::{EvaluationRecord, Evaluations, Result};

/// Inserts the batch's evaluation results; one already kept for `(run_id, task)` stays.
///
/// One fixed single-row statement per result (a batch holds few, one per finished gate), not
/// the JSON rows of [`super::commit`]: SQLite's decimal-to-double conversion does not give back
/// every `f64` exactly, and a score must read back as it was written.
pub(super) async fn insert(conn: &mut SqliteConnection, evaluations: &[EvaluationRecord]) -> Result<()> {
    for e in evaluations {
        sqlx::query(
            "INSERT INTO evaluations (run_id, task, project, stage, service, result, score, evaluation, \
             created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, task) DO NOTHING",
        )
        .bind(e.run_id.as_str())
        .bind(e.task.as_str())
        .bind(e.project.as_str())
        .bind(e.stage.as_str())
        .bind(e.service.as_deref().unwrap_or(""))
        .bind(e.result.as_str())
        .bind(e.score)
        .bind(e.evaluation.to_string())
        .bind(e.created_at_ms)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
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
        .fetch_all(&mut *self.read().await?)
        .await
        .map_err(db_error)?;
        rows.iter().map(record).collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::sqlite::SqliteStore;
    use crate::{Batch, CommitLog, Evaluations};

    /// Scores are bound as doubles, never written as decimal text: SQLite's text-to-double
    /// conversion is off by one unit in the last place for some values, like the first two here.
    #[tokio::test]
    async fn scores_read_back_bit_for_bit() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        let scores = [-6.536982303948592e-214, 1.6902694547073622e168, 1.0 / 3.0, 0.1, 99.99999999999999, 5e-324];
        let evaluations = scores
            .iter()
            .enumerate()
            .map(|(i, score)| {
                let mut e = crate::testing::evaluation("r", &format!("gate-{i}"), "svc", 1);
                e.score = Some(*score);
                e
            })
            .collect();
        store.commit(Batch { evaluations, ..Batch::default() }).await.expect("commit");
        let mut read: Vec<u64> = store
            .recent_evaluations("p", "dev", Some("svc"), 10)
            .await
            .expect("read")
            .into_iter()
            .map(|e| e.score.expect("scored").to_bits())
            .collect();
        read.reverse();
        assert_eq!(read, scores.map(f64::to_bits));
    }
}
