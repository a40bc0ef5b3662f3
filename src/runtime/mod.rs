//! The durable runtime: the imperative shell around the pure engine.
//!
//! ```text
//!  ingest (broker inputs) --+
//!  timers (due rows) -------+--> partition[hash(run id)] --> one commit per batch --> outbox relay
//!  API / CLI commands ------+        (engine decide/evolve)     (events, outbox,       --> broker
//!                                                               timers, inputs, runs)
//! ```
//! Components follow Config -> Service -> Handle: [`Runtime::start`] spawns the partitions, the
//! ingest loop, the timer service, the outbox relay and the pruning of processed inputs, and
//! returns a cheap [`RuntimeHandle`].

mod cache;
pub mod codec;
mod definitions;
mod error;
pub mod faults;
mod ingest;
mod input_pruning;
mod lanes;
mod outbox_relay;
mod partition;
mod recovery;
mod timers;
pub mod triggers;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capstan_brokers::{Broker, Delivery};
use capstan_engine::run::{Input, RunMeta};
use capstan_store::{Store, TimerCancel};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::info;
use uuid::Uuid;

pub use definitions::DefinitionRegistry;
pub use error::RuntimeError;
pub use faults::{FaultInjector, FaultPoint, Faults, RandomFaults};
pub use partition::Applied;

/// Runtime settings with sane defaults for one process on a small machine.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Run partitions; each commits its own batches, so this bounds commit parallelism. 0 lets
    /// the store decide: one for a store that serializes commits anyway (SQLite), where a single
    /// partition batches more per commit (1.4x the tasks/s in `capstan bench`), else four.
    pub partitions: usize,
    /// Most inputs one commit takes.
    pub max_batch: usize,
    /// Batches the partitions may be deciding and committing at once, over a store whose
    /// commits run side by side (PostgreSQL); 0 for no limit. A partition waits for a slot
    /// before it takes its queued inputs, so under load the inputs gather into fewer, larger
    /// commits, the database's work per input shrinks, and an idle engine never waits. Two
    /// slots for four partitions: PostgreSQL + NATS 1.2-1.3x the tasks/s of no limit, with
    /// half the PostgreSQL CPU per task; one slot starved PostgreSQL + memory (docs/performance.md).
    pub commit_slots: usize,
    /// Estimated bytes of run states cached, shared equally by the partitions
    /// (`RunState::approx_bytes`; a run with large trigger data or many tasks costs more). A run
    /// not cached is folded from its events at its next input.
    pub cache_bytes: usize,
    /// Queue depth per partition before senders wait (backpressure).
    pub queue_depth: usize,
    /// Outbox rows published per round.
    pub outbox_batch: usize,
    /// How long the ids of applied inputs are kept to drop redeliveries: the deduplication
    /// window. It must outlast the brokers' redelivery window; `None` keeps them forever.
    pub input_retention: Option<Duration>,
    /// How often ids older than `input_retention` are pruned (the first time shortly after
    /// start).
    pub prune_every: Duration,
    /// Crash points for tests; `Faults::none()` in production.
    pub faults: Faults,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            partitions: 0,
            max_batch: 512,
            commit_slots: 2,
            cache_bytes: 64 << 20,
            queue_depth: 4_096,
            outbox_batch: 1_000,
            input_retention: Some(Duration::from_secs(7 * 24 * 3_600)),
            prune_every: Duration::from_secs(10 * 60),
            faults: Faults::none(),
        }
    }
}

/// Where an input's answer goes once its batch is committed.
pub enum Reply {
    None,
    /// A broker delivery to acknowledge after the commit.
    Delivery(Box<Delivery>),
    /// An API caller waiting for the outcome.
    Api(oneshot::Sender<Result<Applied, RuntimeError>>),
}

/// One input on its way to the partition that owns its run.
pub struct Envelope {
    pub run_id: String,
    /// Deduplication key (the CloudEvent id of a worker's message); `None` for inputs that are
    /// idempotent by construction (timers are consumed in the same transaction).
    pub input_id: Option<String>,
    /// When set, the run must belong to this project.
    pub project: Option<String>,
    pub input: Input,
    /// The timer row this input consumes (deleted in the same commit, if unchanged).
    pub consumed_timer: Option<TimerCancel>,
    pub reply: Reply,
}

impl Envelope {
    /// The id to record against a second application of this input: none for a worker's
    /// message (claim, bid, `started`, heartbeat, `finished`), which its run's state recognises
    /// when it comes again (`Input::idempotent_by_state`), so that worker messages cost no row.
    pub fn recorded_id(&self) -> Option<&String> {
        self.input_id.as_ref().filter(|_| !self.input.idempotent_by_state())
    }
}

