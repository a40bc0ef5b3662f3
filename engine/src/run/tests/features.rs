//! Dispatch, fencing, retries and timeouts, one behaviour per test.

use super::*;

fn with(f: impl FnOnce(&mut Task)) -> Arc<Definition> {
    let mut t = task("a", &[]);
    f(&mut t);
    single(vec![t])
}

#[test]
fn backoff_stays_within_bounds_and_caps() {
    let policy = RetryPolicy {
        max_attempts: 10,
        initial_interval: 1_000,
        backoff_coefficient: 2.0,
        max_interval: 30_000,
        non_retryable: vec![],
    };
    let draws: Vec<u64> = (0..500u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    for attempt in 1..=12 {
        let full = (1_000u64 << (attempt - 1)).min(30_000);
        let all: Vec<u64> = draws.iter().map(|&r| backoff(&policy, attempt, r)).collect();
        let (lo, hi) = (*all.iter().min().unwrap(), *all.iter().max().unwrap());
        assert!(lo >= full / 2 && hi <= full, "attempt {attempt}: {lo}..{hi} outside {full}");
        assert!(lo >= 500 && hi <= 30_000);
    }
    // Extremes of the draw hit both ends of the jitter range.
    assert_eq!(backoff(&policy, 1, 0), 500);
    assert_eq!(backoff(&policy, 1, 500), 1_000);
    assert_eq!(backoff(&policy, 40, u64::MAX), backoff(&policy, 40, u64::MAX % 15_001));
    // A shrinking or broken coefficient never goes under half the initial interval.
    for coefficient in [0.1, f64::NAN, f64::INFINITY] {
        let p = RetryPolicy { backoff_coefficient: coefficient, ..policy.clone() };
        for r in &draws {
            let d = backoff(&p, 5, *r);
            assert!((500..=30_000).contains(&d), "{coefficient}: {d}");
        }
    }
}

#[test]
fn lowest_cost_awards_after_the_window_with_deterministic_ties() {
    let (mut run, _) = Run::start(with(|a| a.award = AwardPolicy::LowestCost), json!({}));
    run.apply(bid("a", 1, worker("w-c", &[]), 2.0, 5, 1));
    run.apply(bid("a", 1, worker("w-b", &[]), 1.0, 9, 1));
    run.apply(bid("a", 1, worker("w-a", &[]), 1.0, 9, 1));
    run.apply(bid("a", 1, worker("w-d", &[]), 1.0, 9, 4));
    // A second bid from the same worker (a redelivery) changes nothing and rejects nothing:
    // its first bid stands.
    let dup = run.apply(bid("a", 1, worker("w-d", &[]), 0.5, 9, 4));
    assert!(dup.events.is_empty() && dup.effects.is_empty(), "{dup:?}");
    let d = run.apply(timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 1 }));
    // Equal cost and estimate: more free slots wins (w-d), then the lower id (w-a before w-b).
    assert_eq!(
        effects(&d),
        [
            "award w-d token=1",
            "unset bid-window/a/1",
            "unset reoffer/a/1",
            "set start-to-close/a/1 @3600000",
            "reject w-a: another bid won",
            "reject w-b: another bid won",
            "reject w-c: another bid won",
        ]
    );
}

#[test]
fn a_bid_after_a_window_that_closed_without_one_is_awarded_at_once() {
    let (mut run, _) = Run::start(with(|a| a.award = AwardPolicy::LowestCost), json!({}));
    run.random = 0;
    let d = run.at(250).apply(timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 1 }));
    assert_eq!(effects(&d), ["set reoffer/a/1 @750"]);
    // A bid inside the window waits for it; one after it (from a worker that kept the offer
    // until a slot freed) need not wait for the re-offer.
    let d = run.at(400).apply(bid("a", 1, worker("w1", &[]), 3.0, 1, 1));
    assert_eq!(kinds(&d), ["bid-recorded", "task-awarded"]);
    assert!(effects(&d).contains(&"unset reoffer/a/1".to_string()), "{:?}", effects(&d));
    assert_eq!(run.state.task("a").unwrap().worker.as_deref(), Some("w1"));
    let d = run.at(750).apply(timer(TimerKind::Reoffer { task: "a".into(), attempt: 1, offer: 1 }));
    assert!(d.events.is_empty(), "{:?}", kinds(&d));
}

