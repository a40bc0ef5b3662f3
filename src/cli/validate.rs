//! `capstan validate -f FILE`: every problem with its place, or a summary of a valid file.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

/// Prints the summary (exit 0) or every problem (exit 1).
pub fn run(file: &Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match capstan_engine::definition::parse(&text) {
        Ok(definition) => {
            println!("{}: valid", file.display());
            println!("{}", definition.summary());
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            println!("{}: invalid", file.display());
            println!("{diagnostics}");
            Ok(ExitCode::from(1))
        }
    }
}
