//! Parsing tests: the ARCHITECTURE.md example, the Keptn fixtures, defaults, and that `parse`
//! never panics on arbitrary or mangled input.

use expect_test::expect;
use proptest::prelude::*;

use super::model::{AwardPolicy, DispatchMode, Flavor, RetryPolicy, TaskResult, Timeouts};
use super::{file_kind, parse};

/// The example of ARCHITECTURE.md's "Definition format" section, verbatim.
pub(super) const ARCHITECTURE_EXAMPLE: &str = r#"
apiVersion: capstan.dev/v1          # Keptn files say spec.keptn.sh/0.2.x and keep Keptn's semantics
kind: Shipyard
metadata: {name: checkout}
spec:
  stages:
    - name: dev
      sequences:
        - name: delivery
          tasks:
            - name: deploy
              type: deployment       # the task type workers subscribe to; defaults to the name
              properties: {deploymentstrategy: direct}
            - name: api-test
              type: test
              dependsOn: [deploy]
              retry: {maxAttempts: 3, initialInterval: 1s, backoffCoefficient: 2, maxInterval: 30s}
              timeouts: {scheduleToStart: 5m, startToClose: 10m, heartbeat: 30s}
            - name: ui-test
              type: test
              dependsOn: [deploy]
              requires: {labels: {browser: chromium}}
            - name: evaluation
              dependsOn: [api-test, ui-test]
    - name: production
      sequences:
        - name: delivery
          triggeredOn:
            - event: dev.delivery.finished
              selector: {match: {result: pass}}
          tasks:
            - name: approval
              properties: {pass: automatic, warning: manual}
            - name: deploy
              type: deployment
              dispatch: auction      # auction (default) | queue | fanout
"#;

const SOCKSHOP: &str = include_str!("../../tests/fixtures/keptn/shipyard-sockshop.yaml");
const REMEDIATION: &str = include_str!("../../tests/fixtures/keptn/remediation.yaml");
const SLI: &str = include_str!("../../tests/fixtures/keptn/sli-config-prometheus.yaml");
const SLO: &str = include_str!("../../tests/fixtures/keptn/slo-quality-gates.yaml");

/// The rendered diagnostics of `text`, or `ok`.
pub(super) fn problems(text: &str) -> String {
    match parse(text) {
        Ok(_) => "ok".into(),
        Err(all) => all.to_string(),
    }
}