#[test]
fn earliest_finish_prefers_the_shortest_estimate() {
    let (mut run, _) = Run::start(with(|a| a.award = AwardPolicy::EarliestFinish), json!({}));
    run.apply(bid("a", 1, worker("slow", &[]), 0.0, 900, 1));
    run.apply(bid("a", 1, worker("fast", &[]), 5.0, 100, 1));
    run.apply(timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 1 }));
    assert_eq!(run.state.task("a").unwrap().worker.as_deref(), Some("fast"));
}

#[test]
fn unmet_labels_are_never_awarded_and_no_bid_means_reoffer() {
    let def = with(|a| {
        a.requires.insert("certified".into(), "production".into());
        a.award = AwardPolicy::LowestCost;
    });
    let (mut run, _) = Run::start(def, json!({}));
    let d = run.apply(bid("a", 1, worker("w1", &[("certified", "dev")]), 0.0, 1, 9));
    assert_eq!(effects(&d), ["reject w1: the worker's labels do not meet the task's requirements"]);
    run.random = 0;
    let d = run.at(250).apply(timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 1 }));
    assert!(d.events.is_empty());
    assert_eq!(effects(&d), ["set reoffer/a/1 @750"]);
    let d = run.at(750).apply(timer(TimerKind::Reoffer { task: "a".into(), attempt: 1, offer: 1 }));
    assert_eq!(kinds(&d), ["task-offered"]);
    assert_eq!(effects(&d), ["offer a#1 Auction", "set bid-window/a/1 @1000"]);
    let good = worker("w2", &[("certified", "production"), ("extra", "x")]);
    run.apply(bid("a", 1, good, 3.0, 1, 1));
    run.apply(timer(TimerKind::BidWindow { task: "a".into(), attempt: 1, offer: 2 }));
    assert_eq!(run.phase("a"), TaskPhase::Awarded);
}

#[test]
fn queue_takes_the_first_valid_claim_only() {
    let def = with(|a| {
        a.dispatch = DispatchMode::Queue;
        a.requires.insert("zone".into(), "eu".into());
    });
    let (mut run, start) = Run::start(def, json!({}));
    assert!(effects(&start).contains(&"offer a#1 Queue".to_string()));
    let d = run.apply(claim("a", 1, "w-us"));
    assert_eq!(effects(&d), ["reject w-us: the worker's labels do not meet the task's requirements"]);
    let eu = Input::Claim(Claim { attempt: aref("a", 1), worker: worker("w-eu", &[("zone", "eu")]) });
    let d = run.apply(eu.clone());
    assert_eq!(kinds(&d), ["task-awarded"]);
    let mut second = eu;
    if let Input::Claim(c) = &mut second {
        c.worker.id = "w-eu2".into();
    }
    let d = run.apply(second);
    assert_eq!(effects(&d), ["reject w-eu2: the attempt was already claimed"]);
    let wrong = run.apply(bid("a", 1, worker("w", &[]), 0.0, 0, 0));
    assert_eq!(effects(&wrong), ["reject w: the task is not auctioned: claim it"]);
}

