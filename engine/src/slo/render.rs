//! Human-readable rendering of an [`Evaluation`] for the CLI.

use std::fmt::Write as _;

use super::evaluate::{Evaluation, ObjectiveStatus};

/// Renders an evaluation as a plain-text table followed by a one-line verdict.
pub fn render_table(evaluation: &Evaluation) -> String {
    let headers = ["SLI", "VALUE", "BASELINE", "STATUS", "SCORE", "VIOLATED"];
    let rows: Vec<[String; 6]> = evaluation
        .objectives
        .iter()
        .map(|o| {
            let name = if o.key_sli { format!("{} (key)", o.display_name) } else { o.display_name.clone() };
            let score = if o.status == ObjectiveStatus::Info {
                "-".to_string()
            } else {
                format!("{}/{}", number(o.score), o.weight)
            };
            let violated = if o.value.is_none() { "no value".to_string() } else { o.violated.join(" ") };
            [
                name,
                o.value.map_or_else(|| "-".to_string(), number),
                o.baseline.map_or_else(|| "-".to_string(), number),
                status(o.status).to_string(),
                score,
                violated,
            ]
        })
        .collect();

    let mut widths = headers.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&headers.map(String::from));
    for row in &rows {
        line(row);
    }
    let _ = write!(out, "score {} of 100: {}", number(evaluation.score), evaluation.result.as_str());
    if evaluation.key_sli_failed {
        out.push_str(" (a key SLI failed)");
    }
    out.push('\n');
    out
}

fn status(status: ObjectiveStatus) -> &'static str {
    match status {
        ObjectiveStatus::Pass => "pass",
        ObjectiveStatus::Warning => "warning",
        ObjectiveStatus::Fail => "fail",
        ObjectiveStatus::Info => "info",
    }
}

/// Shows at most two decimals and drops trailing zeros, so 500 stays `500` and 2/3 is `66.67`.
fn number(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}
