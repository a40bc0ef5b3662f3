//! Scoring SLI values against an [`SloFile`] by Keptn's lighthouse rules.
//!
//! Per objective: with no pass criteria it is informative (`info`, not scored, weight not
//! counted). Otherwise the pass criteria are checked (criteria in a set ANDed, sets ORed); if
//! they hold the objective scores its weight; if not, the warning criteria are checked and score
//! half the weight; else it fails and scores 0. Relative criteria compare with the baseline:
//! the aggregate of this SLI's values in the latest N earlier results that
//! `include_result_with_score` admits; with no such value, relative criteria pass.
//!
//! Overall: score = achieved / total weight of scored objectives * 100 (100 when nothing is
//! scored). A failed key SLI fails the evaluation; otherwise score >= total_score.pass passes,
//! score >= total_score.warning warns, anything else fails.
//!
//! Missing values (our choice, stated because Keptn's code is ambiguous here): a scored
//! objective whose SLI has no value, or a non-finite one, fails with score 0 and its weight
//! still counts; a key SLI without a value fails the evaluation, since a gate that cannot see
//! its key indicator must not open. An informative objective without a value is just reported.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::criteria::Criterion;
use super::model::{Aggregate, IncludeResults, Objective, SloFile};
use crate::TaskResult;

/// An earlier evaluation used as a baseline: its result and SLI values. An [`Evaluation`]'s
/// JSON deserializes into this type (extra fields are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviousResult {
    /// The overall result of that evaluation.
    pub result: TaskResult,
    /// The SLI values it saw.
    #[serde(default)]
    pub values: BTreeMap<String, f64>,
}

impl From<&Evaluation> for PreviousResult {
    fn from(evaluation: &Evaluation) -> Self {
        PreviousResult { result: evaluation.result, values: evaluation.values.clone() }
    }
}

/// The outcome of one objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveStatus {
    /// The pass criteria held.
    Pass,
    /// The pass criteria failed, the warning criteria held.
    Warning,
    /// Neither held, or the value is missing.
    Fail,
    /// Informative objective (no pass criteria): reported, not scored.
    Info,
}

/// Which criteria list of an objective a target belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CriteriaList {
    /// The `pass` list.
    Pass,
    /// The `warning` list.
    Warning,
}

/// One checked criterion of an objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetResult {
    /// The list the criterion is in.
    pub list: CriteriaList,
    /// The index of its `criteria` set within the list.
    pub set: usize,
    /// The criterion as written.
    pub criteria: String,
    /// The value compared with; `None` for a relative criterion without a baseline.
    pub threshold: Option<f64>,
    /// Whether the value broke this criterion.
    pub violated: bool,
}

/// The evaluation of one objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveResult {
    /// The SLI name.
    pub sli: String,
    /// The display name (the SLI name when none is given).
    #[serde(rename = "displayName")]
    pub display_name: String,
    /// The measured value, if any.
    pub value: Option<f64>,
    /// The aggregated earlier value relative criteria compared with, if any.
    pub baseline: Option<f64>,
    /// pass, warning, fail or info.
    pub status: ObjectiveStatus,
    /// The score contributed: weight, half of it, or 0.
    pub score: f64,
    /// The objective's weight.
    pub weight: u32,
    /// Whether it is a key SLI.
    pub key_sli: bool,
    /// The list whose outcome set the status; `None` for info or a missing value.
    pub decided_by: Option<CriteriaList>,
    /// The violated criteria strings, pass list first.
    pub violated: Vec<String>,
    /// Every checked criterion with its threshold.
    pub targets: Vec<TargetResult>,
}

/// The result of scoring SLI values against an SLO file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Achieved score in percent, 0 to 100.
    pub score: f64,
    /// pass, warning or fail.
    pub result: TaskResult,
    /// The SLI values evaluated (non-finite values are left out and count as missing).
    pub values: BTreeMap<String, f64>,
    /// One entry per objective, in file order.
    pub objectives: Vec<ObjectiveResult>,
    /// Whether a key SLI failed (which alone fails the evaluation).
    pub key_sli_failed: bool,
    /// How many earlier results formed the baseline.
    pub compared_results: usize,
}

impl Evaluation {
    /// The process exit code for this result: 0 pass, 2 warning, 3 fail. Code 1 stays
    /// reserved for usage and I/O errors so scripts can tell a failed gate from a broken call.
    pub fn exit_code(&self) -> i32 {
        match self.result {
            TaskResult::Pass => 0,
            TaskResult::Warning => 2,
            TaskResult::Fail => 3,
        }
    }
}

