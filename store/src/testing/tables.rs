//! Conformance cases for the outbox, timers, run index and definitions.

use std::sync::Arc;

use super::{cancel, evaluation, message, run_record, timer};
use crate::{Batch, RunFilter, RunRecord, Store, TimerRow};

fn with_timers(set: Vec<TimerRow>, cancels: Vec<crate::TimerCancel>) -> Batch {
    Batch { set_timers: set, cancel_timers: cancels, ..Batch::default() }
}

async fn all_timers<S: Store>(store: &S) -> Vec<(String, String, i64)> {
    let due = store.timers_due(i64::MAX, 1000).await.expect("timers_due");
    due.into_iter().map(|t| (t.run_id, t.key, t.fire_at_ms)).collect()
}

fn triple(run: &str, key: &str, at: i64) -> (String, String, i64) {
    (run.to_owned(), key.to_owned(), at)
}

/// Timer checkpoints are kept by name, a second write replacing the first; the last position
/// follows the events written.
pub async fn timer_checkpoints_and_last_position<S: Store>(store: Arc<S>) {
    assert_eq!(store.last_position().await.expect("empty"), 0);
    assert!(store.timer_checkpoints().await.expect("none yet").is_empty());
    let batch = super::appends(vec![super::append("a", 0, &["a1", "a2"]), super::append("b", 0, &["b1"])]);
    store.commit(batch).await.expect("append");
    assert_eq!(store.last_position().await.expect("after"), 3);

    store.set_timer_checkpoint("partition/1", 2).await.expect("set 1");
    store.set_timer_checkpoint("partition/0", 1).await.expect("set 0");
    store.set_timer_checkpoint("partition/1", 3).await.expect("replace 1");
    let names = |v: Vec<(String, i64)>| v.into_iter().map(|(n, p)| format!("{n}={p}")).collect::<Vec<_>>();
    assert_eq!(names(store.timer_checkpoints().await.expect("read")), vec!["partition/0=1", "partition/1=3"]);
}

/// Outbox rows come oldest first across commits; deleting removes exactly the given seqs.
pub async fn outbox_pending_and_delete<S: Store>(store: Arc<S>) {
    let batch = |ids: &[&str]| Batch { outbox: ids.iter().map(|id| message(id)).collect(), ..Batch::default() };
    store.commit(batch(&["m1", "m2", "m3"])).await.expect("first");
    store.commit(batch(&["m4", "m5"])).await.expect("second");

    let pending = store.outbox_pending(10).await.expect("pending");
    let ids: Vec<&str> = pending.iter().map(|r| r.message.id.as_str()).collect();
    assert_eq!(ids, vec!["m1", "m2", "m3", "m4", "m5"]);
    assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq), "seqs increase");
    assert_eq!(pending[0].message, message("m1"), "the message round-trips, bytes included");
    assert_eq!(store.outbox_pending(2).await.expect("limited").len(), 2);

    let gone = vec![pending[0].seq, pending[3].seq, 999_999];
    store.outbox_delete(&gone).await.expect("delete");
    store.outbox_delete(&[]).await.expect("delete nothing");
    let left: Vec<String> = store.outbox_pending(10).await.expect("left").into_iter().map(|r| r.message.id).collect();
    assert_eq!(left, vec!["m2", "m3", "m5"]);
}

/// Setting a timer again replaces its fire time and payload; in one batch the last set wins.
pub async fn timers_upsert_and_replace<S: Store>(store: Arc<S>) {
    store.commit(with_timers(vec![timer("r1", "t", 100), timer("r1", "u", 300)], vec![])).await.expect("set");
    let mut replaced = timer("r1", "t", 50);
    replaced.payload = serde_json::json!({"replaced": true});
    store.commit(with_timers(vec![replaced.clone()], vec![])).await.expect("replace");
    let due = store.timers_due(1000, 10).await.expect("due");
    assert_eq!(due, vec![replaced, timer("r1", "u", 300)]);

    store.commit(with_timers(vec![timer("r2", "t", 7), timer("r2", "t", 9)], vec![])).await.expect("twice in a batch");
    assert!(all_timers(&*store).await.contains(&triple("r2", "t", 9)));
    assert_eq!(all_timers(&*store).await.len(), 3);
}

