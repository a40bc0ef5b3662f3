//! The fault schedule: a thread that, at random moments from a seed, kills the server (and
//! starts it again), kills a worker mid-task (and starts it again), stops a worker past its
//! heartbeat lease and continues it, crashes the broker, restarts PostgreSQL with `-m immediate`
//! and cuts the database connections. Between
//! faults it restarts whatever exited on its own, as a supervisor would.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::procs::{Server, WorkerProc};
use super::proxy::FaultProxy;
use super::services::{BrokerKind, PrivateBroker, PrivatePostgres};

/// How big a suite run is, and over which broker.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub name: &'static str,
    pub broker: BrokerKind,
    pub runs: usize,
    pub trigger_every: Duration,
    pub min_server_kills: usize,
    pub min_worker_kills: usize,
    /// The fault step of the first broker crash, then one every `broker_every` steps.
    pub first_broker: usize,
    pub broker_every: usize,
    /// The fault step of the first PostgreSQL restart, then one every `pg_every` steps.
    pub first_pg: usize,
    pub pg_every: usize,
    /// The pause between two faults: `gap_ms.0` plus up to `gap_ms.1`.
    pub gap_ms: (u64, u64),
    pub seed: u64,
}

impl Mode {
    /// The mode for a broker: the full short suite over NATS (>= 500 runs, >= 10 server and worker
    /// kills), a smaller one over RabbitMQ and Kafka (their restarts are the point there).
    pub fn from_env(broker: BrokerKind) -> Mode {
        let seed = std::env::var("CAPSTAN_FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
        let long = std::env::var("CAPSTAN_FAULTS_LONG").is_ok_and(|v| v == "1");
        let full = broker == BrokerKind::Nats;
        let base = Mode {
            name: "short",
            broker,
            runs: 500,
            trigger_every: Duration::from_millis(90),
            min_server_kills: 10,
            min_worker_kills: 10,
            first_broker: 8,
            broker_every: 1000,
            first_pg: 12,
            pg_every: 1000,
            gap_ms: (600, 1200),
            seed,
        };
        match (long, full) {
            (false, true) => base,
            (false, false) => {
                Mode { runs: 150, min_server_kills: 3, min_worker_kills: 3, first_broker: 3, first_pg: 6, ..base }
            }
            // 10,000 runs over an hour, a fault every 3 to 9 s: about 600 faults, of which about
            // 200 server kills, 200 worker kills, 10 NATS crashes and 7 PostgreSQL restarts.
            (true, true) => Mode {
                name: "long",
                runs: 10_000,
                trigger_every: Duration::from_millis(360),
                min_server_kills: 40,
                min_worker_kills: 60,
                broker_every: 60,
                pg_every: 80,
                gap_ms: (3000, 6000),
                ..base
            },
            (true, false) => Mode {
                name: "long",
                runs: 600,
                min_server_kills: 10,
                min_worker_kills: 10,
                first_broker: 3,
                broker_every: 20,
                first_pg: 6,
                pg_every: 30,
                ..base
            },
        }
    }

    fn due(step: usize, first: usize, every: usize) -> bool {
        step == first || (step > first && (step - first).is_multiple_of(every))
    }
}

/// What was injected.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub seed: u64,
    pub broker: &'static str,
    pub server_kills: usize,
    pub worker_kills: usize,
    pub worker_stops: usize,
    pub broker_restarts: usize,
    pub pg_restarts: usize,
    pub db_cuts: usize,
    /// Server incarnations that exited on their own and were started again, by the kind of the
    /// fault injected last before the exit was seen.
    pub server_exits: BTreeMap<&'static str, usize>,
    pub worker_exits: usize,
    /// How the processes that exited on their own ended (e.g. `signal: 11 (SIGSEGV)`).
    pub exit_statuses: BTreeSet<String>,
    /// Workers lost (killed or stopped past their lease): worker id and ms since the epoch.
    pub losses: Vec<(String, u64)>,
    /// The largest resident memory (KiB) and open file descriptors of the server seen, and the
    /// most client connections PostgreSQL held, sampled after every fault.
    pub max_server_rss_kib: u64,
    pub max_server_fds: usize,
    pub max_pg_connections: usize,
    /// The server's resident memory at the first and the last sample (KiB).
    pub first_last_rss_kib: (u64, u64),
}

