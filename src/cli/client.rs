//! Client commands over gRPC: `apply`, `trigger`, `get`, `list`, `watch`, `approve`, `cancel`,
//! `pause`, `resume`. `--server` / CAPSTAN_SERVER names the server, `--token` / CAPSTAN_TOKEN the
//! API token, `--output table|json|yaml` the format. `watch` exits 0 pass, 2 warning, 3 fail.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use capstan_proto::grpc::v1 as pb;
use pb::definition_service_client::DefinitionServiceClient;
use pb::run_service_client::RunServiceClient;
use serde::Serialize;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::Channel;

use super::progress::ProgressPrinter;
use crate::api::stored_event;
use crate::runtime::codec;

/// How to reach the server; shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// The server's gRPC address.
    #[arg(long, env = "CAPSTAN_SERVER", default_value = "http://127.0.0.1:7233")]
    pub server: String,
    /// The API token (sent as `authorization: Bearer`).
    #[arg(long, env = "CAPSTAN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's TLS certificate, for `https://` servers.
    #[arg(long, env = "CAPSTAN_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

/// Output formats of the client commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// The client commands.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Store a definition (Shipyard) in a project.
    Apply {
        #[command(flatten)]
        conn: Conn,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        project: String,
    },
    /// Start a sequence in a stage.
    Trigger {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        project: String,
        #[arg(long)]
        stage: String,
        #[arg(long)]
        sequence: String,
        #[arg(long)]
        service: Option<String>,
        /// Trigger data: JSON text, or @FILE.
        #[arg(long)]
        data: Option<String>,
        /// The definition's name (when the project has several).
        #[arg(long)]
        definition: Option<String>,
    },
    /// Show a run and its tasks.
    Get {
        #[command(flatten)]
        conn: Conn,
        run: String,
    },
    /// List runs, newest first.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        stage: Option<String>,
        #[arg(long)]
        sequence: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Follow a run until it ends; exit 0 pass, 2 warning, 3 fail.
    Watch {
        #[command(flatten)]
        conn: Conn,
        run: String,
    },
    /// Approve (or reject) a task waiting for a manual approval.
    Approve {
        #[command(flatten)]
        conn: Conn,
        run: String,
        task: String,
        #[arg(long)]
        reject: bool,
    },
    /// Cancel a run.
    Cancel {
        #[command(flatten)]
        conn: Conn,
        run: String,
        #[arg(long, default_value = "cancelled from the command line")]
        reason: String,
    },
    /// Pause a run (nothing new starts until resumed).
    Pause {
        #[command(flatten)]
        conn: Conn,
        run: String,
    },
    /// Resume a paused run.
    Resume {
        #[command(flatten)]
        conn: Conn,
        run: String,
    },
}

impl ClientCommand {
    /// How this command reaches the server.
    pub fn conn(&self) -> &Conn {
        match self {
            ClientCommand::Apply { conn, .. }
            | ClientCommand::Trigger { conn, .. }
            | ClientCommand::Get { conn, .. }
            | ClientCommand::List { conn, .. }
            | ClientCommand::Watch { conn, .. }
            | ClientCommand::Approve { conn, .. }
            | ClientCommand::Cancel { conn, .. }
            | ClientCommand::Pause { conn, .. }
            | ClientCommand::Resume { conn, .. } => conn,
        }
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Runs = RunServiceClient<InterceptedService<Channel, Bearer>>;
type Definitions = DefinitionServiceClient<InterceptedService<Channel, Bearer>>;

async fn connect(conn: &Conn) -> anyhow::Result<(Runs, Definitions)> {
    let mut endpoint = Channel::from_shared(conn.server.clone())
        .with_context(|| format!("`{}` is not a server address (e.g. http://127.0.0.1:7233)", conn.server))?;
    if let Some(ca) = &conn.ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    }
    let channel = endpoint.connect().await.with_context(|| format!("cannot reach the server at {}", conn.server))?;
    let bearer = match &conn.token {
        Some(t) => Some(format!("Bearer {t}").parse().context("the token contains characters a header cannot carry")?),
        None => None,
    };
    let bearer = Bearer(bearer);
    Ok((
        RunServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        DefinitionServiceClient::with_interceptor(channel, bearer),
    ))
}

/// Turns a gRPC status into a one-line error that names the code.
fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// A run as printed by `get` and `list`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RunOut {
    run_id: String,
    project: String,
    stage: String,
    sequence: String,
    service: String,
    status: String,
    result: String,
    context_id: String,
    definition: String,
    definition_version: i64,
    created_at_ms: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tasks: Vec<TaskOut>,
}

