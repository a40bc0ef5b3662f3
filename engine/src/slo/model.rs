//! The `slo.yaml` model and its parser: raw serde structs are read first, then checked and
//! turned into typed values so that scoring never meets a malformed criterion.
//!
//! Defaults follow Keptn's lighthouse-service: without a `comparison` block Keptn compares with
//! a single earlier result of any score using `avg`; inside a `comparison` block a missing
//! `include_result_with_score` is `all`, a missing `aggregate_function` is `avg` and a missing
//! or zero `number_of_comparison_results` is 3. A missing `compare_with` is read as
//! `single_result` (Keptn then used a fixed 3 results; we prefer the documented default).
//! A weight of 0 or no weight is 1, as in Keptn.

use serde::Deserialize;

use super::criteria::Criterion;
use super::{SloError, SloProblem};

/// A parsed and checked Keptn `slo.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct SloFile {
    /// `spec_version` as written (Keptn uses "0.1.0" / "0.1.1"); empty when absent.
    pub spec_version: String,
    /// Which earlier results relative criteria compare against.
    pub comparison: Comparison,
    /// The objectives in file order.
    pub objectives: Vec<Objective>,
    /// Total-score thresholds; required when any objective is scored.
    pub total_score: Option<TotalScore>,
}

/// The `comparison` block.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// `single_result` or `several_results`.
    pub compare_with: CompareWith,
    /// How many earlier results `several_results` uses.
    pub number_of_comparison_results: usize,
    /// Which earlier results qualify as a baseline.
    pub include_result_with_score: IncludeResults,
    /// How the earlier values are folded into one baseline.
    pub aggregate_function: Aggregate,
}

impl Comparison {
    /// How many (filtered) earlier results form the baseline.
    pub fn results_to_compare(&self) -> usize {
        match self.compare_with {
            CompareWith::SingleResult => 1,
            CompareWith::SeveralResults => self.number_of_comparison_results,
        }
    }
}

impl Default for Comparison {
    fn default() -> Self {
        Comparison {
            compare_with: CompareWith::SingleResult,
            number_of_comparison_results: 1,
            include_result_with_score: IncludeResults::All,
            aggregate_function: Aggregate::Avg,
        }
    }
}

/// `comparison.compare_with`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareWith {
    /// Compare with the latest qualifying result only.
    SingleResult,
    /// Compare with the aggregate of the latest `number_of_comparison_results`.
    SeveralResults,
}

/// `comparison.include_result_with_score`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeResults {
    /// Only earlier results that passed.
    Pass,
    /// Earlier results that passed or warned.
    PassOrWarn,
    /// Every earlier result.
    All,
}

/// `comparison.aggregate_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// Arithmetic mean.
    Avg,
    /// Percentile `pNN`, 1 to 99 (Keptn names p50, p90 and p95).
    Percentile(u8),
}

/// One objective: an SLI with its pass and warning criteria.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// The SLI name, the key into the values.
    pub sli: String,
    /// `displayName`, or the SLI name when absent.
    pub display_name: String,
    /// Pass criteria: sets ORed, criteria within a set ANDed. Empty = informative only.
    pub pass: Vec<Vec<Criterion>>,
    /// Warning criteria, consulted only when the pass criteria fail.
    pub warning: Vec<Vec<Criterion>>,
    /// Weight in the total score (at least 1).
    pub weight: u32,
    /// A failed key SLI fails the whole evaluation.
    pub key_sli: bool,
}

impl Objective {
    /// Whether the objective counts towards the score (it has pass criteria).
    pub fn is_scored(&self) -> bool {
        !self.pass.is_empty()
    }
}

/// `total_score`: percentages of the achievable score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TotalScore {
    /// A score at or above this passes.
    pub pass: f64,
    /// A score at or above this (and below pass) warns; without it, below pass fails.
    pub warning: Option<f64>,
}

#[derive(Deserialize)]
struct RawSlo {
    #[serde(default)]
    spec_version: Option<String>,
    #[serde(default)]
    comparison: Option<RawComparison>,
    #[serde(default)]
    objectives: Vec<RawObjective>,
    #[serde(default)]
    total_score: Option<RawTotalScore>,
}

#[derive(Deserialize)]
struct RawComparison {
    #[serde(default)]
    compare_with: Option<String>,
    #[serde(default)]
    number_of_comparison_results: Option<u64>,
    #[serde(default)]
    include_result_with_score: Option<String>,
    #[serde(default)]
    aggregate_function: Option<String>,
}

#[derive(Deserialize)]
struct RawObjective {
    sli: String,
    #[serde(default, rename = "displayName")]
    display_name: Option<String>,
    #[serde(default)]
    pass: Option<Vec<RawCriteria>>,
    #[serde(default)]
    warning: Option<Vec<RawCriteria>>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    key_sli: Option<bool>,
}

#[derive(Deserialize)]
struct RawCriteria {
    #[serde(default)]
    criteria: Vec<String>,
}