impl Counts {
    /// Whether every kind of fault was injected at least as often as the mode asks.
    pub fn meets(&self, mode: &Mode) -> bool {
        self.server_kills >= mode.min_server_kills
            && self.worker_kills >= mode.min_worker_kills
            && self.broker_restarts >= 1
            && self.pg_restarts >= 1
            && self.db_cuts >= 1
            && self.worker_stops >= 1
    }

    pub fn assert_minimums(&self, mode: &Mode) {
        assert!(self.server_kills >= mode.min_server_kills, "too few server kills to mean anything: {self}");
        assert!(self.worker_kills >= mode.min_worker_kills, "too few worker kills to mean anything: {self}");
        assert!(
            self.broker_restarts >= 1 && self.pg_restarts >= 1 && self.db_cuts >= 1 && self.worker_stops >= 1,
            "a fault kind was never injected: {self}"
        );
    }

    /// Memory and connections stay bounded whatever the faults: the server's resident memory
    /// under 512 MiB, PostgreSQL's client connections within three pools of the server's (10
    /// each): the connections of killed incarnations may linger while the next one connects
    /// (20 were seen right after a crash of the Kafka client), but a leak would grow past any
    /// bound over the long mode's hundreds of restarts.
    pub fn assert_resources_bounded(&self) {
        assert!(self.max_server_rss_kib > 0, "the server's memory was never sampled: {self}");
        assert!(self.max_server_rss_kib < 512 * 1024, "the server's memory grew past 512 MiB: {self}");
        assert!(self.max_pg_connections <= 30, "PostgreSQL held more than three pools of connections: {self}");
    }

    fn sample(&mut self, c: &Cluster) {
        if let Some((rss, fds)) = c.server.resources() {
            self.max_server_rss_kib = self.max_server_rss_kib.max(rss);
            self.max_server_fds = self.max_server_fds.max(fds);
            if self.first_last_rss_kib.0 == 0 {
                self.first_last_rss_kib.0 = rss;
            }
            self.first_last_rss_kib.1 = rss;
        }
        if let Some(n) = c.pg.client_connections() {
            self.max_pg_connections = self.max_pg_connections.max(n);
        }
    }

    /// The server must ride out database faults by retrying, never by exiting.
    pub fn assert_server_survived_the_database(&self) {
        for fault in ["PostgreSQL restart", "database cut"] {
            assert_eq!(
                self.server_exits.get(fault).copied().unwrap_or(0),
                0,
                "the server exited after a {fault}: {self}"
            );
        }
    }

    fn total(&self) -> usize {
        self.server_kills
            + self.worker_kills
            + self.worker_stops
            + self.broker_restarts
            + self.pg_restarts
            + self.db_cuts
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exits: usize = self.server_exits.values().sum();
        write!(
            f,
            "seed {}: {} server kills, {} worker kills, {} worker stops past the heartbeat lease, {} {} crashes, \
             {} PostgreSQL restarts (-m immediate), {} database cuts ({} server exits on their own{}, {} worker \
             exits; all restarted{})",
            self.seed,
            self.server_kills,
            self.worker_kills,
            self.worker_stops,
            self.broker_restarts,
            self.broker,
            self.pg_restarts,
            self.db_cuts,
            exits,
            if exits == 0 { String::new() } else { format!(" after: {:?}", self.server_exits) },
            self.worker_exits,
            if self.exit_statuses.is_empty() { String::new() } else { format!("; ended by {:?}", self.exit_statuses) }
        )?;
        write!(
            f,
            "; server at most {} MiB resident (first {} MiB, last {} MiB) and {} open files, PostgreSQL at most {} \
             client connections",
            self.max_server_rss_kib / 1024,
            self.first_last_rss_kib.0 / 1024,
            self.first_last_rss_kib.1 / 1024,
            self.max_server_fds,
            self.max_pg_connections
        )
    }
}

