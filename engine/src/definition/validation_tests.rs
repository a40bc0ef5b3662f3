//! One test per validation rule: each renders the diagnostics of a small broken file and compares
//! them with a snapshot, so a rule that stops firing (or starts firing elsewhere) is caught.

use expect_test::{Expect, expect};

use super::tests::problems;

/// Checks a Capstan file made of the given `spec:` body.
fn check(spec: &str, expected: Expect) {
    expected.assert_eq(&problems(&format!("apiVersion: capstan.dev/v1\nkind: Shipyard\n{spec}")));
}

/// Checks a Keptn file made of the given `spec:` body.
fn check_keptn(spec: &str, expected: Expect) {
    expected.assert_eq(&problems(&format!("apiVersion: spec.keptn.sh/0.2.0\nkind: Shipyard\n{spec}")));
}

#[test]
fn yaml_syntax_error_has_line_and_column() {
    check(
        "spec:\n  stages: [\n    - name: dev\n",
        expect!["line 5, column 5: did not find expected node content, while parsing a flow node"],
    );
}

#[test]
fn yaml_type_error_has_line_and_column() {
    check(
        "spec:\n  stages:\n    - name: dev\n      sequences:\n        - name: s\n          tasks:\n            - name: a\n              retry: {maxAttempts: three}\n",
        expect![[
            r#"line 10, column 36: spec.stages[0].sequences[0].tasks[0].retry.maxAttempts: invalid type: string "three", expected u32"#
        ]],
    );
}

#[test]
fn missing_spec_and_empty_stage_list() {
    check("metadata: {name: x}\n", expect!["line 1, column 1: missing field `spec`"]);
    check("spec: {}\n", expect!["document: `spec.stages` is empty; a definition needs at least one stage"]);
    check("spec: {stages: []}\n", expect!["document: `spec.stages` is empty; a definition needs at least one stage"]);
}

#[test]
fn unknown_api_version_or_kind_through_parse() {
    expect![
        "document: apiVersion `capstan.dev/v2` is not supported; expected `capstan.dev/v1` or `spec.keptn.sh/0.2.x`"
    ]
    .assert_eq(&problems("apiVersion: capstan.dev/v2\nkind: Shipyard\nspec: {}\n"));
    expect!["document: kind `Runbook` is not Shipyard; only Shipyard files define stages and sequences"]
        .assert_eq(&problems("apiVersion: capstan.dev/v1\nkind: Runbook\nspec: {}\n"));
}

#[test]
fn duplicate_stage_sequence_and_task_names() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks: [{name: a}, {name: b}, {name: a}]
        - name: s
          tasks: [{name: a}]
    - name: dev
"#,
        expect![[r#"
            stage "dev" / sequence "s" / task "a": duplicate task name in this sequence
            stage "dev" / sequence "s": duplicate sequence name in this stage
            stage "dev": duplicate stage name"#]],
    );
}

