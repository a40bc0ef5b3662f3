//! Scoring tests: a table of hand-computed cases for Keptn's rules, the Keptn fixture, the
//! JSON round trip into [`PreviousResult`], the CLI table and property tests.

use std::collections::BTreeMap;

use expect_test::expect;
use proptest::prelude::*;

use super::*;
use crate::TaskResult::{self, Fail, Pass, Warning};

use ObjectiveStatus as S;

fn values(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn prev(result: TaskResult, pairs: &[(&str, f64)]) -> PreviousResult {
    PreviousResult { result, values: values(pairs) }
}

/// An SLO file with the given comparison block and objectives, gated at 90 % / 75 %.
fn gate(comparison: &str, objectives: &str) -> String {
    format!("{comparison}\nobjectives:\n{objectives}\ntotal_score: {{pass: \"90%\", warning: \"75%\"}}\n")
}

struct Case {
    name: &'static str,
    comparison: &'static str,
    objectives: &'static str,
    values: &'static [(&'static str, f64)],
    previous: Vec<PreviousResult>,
    score: f64,
    result: TaskResult,
    statuses: &'static [ObjectiveStatus],
    baseline: Option<f64>,
}

const RT_PASS: &str = "  - sli: rt\n    pass: [{criteria: [\"<600\"]}]";
const RT_PASS_WARN: &str = "  - sli: rt\n    pass: [{criteria: [\"<600\"]}]\n    warning: [{criteria: [\"<=800\"]}]";
const REL_PCT: &str = "  - sli: rt\n    pass: [{criteria: [\"<=+10%\"]}]";
const SINGLE_PASS: &str = "comparison: {compare_with: single_result, include_result_with_score: pass}";
const SINGLE_WARN: &str = "comparison: {compare_with: single_result, include_result_with_score: pass_or_warn}";
const SINGLE_ALL: &str = "comparison: {compare_with: single_result, include_result_with_score: all}";
const SEVERAL_3_AVG: &str = "comparison: {compare_with: several_results, number_of_comparison_results: 3, include_result_with_score: all, aggregate_function: avg}";
const SEVERAL_3_P90: &str = "comparison: {compare_with: several_results, number_of_comparison_results: 3, include_result_with_score: all, aggregate_function: p90}";
const SEVERAL_2_PASS: &str =
    "comparison: {compare_with: several_results, number_of_comparison_results: 2, include_result_with_score: pass}";

/// Earlier results carrying one value each for the SLI `rt`, oldest first.
fn history(results: &[(TaskResult, f64)]) -> Vec<PreviousResult> {
    history_of("rt", results)
}

fn history_of(sli: &str, results: &[(TaskResult, f64)]) -> Vec<PreviousResult> {
    results.iter().map(|(r, v)| prev(*r, &[(sli, *v)])).collect()
}