/// Everything the fault thread owns.
pub struct Cluster {
    pub server: Server,
    pub workers: Vec<WorkerProc>,
    pub broker: PrivateBroker,
    pub pg: PrivatePostgres,
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

pub fn now_ms() -> u64 {
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

/// Injects faults until `stop`; returns what was injected, when (ms since the epoch), and the
/// cluster. `met` turns true once every fault kind reached its minimum.
pub fn inject(mut c: Cluster, mode: Mode, stop: Arc<AtomicBool>, met: Arc<AtomicBool>) -> (Counts, Vec<u64>, Cluster) {
    let mut rng = Rng(mode.seed | 1);
    let mut counts = Counts { seed: mode.seed, broker: mode.broker.label(), ..Counts::default() };
    let mut at = Vec::new();
    let mut last = "start";
    // The first faults come after the first runs are under way.
    let mut go = nap(Duration::from_millis(1500), &stop);
    while go {
        supervise(&mut c, &mut counts, last);
        // Sampled before each fault: the server has then run for a whole gap.
        counts.sample(&c);
        let step = counts.total();
        at.push(now_ms());
        if Mode::due(step, mode.first_broker, mode.broker_every) {
            // A broker crash: JetStream may lose what it acknowledged but had not yet synced,
            // Tansu's memory storage loses everything, RabbitMQ its unsynced messages.
            c.broker.crash_restart(Duration::from_millis(500));
            counts.broker_restarts += 1;
            last = "broker restart";
        } else if Mode::due(step, mode.first_pg, mode.pg_every) {
            // A PostgreSQL crash and recovery under the server's feet.
            c.pg.restart_immediate();
            counts.pg_restarts += 1;
            last = "PostgreSQL restart";
        } else if step == 5 || step % 11 == 10 {
            // A database outage between the server and PostgreSQL.
            c.proxy.cut(Duration::from_millis(1500));
            counts.db_cuts += 1;
            last = "database cut";
        } else {
            // Server and worker kills alternate so that both reach their minimums; every fifth
            // fault is a worker stop, at a random worker.
            match step % 5 {
                0 | 2 => {
                    c.server.kill();
                    counts.server_kills += 1;
                    restart_server(&mut c);
                    last = "server kill";
                }
                1 | 3 => {
                    let i = rng.below(c.workers.len() as u64) as usize;
                    c.workers[i].kill();
                    counts.worker_kills += 1;
                    counts.losses.push((c.workers[i].id.clone(), now_ms()));
                    std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
                    c.workers[i].spawn();
                    last = "worker kill";
                }
                _ => {
                    // Stopped past its heartbeat lease (1.5 s): its attempts are re-awarded, and
                    // whatever it reports after SIGCONT must be fenced off.
                    let i = rng.below(c.workers.len() as u64) as usize;
                    c.workers[i].signal("STOP");
                    counts.losses.push((c.workers[i].id.clone(), now_ms()));
                    std::thread::sleep(Duration::from_millis(2500));
                    c.workers[i].signal("CONT");
                    counts.worker_stops += 1;
                    last = "worker stop";
                }
            }
        }
        if counts.meets(&mode) {
            met.store(true, Ordering::SeqCst);
        }
        go = nap(Duration::from_millis(mode.gap_ms.0 + rng.below(mode.gap_ms.1)), &stop);
    }
    supervise(&mut c, &mut counts, last);
    (counts, at, c)
}

fn restart_server(c: &mut Cluster) {
    c.server.start_until_up();
    *c.grpc.lock().expect("grpc address") = c.server.grpc.clone();
}

/// Starts again whatever died on its own (e.g. a server that lost its broker).
fn supervise(c: &mut Cluster, counts: &mut Counts, last_fault: &'static str) {
    if let Some(how) = c.server.exited() {
        *counts.server_exits.entry(last_fault).or_default() += 1;
        counts.exit_statuses.insert(format!("server: {how}"));
        restart_server(c);
    }
    for w in &mut c.workers {
        if let Some(how) = w.exited() {
            counts.worker_exits += 1;
            counts.exit_statuses.insert(format!("worker: {how}"));
            w.spawn();
        }
    }
}