#[test]
fn reports_that_come_again_after_the_holders_part_ended_decide_nothing() {
    let (mut run, _) = Run::start(with(|a| a.dispatch = DispatchMode::Fanout), json!({}));
    for w in ["w1", "w2", "w3"] {
        run.apply(claim("a", 1, w));
    }
    run.apply(started("a", 1, "w1", 1));
    run.apply(finished("a", 1, "w1", 1, TaskResult::Pass));
    // w1's part ended while the others still work: its claim and `started` again change nothing.
    for again in [claim("a", 1, "w1"), started("a", 1, "w1", 1)] {
        let d = run.apply(again);
        assert!(d.events.is_empty() && d.effects.is_empty(), "{d:?}");
    }
    // w2 finishes without having said `started`: a `started` after that is a late report, not
    // one that was applied before, and is refused for the record.
    run.apply(finished("a", 1, "w2", 2, TaskResult::Pass));
    let late = run.apply(started("a", 1, "w2", 2));
    assert_eq!(kinds(&late), ["input-rejected"]);
}

#[test]
fn a_result_that_comes_again_is_taken_once() {
    // Fanout: w1's result again, while w2 still works, changes nothing and rejects nothing.
    let (mut run, _) = Run::start(with(|a| a.dispatch = DispatchMode::Fanout), json!({}));
    run.apply(claim("a", 1, "w1"));
    run.apply(claim("a", 1, "w2"));
    run.apply(finished("a", 1, "w1", 1, TaskResult::Pass));
    let again = run.apply(finished("a", 1, "w1", 1, TaskResult::Fail));
    assert!(again.events.is_empty() && again.effects.is_empty(), "{again:?}");
    assert_eq!(run.phase("a"), TaskPhase::Awarded);
    // The same result under another holder's token is not the one taken: refused.
    let forged = run.apply(finished("a", 1, "w1", 2, TaskResult::Pass));
    assert_eq!(kinds(&forged), ["input-rejected"]);

    // A failure with retries left: again during the backoff, nothing; again once the retry
    // replaced the attempt, refused for the record, and the new attempt goes on untouched.
    let (mut run, _) = Run::start(single(vec![task("a", &[])]), json!({}));
    let token = run.award("a", 1, "w1");
    run.apply(failed("a", 1, "w1", token, "exit-code"));
    let again = run.apply(failed("a", 1, "w1", token, "exit-code"));
    assert!(again.events.is_empty() && again.effects.is_empty(), "{again:?}");
    assert_eq!(run.phase("a"), TaskPhase::Backoff);
    run.apply(timer(TimerKind::Retry { task: "a".into(), attempt: 1 }));
    let late = run.apply(failed("a", 1, "w1", token, "exit-code"));
    assert_eq!(kinds(&late), ["input-rejected"]);
    assert_eq!(run.phase("a"), TaskPhase::Offered);

    // A holder whose part timed out: its result is late, not one taken before.
    let (mut run, _) = Run::start(single(vec![task("a", &[])]), json!({}));
    let token = run.award("a", 1, "w1");
    run.apply(timer(TimerKind::StartToClose { task: "a".into(), attempt: 1 }));
    let late = run.apply(finished("a", 1, "w1", token, TaskResult::Pass));
    assert_eq!(kinds(&late), ["input-rejected"]);
}

#[test]
fn fanout_waits_for_every_holder_and_the_worst_result_wins() {
    for (second, expected) in [(TaskResult::Pass, TaskResult::Warning), (TaskResult::Fail, TaskResult::Fail)] {
        let (mut run, _) = Run::start(with(|a| a.dispatch = DispatchMode::Fanout), json!({}));
        run.apply(claim("a", 1, "w1"));
        run.apply(claim("a", 1, "w2"));
        // The holder's claim again (a redelivery): no second award, and no rejection, which
        // would cancel the work it is doing.
        let again = run.apply(claim("a", 1, "w1"));
        assert!(again.events.is_empty() && again.effects.is_empty(), "{again:?}");
        run.apply(finished("a", 1, "w1", 1, TaskResult::Warning));
        assert_eq!(run.phase("a"), TaskPhase::Awarded);
        run.apply(finished("a", 1, "w2", 2, second));
        assert_eq!(run.state.task("a").unwrap().result, Some(expected));
        assert_eq!(run.state.result(), Some(expected));
    }
}