// One row per rule; rustfmt would spread each row over a dozen lines and hide the table.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let two = "  - sli: a\n    pass: [{criteria: [\"<10\"]}]\n    warning: [{criteria: [\"<20\"]}]\n  - sli: b\n    pass: [{criteria: [\"<10\"]}]\n    warning: [{criteria: [\"<20\"]}]";
    let weighted = "  - sli: a\n    weight: 3\n    pass: [{criteria: [\"<10\"]}]\n    warning: [{criteria: [\"<20\"]}]\n  - sli: b\n    pass: [{criteria: [\"<10\"]}]\n    warning: [{criteria: [\"<20\"]}]";
    let key = "  - sli: a\n    key_sli: true\n    pass: [{criteria: [\"<10\"]}]\n    warning: [{criteria: [\"<20\"]}]\n  - sli: b\n    weight: 19\n    pass: [{criteria: [\"<10\"]}]";
    let info = "  - sli: a\n    pass: [{criteria: [\"<10\"]}]\n  - sli: i\n    weight: 5\n    warning: [{criteria: [\"<1\"]}]";
    let ored = "  - sli: a\n    pass: [{criteria: [\"<100\"]}, {criteria: [\">1000\", \"<3000\"]}]";
    let minus_pct = "  - sli: rt\n    pass: [{criteria: [\">=-5%\"]}]";
    let plus_50 = "  - sli: rt\n    pass: [{criteria: [\"<=+50\"]}]";
    let minus_10 = "  - sli: rt\n    pass: [{criteria: [\">-10\"]}]";
    let mixed = [(Pass, 100.0), (Warning, 190.0), (Fail, 1000.0)];
    let four = [(Pass, 100.0), (Pass, 200.0), (Fail, 300.0), (Warning, 400.0)];
    let c = |name, comparison, objectives, values, previous: &[(TaskResult, f64)], score, result, statuses, baseline| Case {
        name, comparison, objectives, values, previous: history(previous), score, result, statuses, baseline,
    };
    vec![
        c("absolute pass", "", RT_PASS, &[("rt", 599.0)], &[], 100.0, Pass, &[S::Pass], None),
        c("absolute boundary fails", "", RT_PASS, &[("rt", 600.0)], &[], 0.0, Fail, &[S::Fail], None),
        c("single warning objective scores half", "", RT_PASS_WARN, &[("rt", 700.0)], &[], 50.0, Fail, &[S::Warning], None),
        c("warning not consulted when pass holds", "", "  - sli: rt\n    pass: [{criteria: [\"<600\"]}]\n    warning: [{criteria: [\">1000\"]}]", &[("rt", 500.0)], &[], 100.0, Pass, &[S::Pass], None),
        c("warning criteria fail too", "", RT_PASS_WARN, &[("rt", 801.0)], &[], 0.0, Fail, &[S::Fail], None),
        c("pass + warning = 75 warns", "", two, &[("a", 1.0), ("b", 15.0)], &[], 75.0, Warning, &[S::Pass, S::Warning], None),
        c("two warnings = 50 fails", "", two, &[("a", 15.0), ("b", 15.0)], &[], 50.0, Fail, &[S::Warning, S::Warning], None),
        c("weight 3 pass, weight 1 fail = 75", "", weighted, &[("a", 1.0), ("b", 25.0)], &[], 75.0, Warning, &[S::Pass, S::Fail], None),
        c("weight 3 warning, weight 1 pass = 62.5", "", weighted, &[("a", 15.0), ("b", 1.0)], &[], 62.5, Fail, &[S::Warning, S::Pass], None),
        c("failed key SLI fails a 95 score", "", key, &[("a", 25.0), ("b", 1.0)], &[], 95.0, Fail, &[S::Fail, S::Pass], None),
        c("key SLI warning does not fail", "", key, &[("a", 15.0), ("b", 1.0)], &[], 97.5, Pass, &[S::Warning, S::Pass], None),
        c("missing key SLI fails", "", key, &[("b", 1.0)], &[], 95.0, Fail, &[S::Fail, S::Pass], None),
        c("missing value fails, weight counts", "", two, &[("a", 1.0)], &[], 50.0, Fail, &[S::Pass, S::Fail], None),
        c("NaN counts as missing", "", two, &[("a", 1.0), ("b", f64::NAN)], &[], 50.0, Fail, &[S::Pass, S::Fail], None),
        c("informative objective not scored", "", info, &[("a", 1.0), ("i", 50.0)], &[], 100.0, Pass, &[S::Pass, S::Info], None),
        c("informative objective without value", "", info, &[("a", 11.0)], &[], 0.0, Fail, &[S::Fail, S::Info], None),
        c("nothing scored passes with 100", "", "  - sli: i", &[], &[], 100.0, Pass, &[S::Info], None),
        c("criteria sets are ORed", "", ored, &[("a", 2000.0)], &[], 100.0, Pass, &[S::Pass], None),
        c("criteria in a set are ANDed", "", ored, &[("a", 5000.0)], &[], 0.0, Fail, &[S::Fail], None),
        // Relative criteria.
        c("relative % without history passes", SINGLE_ALL, REL_PCT, &[("rt", 1e9)], &[], 100.0, Pass, &[S::Pass], None),
        c("relative % at +10% passes", SINGLE_ALL, REL_PCT, &[("rt", 550.0)], &[(Pass, 500.0)], 100.0, Pass, &[S::Pass], Some(500.0)),
        c("relative % above +10% fails", SINGLE_ALL, REL_PCT, &[("rt", 551.0)], &[(Pass, 500.0)], 0.0, Fail, &[S::Fail], Some(500.0)),
        c("relative -5%", SINGLE_ALL, minus_pct, &[("rt", 189.0)], &[(Pass, 200.0)], 0.0, Fail, &[S::Fail], Some(200.0)),
        c("relative absolute +50 passes", SINGLE_ALL, plus_50, &[("rt", 550.0)], &[(Pass, 500.0)], 100.0, Pass, &[S::Pass], Some(500.0)),
        c("relative absolute +50 fails", SINGLE_ALL, plus_50, &[("rt", 550.5)], &[(Pass, 500.0)], 0.0, Fail, &[S::Fail], Some(500.0)),
        c("relative absolute -10", SINGLE_ALL, minus_10, &[("rt", 91.0)], &[(Pass, 100.0)], 100.0, Pass, &[S::Pass], Some(100.0)),
        // Which earlier results form the baseline.
        c("single_result/all takes the latest", SINGLE_ALL, REL_PCT, &[("rt", 200.0)], &mixed, 100.0, Pass, &[S::Pass], Some(1000.0)),
        c("single_result/pass skips the rest", SINGLE_PASS, REL_PCT, &[("rt", 200.0)], &mixed, 0.0, Fail, &[S::Fail], Some(100.0)),
        c("single_result/pass_or_warn takes warnings", SINGLE_WARN, REL_PCT, &[("rt", 200.0)], &mixed, 100.0, Pass, &[S::Pass], Some(190.0)),
        c("only failed history under pass: no baseline", SINGLE_PASS, REL_PCT, &[("rt", 9999.0)], &[(Fail, 1.0)], 100.0, Pass, &[S::Pass], None),
        c("several_results avg of the latest 3", SEVERAL_3_AVG, REL_PCT, &[("rt", 330.0)], &four, 100.0, Pass, &[S::Pass], Some(300.0)),
        c("several_results avg exceeded", SEVERAL_3_AVG, REL_PCT, &[("rt", 330.5)], &four, 0.0, Fail, &[S::Fail], Some(300.0)),
        c("several_results with fewer results than N", SEVERAL_3_AVG, REL_PCT, &[("rt", 160.0)], &[(Pass, 100.0), (Pass, 200.0)], 100.0, Pass, &[S::Pass], Some(150.0)),
        c("several_results p90", SEVERAL_3_P90, REL_PCT, &[("rt", 440.0)], &[(Pass, 100.0), (Pass, 400.0), (Fail, 200.0), (Warning, 300.0)], 100.0, Pass, &[S::Pass], Some(400.0)),
        c("several_results/pass filters before taking N", SEVERAL_2_PASS, REL_PCT, &[("rt", 165.0)], &[(Pass, 100.0), (Pass, 200.0), (Fail, 900.0), (Warning, 800.0)], 100.0, Pass, &[S::Pass], Some(150.0)),
        c("no comparison block: latest result of any score", "", REL_PCT, &[("rt", 1000.0)], &[(Pass, 100.0), (Fail, 1000.0)], 100.0, Pass, &[S::Pass], Some(1000.0)),
        // Without a warning threshold anything below pass fails (see scoring_follows_keptn_rules).
        c("no warning threshold", "", two, &[("a", 1.0), ("b", 15.0)], &[], 75.0, Fail, &[S::Pass, S::Warning], None),
    ]
}

