//! `capstan evaluate`: an offline quality gate. Scores SLI values against a Keptn slo.yaml, with
//! earlier results for relative criteria; the exit code is the verdict (0 pass, 2 warning,
//! 3 fail; 1 for usage or input errors).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use capstan_engine::slo;

/// Arguments of `capstan evaluate`.
#[derive(Debug, clap::Args)]
pub struct EvaluateArgs {
    /// The Keptn slo.yaml.
    #[arg(long)]
    pub slo: PathBuf,
    /// JSON object of SLI name -> number.
    #[arg(long)]
    pub values: PathBuf,
    /// JSON array of earlier results, oldest first (`{"result": .., "values": {..}}` each, or
    /// what `--output json` printed).
    #[arg(long)]
    pub previous: Option<PathBuf>,
    /// table (default) or json.
    #[arg(long, short = 'o', default_value = "table")]
    pub output: Output,
}

/// Output formats.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Scores and prints; the exit code tells pass / warning / fail.
pub fn run(args: &EvaluateArgs) -> anyhow::Result<ExitCode> {
    let slo_text = read(&args.slo)?;
    let slo_file = slo::parse(&slo_text).with_context(|| format!("{} is not a valid slo.yaml", args.slo.display()))?;
    let values: BTreeMap<String, f64> = serde_json::from_str(&read(&args.values)?)
        .with_context(|| format!("{}: expected a JSON object of SLI name -> number", args.values.display()))?;
    let previous: Vec<slo::PreviousResult> = match &args.previous {
        Some(p) => serde_json::from_str(&read(p)?)
            .with_context(|| format!("{}: expected a JSON array of earlier results", p.display()))?,
        None => Vec::new(),
    };
    let evaluation = slo::evaluate(&slo_file, &values, &previous);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&evaluation)?),
        Output::Table => println!("{}", slo::render_table(&evaluation)),
    }
    let code = u8::try_from(evaluation.exit_code()).unwrap_or(1);
    Ok(ExitCode::from(code))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}