/// Cancels: unguarded always removes; guarded only at the same fire time; cancel-then-set in one
/// batch keeps the new timer.
pub async fn timers_cancel_with_and_without_guard<S: Store>(store: Arc<S>) {
    let set = vec![timer("r1", "a", 10), timer("r1", "b", 20), timer("r1", "c", 30)];
    store.commit(with_timers(set, vec![])).await.expect("set");

    store.commit(with_timers(vec![], vec![cancel("r1", "a", None)])).await.expect("unguarded");
    store.commit(with_timers(vec![], vec![cancel("r1", "b", Some(999))])).await.expect("stale guard");
    store.commit(with_timers(vec![], vec![cancel("r1", "c", Some(30))])).await.expect("guard");
    store.commit(with_timers(vec![], vec![cancel("nope", "x", None)])).await.expect("unknown");
    assert_eq!(all_timers(&*store).await, vec![triple("r1", "b", 20)]);

    // A fired timer consumed (guarded) while a new one is set under the same key survives.
    let batch = with_timers(vec![timer("r1", "b", 25)], vec![cancel("r1", "b", Some(20))]);
    store.commit(batch).await.expect("consume and reset");
    assert_eq!(all_timers(&*store).await, vec![triple("r1", "b", 25)]);
    let batch = with_timers(vec![timer("r1", "b", 40)], vec![cancel("r1", "b", None)]);
    store.commit(batch).await.expect("cancel and reset");
    assert_eq!(all_timers(&*store).await, vec![triple("r1", "b", 40)]);
}

/// Due timers come earliest first, up to the limit; `next_timer_at` is the earliest after a time.
pub async fn timers_due_order_and_next<S: Store>(store: Arc<S>) {
    assert_eq!(store.next_timer_at(i64::MIN).await.expect("next"), None);
    assert!(store.timers_due(i64::MAX, 10).await.expect("none").is_empty());
    let set = vec![timer("r1", "x", 30), timer("r2", "x", 10), timer("r1", "y", 20), timer("r3", "x", 40)];
    store.commit(with_timers(set, vec![])).await.expect("set");

    let at = |rows: Vec<TimerRow>| rows.into_iter().map(|t| t.fire_at_ms).collect::<Vec<_>>();
    assert_eq!(at(store.timers_due(25, 10).await.expect("due")), vec![10, 20]);
    assert_eq!(at(store.timers_due(100, 3).await.expect("due")), vec![10, 20, 30]);
    assert_eq!(at(store.timers_due(10, 10).await.expect("due")), vec![10], "fire_at == now is due");
    assert!(store.timers_due(9, 10).await.expect("none due").is_empty());
    assert_eq!(store.next_timer_at(i64::MIN).await.expect("next"), Some(10));
    assert_eq!(store.next_timer_at(10).await.expect("next"), Some(20), "strictly after");
    assert_eq!(store.next_timer_at(25).await.expect("next"), Some(30));
    assert_eq!(store.next_timer_at(40).await.expect("next"), None);
}

/// A run record is upserted by run id and read back whole.
pub async fn run_index_upsert_and_get<S: Store>(store: Arc<S>) {
    let mut run = run_record("r1", 100);
    run.service = None;
    store.commit(Batch { runs: vec![run.clone()], ..Batch::default() }).await.expect("insert");
    assert_eq!(store.get_run("r1").await.expect("get"), Some(run.clone()));

    run.status = "finished".into();
    run.result = Some("pass".into());
    run.service = Some("cart".into());
    run.updated_at_ms = 200;
    store.commit(Batch { runs: vec![run.clone()], ..Batch::default() }).await.expect("update");
    assert_eq!(store.get_run("r1").await.expect("get"), Some(run));
    assert_eq!(store.get_run("unknown").await.expect("get"), None);
    assert_eq!(store.list_runs(&RunFilter::default()).await.expect("list").len(), 1);
}