#[test]
fn fanout_without_claims_times_out_on_schedule_to_start() {
    let def = with(|a| {
        a.dispatch = DispatchMode::Fanout;
        a.retry.max_attempts = 1;
    });
    let (mut run, _) = Run::start(def, json!({}));
    run.apply(timer(TimerKind::ScheduleToStart { task: "a".into(), attempt: 1 }));
    assert_eq!(run.phase("a"), TaskPhase::Ended(TaskStatus::TimedOut));
    let late = run.apply(claim("a", 1, "w1"));
    assert!(late.events.is_empty());
    assert_eq!(effects(&late), ["reject w1: the run is over"]);
}

#[test]
fn stale_tokens_and_duplicate_finished_are_refused_for_the_record() {
    let (mut run, _) = Run::start(with(|_| {}), json!({}));
    let t1 = run.award("a", 1, "w1");
    run.apply(failed("a", 1, "w1", t1, "exit-code"));
    run.apply(timer(TimerKind::Retry { task: "a".into(), attempt: 1 }));
    let t2 = run.award("a", 2, "w2");
    assert!(t2 > t1, "tokens strictly increase");
    // The first holder, after its attempt ended, reports again: refused.
    let d = run.apply(finished("a", 1, "w1", t1, TaskResult::Pass));
    assert_eq!(kinds(&d), ["input-rejected"]);
    assert_eq!(effects(&d), ["reject w1: the attempt is no longer open"]);
    // The right attempt with somebody else's token: refused.
    let d = run.apply(started("a", 2, "w1", t2));
    assert_eq!(effects(&d), ["reject w1: stale or unknown fencing token"]);
    run.apply(finished("a", 2, "w2", t2, TaskResult::Pass));
    // The result taken, again: nothing, not even a rejection.
    let dup = run.apply(finished("a", 2, "w2", t2, TaskResult::Fail));
    assert!(dup.events.is_empty() && dup.effects.is_empty(), "{dup:?}");
    // Another worker under that token: nothing is recorded once the run is over.
    let forged = run.apply(finished("a", 2, "w1", t2, TaskResult::Fail));
    assert!(forged.events.is_empty(), "nothing is recorded once the run is over");
    assert_eq!(effects(&forged), ["reject w1: the run is over"]);
    assert_eq!(run.state.result(), Some(TaskResult::Pass));
}

#[test]
fn duplicate_finished_on_a_live_run_decides_nothing() {
    let (mut run, _) = Run::start(single(vec![task("a", &[]), task("b", &["a"])]), json!({}));
    run.complete("a", 1, "w1", TaskResult::Pass);
    let dup = run.apply(finished("a", 1, "w1", 1, TaskResult::Fail));
    assert!(dup.events.is_empty() && dup.effects.is_empty(), "{dup:?}");
    assert_eq!(run.state.task("a").unwrap().result, Some(TaskResult::Pass));
}

