//! The server from outside: `capstan server` started as a process with a config file over a fresh
//! PostgreSQL schema, driven over gRPC (tonic clients from the same generated code) and HTTP.

mod access;
mod bad_input;
mod cli;
mod grpc;
mod http;
mod python;
mod tls;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capstan::api::auth::hash_token;
use capstan_proto::grpc::v1 as pb;
use pb::definition_service_client::DefinitionServiceClient;
use pb::evaluation_service_client::EvaluationServiceClient;
use pb::event_service_client::EventServiceClient;
use pb::run_service_client::RunServiceClient;
use tonic::codegen::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

/// A definition with an echo task followed by a manual approval, a one-task sequence, and shell
/// tasks whose exit codes map to warning and fail.
pub const SHIPYARD: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: shop}
spec:
  stages:
    - name: dev
      sequences:
        - name: delivery
          tasks:
            - name: build
              type: echo
            - name: gate
              type: approval
              properties: {pass: manual, warning: manual}
        - name: quick
          tasks:
            - name: hello
              type: echo
        - name: shaky
          tasks:
            - name: check
              type: shell
              properties: {command: "exit 3", exitResults: {"3": warning}}
        - name: broken
          tasks:
            - name: check
              type: shell
              retry: {maxAttempts: 1}
              properties: {command: "exit 4", exitResults: {"4": fail}}
"#;

/// Tokens every test server knows; each token string is its own name.
pub const TOKENS: &[(&str, &str, &str)] = &[
    ("admin-a", "a", "admin"),
    ("op-a", "a", "operator"),
    ("view-a", "a", "viewer"),
    ("admin-b", "b", "admin"),
    ("op-b", "b", "operator"),
];

fn postgres_url() -> String {
    std::env::var("CAPSTAN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".to_string())
}

/// A unique schema name per server, so tests never see each other's runs.
fn fresh_schema() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("api_{}_{}_{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A running `capstan server`; killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT` of the gRPC API.
    pub grpc: String,
    /// `http://127.0.0.1:PORT` of the HTTP API.
    pub http: String,
    dir: tempfile::TempDir,
    schema: String,
}

impl Server {
    /// Starts a server with the test tokens, built-in workers and `extra` TOML at the top.
    pub fn start(extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let schema = fresh_schema();
        let mut config = format!(
            "builtin_workers = true\n{extra}\n[store]\nurl = \"{}\"\nschema = \"{}\"\n\
             [listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n",
            postgres_url(),
            schema
        );
        for (name, project, role) in TOKENS {
            config.push_str(&format!(
                "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nprojects = [\"{project}\"]\nrole = \"{role}\"\n",
                hash_token(name)
            ));
        }
        let path = dir.path().join("capstan.toml");
        std::fs::write(&path, config).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_capstan"))
            .arg("server")
            .arg("--config")
            .arg(&path)
            .env_remove("CAPSTAN_STORE")
            .env_remove("CAPSTAN_GRPC_ADDR")
            .env_remove("CAPSTAN_HTTP_ADDR")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn capstan server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining after the addresses are known, so the server never writes to a
            // closed pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut grpc, mut http) = (None, None);
        while grpc.is_none() || http.is_none() {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("grpc: ") {
                        grpc = Some(format!("http://{a}"));
                    } else if let Some(a) = line.strip_prefix("http: ") {
                        http = Some(format!("http://{a}"));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                    panic!(
                        "capstan server did not become ready (is PostgreSQL running at {}?):\n{log}",
                        postgres_url()
                    );
                }
            }
        }
        Server { child, grpc: grpc.unwrap_or_default(), http: http.unwrap_or_default(), dir, schema }
    }

    /// gRPC clients presenting `token` (none for `None`).
    pub async fn clients(&self, token: Option<&str>) -> Clients {
        let channel = Channel::from_shared(self.grpc.clone()).expect("uri").connect().await.expect("connect gRPC");
        let bearer = Bearer(token.map(|t| format!("Bearer {t}")));
        Clients {
            runs: RunServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            defs: DefinitionServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            events: EventServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            evals: EvaluationServiceClient::with_interceptor(channel, bearer),
        }
    }

    /// The server's stderr so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().expect("wait for the server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Best-effort cleanup so test schemas do not pile up in the shared database.
        let _ = Command::new("psql")
            .arg(postgres_url())
            .args(["-q", "-c", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Adds `authorization` to every call.
#[derive(Clone)]
pub struct Bearer(Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.parse().expect("ascii token"));
        }
        Ok(request)
    }
}

type Intercepted = InterceptedService<Channel, Bearer>;

/// One client per service.
pub struct Clients {
    pub runs: RunServiceClient<Intercepted>,
    pub defs: DefinitionServiceClient<Intercepted>,
    pub events: EventServiceClient<Intercepted>,
    pub evals: EvaluationServiceClient<Intercepted>,
}

impl Clients {
    /// Applies [`SHIPYARD`] to `project`.
    pub async fn apply(&mut self, project: &str) {
        self.defs
            .apply(pb::ApplyDefinitionRequest { project: project.into(), source: SHIPYARD.into() })
            .await
            .expect("apply the test shipyard");
    }

    /// Triggers `sequence` in stage dev of `project`; returns the run id.
    pub async fn trigger(&mut self, project: &str, sequence: &str) -> String {
        let request = pb::TriggerRunRequest {
            project: project.into(),
            stage: "dev".into(),
            sequence: sequence.into(),
            ..Default::default()
        };
        self.runs.trigger(request).await.expect("trigger").into_inner().run_id
    }

    /// Polls the run until `check` holds (up to 30 s).
    pub async fn wait_run(&mut self, run_id: &str, check: impl Fn(&pb::Run) -> bool) -> pb::Run {
        for _ in 0..600 {
            let run = self.runs.get(pb::GetRunRequest { project: String::new(), run_id: run_id.into() }).await;
            let run = run.expect("get run").into_inner();
            if check(&run) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("run {run_id} never reached the expected state");
    }
}

/// Whether a task of the run waits for an approval.
pub fn waiting(run: &pb::Run, task: &str) -> bool {
    run.tasks.iter().any(|t| t.name == task && t.state == "waiting-approval")
}