/// Wall-clock time in milliseconds, behind a trait so tests can drive it.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }
}

/// Counters for benchmarks and progress output.
#[derive(Default)]
pub struct Metrics {
    pub commits: AtomicU64,
    pub inputs: AtomicU64,
    pub events: AtomicU64,
    pub published: AtomicU64,
    pub timers_fired: AtomicU64,
    /// Timers set in memory only, and timer rows written to the store (set at once, or kept
    /// and written once they lived a while: see `partition/deferred.rs`).
    pub timers_kept: AtomicU64,
    pub timers_written: AtomicU64,
    /// Processed-input ids forgotten after the input retention.
    pub inputs_pruned: AtomicU64,
    /// Run states dropped from the partitions' caches to stay within `cache_bytes`; each costs
    /// a read of the run's events at its next input.
    pub runs_evicted: AtomicU64,
}

impl Metrics {
    fn record_commit(&self, inputs: usize, events: usize) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.inputs.fetch_add(inputs as u64, Ordering::Relaxed);
        self.events.fetch_add(events as u64, Ordering::Relaxed);
    }
}

/// What the runtime's components share.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn Broker>,
    pub registry: DefinitionRegistry,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    pub faults: Faults,
    /// The rows of each commit, for the relay to publish from memory.
    outbox_tx: mpsc::UnboundedSender<outbox_relay::Outgoing>,
    /// Runs queued and ended in their lanes, for the lane service.
    lane_tx: mpsc::UnboundedSender<lanes::LaneNote>,
    timer_wake: Notify,
    /// Earliest timer committed since the timer service last looked (ms), to cut its sleep short.
    next_timer_hint: AtomicU64,
    /// Timers handed to a partition and not yet committed away: never fire them twice at once.
    inflight_timers: Mutex<HashSet<(String, String, i64)>>,
    /// Slots for the batches partitions decide and commit side by side
    /// ([`RuntimeConfig::commit_slots`]); `None` when unlimited or the store serializes commits.
    pub commit_slots: Option<tokio::sync::Semaphore>,
    /// The highest event position of the commits that returned: where an idle partition moves
    /// its timer checkpoint to (`partition/deferred.rs`).
    log_end: AtomicI64,
    /// Per partition: the number of the newest hold (`Deferred::hold`) whose derived messages,
    /// and those of every earlier hold, the relay published.
    relayed: Vec<AtomicU64>,
}

impl Shared {
    /// The `Start` input (and its run id) for a trigger: the definition version is pinned now;
    /// a request id makes the run id, and so the start, idempotent.
    async fn start_input(&self, req: TriggerRequest) -> Result<(String, Input), RuntimeError> {
        let (definition, version) = self.registry.get(&req.project, req.definition.as_deref(), None).await?;
        let run_id = match &req.request_id {
            Some(r) => Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{}/{r}", req.project).as_bytes()).to_string(),
            None => Uuid::now_v7().to_string(),
        };
        let meta = RunMeta {
            run_id: run_id.clone(),
            context_id: req.context_id.clone().unwrap_or_else(|| Uuid::now_v7().to_string()),
            project: req.project.clone(),
            stage: req.stage,
            sequence: req.sequence,
            service: req.service,
            definition: definition.name.clone(),
            definition_version: u32::try_from(version).unwrap_or(u32::MAX),
            triggered_by: None,
        };
        let data = if req.data.is_null() { Value::Object(Default::default()) } else { req.data };
        Ok((run_id, Input::Start { meta, data }))
    }

    fn timer_wake(&self, at_ms: i64) {
        self.next_timer_hint.fetch_min(at_ms.max(0) as u64, Ordering::Relaxed);
        self.timer_wake.notify_one();
    }

    fn forget_timers(&self, consumed: &[TimerCancel]) {
        if consumed.is_empty() {
            return;
        }
        let mut set = self.inflight_timers.lock().unwrap_or_else(|e| e.into_inner());
        for t in consumed {
            set.remove(&(t.run_id.clone(), t.key.clone(), t.only_if_fire_at.unwrap_or_default()));
        }
    }
}

/// A request to start a sequence.
#[derive(Debug, Clone, Default)]
pub struct TriggerRequest {
    pub project: String,
    /// The definition's name; `None` takes the project's only definition.
    pub definition: Option<String>,
    pub stage: String,
    pub sequence: String,
    pub service: Option<String>,
    pub data: Value,
    /// Joins a promotion chain; a new context id is made when absent.
    pub context_id: Option<String>,
    /// Makes the trigger idempotent: the same request id never starts two runs.
    pub request_id: Option<String>,
}