/// `list_runs`: every filter, newest first (ties by run id, descending), cursor paging.
pub async fn run_index_filters_and_paging<S: Store>(store: Arc<S>) {
    let make = |id: &str, at: i64, edit: fn(&mut RunRecord)| {
        let mut run = run_record(id, at);
        edit(&mut run);
        run
    };
    let runs = vec![
        make("r1", 100, |_| {}),
        make("r2", 200, |r| r.stage = "prod".into()),
        make("r3", 200, |r| r.service = None),
        make("r4", 300, |r| r.project = "q".into()),
        make("r5", 400, |r| {
            r.status = "finished".into();
            r.context_id = "shared".into();
        }),
        make("r6", 500, |r| {
            r.sequence = "remediation".into();
            r.context_id = "shared".into();
        }),
    ];
    store.commit(Batch { runs, ..Batch::default() }).await.expect("runs");

    let ids = |runs: Vec<RunRecord>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();
    let list = |filter: RunFilter| {
        let store = Arc::clone(&store);
        async move { ids(store.list_runs(&filter).await.expect("list")) }
    };
    assert_eq!(list(RunFilter::default()).await, vec!["r6", "r5", "r4", "r3", "r2", "r1"]);
    let f = |edit: fn(&mut RunFilter)| {
        let mut filter = RunFilter::default();
        edit(&mut filter);
        filter
    };
    assert_eq!(list(f(|f| f.project = Some("q".into()))).await, vec!["r4"]);
    assert_eq!(list(f(|f| f.stage = Some("prod".into()))).await, vec!["r2"]);
    assert_eq!(list(f(|f| f.sequence = Some("remediation".into()))).await, vec!["r6"]);
    assert_eq!(list(f(|f| f.status = Some("finished".into()))).await, vec!["r5"]);
    assert_eq!(list(f(|f| f.context_id = Some("shared".into()))).await, vec!["r6", "r5"]);
    assert_eq!(list(f(|f| f.service = Some("checkout".into()))).await, vec!["r6", "r5", "r4", "r2", "r1"]);
    let both = f(|f| {
        f.project = Some("p".into());
        f.stage = Some("dev".into());
        f.status = Some("running".into());
    });
    assert_eq!(list(both).await, vec!["r6", "r3", "r1"]);

    // Page through everything two at a time with the (created_at_ms, run_id) cursor.
    let mut pages = Vec::new();
    let mut filter = RunFilter { limit: 2, ..RunFilter::default() };
    loop {
        let page = store.list_runs(&filter).await.expect("page");
        let Some(last) = page.last() else { break };
        filter.before = Some((last.created_at_ms, last.run_id.clone()));
        pages.push(ids(page));
    }
    assert_eq!(pages, vec![vec!["r6", "r5"], vec!["r4", "r3"], vec!["r2", "r1"]]);
    let mid = RunFilter { before: Some((200, "r3".into())), ..RunFilter::default() };
    assert_eq!(list(mid).await, vec!["r2", "r1"], "the cursor splits equal created_at_ms by run id");
}

/// Runs neither finished nor cancelled, oldest first.
pub async fn unfinished_runs_oldest_first<S: Store>(store: Arc<S>) {
    let mut runs: Vec<RunRecord> =
        [("r1", 300), ("r2", 100), ("r3", 200), ("r4", 50)].iter().map(|(id, at)| run_record(id, *at)).collect();
    runs[1].status = "paused".into();
    runs[2].status = "finished".into();
    runs[3].status = "cancelled".into();
    store.commit(Batch { runs, ..Batch::default() }).await.expect("runs");
    let ids: Vec<String> = store.unfinished_runs().await.expect("unfinished").into_iter().map(|r| r.run_id).collect();
    assert_eq!(ids, vec!["r2", "r1"]);
}

