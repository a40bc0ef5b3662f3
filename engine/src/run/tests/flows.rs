//! Run-level behaviour: approvals, pause and resume, cancel, delays, failure paths, promotion,
//! task input, refused commands and the rendered history.

use expect_test::expect;

use super::*;

fn approval(pass: &str, warning: &str) -> Task {
    let mut t = task("approve", &["a"]);
    t.task_type = APPROVAL_TYPE.into();
    t.properties.insert("pass".into(), json!(pass));
    t.properties.insert("warning".into(), json!(warning));
    t
}

#[test]
fn approvals_follow_the_previous_result() {
    let cases = [
        ("automatic", "manual", TaskResult::Pass, TaskPhase::Ended(TaskStatus::Finished)),
        ("manual", "automatic", TaskResult::Pass, TaskPhase::AwaitingApproval),
        ("manual", "automatic", TaskResult::Warning, TaskPhase::Ended(TaskStatus::Finished)),
        ("automatic", "manual", TaskResult::Warning, TaskPhase::AwaitingApproval),
    ];
    for (pass, warning, before, phase) in cases {
        let mut a = task("a", &[]);
        a.continue_on_failure = true;
        let (mut run, _) = Run::start(single(vec![a, approval(pass, warning)]), json!({}));
        run.complete("a", 1, "w1", before);
        assert_eq!(run.phase("approve"), phase, "{pass}/{warning} after {before:?}");
        if phase != TaskPhase::AwaitingApproval {
            assert_eq!(run.state.task("approve").unwrap().result, Some(before));
        }
    }
    // After a failure the approval fails without asking anybody.
    let mut a = task("a", &[]);
    a.continue_on_failure = true;
    let (mut run, _) = Run::start(single(vec![a, approval("manual", "manual")]), json!({}));
    run.complete("a", 1, "w1", TaskResult::Fail);
    assert_eq!(run.state.task("approve").unwrap().result, Some(TaskResult::Fail));
    assert_eq!(run.state.result(), Some(TaskResult::Fail));
}

#[test]
fn manual_approval_is_decided_by_a_person_or_times_out() {
    let mut gate = approval("manual", "manual");
    gate.properties.insert("timeout".into(), json!("1h"));
    let def = single(vec![task("a", &[]), gate]);
    let (mut run, _) = Run::start(def.clone(), json!({}));
    let d = run.at(10).complete("a", 1, "w1", TaskResult::Pass);
    assert!(effects(&d).contains(&"set approval-timeout/approve @3600010".to_string()));
    let early = run.try_apply(Input::Approve { task: "a".into(), approved: true, by: "x".into() });
    assert_eq!(early, Err(Error::NotAwaitingApproval { task: "a".into() }));
    let d = run.apply(Input::Approve { task: "approve".into(), approved: false, by: "ann".into() });
    assert_eq!(effects(&d)[0], "unset approval-timeout/approve");
    assert_eq!(run.state.result(), Some(TaskResult::Fail));

    let (mut run, _) = Run::start(def, json!({}));
    run.complete("a", 1, "w1", TaskResult::Pass);
    run.apply(timer(TimerKind::ApprovalTimeout { task: "approve".into() }));
    assert_eq!(run.phase("approve"), TaskPhase::Ended(TaskStatus::TimedOut));
    assert_eq!(run.state.result(), Some(TaskResult::Fail));
}

#[test]
fn pause_holds_new_work_and_resume_releases_it() {
    let def = single(vec![task("a", &[]), task("b", &["a"]), task("c", &[])]);
    let (mut run, _) = Run::start(def, json!({}));
    run.apply(Input::Pause);
    assert!(run.state.is_paused());
    assert_eq!(run.apply(Input::Pause), Decision::default(), "pausing twice is a no-op");
    // Running attempts go on and their results are recorded.
    run.complete("a", 1, "w1", TaskResult::Pass);
    assert_eq!(run.phase("b"), TaskPhase::Pending);
    // A retry that comes due while paused waits.
    let t = run.award("c", 1, "w2");
    run.apply(failed("c", 1, "w2", t, "exit-code"));
    let retry = TimerKind::Retry { task: "c".into(), attempt: 1 };
    assert_eq!(run.apply(timer(retry.clone())), Decision::default());
    let d = run.at(5_000).apply(Input::Resume);
    assert_eq!(kinds(&d), ["run-resumed", "task-offered"]);
    assert!(effects(&d).iter().any(|e| e.starts_with("set retry/c/1 @")), "{:?}", effects(&d));
    run.apply(timer(retry));
    assert_eq!(run.phase("c"), TaskPhase::Offered);
    assert_eq!(run.state.task("c").unwrap().attempt, 2);
}

