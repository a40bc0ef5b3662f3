//! The command line: one module per command.

mod bench;
mod client;
pub mod demo;
pub mod demo_workers;
mod dev;
mod evaluate;
pub mod progress;
mod server;
mod validate;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Capstan: a durable, event-driven workflow engine for delivery and remediation.
#[derive(Debug, Parser)]
#[command(name = "capstan", version, about)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a Shipyard file (Capstan or Keptn) and print a summary or every problem.
    Validate {
        /// The file to check.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Score SLIs against a Keptn slo.yaml offline (a quality gate for CI pipelines).
    Evaluate(evaluate::EvaluateArgs),
    /// Run the bundled delivery example on the embedded engine (SQLite + in-memory broker).
    Demo(demo::DemoArgs),
    /// Run the embedded engine with built-in workers, serving the gRPC and HTTP APIs on loopback.
    Dev(dev::DevArgs),
    /// Run the server: configured store and broker, gRPC and HTTP APIs with tokens.
    Server(server::ServerArgs),
    /// Run an echo worker over a real broker as its own process, with an optional action ledger.
    Worker(worker::WorkerArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Measure throughput and latency of the whole engine in one process (store, broker, workers).
    Bench(bench::BenchArgs),
}

/// Logs go to stderr so that command output on stdout stays machine-readable.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,capstan=info,capstan_workers=warn",
        1 => "info,capstan=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs a parsed command line; the exit code is the command's verdict.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { file } => validate::run(&file),
        Command::Evaluate(args) => evaluate::run(&args),
        Command::Demo(args) => demo::run(args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Server(args) => server::run(args).await,
        Command::Worker(args) => worker::run(args).await,
        Command::Client(command) => client::run(command).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
