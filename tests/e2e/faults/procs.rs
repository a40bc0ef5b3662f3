//! The Capstan processes of the fault suite: one `capstan server` at a time and `capstan worker`s
//! with ledgers. Each can be killed with SIGKILL, stopped and continued, and started again.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (free when asked; nothing else here binds fixed ports).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("address").port()
}

pub fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open a log file")
}

/// How a child ended (`exit status: 1`, `signal: 11 (SIGSEGV)`), or `None` while it runs; a
/// child never started counts as ended.
fn exit_of(child: &mut Option<Child>) -> Option<String> {
    match child {
        Some(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
        None => Some("not running".into()),
    }
}

/// Short Kafka group sessions so that a killed member's partitions move within seconds (the
/// other brokers ignore these).
const KAFKA_GROUP_TIMINGS: [(&str, &str); 2] =
    [("CAPSTAN_KAFKA_SESSION_TIMEOUT_MS", "2000"), ("CAPSTAN_KAFKA_HEARTBEAT_MS", "500")];

/// Sends a signal to a child by pid (`KILL`, `STOP`, `CONT`).
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status();
    assert!(status.is_ok_and(|s| s.success()) || sig == "KILL", "kill -{sig} {} failed", child.id());
}

/// `capstan server` from a config file; restarted after every kill.
pub struct Server {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    /// `http://127.0.0.1:PORT` of the current incarnation's gRPC API.
    pub grpc: String,
    pub starts: u32,
    /// How each start that did not come up ended, for the failure message.
    failed_starts: Vec<String>,
    env: &'static [(&'static str, &'static str)],
}

impl Server {
    pub fn new(dir: &Path, config_text: &str, env: &'static [(&'static str, &'static str)]) -> Server {
        let config = dir.join("capstan.toml");
        std::fs::write(&config, config_text).expect("write the server config");
        Server {
            child: None,
            config,
            log: dir.join("server.log"),
            grpc: String::new(),
            starts: 0,
            failed_starts: Vec::new(),
            env,
        }
    }

    /// Starts the server and waits for its gRPC address; false if it did not come up in time
    /// (e.g. while its broker is down), in which case the caller tries again.
    pub fn start(&mut self) -> bool {
        let mut child = Command::new(env!("CARGO_BIN_EXE_capstan"))
            .arg("server")
            .arg("--config")
            .arg(&self.config)
            .envs(KAFKA_GROUP_TIMINGS)
            .envs(self.env.iter().copied())
            .env_remove("CAPSTAN_STORE")
            .env_remove("CAPSTAN_GRPC_ADDR")
            .env_remove("CAPSTAN_HTTP_ADDR")
            .stdout(Stdio::piped())
            .stderr(log_file(&self.log))
            .spawn()
            .expect("spawn capstan server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining so the server never writes to a closed pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("grpc: ") {
                        self.grpc = format!("http://{a}");
                        self.child = Some(child);
                        self.starts += 1;
                        return true;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Whether it exited on its own (and how) or was still starting when given up on.
        let ended = child.try_wait().ok().flatten().map(|s| s.to_string());
        let _ = child.kill();
        let _ = child.wait();
        self.failed_starts.push(ended.unwrap_or_else(|| "still running without a gRPC address".into()));
        false
    }

    /// Starts until it is up (bounded), failing loudly with the log when it never comes up.
    pub fn start_until_up(&mut self) {
        for _ in 0..15 {
            if self.start() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: String =
            log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        panic!("capstan server never came up (the last attempts: {:?}):\n{tail}", self.failed_starts);
    }

    /// How the current incarnation ended, if it did on its own (`None` while it runs).
    pub fn exited(&mut self) -> Option<String> {
        exit_of(&mut self.child)
    }

    /// The running incarnation's resident memory (KiB) and open file descriptors, if it runs.
    pub fn resources(&self) -> Option<(u64, usize)> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some((rss, fds))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `capstan worker` process with a ledger; restarted under the same id after a kill.
pub struct WorkerProc {
    pub id: String,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    pub ledger: PathBuf,
    env: &'static [(&'static str, &'static str)],
}

impl WorkerProc {
    pub fn start(
        dir: &Path,
        id: &str,
        (broker, broker_url, env): (&str, &str, &'static [(&'static str, &'static str)]),
        types: &str,
    ) -> WorkerProc {
        let ledger = dir.join(format!("{id}.jsonl"));
        let journal = dir.join(format!("{id}.journal"));
        let args = [
            "worker",
            "--broker",
            broker,
            "--broker-url",
            broker_url,
            "--id",
            id,
            "--types",
            types,
            "--slots",
            "8",
            "--delay-ms",
            "40",
        ]
        .into_iter()
        .map(String::from)
        .chain(["--ledger".into(), ledger.display().to_string(), "--journal".into(), journal.display().to_string()])
        // A worker that answers twice, every 25th result.
        .chain(["--answer-twice-every".into(), "25".into()])
        .collect();
        let mut w = WorkerProc { id: id.into(), child: None, args, log: dir.join(format!("{id}.log")), ledger, env };
        w.spawn();
        w
    }

    pub fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_capstan"))
            .args(&self.args)
            .envs(KAFKA_GROUP_TIMINGS)
            .envs(self.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file(&self.log))
            .spawn()
            .expect("spawn capstan worker");
        self.child = Some(child);
    }

    /// How the current incarnation ended, if it did on its own (`None` while it runs).
    pub fn exited(&mut self) -> Option<String> {
        exit_of(&mut self.child)
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill();
    }
}
