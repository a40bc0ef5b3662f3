//! Walks every row of the transition table in `machine.rs`: a setup reaches the row's state, the
//! input is applied, and the task's next state and the recorded event kinds are checked.

use super::*;

struct Row {
    row: &'static str,
    def: fn() -> Arc<Definition>,
    setup: fn(&mut Run),
    input: fn(&Run) -> Input,
    task: &'static str,
    phase: TaskPhase,
    events: &'static [&'static str],
}

fn one() -> Arc<Definition> {
    single(vec![task("a", &[])])
}

fn one_with(f: fn(&mut Task)) -> Arc<Definition> {
    let mut t = task("a", &[]);
    f(&mut t);
    single(vec![t])
}

fn chain_with(f: fn(&mut Task)) -> Arc<Definition> {
    let mut b = task("b", &["a"]);
    f(&mut b);
    single(vec![task("a", &[]), b])
}

fn nothing(_: &mut Run) {}

fn awarded(run: &mut Run) {
    run.award("a", 1, "w1");
}

fn running(run: &mut Run) {
    let token = run.award("a", 1, "w1");
    run.apply(started("a", 1, "w1", token));
}

fn token(run: &Run) -> u64 {
    run.state.last_token
}

fn finish_a(run: &Run) -> Input {
    finished("a", 1, "w1", token(run), TaskResult::Pass)
}

const ATTEMPT_END: &[&str] = &["attempt-ended", "task-ended", "run-finished"];

