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

/// A SQLite store that counts what the runtime asks of it. With `failing`, every third commit
/// fails: one time before writing anything, the next time after writing everything. Each
/// commit also takes a while, so inputs queue up behind it and partitions overlap.
struct Instrumented {
    inner: SqliteStore,
    /// Whether to tell the runtime commits run one at a time (SQLite's truth) or side by side.
    serializes: bool,
    failing: bool,
    /// Commits that append an event of this kind are written and then reported failed.
    lose_reply_on: Option<&'static str>,
    /// With `lose_reply_on`: after each lost reply, the next commit that only writes timers
    /// fails (nothing written).
    refuse_timers_after_loss: bool,
    timers_refusal_armed: std::sync::atomic::AtomicBool,
    commits: AtomicU64,
    failed_before: AtomicU64,
    failed_after: AtomicU64,
    /// Calls of `read_stream` (one run) and of `read_streams` (every uncached run of a batch).
    single_reads: AtomicU64,
    batch_reads: AtomicU64,
    /// Commits under way now, and the most ever under way at once.
    under_way: AtomicU64,
    most_under_way: AtomicU64,
    /// The CloudEvent type of every outbox row handed to `commit`.
    outbox_types: Mutex<Vec<String>>,
}

impl Instrumented {
    async fn open(dir: &std::path::Path, serializes: bool, failing: bool) -> Arc<Self> {
        Self::open_losing(dir, serializes, failing, None, false).await
    }

    async fn open_losing(
        dir: &std::path::Path,
        serializes: bool,
        failing: bool,
        lose_reply_on: Option<&'static str>,
        refuse_timers_after_loss: bool,
    ) -> Arc<Self> {
        Arc::new(Instrumented {
            inner: SqliteStore::open(&dir.join("p.db")).await.expect("sqlite"),
            serializes,
            failing,
            lose_reply_on,
            refuse_timers_after_loss,
            timers_refusal_armed: std::sync::atomic::AtomicBool::new(false),
            commits: AtomicU64::new(0),
            failed_before: AtomicU64::new(0),
            failed_after: AtomicU64::new(0),
            single_reads: AtomicU64::new(0),
            batch_reads: AtomicU64::new(0),
            under_way: AtomicU64::new(0),
            most_under_way: AtomicU64::new(0),
            outbox_types: Mutex::new(Vec::new()),
        })
    }

    async fn commit_failing(&self, batch: Batch) -> Result<Committed> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(kind) = self.lose_reply_on
            && batch.appends.iter().any(|a| a.events.iter().any(|e| e.kind == kind))
        {
            self.inner.commit(batch).await?;
            self.failed_after.fetch_add(1, Ordering::SeqCst);
            self.timers_refusal_armed.store(self.refuse_timers_after_loss, Ordering::SeqCst);
            return Err(Error::Unavailable("injected: written, reply lost".into()));
        }
        if batch.appends.is_empty()
            && !batch.set_timers.is_empty()
            && self.timers_refusal_armed.swap(false, Ordering::SeqCst)
        {
            self.failed_before.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Unavailable("injected: timers not written".into()));
        }
        match n % 6 {
            3 if self.failing => {
                self.failed_before.fetch_add(1, Ordering::SeqCst);
                Err(Error::Unavailable("injected: nothing written".into()))
            }
            0 if self.failing => {
                self.inner.commit(batch).await?;
                self.failed_after.fetch_add(1, Ordering::SeqCst);
                Err(Error::Unavailable("injected: written, reply lost".into()))
            }
            _ => self.inner.commit(batch).await,
        }
    }
}

#[async_trait]
impl CommitLog for Instrumented {
    fn serializes_commits(&self) -> bool {
        self.serializes
    }

    async fn commit(&self, batch: Batch) -> Result<Committed> {
        let types = batch.outbox.iter().map(|row| {
            let event: serde_json::Value = serde_json::from_slice(&row.payload).expect("an outbox row is JSON");
            event["type"].as_str().unwrap_or_default().to_string()
        });
        self.outbox_types.lock().expect("types").extend(types);
        let now = self.under_way.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_under_way.fetch_max(now, Ordering::SeqCst);
        let done = self.commit_failing(batch).await;
        self.under_way.fetch_sub(1, Ordering::SeqCst);
        done
    }

    async fn prune_processed_inputs(&self, before_ms: i64, limit: usize) -> Result<u64> {
        self.inner.prune_processed_inputs(before_ms, limit).await
    }
}

#[async_trait]
impl EventReader for Instrumented {
    async fn read_stream(&self, run_id: &str, from_seq: i64) -> Result<Vec<StoredEvent>> {
        self.single_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_stream(run_id, from_seq).await
    }
    async fn read_streams(&self, run_ids: &[String]) -> Result<Vec<StoredEvent>> {
        self.batch_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_streams(run_ids).await
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
    async fn last_position(&self) -> Result<Position> {
        self.inner.last_position().await
    }
}

#[async_trait]
impl Outbox for Instrumented {
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        self.inner.outbox_pending(limit).await
    }
    async fn outbox_delete(&self, seqs: &[i64]) -> Result<()> {
        self.inner.outbox_delete(seqs).await
    }
}