/// Scores `values` against `slo`; `previous` are earlier evaluations, oldest first.
pub fn evaluate(slo: &SloFile, values: &BTreeMap<String, f64>, previous: &[PreviousResult]) -> Evaluation {
    let values: BTreeMap<String, f64> =
        values.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), *v)).collect();
    let baseline_results = select_previous(slo, previous);

    let mut achieved = 0.0;
    let mut achievable = 0.0;
    let mut key_sli_failed = false;
    let mut objectives = Vec::with_capacity(slo.objectives.len());
    for objective in &slo.objectives {
        let earlier: Vec<f64> = baseline_results
            .iter()
            .filter_map(|r| r.values.get(&objective.sli).copied())
            .filter(|v| v.is_finite())
            .collect();
        let baseline = aggregate(slo.comparison.aggregate_function, earlier);
        let result = score_objective(objective, values.get(&objective.sli).copied(), baseline);
        if objective.is_scored() {
            achievable += f64::from(objective.weight);
            achieved += result.score;
            if objective.key_sli && result.status == ObjectiveStatus::Fail {
                key_sli_failed = true;
            }
        }
        objectives.push(result);
    }

    let (score, result) = if achievable == 0.0 {
        (100.0, TaskResult::Pass)
    } else {
        let score = (100.0 * achieved / achievable).clamp(0.0, 100.0);
        (score, total_result(slo, score, key_sli_failed))
    };
    Evaluation { score, result, values, objectives, key_sli_failed, compared_results: baseline_results.len() }
}

/// The latest N earlier results that `include_result_with_score` admits, oldest first.
fn select_previous<'a>(slo: &SloFile, previous: &'a [PreviousResult]) -> Vec<&'a PreviousResult> {
    let include = slo.comparison.include_result_with_score;
    let admitted: Vec<&PreviousResult> = previous
        .iter()
        .filter(|r| match include {
            IncludeResults::Pass => r.result == TaskResult::Pass,
            IncludeResults::PassOrWarn => r.result != TaskResult::Fail,
            IncludeResults::All => true,
        })
        .collect();
    let keep = slo.comparison.results_to_compare();
    let skip = admitted.len().saturating_sub(keep);
    admitted.into_iter().skip(skip).collect()
}

/// Folds earlier values into one baseline. Percentiles use Keptn's rank `p * (n + 1)` with
/// linear interpolation between neighbours, clamped to the smallest and largest value.
pub fn aggregate(function: Aggregate, mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    match function {
        Aggregate::Avg => Some(values.iter().sum::<f64>() / values.len() as f64),
        Aggregate::Percentile(p) => {
            values.sort_by(f64::total_cmp);
            let n = values.len();
            let rank = f64::from(p) / 100.0 * (n as f64 + 1.0);
            let value = if rank < 1.0 {
                values[0]
            } else if rank >= n as f64 {
                values[n - 1]
            } else {
                // 1 <= rank < n, so both neighbours exist.
                let whole = rank.floor();
                let lower = values[whole as usize - 1];
                let upper = values[whole as usize];
                lower + (rank - whole) * (upper - lower)
            };
            Some(value)
        }
    }
}

fn score_objective(objective: &Objective, value: Option<f64>, baseline: Option<f64>) -> ObjectiveResult {
    let mut result = ObjectiveResult {
        sli: objective.sli.clone(),
        display_name: objective.display_name.clone(),
        value,
        baseline,
        status: ObjectiveStatus::Info,
        score: 0.0,
        weight: objective.weight,
        key_sli: objective.key_sli,
        decided_by: None,
        violated: Vec::new(),
        targets: Vec::new(),
    };
    let Some(value) = value else {
        if objective.is_scored() {
            result.status = ObjectiveStatus::Fail;
        }
        return result;
    };
    if !objective.is_scored() {
        return result;
    }
    let weight = f64::from(objective.weight);
    let passed = check_list(&objective.pass, CriteriaList::Pass, value, baseline, &mut result.targets);
    if passed {
        result.status = ObjectiveStatus::Pass;
        result.score = weight;
        result.decided_by = Some(CriteriaList::Pass);
    } else if objective.warning.is_empty() {
        result.status = ObjectiveStatus::Fail;
        result.decided_by = Some(CriteriaList::Pass);
    } else {
        let warned = check_list(&objective.warning, CriteriaList::Warning, value, baseline, &mut result.targets);
        result.decided_by = Some(CriteriaList::Warning);
        if warned {
            result.status = ObjectiveStatus::Warning;
            result.score = weight / 2.0;
        } else {
            result.status = ObjectiveStatus::Fail;
        }
    }
    result.violated = result.targets.iter().filter(|t| t.violated).map(|t| t.criteria.clone()).collect();
    result
}

/// Checks every set of a list (each set is reported, as Keptn does) and returns whether any
/// set held entirely.
fn check_list(
    sets: &[Vec<Criterion>],
    list: CriteriaList,
    value: f64,
    baseline: Option<f64>,
    targets: &mut Vec<TargetResult>,
) -> bool {
    let mut any_set_held = false;
    for (set, criteria) in sets.iter().enumerate() {
        let mut all_held = true;
        for criterion in criteria {
            let held = criterion.check(value, baseline);
            all_held &= held;
            targets.push(TargetResult {
                list,
                set,
                criteria: criterion.raw.clone(),
                threshold: criterion.threshold(baseline),
                violated: !held,
            });
        }
        any_set_held |= all_held;
    }
    any_set_held
}

fn total_result(slo: &SloFile, score: f64, key_sli_failed: bool) -> TaskResult {
    let Some(total) = slo.total_score else {
        // The parser demands total_score when anything is scored; without it nothing can pass.
        return TaskResult::Fail;
    };
    if key_sli_failed {
        TaskResult::Fail
    } else if score >= total.pass {
        TaskResult::Pass
    } else if total.warning.is_some_and(|warning| score >= warning) {
        TaskResult::Warning
    } else {
        TaskResult::Fail
    }
}