fn rows() -> Vec<Row> {
    use TaskPhase::*;
    vec![
        Row {
            row: "pending | dependencies ended | offered",
            def: || chain_with(|_| {}),
            setup: running,
            input: finish_a,
            task: "b",
            phase: Offered,
            events: &["attempt-ended", "task-ended", "task-offered"],
        },
        Row {
            row: "pending | dependencies ended, triggeredAfter | delayed",
            def: || chain_with(|b| b.triggered_after = Some(5_000)),
            setup: running,
            input: finish_a,
            task: "b",
            phase: Delayed,
            events: &["attempt-ended", "task-ended", "task-delayed"],
        },
        Row {
            row: "pending | dependencies ended, approval automatic | ended(finished)",
            def: || chain_with(|b| b.task_type = APPROVAL_TYPE.into()),
            setup: running,
            input: finish_a,
            task: "b",
            phase: Ended(TaskStatus::Finished),
            events: &["attempt-ended", "task-ended", "task-ended", "run-finished"],
        },
        Row {
            row: "pending | dependencies ended, approval manual | awaiting-approval",
            def: || chain_with(manual_approval),
            setup: running,
            input: finish_a,
            task: "b",
            phase: AwaitingApproval,
            events: &["attempt-ended", "task-ended", "approval-requested"],
        },
        Row {
            row: "pending / delayed | run failed, nothing in flight | ended(skipped)",
            def: || chain_with(|_| {}),
            setup: running,
            input: |run| finished("a", 1, "w1", token(run), TaskResult::Fail),
            task: "b",
            phase: Ended(TaskStatus::Skipped),
            events: &["attempt-ended", "task-ended", "task-ended", "run-finished"],
        },
        Row {
            row: "delayed | timer Delay | offered",
            def: || one_with(|a| a.triggered_after = Some(1_000)),
            setup: nothing,
            input: |_| timer(TimerKind::Delay { task: "a".into() }),
            task: "a",
            phase: Offered,
            events: &["task-offered"],
        },
        Row {
            row: "offered | Bid, policy first | awarded",
            def: one,
            setup: nothing,
            input: |_| bid("a", 1, worker("w1", &[]), 1.0, 1, 1),
            task: "a",
            phase: Awarded,
            events: &["task-awarded"],
        },
        Row {
            row: "offered | Bid, policy lowest-cost | offered",
            def: || one_with(|a| a.award = AwardPolicy::LowestCost),
            setup: nothing,
            input: |_| bid("a", 1, worker("w1", &[]), 1.0, 1, 1),
            task: "a",
            phase: Offered,
            events: &["bid-recorded"],
        },
        Row {
            row: "offered | Bid, policy lowest-cost / earliest-finish, labels met, bid window over | awarded",
            def: || one_with(|a| a.award = AwardPolicy::LowestCost),
            setup: |run| {
                run.random = 0;
                run.at(250).apply(timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 1 }));
                run.at(300);
            },
            input: |_| bid("a", 1, worker("w1", &[]), 1.0, 1, 1),
            task: "a",
            phase: Awarded,
            events: &["bid-recorded", "task-awarded"],
        },
        Row {
            row: "offered | Bid, labels not met | offered",
            def: || one_with(|a| _ = a.requires.insert("zone".into(), "eu".into())),
            setup: nothing,
            input: |_| bid("a", 1, worker("w1", &[("zone", "us")]), 1.0, 1, 1),
            task: "a",
            phase: Offered,
            events: &[],
        },
        Row {
            row: "offered | timer BidWindow, bids kept | awarded",
            def: || one_with(|a| a.award = AwardPolicy::EarliestFinish),
            setup: |run| _ = run.apply(bid("a", 1, worker("w1", &[]), 1.0, 1, 1)),
            input: |_| timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 1 }),
            task: "a",
            phase: Awarded,
            events: &["task-awarded"],
        },
        Row {
            row: "offered | timer BidWindow, no bid | offered",
            def: one,
            setup: nothing,
            input: |_| timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 1 }),
            task: "a",
            phase: Offered,
            events: &[],
        },
        Row {
            row: "offered | timer Reoffer | offered",
            def: one,
            setup: nothing,
            input: |_| timer(TimerKind::Reoffer { task: "a".into(), attempt: 1, offer: 1 }),
            task: "a",
            phase: Offered,
            events: &["task-offered"],
        },
        Row {
            row: "offered | Claim (queue) | awarded",
            def: || one_with(|a| a.dispatch = DispatchMode::Queue),
            setup: nothing,
            input: |_| claim("a", 1, "w1"),
            task: "a",
            phase: Awarded,
            events: &["task-awarded"],
        },
        Row {
            row: "offered (`claim: false`) | Started / Heartbeat / Finished, the offer's token | as awarded",
            def: || one_with(claim_free),
            setup: nothing,
            input: |run| started("a", 1, "w1", run.state.last_token),
            task: "a",
            phase: Running,
            events: &["task-awarded", "task-started"],
        },
        Row {
            row: "offered (`claim: false`) | Finished first, the offer's token | ended(finished)",
            def: || one_with(claim_free),
            setup: nothing,
            input: finish_a,
            task: "a",
            phase: Ended(TaskStatus::Finished),
            events: &["task-awarded", "attempt-ended", "task-ended", "run-finished"],
        },
        Row {
            row: "offered / awarded | timer ScheduleToStart | backoff",
            def: one,
            setup: awarded,
            input: |_| timer(TimerKind::ScheduleToStart { task: "a".into(), attempt: 1 }),
            task: "a",
            phase: Backoff,
            events: &["attempt-ended"],
        },
        Row {
            row: "offered | timer ScheduleToStart, no retry left | ended(timed-out)",
            def: || one_with(|a| a.retry.max_attempts = 1),
            setup: nothing,
            input: |_| timer(TimerKind::ScheduleToStart { task: "a".into(), attempt: 1 }),
            task: "a",
            phase: Ended(TaskStatus::TimedOut),
            events: ATTEMPT_END,
        },
        Row {
            row: "awarded | Claim (queue) | awarded",
            def: || one_with(|a| a.dispatch = DispatchMode::Queue),
            setup: |run| _ = run.apply(claim("a", 1, "w1")),
            input: |_| claim("a", 1, "w2"),
            task: "a",
            phase: Awarded,
            events: &[],
        },
        Row {
            row: "awarded / running | Claim (fanout, new worker) | unchanged",
            def: || one_with(|a| a.dispatch = DispatchMode::Fanout),
            setup: |run| {
                run.apply(claim("a", 1, "w1"));
                run.apply(started("a", 1, "w1", 1));
            },
            input: |_| claim("a", 1, "w2"),
            task: "a",
            phase: Running,
            events: &["task-awarded"],
        },
        Row {
            row: "awarded | Started, holder's token | running",
            def: one,
            setup: awarded,
            input: |run| started("a", 1, "w1", token(run)),
            task: "a",
            phase: Running,
            events: &["task-started"],
        },
        Row {
            row: "awarded / running | Finished, no error | ended(finished)",
            def: one,
            setup: running,
            input: finish_a,
            task: "a",
            phase: Ended(TaskStatus::Finished),
            events: ATTEMPT_END,
        },
        Row {
            row: "awarded / running | Finished with error, retries left | backoff",
            def: one,
            setup: running,
            input: |run| failed("a", 1, "w1", token(run), "exit-code"),
            task: "a",
            phase: Backoff,
            events: &["attempt-ended"],
        },
        Row {
            row: "awarded / running | Finished, other fanout holders open | unchanged",
            def: || one_with(|a| a.dispatch = DispatchMode::Fanout),
            setup: |run| {
                run.apply(claim("a", 1, "w1"));
                run.apply(claim("a", 1, "w2"));
                run.apply(started("a", 1, "w1", 1));
            },
            input: |_| finished("a", 1, "w1", 1, TaskResult::Pass),
            task: "a",
            phase: Running,
            events: &["attempt-ended"],
        },
        Row {
            row: "awarded / running | timer StartToClose | backoff",
            def: one,
            setup: running,
            input: |_| timer(TimerKind::StartToClose { task: "a".into(), attempt: 1 }),
            task: "a",
            phase: Backoff,
            events: &["attempt-ended"],
        },
        Row {
            row: "running | Heartbeat, holder's token | running",
            def: || one_with(|a| a.timeouts.heartbeat = Some(1_000)),
            setup: running,
            input: |run| heartbeat("a", 1, "w1", token(run)),
            task: "a",
            phase: Running,
            events: &[],
        },
        Row {
            row: "running | timer Heartbeat, not idempotent | ended(outcome-unknown)",
            def: || {
                one_with(|a| {
                    a.timeouts.heartbeat = Some(1_000);
                    a.idempotent = false;
                })
            },
            setup: running,
            input: |_| timer(TimerKind::Heartbeat { task: "a".into(), attempt: 1 }),
            task: "a",
            phase: Ended(TaskStatus::OutcomeUnknown),
            events: ATTEMPT_END,
        },
        Row {
            row: "any | Finished, not a current token | unchanged",
            def: one,
            setup: running,
            input: |run| finished("a", 1, "w1", token(run) + 7, TaskResult::Pass),
            task: "a",
            phase: Running,
            events: &["input-rejected"],
        },
        Row {
            row: "any | Finished again, from the holder whose part it ended | unchanged",
            def: one,
            setup: |run| {
                running(run);
                let result = finish_a(run);
                run.apply(result);
            },
            input: finish_a,
            task: "a",
            phase: Ended(TaskStatus::Finished),
            events: &[],
        },
        Row {
            row: "backoff | timer Retry | offered (attempt + 1)",
            def: one,
            setup: |run| {
                running(run);
                run.apply(failed("a", 1, "w1", 1, "exit-code"));
            },
            input: |_| timer(TimerKind::Retry { task: "a".into(), attempt: 1 }),
            task: "a",
            phase: Offered,
            events: &["task-offered"],
        },
        Row {
            row: "awaiting-approval | Approve | ended(finished)",
            def: || one_with(manual_approval),
            setup: nothing,
            input: |_| Input::Approve { task: "a".into(), approved: true, by: "ann".into() },
            task: "a",
            phase: Ended(TaskStatus::Finished),
            events: &["task-ended", "run-finished"],
        },
        Row {
            row: "awaiting-approval | timer ApprovalTimeout | ended(timed-out)",
            def: || one_with(manual_approval),
            setup: nothing,
            input: |_| timer(TimerKind::ApprovalTimeout { task: "a".into() }),
            task: "a",
            phase: Ended(TaskStatus::TimedOut),
            events: &["task-ended", "run-finished"],
        },
        Row {
            row: "offered / awarded / running / backoff / awaiting | Cancel | ended(cancelled)",
            def: one,
            setup: running,
            input: |_| Input::Cancel { reason: "stop".into() },
            task: "a",
            phase: Ended(TaskStatus::Cancelled),
            events: ATTEMPT_END,
        },
        Row {
            row: "pending / delayed | Cancel | ended(skipped)",
            def: || chain_with(|_| {}),
            setup: nothing,
            input: |_| Input::Cancel { reason: "stop".into() },
            task: "b",
            phase: Ended(TaskStatus::Skipped),
            events: &["task-ended", "task-ended", "run-finished"],
        },
        Row {
            row: "ended | any timer | ended",
            def: || chain_with(|_| {}),
            setup: |run| _ = run.complete("a", 1, "w1", TaskResult::Pass),
            input: |_| timer(TimerKind::StartToClose { task: "a".into(), attempt: 1 }),
            task: "a",
            phase: Ended(TaskStatus::Finished),
            events: &[],
        },
    ]
}