#[test]
fn bad_names() {
    check(
        r#"spec:
  stages:
    - name: eu.prod
      sequences:
        - name: ""
          tasks: [{name: ""}]
    - name: ""
"#,
        expect![[r#"
            stage "eu.prod": a stage name must not contain `.`
            stage "eu.prod" / sequence "": a sequence needs a name
            stage "eu.prod" / sequence "" / task "": a task needs a name
            stage "": a stage needs a name"#]],
    );
}

#[test]
fn empty_sequence_in_capstan_file() {
    check(
        "spec:\n  stages:\n    - name: dev\n      sequences:\n        - name: s\n",
        expect![[r#"stage "dev" / sequence "s": the sequence has no tasks"#]],
    );
}

#[test]
fn unknown_dependency_is_named() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks:
            - {name: a}
            - {name: b, dependsOn: [a, deploy, tset]}
"#,
        expect![[r#"
            stage "dev" / sequence "s" / task "b": depends on unknown task `deploy`
            stage "dev" / sequence "s" / task "b": depends on unknown task `tset`"#]],
    );
}

#[test]
fn each_cycle_is_reported_once_with_every_task_on_it() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks:
            - {name: start, dependsOn: []}
            - {name: a, dependsOn: [start, c]}
            - {name: b, dependsOn: [a]}
            - {name: c, dependsOn: [b]}
            - {name: self, dependsOn: [self]}
            - {name: x, dependsOn: [y]}
            - {name: y, dependsOn: [x]}
            - {name: end, dependsOn: [c, y]}
"#,
        expect![[r#"
            stage "dev" / sequence "s": tasks `a`, `b`, `c` depend on each other in a cycle
            stage "dev" / sequence "s": task `self` depends on itself
            stage "dev" / sequence "s": tasks `x`, `y` depend on each other in a cycle"#]],
    );
}

#[test]
fn triggers_naming_unknown_stages_or_sequences_or_malformed() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks: [{name: a}]
    - name: prod
      sequences:
        - name: s
          triggeredOn:
            - event: qa.s.finished
            - event: dev.delivery.finished
            - event: dev.s.started
            - event: dev.finished
          tasks: [{name: a}]
"#,
        expect![[r#"
            stage "prod" / sequence "s": triggeredOn event `dev.s.started` is not `<stage>.<sequence>.finished`
            stage "prod" / sequence "s": triggeredOn event `dev.finished` is not `<stage>.<sequence>.finished`
            stage "prod" / sequence "s": triggeredOn event `qa.s.finished` names unknown stage `qa`
            stage "prod" / sequence "s": triggeredOn event `dev.delivery.finished` names unknown sequence `delivery` of stage `dev`"#]],
    );
}

#[test]
fn malformed_selectors() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks: [{name: a}]
        - name: t
          triggeredOn:
            - {event: dev.s.finished, selector: pass}
            - {event: dev.s.finished, selector: {match: {result: pass}, when: always}}
            - {event: dev.s.finished, selector: {match: [result]}}
            - {event: dev.s.finished, selector: {match: {result: great}}}
            - {event: dev.s.finished, selector: {match: {status: pass}}}
            - {event: dev.s.finished, selector: {match: {result: []}}}
            - {event: dev.s.finished, selector: {match: {result: [pass, {x: 1}]}}}
          tasks: [{name: a}]
"#,
        expect![[r#"
            stage "dev" / sequence "t": selector of `dev.s.finished`: must be a mapping like `{match: {result: pass}}`
            stage "dev" / sequence "t": selector of `dev.s.finished`: unknown key `when` (only `match` is allowed)
            stage "dev" / sequence "t": selector of `dev.s.finished`: `match` must be a mapping like `{result: pass}`
            stage "dev" / sequence "t": selector of `dev.s.finished`: `result`: `great` is not one of pass, warning, fail, failed
            stage "dev" / sequence "t": selector of `dev.s.finished`: `status` is neither `result` nor `<task>.result`
            stage "dev" / sequence "t": selector of `dev.s.finished`: `result` lists no result, so it can never match
            stage "dev" / sequence "t": selector of `dev.s.finished`: `result`: a list or mapping is not one of pass, warning, fail, failed"#]],
    );
}

#[test]
fn selector_naming_unknown_task_of_source_sequence() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks: [{name: test}]
        - name: t
          triggeredOn:
            - {event: dev.s.finished, selector: {match: {evaluation.result: fail, test.result: [fail, failed]}}}
          tasks: [{name: a}]
"#,
        expect![[
            r#"stage "dev" / sequence "t": selector of `dev.s.finished` names `evaluation.result`, but `dev.s` has no task `evaluation`"#
        ]],
    );
}

#[test]
fn bad_durations_are_reported_at_their_task() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks:
            - name: a
              triggeredAfter: 10
              retry: {initialInterval: 1x, maxInterval: [1s]}
              timeouts: {scheduleToStart: soon, startToClose: 10m, heartbeat: "", bidWindow: 5 s}
"#,
        expect![[r#"
            stage "dev" / sequence "s" / task "a": `retry.initialInterval`: `1x`: unknown unit `x` (ms, s, m, h)
            stage "dev" / sequence "s" / task "a": `retry.maxInterval`: expected a duration like 300ms, 10s, 5m, 1h
            stage "dev" / sequence "s" / task "a": `timeouts.scheduleToStart`: `soon` is not a duration (expected e.g. 300ms, 10s, 5m, 1h)
            stage "dev" / sequence "s" / task "a": `timeouts.heartbeat`: empty duration
            stage "dev" / sequence "s" / task "a": `timeouts.bidWindow`: `5 s`: missing unit (ms, s, m, h)
            stage "dev" / sequence "s" / task "a": `triggeredAfter`: `10`: missing unit (ms, s, m, h)"#]],
    );
}

#[test]
fn retry_and_timeout_values_out_of_range() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks:
            - name: a
              retry: {maxAttempts: 0, backoffCoefficient: 0.5, initialInterval: 1m, maxInterval: 10s}
              timeouts: {heartbeat: 0s}
            - name: b
              retry: {backoffCoefficient: .nan}
"#,
        expect![[r#"
            stage "dev" / sequence "s" / task "a": `retry.maxAttempts` must be at least 1 (1 means no retry)
            stage "dev" / sequence "s" / task "a": `retry.backoffCoefficient` must be at least 1, not 0.5
            stage "dev" / sequence "s" / task "a": `retry.initialInterval` (60000ms) is longer than `retry.maxInterval` (10000ms)
            stage "dev" / sequence "s" / task "a": `timeouts.heartbeat` must be longer than 0
            stage "dev" / sequence "s" / task "b": `retry.backoffCoefficient` must be at least 1, not NaN"#]],
    );
}

#[test]
fn unknown_fields_in_capstan_files() {
    check(
        r#"spec:
  stage: []
  stages:
    - name: dev
      sequence: []
      sequences:
        - name: s
          triggerOn: []
          tasks:
            - name: a
              dependOn: [x]
              retry: {attempts: 2}
              timeouts: {total: 1h}
              requires: {label: {a: b}}
"#,
        expect![[r#"
            document: unknown field `stage` in spec
            stage "dev": unknown field `sequence` in stage
            stage "dev" / sequence "s": unknown field `triggerOn` in sequence
            stage "dev" / sequence "s" / task "a": unknown field `dependOn` in task
            stage "dev" / sequence "s" / task "a": unknown field `attempts` in retry
            stage "dev" / sequence "s" / task "a": unknown field `total` in timeouts
            stage "dev" / sequence "s" / task "a": unknown field `label` in requires"#]],
    );
}

#[test]
fn bad_dispatch_award_properties_and_labels() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks:
            - name: a
              dispatch: broadcast
              award: cheapest
              properties: [x]
              requires: {labels: {zone: [a, b]}}
            - {name: b, dispatch: [queue]}
"#,
        expect![[r#"
            stage "dev" / sequence "s" / task "a": `properties` must be a mapping
            stage "dev" / sequence "s" / task "a": label `zone` must be a string
            stage "dev" / sequence "s" / task "a": `dispatch`: `broadcast` is not one of auction, queue, fanout
            stage "dev" / sequence "s" / task "a": `award`: `cheapest` is not one of first, lowest-cost, earliest-finish
            stage "dev" / sequence "s" / task "b": `dispatch`: a list or mapping is not one of auction, queue, fanout"#]],
    );
}

#[test]
fn claim_free_offers_need_a_queue_and_an_idempotent_task() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          tasks:
            - {name: a, claim: false}
            - {name: b, dispatch: queue, claim: false, idempotent: false}
            - {name: c, dispatch: queue, claim: false}
"#,
        expect![[r#"
            stage "dev" / sequence "s" / task "a": `claim: false` needs `dispatch: queue`: auction and fanout workers must bid or claim
            stage "dev" / sequence "s" / task "b": `claim: false` cannot go with `idempotent: false`: an offer delivered twice may start twice"#]],
    );
}

#[test]
fn depends_on_in_keptn_file() {
    check_keptn(
        "spec:\n  stages:\n    - name: dev\n      sequences:\n        - name: s\n          tasks: [{name: a}, {name: b, dependsOn: []}]\n",
        expect![[
            r#"stage "dev" / sequence "s" / task "b": `dependsOn` needs `apiVersion: capstan.dev/v1`; Keptn sequences are chains"#
        ]],
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    check(
        r#"spec:
  stages:
    - name: dev
      sequences:
        - name: s
          triggeredOn: [{event: nowhere.s.finished}]
          tasks:
            - {name: a, dependsOn: [b]}
            - {name: b, dependsOn: [a], triggeredAfter: later}
            - {name: c, dependsOn: [z], retry: {maxAttempts: 0}}
        - name: empty
    - name: dev
"#,
        expect![[r#"
            stage "dev" / sequence "s" / task "b": `triggeredAfter`: `later` is not a duration (expected e.g. 300ms, 10s, 5m, 1h)
            stage "dev" / sequence "s" / task "c": `retry.maxAttempts` must be at least 1 (1 means no retry)
            stage "dev" / sequence "s" / task "c": depends on unknown task `z`
            stage "dev" / sequence "s": tasks `a`, `b` depend on each other in a cycle
            stage "dev" / sequence "s": triggeredOn event `nowhere.s.finished` names unknown stage `nowhere`
            stage "dev" / sequence "empty": the sequence has no tasks
            stage "dev": duplicate stage name"#]],
    );
}

#[test]
fn several_documents_or_deep_nesting_are_diagnostics_not_crashes() {
    expect!["document: deserializing from YAML containing more than one document is not supported"]
        .assert_eq(&problems("apiVersion: capstan.dev/v1\n---\nkind: Shipyard\n"));
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    expect!["line 1, column 129: recursion limit exceeded"].assert_eq(&problems(&deep));
}