#[async_trait]
impl Timers for Instrumented {
    async fn timers_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TimerRow>> {
        self.inner.timers_due(now_ms, limit).await
    }
    async fn next_timer_at(&self, after_ms: i64) -> Result<Option<i64>> {
        self.inner.next_timer_at(after_ms).await
    }
    async fn timer_checkpoints(&self) -> Result<Vec<(String, Position)>> {
        self.inner.timer_checkpoints().await
    }
    async fn set_timer_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.inner.set_timer_checkpoint(name, position).await
    }
}

#[async_trait]
impl RunIndex for Instrumented {
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
impl Definitions for Instrumented {
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
impl Evaluations for Instrumented {
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

/// Triggers 60 runs of the crash test's DAG at once over `store` and waits until all are over;
/// their ids and how many run states the runtime evicted from its caches.
async fn drive(store: Arc<dyn Store>, config: RuntimeConfig) -> (Vec<String>, u64) {
    let script: Script =
        Arc::new(|_, _| Behaviour::Complete { after: Duration::from_millis(2), result: TaskResult::Pass, error: None });
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let (rt, broker) = engine(store.clone(), config).await;
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
        assert!(started.elapsed() < Duration::from_secs(60), "runs did not finish");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let evicted = rt.metrics().runs_evicted.load(Ordering::Relaxed);
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }
    (run_ids, evicted)
}

/// Checks that every run recorded each award and result once.
async fn all_recorded_once(store: &dyn Store, run_ids: &[String]) {
    for run_id in run_ids {
        check_recorded_once(run_id, &history(store, run_id).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_decided_behind_a_failed_commit_are_applied_again_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let failing = Instrumented::open(dir.path(), true, true).await;
    let store: Arc<dyn Store> = failing.clone();
    let (run_ids, _) = drive(store.clone(), RuntimeConfig::default()).await;

    // A failed commit drops the states it decided, so the runs are folded from the store again:
    // all the runs a batch holds in no cache with one read, never one read per run.
    let (single, batched) = (failing.single_reads.load(Ordering::SeqCst), failing.batch_reads.load(Ordering::SeqCst));
    assert!(single == 0 && batched > 0, "streams read one by one {single} times, by batch {batched} times");
    let before = failing.failed_before.load(Ordering::SeqCst);
    let after = failing.failed_after.load(Ordering::SeqCst);
    // Every sixth commit fails each way; a loaded machine batches more per commit, so fewer.
    assert!(
        before >= 2 && after >= 2,
        "too few failures injected to mean anything: {before} before, {after} after writing"
    );
    all_recorded_once(&*store, &run_ids).await;
}

/// Over a store whose commits run side by side, partitions decide and commit at most
/// `commit_slots` batches at once; without the limit they overlap (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_slots_bound_the_commits_under_way() {
    for (slots, bounded) in [(1, true), (0, false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let counted = Instrumented::open(dir.path(), false, false).await;
        let config = RuntimeConfig { partitions: 4, commit_slots: slots, ..RuntimeConfig::default() };
        let (run_ids, _) = drive(counted.clone(), config).await;
        all_recorded_once(&*counted, &run_ids).await;
        let most = counted.most_under_way.load(Ordering::SeqCst);
        if bounded {
            assert_eq!(most, 1, "{slots} commit slot(s), yet {most} commits were under way at once");
        } else {
            assert!(most >= 2, "without a limit the four partitions' commits never overlapped ({most})");
        }
    }
}

/// The run-state cache is bounded by the states' estimated bytes. With a budget smaller than
/// any state nothing stays cached: every batch folds its runs from the store (one read per
/// batch) and every run still ends with each task recorded once. The control, the default
/// budget, keeps these 60 small runs without evicting one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_too_small_for_any_run_reads_runs_back_and_loses_nothing() {
    for (cache_bytes, starved) in [(1_000, true), (RuntimeConfig::default().cache_bytes, false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let counted = Instrumented::open(dir.path(), true, false).await;
        let config = RuntimeConfig { cache_bytes, ..RuntimeConfig::default() };
        let (run_ids, evicted) = drive(counted.clone(), config).await;
        all_recorded_once(&*counted, &run_ids).await;
        let batched = counted.batch_reads.load(Ordering::SeqCst);
        if starved {
            // Each run's start and each of its tasks' results is a batch the run is read back in.
            assert!(evicted >= 60 * 2, "a {cache_bytes}-byte cache evicted only {evicted} states");
            assert!(batched >= 60 / 8, "runs were read back only {batched} times");
        } else {
            assert_eq!(evicted, 0, "the default cache evicted {evicted} of 60 small runs");
        }
    }
}

/// A losing bid's rejection reaches its worker without an outbox row (rejections and offers are
/// published after the commit, best effort: `codec::is_advisory`), and so do awards and the
/// notifications that runs ended (sent again from the states after a crash: `codec::is_derived`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_offers_and_awards_reach_workers_without_outbox_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counted = Instrumented::open(dir.path(), true, false).await;
    let (rt, broker) = engine(counted.clone(), RuntimeConfig::default()).await;
    let script: Script =
        Arc::new(|_, _| Behaviour::Complete { after: Duration::from_millis(2), result: TaskResult::Pass, error: None });
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let mut workers = Vec::new();
    for id in ["w1", "w2"] {
        workers
            .extend(scripted_worker(broker.clone(), id, BTreeMap::new(), &["work"], script.clone(), log.clone()).await);
    }
    rt.apply_definition("p", DAG).await.expect("definition");
    let mut run_ids = Vec::new();
    for i in 0..10 {
        run_ids.push(rt.trigger(dag_trigger(i)).await.expect("trigger"));
    }
    let started = Instant::now();
    while !all_over(&*counted, &run_ids).await {
        assert!(started.elapsed() < Duration::from_secs(60), "runs did not finish");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The last rejections may still be on their way.
    let auctioned = 10 * 3;
    while log.lock().expect("log").rejections.len() < auctioned && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }
    // Three auctioned tasks per run, each bid for by both workers: one loses every time.
    let rejections = log.lock().expect("log").rejections.len();
    assert!(rejections >= auctioned, "{rejections} rejections for {auctioned} auctions");
    let types = counted.outbox_types.lock().expect("types").clone();
    let count = |ty: &str| types.iter().filter(|t| *t == ty).count();
    assert_eq!(count(capstan_proto::types::TASK_REJECTED), 0, "rejections were written to the outbox");
    assert_eq!(count(capstan_proto::types::TASK_OFFERED), 0, "offers were written to the outbox");
    assert_eq!(count(capstan_proto::types::TASK_AWARDED), 0, "awards were written to the outbox");
    assert_eq!(count(capstan_proto::types::SEQUENCE_FINISHED), 0, "notifications were written to the outbox");
    assert_eq!(log.lock().expect("log").awards.len(), 10 * 4, "every award reached its worker once");
    all_recorded_once(&*counted, &run_ids).await;
}

/// A commit whose reply is lost may have kept timers in memory: here every commit that records
/// an attempt's end is written and reported failed, so the retry timer of a failed first attempt
/// (1 s away: kept in memory, not written) goes with the undone batch. The runs can only end if
/// the runtime derives that timer again from the stored state. In the second case the first
/// write of the derived timers fails too: they must stay pending and be written later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_kept_by_a_commit_whose_reply_was_lost_still_fire() {
    const RETRIED: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: retried}
spec:
  stages:
    - name: dev
      sequences:
        - name: dag
          tasks:
            - {name: flaky, type: work, retry: {maxAttempts: 3, initialInterval: 1s, maxInterval: 1s}}
"#;
    for (runs, refuse_timers) in [(3, false), (1, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let losing = Instrumented::open_losing(dir.path(), true, false, Some("attempt-ended"), refuse_timers).await;
        retried_runs_end(losing, RETRIED, runs, refuse_timers).await;
    }
}

async fn retried_runs_end(losing: Arc<Instrumented>, definition: &str, runs: usize, refuse_timers: bool) {
    let store: Arc<dyn Store> = losing.clone();
    let (rt, broker) = engine(store.clone(), RuntimeConfig::default()).await;
    let script: Script = Arc::new(|_, attempt| Behaviour::Complete {
        after: Duration::from_millis(2),
        result: if attempt == 1 { TaskResult::Fail } else { TaskResult::Pass },
        error: (attempt == 1).then_some("flaky"),
    });
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let workers = scripted_worker(broker, "w", BTreeMap::new(), &["work"], script, log).await;
    rt.apply_definition("p", definition).await.expect("definition");
    let mut run_ids = Vec::new();
    for i in 0..runs {
        run_ids.push(rt.trigger(dag_trigger(i)).await.expect("trigger"));
    }
    let started = Instant::now();
    while !all_over(&*store, &run_ids).await {
        assert!(started.elapsed() < Duration::from_secs(20), "a run waits for a retry timer that was lost");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(losing.failed_after.load(Ordering::SeqCst) >= runs as u64, "no reply was lost");
    if refuse_timers {
        assert!(losing.failed_before.load(Ordering::SeqCst) >= 1, "no write of the derived timers was refused");
    }
    for run_id in &run_ids {
        let record = store.get_run(run_id).await.expect("get_run").expect("the run");
        assert_eq!(record.result.as_deref(), Some("pass"), "run {run_id}");
    }
    rt.shutdown().await;
    for w in workers {
        w.abort();
    }
}