#[test]
fn each_timeout_kind_ends_the_attempt_and_cancels_the_holder() {
    let def = with(|a| {
        a.timeouts =
            Timeouts { schedule_to_start: Some(100), start_to_close: Some(1_000), heartbeat: Some(50), bid_window: 10 };
        a.retry.max_attempts = 1;
    });
    let (mut run, start) = Run::start(def.clone(), json!({}));
    assert!(effects(&start).contains(&"set schedule-to-start/a/1 @100".to_string()));
    let d = run.apply(timer(TimerKind::ScheduleToStart { task: "a".into(), attempt: 1 }));
    assert_eq!(run.phase("a"), TaskPhase::Ended(TaskStatus::TimedOut), "{:?}", effects(&d));

    let (mut run, _) = Run::start(def.clone(), json!({}));
    run.award("a", 1, "w1");
    let d = run.at(20).apply(started("a", 1, "w1", 1));
    assert_eq!(effects(&d), ["unset schedule-to-start/a/1", "set heartbeat/a/1 @70"]);
    let d = run.at(60).apply(heartbeat("a", 1, "w1", 1));
    assert_eq!((kinds(&d).len(), effects(&d)), (0, vec!["set heartbeat/a/1 @110".to_string()]));
    let d = run.at(110).apply(timer(TimerKind::Heartbeat { task: "a".into(), attempt: 1 }));
    assert_eq!(effects(&d)[..3], ["cancel w1: the attempt timed out", "unset start-to-close/a/1", "notify fail"]);
    let ended = d.events.iter().find_map(|e| match e {
        Event::AttemptEnded { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    assert_eq!(ended, Some(AttemptOutcome::TimedOut { timeout: TimeoutKind::Heartbeat }));

    let (mut run, _) = Run::start(def, json!({}));
    run.award("a", 1, "w1");
    run.apply(started("a", 1, "w1", 1));
    run.apply(timer(TimerKind::StartToClose { task: "a".into(), attempt: 1 }));
    assert_eq!(run.phase("a"), TaskPhase::Ended(TaskStatus::TimedOut));
    // The moot heartbeat timer that may still fire changes nothing.
    let moot = run.apply(timer(TimerKind::Heartbeat { task: "a".into(), attempt: 1 }));
    assert_eq!(moot, Decision::default());
}

#[test]
fn errors_retry_with_backoff_but_real_failures_and_non_retryable_kinds_do_not() {
    let def = with(|a| a.retry.non_retryable = vec!["bad-input".into()]);
    let (mut run, _) = Run::start(def.clone(), json!({}));
    run.random = 3;
    let t = run.award("a", 1, "w1");
    let d = run.at(1_000).apply(failed("a", 1, "w1", t, "exit-code"));
    // attempt 1: full 1000 ms, equal jitter 500 + 3.
    assert_eq!(effects(&d).last().map(String::as_str), Some("set retry/a/1 @1503"));
    run.apply(timer(TimerKind::Retry { task: "a".into(), attempt: 1 }));
    let t = run.award("a", 2, "w1");
    run.apply(failed("a", 2, "w1", t, "exit-code"));
    run.apply(timer(TimerKind::Retry { task: "a".into(), attempt: 2 }));
    let t = run.award("a", 3, "w1");
    run.apply(failed("a", 3, "w1", t, "exit-code"));
    assert_eq!(run.phase("a"), TaskPhase::Ended(TaskStatus::Finished), "attempts exhausted");
    assert_eq!(run.state.result(), Some(TaskResult::Fail));

    for last in [failed("a", 1, "w1", 1, "bad-input"), finished("a", 1, "w1", 1, TaskResult::Fail)] {
        let (mut run, _) = Run::start(def.clone(), json!({}));
        run.award("a", 1, "w1");
        let d = run.apply(last);
        assert_eq!(kinds(&d), ["attempt-ended", "task-ended", "run-finished"]);
    }
}

#[test]
fn non_idempotent_tasks_retry_only_before_they_were_awarded() {
    let def = with(|a| a.idempotent = false);
    // Nobody took the offer: no worker can have acted, so another attempt is safe.
    let (mut run, _) = Run::start(def.clone(), json!({}));
    run.apply(timer(TimerKind::ScheduleToStart { task: "a".into(), attempt: 1 }));
    assert_eq!(run.phase("a"), TaskPhase::Backoff, "never awarded: may retry");
    run.apply(timer(TimerKind::Retry { task: "a".into(), attempt: 1 }));
    let t = run.award("a", 2, "w2");
    run.apply(started("a", 2, "w2", t));
    let d = run.apply(timer(TimerKind::StartToClose { task: "a".into(), attempt: 2 }));
    assert_eq!(run.phase("a"), TaskPhase::Ended(TaskStatus::OutcomeUnknown));
    assert!(effects(&d).contains(&"cancel w2: the attempt timed out".to_string()));
    assert_eq!(run.state.result(), Some(TaskResult::Fail));

    // Awarded but its `started` never arrived: the worker may have acted, so no second attempt.
    let (mut run, _) = Run::start(def, json!({}));
    run.award("a", 1, "w1");
    run.apply(timer(TimerKind::ScheduleToStart { task: "a".into(), attempt: 1 }));
    assert_eq!(run.phase("a"), TaskPhase::Ended(TaskStatus::OutcomeUnknown), "awarded: never twice");
}

#[test]
fn tokens_are_unique_and_increasing_across_tasks() {
    let def = single(vec![task("a", &[]), task("b", &[])]);
    let (mut run, start) = Run::start(def, json!({}));
    assert_eq!(kinds(&start), ["run-started", "task-offered", "task-offered"], "independent branches");
    assert_eq!((run.award("a", 1, "w1"), run.award("b", 1, "w1")), (1, 2));
}

/// A queue task whose offers carry their fencing token (`claim: false`).
fn claim_free() -> Arc<Definition> {
    with(|a| {
        a.dispatch = DispatchMode::Queue;
        a.claim = false;
    })
}

fn offered_token(d: &Decision) -> Option<u64> {
    d.effects.iter().find_map(|e| match e {
        Effect::Offer(o) => o.token,
        _ => None,
    })
}

#[test]
fn a_claim_free_offer_goes_to_the_first_reporter_under_its_token() {
    let (mut run, start) = Run::start(claim_free(), json!({}));
    let token = offered_token(&start).expect("a claim-free offer carries its token");
    // Left to the broker's redelivery before the engine offers it again.
    let reoffer = format!("set reoffer/a/1 @{CLAIM_FREE_REOFFER_MS}");
    assert!(effects(&start).contains(&reoffer), "{:?}", effects(&start));
    assert_eq!(run.apply(started("a", 1, "w1", token + 1)).events.len(), 1, "another token binds nothing");
    assert_eq!(run.phase("a"), TaskPhase::Offered);
    // The receiver's `started` makes it the holder; it has its token, so no award goes out.
    let d = run.apply(started("a", 1, "w1", token));
    assert_eq!(kinds(&d), ["task-awarded", "task-started"]);
    assert!(!effects(&d).iter().any(|e| e.starts_with("award")), "{:?}", effects(&d));
    assert!(effects(&d).contains(&"unset reoffer/a/1".to_string()), "{:?}", effects(&d));
    // A member that got the offer again is refused, so that its copy stops.
    for copy in [started("a", 1, "w2", token), finished("a", 1, "w2", token, TaskResult::Pass)] {
        let d = run.apply(copy);
        assert_eq!(kinds(&d), ["input-rejected"]);
        assert_eq!(effects(&d), ["reject w2: stale or unknown fencing token"]);
    }
    let d = run.apply(finished("a", 1, "w1", token, TaskResult::Pass));
    assert_eq!(kinds(&d), ["attempt-ended", "task-ended", "run-finished"]);
}

#[test]
fn a_claim_free_attempt_keeps_its_token_across_re_offers_and_a_retry_gets_a_new_one() {
    let (mut run, start) = Run::start(claim_free(), json!({}));
    let token = offered_token(&start).expect("a claim-free offer carries its token");
    let limit = Timeouts::default().schedule_to_start.expect("a default schedule-to-start");
    let start_by = |d: &Decision| {
        d.effects.iter().find_map(|e| match e {
            Effect::Offer(o) => o.start_by_ms,
            _ => None,
        })
    };
    assert_eq!(start_by(&start), Some(limit), "offered at 0: stale after its schedule-to-start");
    run.at(40_000);
    let d = run.apply(timer(TimerKind::Reoffer { task: "a".into(), attempt: 1, offer: 1 }));
    assert_eq!(offered_token(&d), Some(token), "a re-offer is the same attempt");
    assert_eq!(start_by(&d), Some(limit), "and has the same deadline");
    // A worker that claims anyway (one that does not know claim-free offers) is awarded the
    // offer's token, and the offer's token binds nobody else after that.
    let d = run.apply(claim("a", 1, "w-old"));
    assert_eq!(effects(&d)[0], format!("award w-old token={token}"));
    assert_eq!(kinds(&run.apply(started("a", 1, "w2", token))), ["input-rejected"]);
    run.apply(failed("a", 1, "w-old", token, "exit-code"));
    let d = run.apply(timer(TimerKind::Retry { task: "a".into(), attempt: 1 }));
    assert_eq!(offered_token(&d), Some(token + 1), "a retry is a new attempt with a new token");
    // An attempt that timed out before anyone reported takes no report under its token.
    run.apply(timer(TimerKind::ScheduleToStart { task: "a".into(), attempt: 2 }));
    let late = run.apply(finished("a", 2, "w1", token + 1, TaskResult::Pass));
    assert_eq!(effects(&late), ["reject w1: the attempt is no longer open"]);
}

/// After a restart the runtime re-offers what was on offer: a claimed queue offer at once, a
/// claim-free one only after `CLAIM_FREE_REOFFER_MS`, since a member may be running it.
#[test]
fn a_restart_re_offers_a_claim_free_offer_late_and_a_claimed_one_at_once() {
    for (claim, wait) in [(true, 0), (false, CLAIM_FREE_REOFFER_MS)] {
        let def = with(|a| {
            a.dispatch = DispatchMode::Queue;
            a.claim = claim;
        });
        let (run, _) = Run::start(def, json!({}));
        let reoffer = run
            .state
            .derived_timers(Timestamp(5_000))
            .into_iter()
            .find_map(|(kind, at)| matches!(kind, TimerKind::Reoffer { .. }).then_some(at.0));
        assert_eq!(reoffer, Some(5_000 + wait), "claim: {claim}");
    }
}

#[test]
fn claims_keep_their_offers_without_a_token() {
    for dispatch in [DispatchMode::Queue, DispatchMode::Auction, DispatchMode::Fanout] {
        let (_, start) = Run::start(with(|a| a.dispatch = dispatch), json!({}));
        assert_eq!(offered_token(&start), None, "{dispatch:?}");
    }
}

#[test]
fn a_queue_offer_is_left_to_the_broker_for_a_while_before_it_is_offered_again() {
    use crate::run::flow::QUEUE_REOFFER_MS;
    let reoffer_due = |d: &Decision| -> u64 {
        let set = effects(d).into_iter().find(|e| e.starts_with("set reoffer/a/")).expect("a re-offer timer");
        set.rsplit('@').next().and_then(|t| t.parse().ok()).expect("due time")
    };
    // The retry backoff alone would re-offer after 0.5-1 s; a queued offer waits for a member.
    let (mut run, start) = Run::start(with(|a| a.dispatch = DispatchMode::Queue), json!({}));
    assert_eq!(reoffer_due(&start), QUEUE_REOFFER_MS);
    let d = run.at(QUEUE_REOFFER_MS).apply(timer(TimerKind::Reoffer { task: "a".into(), attempt: 1, offer: 1 }));
    assert_eq!(kinds(&d), ["task-offered"]);
    assert_eq!(reoffer_due(&d), 2 * QUEUE_REOFFER_MS);
    // A backoff longer than the floor keeps its own length.
    let slow = with(|a| {
        a.dispatch = DispatchMode::Queue;
        a.retry.initial_interval = 4 * QUEUE_REOFFER_MS;
        a.retry.max_interval = 4 * QUEUE_REOFFER_MS;
    });
    let (_, start) = Run::start(slow, json!({}));
    assert!(reoffer_due(&start) >= 2 * QUEUE_REOFFER_MS, "{}", reoffer_due(&start));
    // A fanout offer goes to every worker, none keeps it queued: its re-offer is not held back.
    let (_, start) = Run::start(with(|a| a.dispatch = DispatchMode::Fanout), json!({}));
    assert!(reoffer_due(&start) <= 1_000, "{}", reoffer_due(&start));
}
