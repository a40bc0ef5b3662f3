//! A partition decides the next batch while the previous one commits. When that commit fails,
//! both batches must be applied again, in order, without losing or doubling an input: checked
//! with a store that fails every third commit, half of them after writing (the reply was lost).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use capstan::runtime::RuntimeConfig;
use capstan_proto::TaskResult;
use capstan_store::sqlite::SqliteStore;
use capstan_store::{
    Batch, CommitLog, Committed, DefinitionRecord, Definitions, Error, EvaluationRecord, Evaluations, EventReader,
    Outbox, OutboxRow, Position, Result, RunFilter, RunIndex, RunRecord, Store, StoredEvent, TimerRow, Timers,
};

use crate::crash::{DAG, all_over, check_recorded_once, dag_trigger};
use crate::support::{Behaviour, Script, WorkerLog, engine, history, scripted_worker};

/// A store whose every third commit fails: one time before writing anything, the next time
/// after writing everything. Each commit also takes a while, so inputs queue up behind it and
/// the partition decides the next batch meanwhile.
struct FailingCommits {
    inner: SqliteStore,
    commits: AtomicU64,
    failed_before: AtomicU64,
    failed_after: AtomicU64,
}

#[async_trait]
impl CommitLog for FailingCommits {
    fn serializes_commits(&self) -> bool {
        true
    }

    async fn commit(&self, batch: Batch) -> Result<Committed> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        match n % 6 {
            3 => {
                self.failed_before.fetch_add(1, Ordering::SeqCst);
                Err(Error::Unavailable("injected: nothing written".into()))
            }
            0 => {
                self.inner.commit(batch).await?;
                self.failed_after.fetch_add(1, Ordering::SeqCst);
                Err(Error::Unavailable("injected: written, reply lost".into()))
            }
            _ => self.inner.commit(batch).await,
        }
    }

    async fn prune_processed_inputs(&self, before_ms: i64, limit: usize) -> Result<u64> {
        self.inner.prune_processed_inputs(before_ms, limit).await
    }
}

#[async_trait]
impl EventReader for FailingCommits {
    async fn read_stream(&self, run_id: &str, from_seq: i64) -> Result<Vec<StoredEvent>> {
        self.inner.read_stream(run_id, from_seq).await
    }
    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<StoredEvent>> {
        self.inner.read_all(after, limit).await
    }
    async fn stream_version(&self, run_id: &str) -> Result<i64> {
        self.inner.stream_version(run_id).await
    }
    async fn inputs_seen(&self, ids: &[String]) -> Result<Vec<String>> {
        self.inner.inputs_seen(ids).await
    }
}

#[async_trait]
impl Outbox for FailingCommits {
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        self.inner.outbox_pending(limit).await
    }
    async fn outbox_delete(&self, seqs: &[i64]) -> Result<()> {
        self.inner.outbox_delete(seqs).await
    }
}

#[async_trait]
impl Timers for FailingCommits {
    async fn timers_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TimerRow>> {
        self.inner.timers_due(now_ms, limit).await
    }
    async fn next_timer_at(&self, after_ms: i64) -> Result<Option<i64>> {
        self.inner.next_timer_at(after_ms).await
    }
}

#[async_trait]
impl RunIndex for FailingCommits {
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        self.inner.get_run(run_id).await
    }
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        self.inner.list_runs(filter).await
    }
    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
        self.inner.unfinished_runs().await
    }
}

#[async_trait]
impl Definitions for FailingCommits {
    async fn put_definition(&self, project: &str, name: &str, source: &str, now_ms: i64) -> Result<i64> {
        self.inner.put_definition(project, name, source, now_ms).await
    }
    async fn get_definition(
        &self,
        project: &str,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<DefinitionRecord>> {
        self.inner.get_definition(project, name, version).await
    }
    async fn list_definitions(&self, project: &str) -> Result<Vec<DefinitionRecord>> {
        self.inner.list_definitions(project).await
    }
}

#[async_trait]
impl Evaluations for FailingCommits {
    async fn recent_evaluations(
        &self,
        project: &str,
        stage: &str,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EvaluationRecord>> {
        self.inner.recent_evaluations(project, stage, service, limit).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_decided_behind_a_failed_commit_are_applied_again_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let failing = Arc::new(FailingCommits {
        inner: SqliteStore::open(&dir.path().join("p.db")).await.expect("sqlite"),
        commits: AtomicU64::new(0),
        failed_before: AtomicU64::new(0),
        failed_after: AtomicU64::new(0),
    });
    let store: Arc<dyn Store> = failing.clone();
    let script: Script =
        Arc::new(|_, _| Behaviour::Complete { after: Duration::from_millis(2), result: TaskResult::Pass, error: None });
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let (rt, broker) = engine(store.clone(), RuntimeConfig::default()).await;
    let workers = scripted_worker(broker, "w", BTreeMap::new(), &["work"], script, log).await;
    rt.apply_definition("p", DAG).await.expect("definition");

    // Triggered all at once, so starts share batches with each other and with worker results.
    let triggers: Vec<_> = (0..60)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move {
                // A start whose commit reply was lost is found started on the retry: same id.
                rt.trigger(dag_trigger(i)).await.expect("trigger")
            })
        })
        .collect();
    let mut run_ids = Vec::new();
    for t in triggers {
        run_ids.push(t.await.expect("trigger task"));
    }
    let started = Instant::now();
    while !all_over(&*store, &run_ids).await {
        assert!(started.elapsed() < Duration::from_secs(60), "runs did not finish behind failing commits");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }

    let before = failing.failed_before.load(Ordering::SeqCst);
    let after = failing.failed_after.load(Ordering::SeqCst);
    // Every sixth commit fails each way; a loaded machine batches more per commit, so fewer.
    assert!(
        before >= 2 && after >= 2,
        "too few failures injected to mean anything: {before} before, {after} after writing"
    );
    for run_id in &run_ids {
        check_recorded_once(run_id, &history(&*store, run_id).await);
    }
}