#[derive(Deserialize)]
struct RawTotalScore {
    #[serde(default)]
    pass: Option<Percentage>,
    #[serde(default)]
    warning: Option<Percentage>,
}

/// Keptn writes `"90%"`; a bare number (`90`) is accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum Percentage {
    Number(f64),
    Text(String),
}

/// Parses a Keptn `slo.yaml`, reporting every problem with its location.
pub fn parse(text: &str) -> Result<SloFile, SloError> {
    let raw: RawSlo = serde_yaml::from_str(text)?;
    let mut problems = Vec::new();
    let mut problem = |location: String, message: String| {
        problems.push(SloProblem { location, message });
    };

    let comparison = match raw.comparison {
        None => Comparison::default(),
        Some(c) => {
            let compare_with = match c.compare_with.as_deref() {
                None | Some("single_result") => CompareWith::SingleResult,
                Some("several_results") => CompareWith::SeveralResults,
                Some(other) => {
                    problem(
                        "comparison.compare_with".into(),
                        format!("`{other}` is not single_result or several_results"),
                    );
                    CompareWith::SingleResult
                }
            };
            let include = match c.include_result_with_score.as_deref() {
                None | Some("all") => IncludeResults::All,
                Some("pass") => IncludeResults::Pass,
                Some("pass_or_warn") => IncludeResults::PassOrWarn,
                Some(other) => {
                    problem(
                        "comparison.include_result_with_score".into(),
                        format!("`{other}` is not pass, pass_or_warn or all"),
                    );
                    IncludeResults::All
                }
            };
            let aggregate = match c.aggregate_function.as_deref() {
                None => Aggregate::Avg,
                Some(name) => parse_aggregate(name).unwrap_or_else(|| {
                    problem(
                        "comparison.aggregate_function".into(),
                        format!("`{name}` is not avg or a percentile p1..p99"),
                    );
                    Aggregate::Avg
                }),
            };
            let number = match c.number_of_comparison_results {
                None | Some(0) => 3,
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            };
            Comparison {
                compare_with,
                number_of_comparison_results: number,
                include_result_with_score: include,
                aggregate_function: aggregate,
            }
        }
    };

    let mut objectives = Vec::with_capacity(raw.objectives.len());
    for (index, o) in raw.objectives.into_iter().enumerate() {
        let at = format!("objectives[{index}] ({})", o.sli);
        if o.sli.trim().is_empty() {
            problem(at.clone(), "sli must not be empty".into());
        }
        let pass = parse_sets(&at, "pass", o.pass.unwrap_or_default(), &mut problem);
        let warning = parse_sets(&at, "warning", o.warning.unwrap_or_default(), &mut problem);
        objectives.push(Objective {
            display_name: o.display_name.unwrap_or_else(|| o.sli.clone()),
            sli: o.sli,
            pass,
            warning,
            weight: o.weight.filter(|w| *w > 0).unwrap_or(1),
            key_sli: o.key_sli.unwrap_or(false),
        });
    }

    let total_score = match raw.total_score {
        None => None,
        Some(t) => {
            let pass = t.pass.and_then(|p| percentage("total_score.pass", p, &mut problem));
            let warning = t.warning.and_then(|p| percentage("total_score.warning", p, &mut problem));
            pass.map(|pass| TotalScore { pass, warning })
        }
    };
    if total_score.is_none() && objectives.iter().any(Objective::is_scored) {
        problem("total_score.pass".into(), "is required when an objective has pass criteria".into());
    }

    if !problems.is_empty() {
        return Err(SloError::Invalid(problems));
    }
    Ok(SloFile { spec_version: raw.spec_version.unwrap_or_default(), comparison, objectives, total_score })
}

fn parse_aggregate(name: &str) -> Option<Aggregate> {
    if name == "avg" {
        return Some(Aggregate::Avg);
    }
    let n: u8 = name.strip_prefix('p')?.parse().ok()?;
    (1..=99).contains(&n).then_some(Aggregate::Percentile(n))
}

fn parse_sets(
    at: &str,
    list: &str,
    sets: Vec<RawCriteria>,
    problem: &mut impl FnMut(String, String),
) -> Vec<Vec<Criterion>> {
    let mut parsed = Vec::with_capacity(sets.len());
    for (set_index, set) in sets.into_iter().enumerate() {
        let mut criteria = Vec::with_capacity(set.criteria.len());
        for (index, raw) in set.criteria.iter().enumerate() {
            match Criterion::parse(raw) {
                Ok(c) => criteria.push(c),
                Err(e) => problem(format!("{at}.{list}[{set_index}].criteria[{index}]"), e.to_string()),
            }
        }
        parsed.push(criteria);
    }
    parsed
}