/// Definitions: a new source is the next version, the latest source again is not.
pub async fn definitions_versioning<S: Store>(store: Arc<S>) {
    let put = |name: &'static str, source: &'static str| {
        let store = Arc::clone(&store);
        async move { store.put_definition("p", name, source, 1000).await.expect("put") }
    };
    assert_eq!(put("checkout", "v: 1").await, 1);
    assert_eq!(put("checkout", "v: 1").await, 1, "same source as latest");
    assert_eq!(put("checkout", "v: 2").await, 2);
    assert_eq!(put("checkout", "v: 1").await, 3, "an older source is a new version");
    assert_eq!(put("billing", "b: 1").await, 1);
    store.put_definition("other", "checkout", "o", 5).await.expect("other project");

    let latest = store.get_definition("p", "checkout", None).await.expect("get").expect("exists");
    assert_eq!((latest.version, latest.source.as_str(), latest.created_at_ms), (3, "v: 1", 1000));
    let v2 = store.get_definition("p", "checkout", Some(2)).await.expect("get").expect("v2");
    assert_eq!((v2.project.as_str(), v2.name.as_str(), v2.source.as_str()), ("p", "checkout", "v: 2"));
    assert_eq!(store.get_definition("p", "checkout", Some(9)).await.expect("get"), None);
    assert_eq!(store.get_definition("p", "nope", None).await.expect("get"), None);

    let listed: Vec<(String, i64)> =
        store.list_definitions("p").await.expect("list").into_iter().map(|d| (d.name, d.version)).collect();
    assert_eq!(listed, vec![("billing".to_owned(), 1), ("checkout".to_owned(), 3)]);
    assert!(store.list_definitions("none").await.expect("list").is_empty());
}

/// Evaluations are kept per project, stage and service, newest first; a repeat of
/// `(run, task)` keeps the first; runs without a service form their own lane.
pub async fn evaluations_newest_first_per_lane<S: Store>(store: Arc<S>) {
    let none = store.recent_evaluations("p", "dev", Some("cart"), 10).await.expect("read empty");
    assert!(none.is_empty());
    let batch = |evaluations| Batch { evaluations, ..Batch::default() };
    store
        .commit(batch(vec![evaluation("r1", "gate", "cart", 1), evaluation("r1", "gate", "cart", 99)]))
        .await
        .expect("first");
    store
        .commit(batch(vec![evaluation("r2", "gate", "cart", 2), evaluation("o1", "gate", "orders", 3)]))
        .await
        .expect("second");
    store
        .commit(batch(vec![evaluation("r3", "gate", "", 4), evaluation("r1", "gate", "cart", 77)]))
        .await
        .expect("third");

    let cart = store.recent_evaluations("p", "dev", Some("cart"), 10).await.expect("cart");
    let runs: Vec<(&str, Option<f64>)> = cart.iter().map(|e| (e.run_id.as_str(), e.score)).collect();
    assert_eq!(runs, vec![("r2", Some(2.0)), ("r1", Some(1.0))]);
    assert_eq!(cart[0], evaluation("r2", "gate", "cart", 2));
    let one = store.recent_evaluations("p", "dev", Some("cart"), 1).await.expect("limit");
    assert_eq!(one.len(), 1);
    let unnamed = store.recent_evaluations("p", "dev", None, 10).await.expect("no service");
    assert_eq!(unnamed, vec![evaluation("r3", "gate", "", 4)]);
    assert!(store.recent_evaluations("p", "prod", Some("cart"), 10).await.expect("other stage").is_empty());
    assert!(store.recent_evaluations("q", "dev", Some("cart"), 10).await.expect("other project").is_empty());
}
