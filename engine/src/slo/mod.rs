//! Keptn `slo.yaml` quality gates: parsing and scoring, by the lighthouse-service's rules.
//!
//! [`parse`] reads and checks a file (every problem reported with its location);
//! [`evaluate`] scores SLI values against it, with earlier results as the baseline for
//! relative criteria; [`render_table`] prints an [`Evaluation`] for people, and
//! [`Evaluation::exit_code`] maps its result for scripts.

mod criteria;
mod evaluate;
mod model;
mod render;
#[cfg(test)]
mod tests;

use std::fmt;

pub use criteria::{Criterion, CriterionError, Operator, Target};
pub use evaluate::{
    CriteriaList, Evaluation, ObjectiveResult, ObjectiveStatus, PreviousResult, TargetResult, aggregate, evaluate,
};
pub use model::{Aggregate, CompareWith, Comparison, IncludeResults, Objective, SloFile, TotalScore, parse};
pub use render::render_table;

/// The task type of a quality gate. The runtime keeps every such task's result (its output's
/// `evaluation`) and hands the earlier ones of the same project, stage and service to the next
/// gate as `previousEvaluations`, the baseline of relative criteria.
pub const EVALUATION_TASK_TYPE: &str = "evaluation";

/// How many earlier results a gate is given at most: more than any comparison needs in practice
/// (Keptn's `number_of_comparison_results` counts only results the `include_result_with_score`
/// setting keeps, so the raw history must be longer than that number).
pub const PREVIOUS_EVALUATIONS: usize = 50;

/// One problem in an SLO file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SloProblem {
    /// Where: `objectives[0] (response_time_p95).pass[0].criteria[1]`, `total_score.pass`, ...
    pub location: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for SloProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why an SLO file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SloError {
    /// Not YAML, or not the shape of an slo.yaml; the message carries line and column.
    #[error("slo.yaml is not valid: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// Well-formed YAML with invalid content; every problem is listed.
    #[error("slo.yaml has {} problem(s): {}", .0.len(), join(.0))]
    Invalid(Vec<SloProblem>),
}

fn join(problems: &[SloProblem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}