/// The running runtime.
pub struct Runtime;

/// A cheap handle to a running runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    shared: Arc<Shared>,
    senders: Arc<Vec<mpsc::Sender<Envelope>>>,
    shutdown: watch::Sender<bool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Runtime {
    /// Starts partitions, ingest, timers, the outbox relay and input pruning over a store and a broker.
    pub async fn start(
        config: RuntimeConfig,
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        clock: Arc<dyn Clock>,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        let (lane_tx, lane_rx) = mpsc::unbounded_channel();
        let serializes = store.serializes_commits();
        let partitions = match config.partitions {
            0 if serializes => 1,
            0 => 4,
            n => n,
        };
        let shared = Arc::new(Shared {
            registry: DefinitionRegistry::new(store.clone()),
            store,
            broker,
            clock,
            metrics: Metrics::default(),
            faults: config.faults.clone(),
            outbox_tx,
            lane_tx,
            timer_wake: Notify::new(),
            next_timer_hint: AtomicU64::new(u64::MAX),
            inflight_timers: Mutex::new(HashSet::new()),
            commit_slots: (config.commit_slots > 0 && !serializes)
                .then(|| tokio::sync::Semaphore::new(config.commit_slots)),
            log_end: AtomicI64::new(0),
            relayed: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        let names: Vec<String> = (0..partitions).map(partition::Partition::checkpoint_name).collect();
        let start_position = recovery::derive_lost(&shared, &names).await?;
        shared.log_end.store(start_position, Ordering::Relaxed);
        for id in 0..partitions {
            let (tx, rx) = mpsc::channel(config.queue_depth);
            senders.push(tx);
            let p =
                partition::Partition::new(id, rx, shared.clone(), config.cache_bytes / partitions, config.max_batch);
            tasks.push(tokio::spawn(p.run(shutdown_rx.clone())));
        }
        let senders = Arc::new(senders);
        let router = Router { senders: senders.clone() };
        let subscription = ingest::subscribe(&*shared.broker).await?;
        tasks.push(tokio::spawn(ingest::run(subscription, shared.clone(), router.clone(), shutdown_rx.clone())));
        tasks.push(tokio::spawn(timers::run(shared.clone(), router.clone(), shutdown_rx.clone())));
        tasks.push(tokio::spawn(lanes::run(shared.clone(), router.clone(), lane_rx, shutdown_rx.clone())));
        tasks.push(tokio::spawn(outbox_relay::run(
            shared.clone(),
            config.outbox_batch,
            outbox_rx,
            shutdown_rx.clone(),
        )));
        if let Some(retention) = config.input_retention.filter(|r| !r.is_zero()) {
            let pruning = input_pruning::run(shared.clone(), retention, config.prune_every, shutdown_rx.clone());
            tasks.push(tokio::spawn(pruning));
        }
        let unfinished = shared.store.unfinished_runs().await?.len();
        if unfinished > 0 {
            info!(runs = unfinished, "resuming unfinished runs from the store");
        }
        Ok(RuntimeHandle { shared, senders, shutdown, tasks: Arc::new(Mutex::new(tasks)) })
    }
}

/// Routes envelopes to the partition owning their run.
#[derive(Clone)]
struct Router {
    senders: Arc<Vec<mpsc::Sender<Envelope>>>,
}

impl Router {
    async fn route(&self, env: Envelope) -> Result<(), RuntimeError> {
        let i = partition_of(&env.run_id, self.senders.len());
        self.senders[i].send(env).await.map_err(|_| RuntimeError::ShuttingDown)
    }
}

/// FNV-1a: stable across processes and versions, unlike std's randomly keyed hasher.
fn partition_of(run_id: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % n as u64) as usize
}

impl RuntimeHandle {
    /// The shared store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// How many partitions apply inputs.
    pub fn partitions(&self) -> usize {
        self.senders.len()
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Validates and stores a definition; returns its name and version.
    pub async fn apply_definition(&self, project: &str, source: &str) -> Result<(String, i64), RuntimeError> {
        self.shared.registry.apply(project, source, self.shared.clock.now_ms()).await
    }

    /// Starts a sequence; returns the new run's id once its start is committed.
    ///
    /// With a request id the trigger is idempotent: repeating it (a client retrying after a lost
    /// answer) returns the run the first one started instead of an error.
    pub async fn trigger(&self, req: TriggerRequest) -> Result<String, RuntimeError> {
        Ok(self.trigger_once(req).await?.0)
    }

    /// [`trigger`](Self::trigger), also telling whether this call started the run (`false`: a
    /// repeated request id found the run an earlier call started).
    pub async fn trigger_once(&self, req: TriggerRequest) -> Result<(String, bool), RuntimeError> {
        let project = req.project.clone();
        let idempotent = req.request_id.is_some();
        let (run_id, input) = self.shared.start_input(req).await?;
        match self.send(run_id.clone(), Some(project), input).await {
            Ok(_) => Ok((run_id, true)),
            Err(RuntimeError::Refused(capstan_engine::run::Error::AlreadyStarted(_))) if idempotent => {
                Ok((run_id, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a command (cancel, pause, resume, approve) to a run of `project`.
    pub async fn command(&self, project: &str, run_id: &str, input: Input) -> Result<Applied, RuntimeError> {
        self.send(run_id.to_string(), Some(project.to_string()), input).await
    }

    async fn send(&self, run_id: String, project: Option<String>, input: Input) -> Result<Applied, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        let env = Envelope { run_id, input_id: None, project, input, consumed_timer: None, reply: Reply::Api(tx) };
        Router { senders: self.senders.clone() }.route(env).await?;
        rx.await.map_err(|_| RuntimeError::ShuttingDown)?
    }

    /// Waits until an injected fault crashed a component (tests only).
    pub async fn crashed(&self) -> FaultPoint {
        self.shared.faults.crashed().await
    }

    /// Kills every task of the runtime where it stands, as a crash would (tests only).
    pub fn abort(&self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }

    /// Stops intake, lets every partition finish its batch in hand, and waits for the tasks.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use capstan_brokers::memory::MemoryBroker;
    use capstan_store::MemoryStore;
    use capstan_store::sqlite::SqliteStore;

    use super::*;

    #[tokio::test]
    async fn partitions_follow_the_store_unless_configured() {
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let start = async |store: Arc<dyn Store>, partitions: usize| {
            let config = RuntimeConfig { partitions, ..RuntimeConfig::default() };
            let rt = Runtime::start(config, store, broker.clone(), Arc::new(SystemClock)).await.expect("starts");
            let n = rt.partitions();
            rt.shutdown().await;
            n
        };
        let sqlite = || async { Arc::new(SqliteStore::open_in_memory().await.expect("sqlite")) as Arc<dyn Store> };
        assert_eq!(start(sqlite().await, 0).await, 1, "SQLite has one writer");
        assert_eq!(start(Arc::new(MemoryStore::new()), 0).await, 4);
        assert_eq!(start(sqlite().await, 3).await, 3, "an explicit count wins");
    }

    #[tokio::test]
    async fn unusable_broker_inputs_are_dead_lettered_with_the_error() {
        use capstan_brokers::Message;
        use capstan_proto::{CloudEvent, topics, types};

        let memory = MemoryBroker::new();
        let broker: Arc<dyn Broker> = Arc::new(memory.clone());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let rt = Runtime::start(RuntimeConfig::default(), store, broker.clone(), Arc::new(SystemClock))
            .await
            .expect("starts");
        let message = |id: &str, ty: &str, data: Value| Message {
            topic: topics::ENGINE_INPUTS.into(),
            key: "run".into(),
            event: CloudEvent::new(id, "test", ty).with_data(data),
        };
        let trigger = serde_json::json!({"project": "nowhere", "stage": "dev", "sequence": "delivery"});
        broker
            .publish(vec![
                message("no-project", types::SEQUENCE_TRIGGERED, trigger),
                message("no-trigger", types::SEQUENCE_TRIGGERED, serde_json::json!(["not an object"])),
                message("no-result", types::TASK_FINISHED, serde_json::json!("not a result")),
            ])
            .await
            .expect("publish");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while memory.dead_letters().len() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "dead letters: {:?}", memory.dead_letters());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kept: Vec<(String, String)> =
            memory.dead_letters().into_iter().map(|d| (d.message.event.id, d.reason)).collect();
        let ids: Vec<&str> = kept.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["no-project", "no-trigger", "no-result"]);
        assert!(kept[0].1.contains("nowhere"), "the reason is the error: {}", kept[0].1);
        assert!(kept[1].1.contains("must be a JSON object"), "the reason is the error: {}", kept[1].1);
        assert!(kept[2].1.contains("does not fit"), "the reason is the error: {}", kept[2].1);
        assert_eq!(memory.backlog(topics::ENGINE_INPUTS, ingest::ENGINE_GROUP), Some(0), "all settled");
        rt.shutdown().await;
    }
}