#[test]
fn cancel_ends_open_tasks_and_skips_the_rest() {
    let def = single(vec![task("a", &[]), task("b", &["a"]), task("c", &[])]);
    let (mut run, _) = Run::start(def, json!({}));
    let t = run.award("a", 1, "w1");
    let d = run.apply(Input::Cancel { reason: "operator".into() });
    let fx = effects(&d);
    assert!(fx.contains(&"cancel w1: operator".to_string()), "{fx:?}");
    assert!(!fx.iter().any(|e| e.starts_with("start-run")));
    assert_eq!(run.phase("a"), TaskPhase::Ended(TaskStatus::Cancelled));
    assert_eq!(run.phase("b"), TaskPhase::Ended(TaskStatus::Skipped));
    assert_eq!(run.phase("c"), TaskPhase::Ended(TaskStatus::Cancelled));
    assert_eq!((run.state.status(), run.state.result()), (Some(RunStatus::Cancelled), Some(TaskResult::Fail)));
    for command in [Input::Pause, Input::Resume, Input::Cancel { reason: "again".into() }] {
        assert_eq!(run.try_apply(command), Err(Error::RunOver));
    }
    let late = run.apply(finished("a", 1, "w1", t, TaskResult::Pass));
    assert!(late.events.is_empty());
}

#[test]
fn triggered_after_delays_the_first_offer() {
    let mut b = task("b", &[]);
    b.triggered_after = Some(30_000);
    let (mut run, start) = Run::start(single(vec![b]), json!({}));
    assert_eq!(kinds(&start), ["run-started", "task-delayed"]);
    assert_eq!(effects(&start), ["set delay/b @30000"]);
    let d = run.at(30_000).apply(timer(TimerKind::Delay { task: "b".into() }));
    assert_eq!(kinds(&d), ["task-offered"]);
}

#[test]
fn continue_on_failure_lets_the_run_go_on_without_failing_it() {
    let mut a = task("a", &[]);
    a.continue_on_failure = true;
    let def = single(vec![a, task("b", &["a"])]);
    let (mut run, _) = Run::start(def, json!({}));
    run.complete("a", 1, "w1", TaskResult::Fail);
    assert_eq!(run.phase("b"), TaskPhase::Offered);
    run.complete("b", 1, "w1", TaskResult::Warning);
    assert_eq!(run.state.result(), Some(TaskResult::Warning));
}

#[test]
fn a_failure_waits_for_running_branches_then_skips_the_rest() {
    let def = single(vec![task("a", &[]), task("b", &[]), task("c", &["a", "b"])]);
    let (mut run, _) = Run::start(def, json!({}));
    let tb = run.award("b", 1, "w2");
    run.complete("a", 1, "w1", TaskResult::Fail);
    assert!(!run.state.is_over(), "b still runs");
    run.apply(finished("b", 1, "w2", tb, TaskResult::Pass));
    assert_eq!(run.phase("c"), TaskPhase::Ended(TaskStatus::Skipped));
    assert_eq!(run.state.result(), Some(TaskResult::Fail));
}

fn two_stages() -> Arc<Definition> {
    let on = |result: Option<TaskResult>, task: Option<&str>| {
        let mut selector = crate::definition::model::Selector::default();
        if let Some(r) = result {
            let subject = match task {
                Some(t) => crate::definition::model::ConditionSubject::Task(t.into()),
                None => crate::definition::model::ConditionSubject::Run,
            };
            selector.conditions.push(crate::definition::model::Condition { subject, any_of: vec![r] });
        }
        Trigger { stage: "dev".into(), sequence: "delivery".into(), selector }
    };
    definition(vec![
        ("dev", vec![sequence("delivery", vec![], vec![task("deploy", &[]), task("test", &["deploy"])])]),
        (
            "prod",
            vec![
                sequence("delivery", vec![on(None, None)], vec![task("deploy", &[])]),
                sequence("rollback", vec![on(Some(TaskResult::Fail), Some("test"))], vec![task("undo", &[])]),
            ],
        ),
    ])
}