#[derive(Serialize)]
struct TaskOut {
    name: String,
    state: String,
    result: String,
    attempt: u32,
    worker: String,
}

fn run_out(r: pb::Run) -> RunOut {
    RunOut {
        tasks: r
            .tasks
            .into_iter()
            .map(|t| TaskOut { name: t.name, state: t.state, result: t.result, attempt: t.attempt, worker: t.worker })
            .collect(),
        run_id: r.run_id,
        project: r.project,
        stage: r.stage,
        sequence: r.sequence,
        service: r.service,
        status: r.status,
        result: r.result,
        context_id: r.context_id,
        definition: r.definition,
        definition_version: r.definition_version,
        created_at_ms: r.created_at_ms,
    }
}

fn print_structured<T: Serialize>(output: Output, value: &T) -> anyhow::Result<()> {
    match output {
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// Runs a client command.
pub async fn run(command: ClientCommand) -> anyhow::Result<ExitCode> {
    let conn = command.conn().clone();
    let (mut runs, mut definitions) = connect(&conn).await?;
    let out = conn.output;
    match command {
        ClientCommand::Apply { file, project, .. } => {
            let source = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let r = definitions.apply(pb::ApplyDefinitionRequest { project: project.clone(), source }).await;
            let r = r.map_err(status)?.into_inner();
            match out {
                Output::Table => println!("applied {} v{} to project {project}", r.name, r.version),
                _ => print_structured(out, &serde_json::json!({"name": r.name, "version": r.version}))?,
            }
        }
        ClientCommand::Trigger { project, stage, sequence, service, data, definition, .. } => {
            let data_json = match data.as_deref() {
                Some(d) if d.starts_with('@') => {
                    std::fs::read_to_string(&d[1..]).with_context(|| format!("cannot read {}", &d[1..]))?
                }
                Some(d) => d.to_string(),
                None => String::new(),
            };
            let request = pb::TriggerRunRequest {
                project,
                definition: definition.unwrap_or_default(),
                stage,
                sequence,
                service: service.unwrap_or_default(),
                data: Some(pb::trigger_run_request::Data::DataJson(data_json)),
                ..Default::default()
            };
            let r = runs.trigger(request).await.map_err(status)?.into_inner();
            match out {
                Output::Table => println!("{}", r.run_id),
                _ => print_structured(out, &serde_json::json!({"runId": r.run_id}))?,
            }
        }
        ClientCommand::Get { run, .. } => {
            let r = runs.get(pb::GetRunRequest { project: String::new(), run_id: run }).await.map_err(status)?;
            let r = run_out(r.into_inner());
            match out {
                Output::Table => print_run(&r),
                _ => print_structured(out, &r)?,
            }
        }
        ClientCommand::List { project, stage, sequence, status: state, limit, .. } => {
            let request = pb::ListRunsRequest {
                project: project.unwrap_or_default(),
                stage: stage.unwrap_or_default(),
                sequence: sequence.unwrap_or_default(),
                status: state.unwrap_or_default(),
                page_size: limit,
                ..Default::default()
            };
            let r = runs.list(request).await.map_err(status)?.into_inner();
            let list: Vec<RunOut> = r.runs.into_iter().map(run_out).collect();
            match out {
                Output::Table => {
                    println!(
                        "{:<36}  {:<12} {:<12} {:<14} {:<10} {:<8}",
                        "RUN", "PROJECT", "STAGE", "SEQUENCE", "STATUS", "RESULT"
                    );
                    for r in &list {
                        println!(
                            "{:<36}  {:<12} {:<12} {:<14} {:<10} {:<8}",
                            r.run_id, r.project, r.stage, r.sequence, r.status, r.result
                        );
                    }
                }
                _ => print_structured(out, &list)?,
            }
        }
        ClientCommand::Watch { run, .. } => return watch(&mut runs, out, run).await,
        ClientCommand::Approve { run, task, reject, .. } => {
            let request = pb::ApproveRequest { project: String::new(), run_id: run, task: task.clone(), reject };
            let r = runs.approve(request).await.map_err(status)?.into_inner();
            let verb = if reject { "rejected" } else { "approved" };
            print_command(out, &format!("{verb} {task}"), &r)?;
        }
        ClientCommand::Cancel { run, reason, .. } => {
            let r = runs.cancel(pb::CancelRunRequest { project: String::new(), run_id: run, reason }).await;
            print_command(out, "cancelled", &r.map_err(status)?.into_inner())?;
        }
        ClientCommand::Pause { run, .. } => {
            let r = runs.pause(pb::RunRef { project: String::new(), run_id: run }).await;
            print_command(out, "paused", &r.map_err(status)?.into_inner())?;
        }
        ClientCommand::Resume { run, .. } => {
            let r = runs.resume(pb::RunRef { project: String::new(), run_id: run }).await;
            print_command(out, "resumed", &r.map_err(status)?.into_inner())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_run(r: &RunOut) {
    println!("run       {}", r.run_id);
    println!("project   {}", r.project);
    println!("stage     {} / {}", r.stage, r.sequence);
    if !r.service.is_empty() {
        println!("service   {}", r.service);
    }
    let result = if r.result.is_empty() { String::new() } else { format!(" ({})", r.result) };
    println!("status    {}{result}", r.status);
    println!("context   {}", r.context_id);
    println!("pinned    {} v{}", r.definition, r.definition_version);
    for t in &r.tasks {
        println!("  {:<20} {:<17} {:<8} attempt {} {}", t.name, t.state, t.result, t.attempt, t.worker);
    }
}

fn print_command(out: Output, what: &str, r: &pb::RunCommandResponse) -> anyhow::Result<()> {
    match out {
        Output::Table => println!("{what}: run {} ({} new event(s))", r.run_id, r.events),
        _ => print_structured(out, &serde_json::json!({"runId": r.run_id, "events": r.events, "version": r.version}))?,
    }
    Ok(())
}

/// Prints a run's progress until it ends; the exit code is its result.
async fn watch(runs: &mut Runs, out: Output, run: String) -> anyhow::Result<ExitCode> {
    let request = pb::WatchRunRequest { project: String::new(), run_id: run.clone(), from_seq: 1 };
    let mut stream = runs.watch(request).await.map_err(status)?.into_inner();
    let mut printer: Option<ProgressPrinter> = None;
    while let Some(message) = stream.message().await.map_err(status)? {
        let stored = stored_event(&message).context("the server sent an unreadable event")?;
        let event = codec::decode_event(&stored)?;
        match out {
            Output::Table => {
                let p = printer.get_or_insert_with(|| ProgressPrinter::new(stored.recorded_at_ms));
                if let Some(line) = p.line(&stored, &event) {
                    println!("{line}");
                }
            }
            Output::Json => println!("{}", serde_json::to_string(&event)?),
            Output::Yaml => print!("---\n{}", serde_yaml::to_string(&event)?),
        }
        if let capstan_engine::run::Event::RunFinished { result, .. } = event {
            let code = match result {
                capstan_engine::TaskResult::Pass => 0,
                capstan_engine::TaskResult::Warning => 2,
                capstan_engine::TaskResult::Fail => 3,
            };
            return Ok(ExitCode::from(code));
        }
    }
    bail!("the watch of run {run} ended before the run did (server stopping?); watch again")
}
