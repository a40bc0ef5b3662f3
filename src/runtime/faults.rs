//! Fault injection for crash tests: named points in the runtime where a test may make the process
//! "die" (the component stops dead and the harness aborts everything), to prove that a restart on
//! the same store loses nothing and records nothing twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Where the runtime can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// A batch is decided but not yet committed.
    MidBatch,
    /// A batch is committed; its inputs are not yet acknowledged nor its callers answered.
    AfterCommit,
    /// Outbox rows were published but not yet deleted.
    AfterPublish,
    /// An input's batch is committed; its broker delivery is not yet acknowledged.
    BeforeAck,
}

/// Decides, at each fault point, whether to crash now.
pub trait FaultInjector: Send + Sync + 'static {
    fn should_crash(&self, point: FaultPoint) -> bool;
}

/// Crashes at each point with a fixed probability per passage, from a seed (reproducible).
#[derive(Debug)]
pub struct RandomFaults {
    state: AtomicU64,
    /// Probability in millionths per passage.
    per_million: u64,
}

impl RandomFaults {
    /// Crash with probability `p` (0..1) at each passage of a fault point.
    pub fn new(seed: u64, p: f64) -> Self {
        RandomFaults { state: AtomicU64::new(seed | 1), per_million: (p.clamp(0.0, 1.0) * 1e6) as u64 }
    }
}

impl FaultInjector for RandomFaults {
    fn should_crash(&self, _point: FaultPoint) -> bool {
        // xorshift64 on an atomic: good enough for picking crash moments.
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        x % 1_000_000 < self.per_million
    }
}

/// The runtime's link to an injector and the "crashed" signal the harness waits for.
#[derive(Clone)]
pub struct Faults {
    injector: Option<Arc<dyn FaultInjector>>,
    crashed: watch::Sender<Option<FaultPoint>>,
}

impl Faults {
    /// No injector: every point passes.
    pub fn none() -> Self {
        Faults { injector: None, crashed: watch::channel(None).0 }
    }

    /// With an injector.
    pub fn with(injector: Arc<dyn FaultInjector>) -> Self {
        Faults { injector: Some(injector), crashed: watch::channel(None).0 }
    }

    /// Passes the point, or, when the injector says so, signals the crash and never returns
    /// (the harness aborts the task).
    pub async fn point(&self, point: FaultPoint) {
        let Some(injector) = &self.injector else { return };
        if self.crashed.borrow().is_some() || injector.should_crash(point) {
            self.crashed.send_replace(Some(point));
            std::future::pending::<()>().await;
        }
    }

    /// Waits until some component crashed; returns where.
    pub async fn crashed(&self) -> FaultPoint {
        let mut rx = self.crashed.subscribe();
        loop {
            if let Some(p) = *rx.borrow_and_update() {
                return p;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}