#[test]
fn finishing_promotes_to_the_selected_sequences_with_carried_data() {
    let (mut run, _) = Run::start(two_stages(), json!({"image": "v1", "tag": "old"}));
    let t = run.award("deploy", 1, "w1");
    let out = json!({"tag": "new", "url": "http://dev"});
    run.apply(finished_with("deploy", 1, "w1", t, TaskResult::Pass, out, None));
    let d = run.complete("test", 1, "w1", TaskResult::Warning);
    assert_eq!(effects(&d)[effects(&d).len() - 2..], ["start-run prod.delivery", "notify warning"]);
    let data = d.effects.iter().find_map(|e| match e {
        Effect::StartRun { data, triggered_by, context_id, .. } => {
            Some((data.clone(), triggered_by.clone(), context_id.clone()))
        }
        _ => None,
    });
    assert_eq!(data, Some((json!({"image": "v1", "tag": "new", "url": "http://dev"}), "r1".into(), "c1".into())));

    let (mut run, _) = Run::start(two_stages(), json!({}));
    run.complete("deploy", 1, "w1", TaskResult::Pass);
    let d = run.complete("test", 1, "w1", TaskResult::Fail);
    assert_eq!(effects(&d)[effects(&d).len() - 2..], ["start-run prod.rollback", "notify fail"]);
    let next = d.events.iter().find_map(|e| match e {
        Event::RunFinished { next, .. } => Some(next.clone()),
        _ => None,
    });
    assert_eq!(next, Some(vec![NextSequence { stage: "prod".into(), sequence: "rollback".into() }]));
}

#[test]
fn task_input_merges_trigger_data_dependency_outputs_and_properties() {
    let mut c = task("c", &["b"]);
    c.properties.insert("strategy".into(), json!("blue-green"));
    c.properties.insert("x".into(), json!("prop"));
    let def = single(vec![task("a", &[]), task("b", &["a"]), c]);
    let (mut run, _) = Run::start(def, json!({"x": "trigger", "keep": 1, "stage": "given"}));
    let t = run.award("a", 1, "w");
    run.apply(finished_with("a", 1, "w", t, TaskResult::Pass, json!({"x": "a", "fromA": true}), None));
    let t = run.award("b", 1, "w");
    let d = run.apply(finished_with("b", 1, "w", t, TaskResult::Pass, json!({"fromB": 2}), None));
    let input = d.effects.iter().find_map(|e| match e {
        Effect::Offer(o) => Some(o.input.clone()),
        _ => None,
    });
    // The run's project and stage are set (no service here), over what the data says.
    let expected = json!({
        "x": "prop", "keep": 1, "fromA": true, "fromB": 2, "strategy": "blue-green", "project": "p", "stage": "dev"
    });
    assert_eq!(input, Some(expected.clone()));
    let award = run.apply(bid("c", 1, worker("w", &[]), 0.0, 0, 0));
    assert!(matches!(&award.effects[0], Effect::Send { message: WorkerMessage::Award(a), .. } if a.input == expected));
}

#[test]
fn inputs_that_do_not_apply_are_errors() {
    let mut run = Run::new(two_stages());
    assert_eq!(run.try_apply(Input::Pause), Err(Error::NotStarted));
    assert_eq!(run.try_apply(claim("deploy", 1, "w")), Err(Error::NotStarted));
    let unknown = Input::Start { meta: meta("dev", "nope"), data: json!({}) };
    assert!(matches!(run.try_apply(unknown), Err(Error::UnknownSequence { .. })));
    run.apply(Input::Start { meta: meta("dev", "delivery"), data: json!({}) });
    let again = Input::Start { meta: meta("dev", "delivery"), data: json!({}) };
    assert_eq!(run.try_apply(again), Err(Error::AlreadyStarted("r1".into())));
    assert_eq!(run.try_apply(claim("ghost", 1, "w")), Err(Error::UnknownTask("ghost".into())));
    let approve = Input::Approve { task: "ghost".into(), approved: true, by: "x".into() };
    assert_eq!(run.try_apply(approve), Err(Error::UnknownTask("ghost".into())));
    assert_eq!(run.state.version(), 2, "errors record nothing");
}

