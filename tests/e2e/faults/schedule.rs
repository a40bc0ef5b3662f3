//! The fault schedule: a thread that, at random moments from a seed, kills the server (and
//! starts it again), kills a worker mid-task (and starts it again), stops a worker past its
//! heartbeat lease and continues it, crashes NATS, and cuts the database connections. Between
//! faults it restarts whatever exited on its own, as a supervisor would.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::procs::{Nats, Server, WorkerProc};
use super::proxy::FaultProxy;

/// How big a suite run is.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub name: &'static str,
    pub runs: usize,
    pub trigger_every: Duration,
    pub min_server_kills: usize,
    pub min_worker_kills: usize,
    pub nats_every: usize,
    pub seed: u64,
}

impl Mode {
    pub fn from_env() -> Mode {
        let seed = std::env::var("CAPSTAN_FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
        if std::env::var("CAPSTAN_FAULTS_LONG").is_ok_and(|v| v == "1") {
            Mode {
                name: "long",
                runs: 2000,
                trigger_every: Duration::from_millis(60),
                min_server_kills: 40,
                min_worker_kills: 40,
                nats_every: 30,
                seed,
            }
        } else {
            Mode {
                name: "short",
                runs: 500,
                trigger_every: Duration::from_millis(90),
                min_server_kills: 10,
                min_worker_kills: 10,
                nats_every: 1000,
                seed,
            }
        }
    }
}

/// What was injected.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub seed: u64,
    pub server_kills: usize,
    pub worker_kills: usize,
    pub worker_stops: usize,
    pub nats_restarts: usize,
    pub db_cuts: usize,
    /// Server incarnations that exited on their own and were started again.
    pub server_exits: usize,
    pub worker_exits: usize,
}

impl Counts {
    pub fn assert_minimums(&self, mode: &Mode) {
        assert!(self.server_kills >= mode.min_server_kills, "too few server kills to mean anything: {self}");
        assert!(self.worker_kills >= mode.min_worker_kills, "too few worker kills to mean anything: {self}");
        assert!(
            self.nats_restarts >= 1 && self.db_cuts >= 1 && self.worker_stops >= 1,
            "a fault kind was never injected: {self}"
        );
    }

    fn total(&self) -> usize {
        self.server_kills + self.worker_kills + self.worker_stops + self.nats_restarts + self.db_cuts
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} server kills, {} worker kills, {} worker stops past the heartbeat lease, {} NATS crashes, \
             {} database cuts ({} server and {} worker exits on their own, restarted)",
            self.seed,
            self.server_kills,
            self.worker_kills,
            self.worker_stops,
            self.nats_restarts,
            self.db_cuts,
            self.server_exits,
            self.worker_exits
        )
    }
}

/// Everything the fault thread owns.
pub struct Cluster {
    pub server: Server,
    pub workers: Vec<WorkerProc>,
    pub nats: Nats,
    pub proxy: FaultProxy,
    /// The current server's gRPC address, for the triggering side.
    pub grpc: Arc<Mutex<String>>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64: reproducible from the printed seed.
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Sleeps `total` in small steps; false when asked to stop meanwhile.
fn nap(total: Duration, stop: &AtomicBool) -> bool {
    let step = Duration::from_millis(50);
    let mut left = total;
    while !left.is_zero() {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(step.min(left));
        left = left.saturating_sub(step);
    }
    !stop.load(Ordering::SeqCst)
}

/// Injects faults until `stop`; returns what was injected and when (ms since the epoch).
pub fn inject(mut c: Cluster, mode: Mode, stop: Arc<AtomicBool>) -> (Counts, Vec<u64>) {
    let mut rng = Rng(mode.seed | 1);
    let mut counts = Counts { seed: mode.seed, ..Counts::default() };
    let mut at = Vec::new();
    // The first faults come after the first runs are under way.
    let mut go = nap(Duration::from_millis(1500), &stop);
    while go {
        supervise(&mut c, &mut counts);
        let step = counts.total();
        at.push(now_ms());
        if step == 8 || (step > 8 && step % mode.nats_every == 8) {
            // A NATS crash: JetStream may lose what it acknowledged but had not yet synced.
            c.nats.crash_restart(Duration::from_millis(500));
            counts.nats_restarts += 1;
        } else if step == 5 || step % 11 == 10 {
            // A database outage between the server and PostgreSQL.
            c.proxy.cut(Duration::from_millis(1500));
            counts.db_cuts += 1;
        } else {
            // Server and worker kills alternate so that both reach their minimums; every fifth
            // fault is a worker stop, at a random worker.
            match step % 5 {
                0 | 2 => {
                    c.server.kill();
                    counts.server_kills += 1;
                    restart_server(&mut c);
                }
                1 | 3 => {
                    let i = rng.below(c.workers.len() as u64) as usize;
                    c.workers[i].kill();
                    counts.worker_kills += 1;
                    std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
                    c.workers[i].spawn();
                }
                _ => {
                    // Stopped past its heartbeat lease (1.5 s): its attempts are re-awarded, and
                    // whatever it reports after SIGCONT must be fenced off.
                    let i = rng.below(c.workers.len() as u64) as usize;
                    c.workers[i].signal("STOP");
                    std::thread::sleep(Duration::from_millis(2500));
                    c.workers[i].signal("CONT");
                    counts.worker_stops += 1;
                }
            }
        }
        go = nap(Duration::from_millis(600 + rng.below(1200)), &stop);
    }
    (counts, at)
}

fn restart_server(c: &mut Cluster) {
    c.server.start_until_up();
    *c.grpc.lock().expect("grpc address") = c.server.grpc.clone();
}

/// Starts again whatever died on its own (e.g. a server that lost its broker).
fn supervise(c: &mut Cluster, counts: &mut Counts) {
    if c.server.exited() {
        counts.server_exits += 1;
        restart_server(c);
    }
    for w in &mut c.workers {
        if w.exited() {
            counts.worker_exits += 1;
            w.spawn();
        }
    }
}