#[test]
fn scoring_follows_keptn_rules() {
    for case in cases() {
        let mut text = gate(case.comparison, case.objectives);
        if case.name == "no warning threshold" {
            text = text.replace(", warning: \"75%\"", "");
        }
        let slo = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let got = evaluate(&slo, &values(case.values), &case.previous);
        assert!((got.score - case.score).abs() < 1e-9, "{}: score {}", case.name, got.score);
        assert_eq!(got.result, case.result, "{}", case.name);
        let statuses: Vec<_> = got.objectives.iter().map(|o| o.status).collect();
        assert_eq!(statuses, case.statuses, "{}", case.name);
        assert_eq!(got.objectives[0].baseline, case.baseline, "{}", case.name);
    }
}

#[test]
fn objectives_report_their_criteria() {
    let slo = parse(&gate(SINGLE_ALL, "  - sli: rt\n    displayName: Response time\n    pass: [{criteria: [\"<=+10%\", \"<600\"]}]\n    warning: [{criteria: [\"<=800\"]}]")).unwrap();
    let got = evaluate(&slo, &values(&[("rt", 650.0)]), &history(&[(Pass, 500.0)]));
    let o = &got.objectives[0];
    assert_eq!((o.display_name.as_str(), o.value, o.status), ("Response time", Some(650.0), S::Warning));
    assert_eq!((o.score, o.weight, o.key_sli), (0.5, 1, false));
    assert_eq!(o.decided_by, Some(CriteriaList::Warning));
    assert_eq!(o.violated, ["<=+10%", "<600"]);
    let thresholds: Vec<_> = o.targets.iter().map(|t| (t.list, t.criteria.as_str(), t.threshold, t.violated)).collect();
    assert_eq!(
        thresholds,
        [
            (CriteriaList::Pass, "<=+10%", Some(550.0), true),
            (CriteriaList::Pass, "<600", Some(600.0), true),
            (CriteriaList::Warning, "<=800", Some(800.0), false),
        ]
    );
    assert_eq!(got.compared_results, 1);
    assert_eq!(got.values, values(&[("rt", 650.0)]));
}