#[test]
fn history_renders_one_line_per_event() {
    let def = single(vec![task("a", &[]), task("b", &["a"])]);
    let (mut run, _) = Run::start(def, json!({}));
    let t = run.at(5).award("a", 1, "w1");
    run.at(6).apply(failed("a", 1, "w1", t, "exit-code"));
    run.at(600).apply(timer(TimerKind::Retry { task: "a".into(), attempt: 1 }));
    run.at(700).complete("a", 2, "w2", TaskResult::Pass);
    run.apply(Input::Pause);
    run.apply(finished("a", 1, "w1", t, TaskResult::Pass));
    run.apply(Input::Cancel { reason: "done".into() });
    expect![[r#"
        1 @0 run-started r1 dev.delivery
        2 @0 task-offered a#1 offer=1
        3 @5 task-awarded a#1 worker=w1 token=1
        4 @6 attempt-ended a#1 worker=w1 fail error=exit-code retry-at=506
        5 @600 task-offered a#2 offer=1
        6 @700 task-awarded a#2 worker=w2 token=2
        7 @700 task-started a#2 worker=w2 token=2
        8 @700 attempt-ended a#2 worker=w2 pass
        9 @700 task-ended a finished pass
        10 @700 task-offered b#1 offer=1
        11 @700 run-paused
        12 @700 input-rejected finished task=a worker=w1: the attempt is no longer open
        13 @700 task-ended b cancelled fail
        14 @700 run-finished cancelled fail
    "#]]
    .assert_eq(&run.history());
    let views: Vec<_> = run.state.tasks().map(|t| (t.name, t.status, t.attempt, t.worker)).collect();
    assert_eq!(views[0], ("a".into(), TaskPhase::Ended(TaskStatus::Finished), 2, Some("w2".into())));
}

#[test]
fn a_run_with_a_service_waits_in_its_lane_until_admitted() {
    let def = single(vec![task("a", &[]), task("b", &["a"])]);
    let mut run = Run::new(def.clone());
    let mut m = meta("dev", "delivery");
    m.service = Some("cart".into());
    let d = run.apply(Input::Start { meta: m.clone(), data: json!({}) });
    assert!(effects(&d).is_empty(), "a queued run offers nothing: {:?}", effects(&d));
    assert!(run.state.is_queued());
    assert_eq!(run.try_apply(Input::Pause), Err(Error::Queued));
    assert_eq!(run.try_apply(Input::Resume), Err(Error::Queued));
    // Workers' messages for a queued run's tasks are refused, not applied.
    run.apply(bid("a", 1, worker("w1", &[]), 1.0, 10, 1));
    assert_eq!(run.phase("a"), TaskPhase::Pending);

    let d = run.at(5).apply(Input::Admit);
    assert!(!run.state.is_queued());
    assert_eq!(effects(&d)[0], "offer a#1 Auction");
    // Admitting again (a repeated admission after a crash) changes nothing.
    assert!(run.apply(Input::Admit).events.is_empty());
    run.complete("a", 1, "w1", TaskResult::Pass);
    run.complete("b", 1, "w1", TaskResult::Pass);
    assert_eq!(run.state.result(), Some(TaskResult::Pass));
    assert_eq!(run.try_apply(Input::Admit), Err(Error::RunOver));

    // A queued run can be cancelled: every task is skipped, nothing was ever offered.
    let mut run = Run::new(def);
    run.apply(Input::Start { meta: m, data: json!({}) });
    let d = run.apply(Input::Cancel { reason: "superseded".into() });
    assert_eq!(effects(&d), vec!["notify fail".to_string()]);
    assert_eq!(run.state.status(), Some(RunStatus::Cancelled));
    expect![[r#"
        1 @0 run-started r1 dev.delivery
        2 @0 run-queued
        3 @0 task-ended a skipped
        4 @0 task-ended b skipped
        5 @0 run-finished cancelled fail
    "#]]
    .assert_eq(&run.history());
}

const RUNBOOK: &str = r#"
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: shop}
spec:
  stages:
    - name: dev
      sequences:
        - name: delivery
          runbook:
            evaluateAfter: 1m
            escalation: {type: webhook, properties: {url: "https://pager.example/hook"}}
            remediations:
              - problemType: Response time degradation
                actionsOnOpen:
                  - {action: scaling, name: scale up, value: 1}
                  - {action: toggle-feature, name: promotion off, value: {EnablePromotion: "off"}}
              - problemType: default
                actionsOnOpen: []
"#;

fn problem(title: &str) -> Value {
    json!({"problem": {"problemTitle": title, "rootCause": "cpu"}})
}

/// Walks one action of a runbook run: the action, the wait, the measurement, the gate.
fn remediate_once(run: &mut Run, n: u32, gate: TaskResult) {
    run.complete(&format!("action-{n}"), 1, "w1", TaskResult::Pass);
    let sli = format!("get-sli-{n}");
    assert_eq!(run.phase(&sli), TaskPhase::Delayed, "the measurement waits evaluateAfter");
    run.apply(timer(TimerKind::Delay { task: sli.clone() }));
    run.complete(&sli, 1, "w1", TaskResult::Pass);
    run.complete(&format!("evaluation-{n}"), 1, "w1", gate);
}

#[test]
fn a_runbook_tries_actions_until_a_gate_passes() {
    let def = Arc::new(crate::definition::parse(RUNBOOK).expect("valid runbook"));
    let (mut run, d) = Run::start(def.clone(), problem("Response time degradation"));
    let names: Vec<String> = run.state.tasks().map(|t| format!("{}:{}", t.name, t.task_type)).collect();
    assert_eq!(
        names,
        [
            "action-1:scaling",
            "get-sli-1:get-sli",
            "evaluation-1:evaluation",
            "action-2:toggle-feature",
            "get-sli-2:get-sli",
            "evaluation-2:evaluation",
            "escalation:webhook"
        ]
    );
    let Effect::Offer(offer) = &d.effects[0] else { panic!("first effect offers action-1: {:?}", effects(&d)) };
    assert_eq!(offer.input["action"]["value"], json!(1));
    assert_eq!(offer.input["problem"]["problemTitle"], "Response time degradation");
    assert_eq!(offer.input["remediation"], json!({"attempt": 1, "of": 2}));

    // Action 1 does not help; action 2 does: the run is resolved, the escalation skipped.
    remediate_once(&mut run, 1, TaskResult::Fail);
    assert_eq!(run.phase("action-2"), TaskPhase::Offered);
    remediate_once(&mut run, 2, TaskResult::Pass);
    assert_eq!(run.state.result(), Some(TaskResult::Pass));
    assert_eq!(run.phase("escalation"), TaskPhase::Ended(TaskStatus::Skipped));

    // Nothing helps: the escalation runs and the run ends unresolved even though it passed.
    let (mut run, _) = Run::start(def.clone(), problem("Response time degradation"));
    remediate_once(&mut run, 1, TaskResult::Fail);
    remediate_once(&mut run, 2, TaskResult::Fail);
    assert_eq!(run.phase("escalation"), TaskPhase::Offered);
    run.complete("escalation", 1, "w1", TaskResult::Pass);
    assert_eq!(run.state.result(), Some(TaskResult::Fail));

    // An action that fails is judged by the gate after it; a gate that warns also resolves.
    let (mut run, _) = Run::start(def.clone(), problem("Response time degradation"));
    run.complete("action-1", 1, "w1", TaskResult::Fail);
    run.apply(timer(TimerKind::Delay { task: "get-sli-1".into() }));
    run.complete("get-sli-1", 1, "w1", TaskResult::Pass);
    run.complete("evaluation-1", 1, "w1", TaskResult::Warning);
    assert_eq!(run.state.result(), Some(TaskResult::Warning));

    // A problem with no actions goes straight to the escalation.
    let (run, _) = Run::start(def, problem("Disk full"));
    let names: Vec<String> = run.state.tasks().map(|t| t.name).collect();
    assert_eq!(names, ["escalation"]);
    assert_eq!(run.phase("escalation"), TaskPhase::Offered);
}

#[test]
fn a_runbook_is_checked_when_the_definition_is_read() {
    let both = RUNBOOK.replace("          runbook:", "          tasks: [{name: a}]\n          runbook:");
    let err = crate::definition::parse(&both).expect_err("tasks and runbook").to_string();
    assert!(err.contains("either `tasks` or a `runbook`"), "{err}");
    let empty_action = RUNBOOK.replace("action: scaling,", "action: '',");
    let err = crate::definition::parse(&empty_action).expect_err("empty action").to_string();
    assert!(err.contains("runbook.remediations[0].actionsOnOpen[0].action: must not be empty"), "{err}");
    let typo = RUNBOOK.replace("evaluateAfter: 1m", "evaluateAfter: soon");
    let err = crate::definition::parse(&typo).expect_err("bad duration").to_string();
    assert!(err.contains("runbook.evaluateAfter"), "{err}");
    let named = RUNBOOK.replace("{type: webhook,", "{name: page, type: webhook,");
    let err = crate::definition::parse(&named).expect_err("named escalation").to_string();
    assert!(err.contains("takes no `name`"), "{err}");
}

#[test]
fn the_size_estimate_grows_with_what_the_run_holds() {
    let def = single(vec![task("a", &[]), task("b", &["a"])]);
    let empty = RunState::new(def.clone()).approx_bytes();
    let (small, _) = Run::start(def.clone(), json!({"image": "shop:1"}));
    let small_bytes = small.state.approx_bytes();
    assert!(small_bytes > empty + 2 * size_of::<state::TaskState>(), "{small_bytes} vs empty {empty}");

    // A megabyte of trigger data is charged as a megabyte, not as one entry.
    let big = "x".repeat(1 << 20);
    let (mut run, _) = Run::start(def, json!({"image": "shop:1", "blob": [big.clone(), {"nested": big}]}));
    let before = run.state.approx_bytes();
    assert!(before >= small_bytes + (2 << 20), "{before} vs {small_bytes}");

    // Holders, and then the outputs tasks report, are charged as they arrive.
    let token = run.award("a", 1, "w-with-a-long-worker-id");
    let awarded = run.state.approx_bytes();
    assert!(awarded > before, "{awarded} vs {before}");
    run.apply(started("a", 1, "w-with-a-long-worker-id", token));
    let output = json!({"report": "y".repeat(10_000)});
    run.apply(finished_with("a", 1, "w-with-a-long-worker-id", token, TaskResult::Pass, output, None));
    assert!(run.state.approx_bytes() >= awarded + 10_000, "{} vs {awarded}", run.state.approx_bytes());
}

#[test]
fn a_task_input_layers_data_outputs_in_order_properties_and_the_runs_names() {
    let mut c = task("c", &["a", "b"]);
    c.properties.insert("prop".into(), json!("from c"));
    c.properties.insert("stage".into(), json!("a property cannot rename the stage"));
    let def = single(vec![task("a", &[]), task("b", &["a"]), c]);
    let data = json!({ "only_data": 1, "shared": "data", "prop": "data", "project": "not the run's" });
    let (mut run, _) = Run::start(def, data);
    for (name, token, output) in [
        ("a", 1, json!({ "shared": "a", "from_a": true, "over_b": "a" })),
        ("b", 2, json!({ "shared": "b", "over_b": "b", "prop": "b" })),
    ] {
        run.apply(bid(name, 1, worker("w", &[]), 1.0, 1, 1));
        run.apply(started(name, 1, "w", token));
        run.apply(finished_with(name, 1, "w", token, TaskResult::Pass, output, None));
    }
    let d = run.apply(bid("c", 1, worker("w", &[]), 1.0, 1, 1));
    let award = d
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Send { message: WorkerMessage::Award(a), .. } => Some(a),
            _ => None,
        })
        .expect("c is awarded");
    assert_eq!(
        award.input,
        json!({
            "only_data": 1,
            "shared": "b",
            "from_a": true,
            "over_b": "b",
            "prop": "from c",
            "project": "p",
            "stage": "dev",
        })
    );
}