#[test]
fn architecture_example_gets_capstan_defaults_and_edges() {
    let def = parse(ARCHITECTURE_EXAMPLE).expect("the ARCHITECTURE.md example parses");
    assert_eq!(def.flavor, Flavor::Capstan);
    assert_eq!(def.name, "checkout");
    let dev = def.sequence("dev", "delivery").expect("dev.delivery");
    let deps: Vec<(&str, &str, Vec<&str>)> = dev
        .tasks
        .iter()
        .map(|t| (t.name.as_str(), t.task_type.as_str(), t.depends_on.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        deps,
        [
            ("deploy", "deployment", vec![]),
            ("api-test", "test", vec!["deploy"]),
            ("ui-test", "test", vec!["deploy"]),
            ("evaluation", "evaluation", vec!["api-test", "ui-test"]),
        ]
    );
    let deploy = &dev.tasks[0];
    assert_eq!(deploy.properties["deploymentstrategy"], "direct");
    assert_eq!(deploy.retry, RetryPolicy::default());
    assert_eq!(deploy.timeouts, Timeouts::default());
    assert_eq!(deploy.dispatch, DispatchMode::Auction);
    assert_eq!(deploy.award, AwardPolicy::First);
    assert!(deploy.idempotent && !deploy.continue_on_failure);
    assert_eq!(deploy.triggered_after, None);

    let api = &dev.tasks[1];
    assert_eq!(
        api.retry,
        RetryPolicy {
            max_attempts: 3,
            initial_interval: 1_000,
            backoff_coefficient: 2.0,
            max_interval: 30_000,
            non_retryable: vec![]
        }
    );
    assert_eq!(
        api.timeouts,
        Timeouts {
            schedule_to_start: Some(300_000),
            start_to_close: Some(600_000),
            heartbeat: Some(30_000),
            bid_window: Timeouts::default().bid_window,
        }
    );
    assert_eq!(dev.tasks[2].requires.get("browser").map(String::as_str), Some("chromium"));

    let prod = def.sequence("production", "delivery").expect("production.delivery");
    assert_eq!(prod.tasks[1].depends_on, ["approval"], "a task without dependsOn follows the one before");
    assert_eq!(prod.triggered_on.len(), 1);
    let trigger = &prod.triggered_on[0];
    assert_eq!((trigger.stage.as_str(), trigger.sequence.as_str()), ("dev", "delivery"));
    assert_eq!(trigger.selector.conditions[0].any_of, [TaskResult::Pass]);
}

#[test]
fn sockshop_gets_keptn_semantics() {
    let def = parse(SOCKSHOP).expect("the sockshop fixture parses unchanged");
    assert_eq!(def.flavor, Flavor::Keptn { version: "spec.keptn.sh/0.2.0".into() });
    for stage in &def.stages {
        for sequence in &stage.sequences {
            for (at, task) in sequence.tasks.iter().enumerate() {
                let before: Vec<String> = sequence.tasks[..at].last().map(|t| t.name.clone()).into_iter().collect();
                assert_eq!(task.depends_on, before, "Keptn tasks form a chain");
                assert_eq!(task.task_type, task.name);
                assert_eq!(task.dispatch, DispatchMode::Fanout);
                assert_eq!(task.retry, RetryPolicy::keptn());
                assert_eq!(task.timeouts, Timeouts::keptn());
            }
        }
    }
    let remediation = def.sequence("production", "remediation").expect("remediation");
    assert_eq!(remediation.task("evaluation").and_then(|t| t.triggered_after), Some(600_000));
    assert_eq!(def.sequence("dev", "delivery").map(|s| s.tasks.len()), Some(4));
}

#[test]
fn other_keptn_files_are_named_not_shipyards() {
    expect![[r#"
        document: kind `Remediation` is not Shipyard; only Shipyard files define stages and sequences
        document: no `kind`: this looks like a Keptn SLO or SLI file (it has `spec_version`), not a Shipyard
        document: no `kind`: this looks like a Keptn SLO or SLI file (it has `spec_version`), not a Shipyard"#]]
    .assert_eq(&[REMEDIATION, SLI, SLO].map(problems).join("\n"));
    assert_eq!(file_kind(REMEDIATION).as_deref(), Some("Remediation"));
    assert_eq!(file_kind(SOCKSHOP).as_deref(), Some("Shipyard"));
}

#[test]
fn keptn_files_tolerate_unknown_keys_and_empty_sequences() {
    let text = r#"
apiVersion: spec.keptn.sh/0.2.3
kind: Shipyard
metadata: {name: x, labels: {team: a}}
spec:
  future: 1
  stages:
    - name: dev
      color: blue
      sequences:
        - name: delivery
          owner: me
          triggeredOn: []
          tasks:
            - {name: deployment, whatever: {deep: [1, 2]}}
        - name: empty
          tasks: []
"#;
    assert_eq!(problems(text), "ok");
}

#[test]
fn capstan_defaults_can_be_overridden_everywhere() {
    let def = parse(
        r#"
apiVersion: capstan.dev/v1
kind: Shipyard
spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks:
            - name: a
              dispatch: queue
              award: lowest-cost
              continueOnFailure: true
              idempotent: false
              triggeredAfter: 300ms
              retry: {nonRetryable: [bad-input]}
              timeouts: {bidWindow: 2s}
              requires: {labels: {tier: 1}}
            - {name: b, dependsOn: [], dispatch: fanout, award: earliest-finish}
            - {name: c}
            - {name: d, dispatch: queue, claim: false}
"#,
    )
    .expect("parses");
    let s = def.sequence("dev", "s").expect("dev.s");
    let (a, b, c) = (&s.tasks[0], &s.tasks[1], &s.tasks[2]);
    assert!(a.claim && b.claim && c.claim, "workers claim unless told otherwise");
    assert_eq!((s.tasks[3].dispatch, s.tasks[3].claim), (DispatchMode::Queue, false));
    assert_eq!((a.dispatch, a.award), (DispatchMode::Queue, AwardPolicy::LowestCost));
    assert!(a.continue_on_failure && !a.idempotent);
    assert_eq!(a.triggered_after, Some(300));
    assert_eq!(a.retry.non_retryable, ["bad-input"]);
    assert_eq!(a.retry.max_attempts, RetryPolicy::default().max_attempts);
    assert_eq!(a.timeouts.bid_window, 2_000);
    assert_eq!(a.timeouts.start_to_close, Timeouts::default().start_to_close);
    assert_eq!(a.requires.get("tier").map(String::as_str), Some("1"));
    assert!(b.depends_on.is_empty(), "`dependsOn: []` starts with the sequence");
    assert_eq!((b.dispatch, b.award), (DispatchMode::Fanout, AwardPolicy::EarliestFinish));
    assert_eq!(c.depends_on, ["b"]);
}

#[test]
fn keptn_files_honour_capstan_keys_on_keptn_defaults() {
    let def = parse(
        "apiVersion: spec.keptn.sh/0.2.0\nkind: Shipyard\nspec:\n  stages:\n    - name: dev\n      sequences:\n        - name: s\n          tasks:\n            - {name: a, dispatch: queue, retry: {initialInterval: 5s}}\n",
    )
    .expect("parses");
    let a = &def.stages[0].sequences[0].tasks[0];
    assert_eq!(a.dispatch, DispatchMode::Queue);
    assert_eq!(a.retry, RetryPolicy { initial_interval: 5_000, ..RetryPolicy::keptn() });
}

/// Small, targeted damage to a valid file: the kind of input `capstan validate` sees while
/// someone is editing.
fn mangled(base: &'static str) -> impl Strategy<Value = String> {
    let len = base.len();
    (0..=len, 0..=len, ".{0,8}").prop_map(move |(a, b, insert)| {
        let (from, to) = (a.min(b), a.max(b).min(a.min(b) + 40));
        let (from, to) = (floor_char(base, from), floor_char(base, to));
        format!("{}{}{}", &base[..from], insert, &base[to..])
    })
}

fn floor_char(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn parse_never_panics_on_yamlish_text(text in "[a-z:\\-\\[\\]{}, \n\"'.&*!|>#0-9]{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn parse_never_panics_on_mangled_sockshop(text in mangled(SOCKSHOP)) {
        let _ = parse(&text);
    }

    #[test]
    fn parse_never_panics_on_mangled_example(text in mangled(ARCHITECTURE_EXAMPLE)) {
        if let Ok(def) = parse(&text) {
            // Whatever parses must also summarise.
            let _ = def.summary();
        }
    }
}
