//! `capstan validate -f FILE`: every problem with its place, or a summary of a valid file.
//! Besides shipyards it checks the other files of a delivery setup, told apart by their
//! content: Keptn's `remediation.yaml` (`kind: Remediation`), `slo.yaml` (`objectives`) and
//! `sli.yaml` (`indicators`), and a server configuration (`.toml`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

/// Prints the summary (exit 0) or every problem (exit 1).
pub fn run(file: &Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if let Some(checked) = other_kind(file, &text) {
        return Ok(match checked {
            Ok(summary) => {
                println!("{}: valid", file.display());
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(problem) => {
                println!("{}: invalid", file.display());
                println!("{problem}");
                ExitCode::from(1)
            }
        });
    }
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

/// A file that is not a shipyard: its summary or its problem; `None` for a shipyard.
fn other_kind(file: &Path, text: &str) -> Option<Result<String, String>> {
    if file.extension().is_some_and(|e| e == "toml") {
        let env = std::collections::HashMap::new();
        return Some(crate::config::Config::load(Some(file), &env).map_err(|e| e.to_string()).and_then(|c| {
            worker_files(&c.workers)?;
            let workers: Vec<String> =
                c.workers.sections().iter().map(|(s, t)| format!("{s} ({})", t.join(", "))).collect();
            let workers = if workers.is_empty() { "none".to_string() } else { workers.join(", ") };
            Ok(format!("server configuration; delivery workers: {workers}"))
        }));
    }
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
    if yaml.get("kind").and_then(serde_yaml::Value::as_str) == Some("Remediation") {
        return Some(capstan_engine::remediation::Remediation::parse(text).map_err(|e| e.to_string()).map(|r| {
            let types: Vec<String> = r
                .spec
                .remediations
                .iter()
                .map(|p| format!("{} ({} action(s))", p.problem_type, p.actions_on_open.len()))
                .collect();
            format!("remediation {}: {}", r.metadata.name, types.join(", "))
        }));
    }
    if yaml.get("objectives").is_some() {
        return Some(
            capstan_engine::slo::parse(text)
                .map_err(|e| e.to_string())
                .map(|slo| format!("slo: {} objective(s)", slo.objectives.len())),
        );
    }
    if yaml.get("indicators").is_some() {
        return Some(
            capstan_workers::sli::SliFile::parse(text)
                .map(|f| format!("sli: {}", f.indicators.keys().cloned().collect::<Vec<_>>().join(", "))),
        );
    }
    None
}

/// Every file a `[workers]` section names must exist and be valid; all problems are listed.
fn worker_files(workers: &crate::config::WorkersConfig) -> Result<(), String> {
    type Check = fn(&str) -> Result<(), String>;
    let slo: Check = |t| capstan_engine::slo::parse(t).map(drop).map_err(|e| e.to_string());
    let sli: Check = |t| capstan_workers::sli::SliFile::parse(t).map(drop);
    let remediation: Check =
        |t| capstan_engine::remediation::Remediation::parse(t).map(drop).map_err(|e| e.to_string());
    let mut files = Vec::new();
    if let Some(e) = &workers.evaluation {
        files.extend(e.slo.iter().map(|(k, p)| ("evaluation.slo", k, p, slo)));
    }
    if let Some(p) = &workers.prometheus {
        files.extend(p.sli.iter().map(|(k, p)| ("prometheus.sli", k, p, sli)));
    }
    if let Some(g) = &workers.get_action {
        files.extend(g.remediation.iter().map(|(k, p)| ("get_action.remediation", k, p, remediation)));
    }
    let problems: Vec<String> = files
        .into_iter()
        .filter_map(|(what, key, path, check)| {
            let checked = std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|t| check(&t));
            checked.err().map(|e| format!("workers.{what}.{key} ({}): {e}", path.display()))
        })
        .collect();
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
}