#[test]
fn percentiles_interpolate_like_keptn() {
    let four = vec![400.0, 100.0, 300.0, 200.0];
    assert_eq!(aggregate(Aggregate::Avg, four.clone()), Some(250.0));
    // rank = 0.5 * 5 = 2.5: halfway between the 2nd and 3rd smallest.
    assert_eq!(aggregate(Aggregate::Percentile(50), four.clone()), Some(250.0));
    // rank = 0.9 * 5 = 4.5 >= n: the largest.
    assert_eq!(aggregate(Aggregate::Percentile(90), four.clone()), Some(400.0));
    // rank = 0.1 * 5 = 0.5 < 1: the smallest.
    assert_eq!(aggregate(Aggregate::Percentile(10), four), Some(100.0));
    assert_eq!(aggregate(Aggregate::Percentile(50), vec![7.0]), Some(7.0));
    assert_eq!(aggregate(Aggregate::Avg, vec![]), None);
}

/// (value, earlier results, objective status, score, evaluation result).
type FixtureRow = (f64, &'static [(TaskResult, f64)], ObjectiveStatus, f64, TaskResult);

const FIXTURE: &str = include_str!("../../tests/fixtures/keptn/slo-quality-gates.yaml");

#[test]
fn keptn_fixture_scores_by_hand() {
    let slo = parse(FIXTURE).unwrap();
    assert_eq!(slo.comparison.include_result_with_score, IncludeResults::Pass);
    // (value, history, objective status, score, result); the gate is 90 % / 75 % over one
    // objective, so a warning objective (50 %) fails the evaluation.
    #[rustfmt::skip]
    let table: [FixtureRow; 9] = [
        (500.0, &[], S::Pass, 100.0, Pass),
        (599.0, &[], S::Pass, 100.0, Pass),
        (700.0, &[], S::Warning, 50.0, Fail),
        (800.0, &[], S::Warning, 50.0, Fail),
        (900.0, &[], S::Fail, 0.0, Fail),
        // 500 > 400 * 1.1: the relative criterion breaks, the warning one holds.
        (500.0, &[(Pass, 400.0)], S::Warning, 50.0, Fail),
        // Only passed results count: the baseline is 480, so 528 is the limit.
        (520.0, &[(Pass, 480.0), (Fail, 300.0)], S::Pass, 100.0, Pass),
        (530.0, &[(Pass, 480.0), (Fail, 300.0)], S::Warning, 50.0, Fail),
        (590.0, &[(Fail, 100.0)], S::Pass, 100.0, Pass),
    ];
    for (value, previous, status, score, result) in table {
        let previous = history_of("response_time_p95", previous);
        let got = evaluate(&slo, &values(&[("response_time_p95", value)]), &previous);
        let label = format!("value {value} with {} earlier", previous.len());
        assert_eq!(got.objectives[0].status, status, "{label}");
        assert_eq!(got.score, score, "{label}");
        assert_eq!(got.result, result, "{label}");
        assert_eq!(got.exit_code(), [0, 2, 3][result as usize], "{label}");
    }
    let missing = evaluate(&slo, &BTreeMap::new(), &[]);
    assert_eq!((missing.score, missing.result), (0.0, Fail));
}

#[test]
fn exit_codes() {
    let slo = parse(&gate("", "  - sli: a\n    pass: [{criteria: [\"<10\"]}]\n    warning: [{criteria: [\"<20\"]}]\n  - sli: b\n    pass: [{criteria: [\"<10\"]}]")).unwrap();
    // One of two equal objectives: pass 100 %, warning 75 %, fail 50 %.
    for (a, code) in [(1.0, 0), (15.0, 2), (25.0, 3)] {
        let got = evaluate(&slo, &values(&[("a", a), ("b", 1.0)]), &[]);
        assert_eq!(got.exit_code(), code, "a = {a}");
    }
}

#[test]
fn evaluation_json_is_a_previous_result() {
    let slo = parse(FIXTURE).unwrap();
    let first = evaluate(&slo, &values(&[("response_time_p95", 480.0)]), &[]);
    let json = serde_json::to_string(&first).unwrap();
    let as_previous: PreviousResult = serde_json::from_str(&json).unwrap();
    assert_eq!(as_previous, PreviousResult::from(&first));
    let back: Evaluation = serde_json::from_str(&json).unwrap();
    assert_eq!(back, first);
    let second = evaluate(&slo, &values(&[("response_time_p95", 530.0)]), &[as_previous]);
    assert_eq!(second.objectives[0].baseline, Some(480.0));
    assert_eq!(second.objectives[0].status, S::Warning);

    let plain: PreviousResult =
        serde_json::from_str(r#"{"result": "failed", "values": {"rt": 3}, "extra": 1}"#).unwrap();
    assert_eq!(plain, prev(Fail, &[("rt", 3.0)]));
    let value: serde_json::Value = serde_json::to_value(&first).unwrap();
    assert_eq!(value["objectives"][0]["displayName"], "response_time_p95");
    assert_eq!(value["objectives"][0]["status"], "pass");
}

#[test]
fn renders_a_table() {
    let slo = parse(&gate(SINGLE_ALL, "  - sli: rt\n    displayName: Response time\n    key_sli: true\n    pass: [{criteria: [\"<=+10%\", \"<600\"]}]\n    warning: [{criteria: [\"<=800\"]}]\n  - sli: errors\n    weight: 2\n    pass: [{criteria: [\"<1\"]}]\n  - sli: throughput\n  - sli: cpu\n    pass: [{criteria: [\"<80\"]}]")).unwrap();
    let got =
        evaluate(&slo, &values(&[("rt", 650.0), ("errors", 0.5), ("throughput", 1234.5)]), &history(&[(Pass, 500.0)]));
    expect![[r#"
        SLI                  VALUE   BASELINE  STATUS   SCORE  VIOLATED
        Response time (key)  650     500       warning  0.5/1  <=+10% <600
        errors               0.5     -         pass     2/2
        throughput           1234.5  -         info     -
        cpu                  -       -         fail     0/1    no value
        score 62.5 of 100: fail
    "#]]
    .assert_eq(&render_table(&got));
}

proptest! {
    #[test]
    fn score_stays_within_bounds(
        objectives in prop::collection::vec((1u32..5, any::<bool>(), 0u8..4, -5i32..5), 0..6),
        current in prop::collection::vec(prop::option::of(-1000.0f64..1000.0), 6),
        history_values in prop::collection::vec((0u8..3, -1000.0f64..1000.0), 0..5),
    ) {
        let criteria = ["<10", ">=-5%", "<=+20", ">0"];
        let mut text = String::from("comparison: {compare_with: several_results, number_of_comparison_results: 2}\nobjectives:\n");
        for (i, (weight, key, c, w)) in objectives.iter().enumerate() {
            text.push_str(&format!("  - sli: s{i}\n    weight: {weight}\n    key_sli: {key}\n"));
            if *c > 0 {
                text.push_str(&format!("    pass: [{{criteria: [\"{}\"]}}]\n", criteria[usize::from(*c)]));
            }
            text.push_str(&format!("    warning: [{{criteria: [\"<{w}\"]}}]\n"));
        }
        text.push_str("total_score: {pass: \"90%\", warning: \"75%\"}\n");
        let slo = parse(&text).unwrap();
        let now: BTreeMap<String, f64> = current.iter().enumerate()
            .filter_map(|(i, v)| v.map(|v| (format!("s{i}"), v))).collect();
        let previous: Vec<PreviousResult> = history_values.iter().map(|(r, v)| PreviousResult {
            result: [Pass, Warning, Fail][usize::from(*r)],
            values: (0..6).map(|i| (format!("s{i}"), *v)).collect(),
        }).collect();
        let got = evaluate(&slo, &now, &previous);
        prop_assert!((0.0..=100.0).contains(&got.score), "score {}", got.score);
        prop_assert_eq!(got.objectives.len(), objectives.len());
        if got.key_sli_failed { prop_assert_eq!(got.result, Fail); }
    }

    #[test]
    fn parsing_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn criteria_parsing_never_panics(raw in "[<>=+\\-%.0-9a ]{0,12}") {
        let text = gate("", &format!("  - sli: x\n    pass: [{{criteria: [{raw:?}]}}]"));
        if let Ok(slo) = parse(&text) {
            let got = evaluate(&slo, &values(&[("x", 1.0)]), &[prev(Pass, &[("x", 2.0)])]);
            prop_assert!((0.0..=100.0).contains(&got.score));
        }
    }
}