fn claim_free(t: &mut Task) {
    t.dispatch = DispatchMode::Queue;
    t.claim = false;
}

fn manual_approval(t: &mut Task) {
    t.task_type = APPROVAL_TYPE.into();
    t.properties.insert("pass".into(), json!("manual"));
    t.properties.insert("timeout".into(), json!("1h"));
}

#[test]
fn walks_every_row_of_the_transition_table() {
    let rows = rows();
    let table = include_str!("../machine.rs");
    for row in &rows {
        let (mut run, _) = Run::start((row.def)(), json!({}));
        (row.setup)(&mut run);
        let input = (row.input)(&run);
        let d = run.apply(input);
        assert_eq!(run.phase(row.task), row.phase, "row `{}`\n{}", row.row, run.history());
        assert_eq!(kinds(&d), row.events, "row `{}`\n{}", row.row, run.history());
        // Every row named here is a row (or a narrowing of a row) of the documented table.
        let state = row.row.split(" | ").next().unwrap_or_default();
        assert!(table.contains(&format!("//! | {state}")), "row `{}` not in the table", row.row);
    }
    let documented = table.lines().filter(|l| l.starts_with("//! | ") && !l.contains("---")).count();
    // The header line is not a row; every documented row has a walked counterpart.
    assert!(rows.len() >= documented - 1, "{} rows walked, {} documented", rows.len(), documented - 1);
}