fn percentage(at: &str, value: Percentage, problem: &mut impl FnMut(String, String)) -> Option<f64> {
    let number = match &value {
        Percentage::Number(n) => Some(*n),
        Percentage::Text(text) => text.trim().trim_end_matches('%').trim().parse().ok(),
    };
    match number {
        Some(n) if n.is_finite() => Some(n),
        _ => {
            let shown = match value {
                Percentage::Number(n) => n.to_string(),
                Percentage::Text(text) => text,
            };
            problem(at.into(), format!("`{shown}` is not a percentage like \"90%\""));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(SloError::Invalid(problems)) => problems.iter().map(ToString::to_string).collect(),
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_keptn() {
        let slo = parse("objectives:\n  - sli: rt\n").unwrap();
        assert_eq!(slo.comparison, Comparison::default());
        assert_eq!(slo.spec_version, "");
        let o = &slo.objectives[0];
        assert_eq!((o.display_name.as_str(), o.weight, o.key_sli), ("rt", 1, false));
        assert!(!o.is_scored());

        let slo = parse("comparison: {compare_with: several_results}\nobjectives: []").unwrap();
        assert_eq!(slo.comparison.number_of_comparison_results, 3);
        assert_eq!(slo.comparison.results_to_compare(), 3);
        assert_eq!(slo.comparison.include_result_with_score, IncludeResults::All);
        assert_eq!(slo.comparison.aggregate_function, Aggregate::Avg);

        let slo =
            parse("objectives: [{sli: a, weight: 0, pass: [{criteria: ['<1']}]}]\ntotal_score: {pass: 90}").unwrap();
        assert_eq!(slo.objectives[0].weight, 1, "weight 0 is read as 1, like Keptn");
        assert_eq!(slo.total_score, Some(TotalScore { pass: 90.0, warning: None }));
    }

    #[test]
    fn reads_every_field() {
        let slo = parse(
            r#"
spec_version: "0.1.1"
comparison:
  compare_with: several_results
  number_of_comparison_results: 5
  include_result_with_score: pass_or_warn
  aggregate_function: p95
objectives:
  - sli: error_rate
    displayName: Error rate
    weight: 2
    key_sli: true
    pass: [{criteria: ["<=1"]}, {criteria: ["=0", "<+5%"]}]
    warning: [{criteria: ["<=2"]}]
total_score: {pass: "90%", warning: " 75 % "}
filter: {handler: x}
"#,
        )
        .unwrap();
        assert_eq!(slo.spec_version, "0.1.1");
        assert_eq!(slo.comparison.compare_with, CompareWith::SeveralResults);
        assert_eq!(slo.comparison.results_to_compare(), 5);
        assert_eq!(slo.comparison.include_result_with_score, IncludeResults::PassOrWarn);
        assert_eq!(slo.comparison.aggregate_function, Aggregate::Percentile(95));
        let o = &slo.objectives[0];
        assert_eq!(o.display_name, "Error rate");
        assert_eq!((o.weight, o.key_sli), (2, true));
        assert_eq!(o.pass.len(), 2);
        assert_eq!(o.pass[1][1].raw, "<+5%");
        assert_eq!(o.warning[0][0].raw, "<=2");
        assert_eq!(slo.total_score, Some(TotalScore { pass: 90.0, warning: Some(75.0) }));
    }

    #[test]
    fn bad_criteria_name_the_objective_and_every_problem_is_listed() {
        let found = problems(
            r#"
objectives:
  - sli: response_time_p95
    pass: [{criteria: ["<=+10%", "600"]}]
    warning: [{criteria: ["<=abc"]}]
  - sli: errors
    pass: [{criteria: ["~5"]}]
total_score: {pass: "90%"}
"#,
        );
        assert_eq!(
            found,
            [
                "objectives[0] (response_time_p95).pass[0].criteria[1]: criterion `600` must start with one of <, <=, =, >=, >",
                "objectives[0] (response_time_p95).warning[0].criteria[0]: criterion `<=abc` has no valid number after its operator",
                "objectives[1] (errors).pass[0].criteria[0]: criterion `~5` must start with one of <, <=, =, >=, >",
            ]
        );
    }

    #[test]
    fn bad_settings_are_located() {
        let found = problems(
            r#"
comparison:
  compare_with: all_results
  include_result_with_score: best
  aggregate_function: median
objectives:
  - sli: rt
    pass: [{criteria: ["<1"]}]
total_score: {pass: "ninety", warning: "75%"}
"#,
        );
        assert_eq!(found.len(), 5, "{found:#?}");
        for location in [
            "comparison.compare_with",
            "comparison.include_result_with_score",
            "comparison.aggregate_function",
            "total_score.pass: `ninety`",
            "total_score.pass: is required",
        ] {
            assert!(found.iter().any(|p| p.starts_with(location)), "{location}: {found:#?}");
        }
        for name in ["p0", "p100", "px", "max"] {
            assert_eq!(parse_aggregate(name), None, "{name}");
        }
        assert_eq!(parse_aggregate("p50"), Some(Aggregate::Percentile(50)));
    }

    #[test]
    fn yaml_errors_say_where() {
        let err = parse("objectives:\n  - sli: rt\n    weight: heavy\n").unwrap_err();
        assert!(matches!(err, SloError::Yaml(_)));
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
