//! Conformance cases for commits and event streams: versions, atomicity, deduplication, order.

use std::sync::Arc;

use super::{append, appends, cancel, label, message, run_record, timer};
use crate::{Batch, Committed, Error, Store};

/// How many events `read_all` returns from the start, to check that nothing else was written.
async fn event_count<S: Store>(store: &S) -> usize {
    store.read_all(0, 100_000).await.expect("read_all").len()
}

/// Appended events read back whole, with seqs from 1, positions in order and ids `run:seq`.
pub async fn append_and_read_back<S: Store>(store: Arc<S>) {
    let done = store.commit(appends(vec![append("r1", 0, &["e1", "e2"])])).await.expect("commit");
    assert_eq!(done, Committed { last_position: 2, events: 2 });
    let done = store.commit(appends(vec![append("r1", 2, &["e3"])])).await.expect("commit");
    assert_eq!(done, Committed { last_position: 3, events: 1 });

    let stream = store.read_stream("r1", 1).await.expect("read_stream");
    let seqs: Vec<(i64, i64, &str, &str)> =
        stream.iter().map(|e| (e.position, e.seq, e.id.as_str(), label(e))).collect();
    assert_eq!(seqs, vec![(1, 1, "r1:1", "e1"), (2, 2, "r1:2", "e2"), (3, 3, "r1:3", "e3")]);
    let first = &stream[0];
    let sent = super::event("e1");
    assert_eq!((first.run_id.as_str(), first.kind.as_str()), ("r1", sent.kind.as_str()));
    assert_eq!(first.payload, sent.payload.to_value());
    assert_eq!(first.recorded_at_ms, sent.recorded_at_ms);

    let tail = store.read_stream("r1", 3).await.expect("read_stream from 3");
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    assert!(store.read_stream("unknown", 1).await.expect("unknown run").is_empty());
    assert_eq!(store.stream_version("r1").await.expect("version"), 3);
    assert_eq!(store.stream_version("unknown").await.expect("version"), 0);
}

/// Empty batches and batches without events commit and report no position.
pub async fn empty_and_eventless_batches<S: Store>(store: Arc<S>) {
    assert_eq!(store.commit(Batch::default()).await.expect("empty"), Committed::default());
    let batch = Batch { inputs: vec!["in-1".into()], outbox: vec![message("m1")], ..Batch::default() };
    assert_eq!(store.commit(batch).await.expect("no events"), Committed::default());
    // An append with no events still checks its expected version.
    let err = store.commit(appends(vec![append("r1", 3, &[])])).await.expect_err("stale");
    assert!(matches!(err, Error::Conflict { expected: 3, actual: 0, .. }), "{err:?}");
    assert_eq!(store.inputs_seen(&["in-1".into(), "in-2".into()]).await.expect("seen"), vec!["in-1"]);
}

/// A stale expected version fails the whole batch: no events, inputs, outbox, timers or runs.
pub async fn conflict_writes_nothing<S: Store>(store: Arc<S>) {
    let setup = Batch {
        appends: vec![append("r1", 0, &["e1"])],
        set_timers: vec![timer("r1", "keep", 500)],
        ..Batch::default()
    };
    store.commit(setup).await.expect("setup");

    let batch = Batch {
        appends: vec![append("r2", 0, &["e2"]), append("r1", 0, &["e3"])],
        runs: vec![run_record("r2", 10)],
        inputs: vec!["in-1".into()],
        outbox: vec![message("m1")],
        set_timers: vec![timer("r2", "new", 100)],
        cancel_timers: vec![cancel("r1", "keep", None)],
        evaluations: vec![super::evaluation("r2", "gate", "cart", 1)],
        inputs_at_ms: 1,
    };
    let err = store.commit(batch).await.expect_err("stale version");
    match err {
        Error::Conflict { run_id, expected, actual } => {
            assert_eq!((run_id.as_str(), expected, actual), ("r1", 0, 1));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.stream_version("r2").await.expect("version"), 0);
    assert_eq!(event_count(&*store).await, 1);
    assert!(store.inputs_seen(&["in-1".into()]).await.expect("seen").is_empty());
    assert!(store.outbox_pending(10).await.expect("outbox").is_empty());
    assert_eq!(store.timers_due(i64::MAX, 10).await.expect("timers"), vec![timer("r1", "keep", 500)]);
    assert!(store.get_run("r2").await.expect("run").is_none());
    assert!(store.recent_evaluations("p", "dev", Some("cart"), 10).await.expect("evaluations").is_empty());
}

/// Two tasks appending to the same run at the same version: exactly one wins, every round.
pub async fn concurrent_appends_one_wins<S: Store>(store: Arc<S>) {
    const ROUNDS: i64 = 10;
    for round in 0..ROUNDS {
        let tasks: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let store = Arc::clone(&store);
                let id = format!("e-{round}-{who}");
                tokio::spawn(async move { store.commit(appends(vec![append("r1", round, &[&id])])).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await.expect("task") {
                Ok(_) => wins += 1,
                Err(Error::Conflict { expected, actual, .. }) => {
                    assert_eq!((expected, actual), (round, round + 1));
                }
                Err(other) => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one append must win");
    }
    assert_eq!(store.stream_version("r1").await.expect("version"), ROUNDS);
}

/// Concurrent commits to different runs all land, at dense positions 1..=n in read_all order.
pub async fn concurrent_commits_keep_positions_dense<S: Store>(store: Arc<S>) {
    const TASKS: usize = 4;
    const COMMITS: i64 = 10;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for v in 0..COMMITS {
                    let run = format!("run-{t}");
                    let ids = [format!("{run}-{v}-a"), format!("{run}-{v}-b")];
                    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    store.commit(appends(vec![append(&run, v * 2, &ids)])).await.expect("commit");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let all = store.read_all(0, 10_000).await.expect("read_all");
    let positions: Vec<i64> = all.iter().map(|e| e.position).collect();
    let expected: Vec<i64> = (1..=(TASKS as i64 * COMMITS * 2)).collect();
    assert_eq!(positions, expected);
    for t in 0..TASKS {
        let seqs: Vec<i64> = all.iter().filter(|e| e.run_id == format!("run-{t}")).map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=COMMITS * 2).collect::<Vec<_>>());
    }
}

/// An input id already applied (or twice in one batch) fails the batch, writing nothing.
pub async fn duplicate_input_writes_nothing<S: Store>(store: Arc<S>) {
    let first = Batch { inputs: vec!["in-a".into()], ..appends(vec![append("r1", 0, &["e1"])]) };
    store.commit(first).await.expect("first");

    let again = Batch {
        appends: vec![append("r2", 0, &["e2"])],
        inputs: vec!["in-b".into(), "in-a".into()],
        outbox: vec![message("m1")],
        set_timers: vec![timer("r2", "t", 10)],
        runs: vec![run_record("r2", 1)],
        ..Batch::default()
    };
    let err = store.commit(again).await.expect_err("duplicate input");
    assert!(matches!(&err, Error::DuplicateInput(id) if id == "in-a"), "{err:?}");
    assert!(store.inputs_seen(&["in-b".into()]).await.expect("seen").is_empty());
    assert_eq!(store.stream_version("r2").await.expect("version"), 0);
    assert!(store.outbox_pending(10).await.expect("outbox").is_empty());
    assert_eq!(store.next_timer_at(i64::MIN).await.expect("timers"), None);
    assert!(store.get_run("r2").await.expect("run").is_none());

    let twice = Batch { inputs: vec!["in-c".into(), "in-c".into()], ..Batch::default() };
    let err = store.commit(twice).await.expect_err("twice in one batch");
    assert!(matches!(&err, Error::DuplicateInput(id) if id == "in-c"), "{err:?}");
    let seen = store.inputs_seen(&["in-c".into(), "in-a".into()]).await.expect("seen");
    assert_eq!(seen, vec!["in-a"]);
}

/// Pruning forgets processed inputs recorded strictly before the cut, oldest first and at most
/// `limit` per call; later ones stay. A forgotten id can be applied again, a kept one is still a
/// duplicate.
pub async fn prune_processed_inputs_before_the_cut<S: Store>(store: Arc<S>) {
    let applied = |ids: &[&str], at: i64| Batch {
        inputs: ids.iter().map(|id| (*id).to_owned()).collect(),
        inputs_at_ms: at,
        ..Batch::default()
    };
    store.commit(applied(&["old-1", "old-2"], 100)).await.expect("old-1, old-2");
    store.commit(applied(&["old-3"], 200)).await.expect("old-3");
    store.commit(applied(&["at-cut"], 300)).await.expect("at-cut");
    store.commit(applied(&["new"], 400)).await.expect("new");
    let all: Vec<String> = ["old-1", "old-2", "old-3", "at-cut", "new"].map(String::from).to_vec();
    let seen = async || {
        let mut seen = store.inputs_seen(&all).await.expect("seen");
        seen.sort();
        seen
    };

    assert_eq!(store.prune_processed_inputs(300, 0).await.expect("limit 0"), 0);
    assert_eq!(store.prune_processed_inputs(300, 2).await.expect("first call"), 2, "the limit holds");
    assert_eq!(seen().await, ["at-cut", "new", "old-3"], "the oldest go first");
    assert_eq!(store.prune_processed_inputs(300, 2).await.expect("second call"), 1);
    assert_eq!(store.prune_processed_inputs(300, 2).await.expect("third call"), 0, "nothing left before the cut");
    assert_eq!(seen().await, ["at-cut", "new"]);

    store.commit(applied(&["old-1"], 500)).await.expect("a forgotten id applies again");
    let err = store.commit(applied(&["at-cut"], 500)).await.expect_err("a kept id is a duplicate");
    assert!(matches!(&err, Error::DuplicateInput(id) if id == "at-cut"), "{err:?}");
    assert_eq!(store.prune_processed_inputs(450, 10).await.expect("prune"), 2);
    assert_eq!(seen().await, ["old-1"], "a re-applied id carries its new time");
}

/// The same append twice (a batch applied again): the second finds the stream moved on and
/// fails whole, writing nothing, so no event id is ever taken twice.
pub async fn an_append_applied_twice_writes_nothing<S: Store>(store: Arc<S>) {
    store.commit(appends(vec![append("r1", 0, &["e1"])])).await.expect("first");
    let again = Batch {
        appends: vec![append("r2", 0, &["e2"]), append("r1", 0, &["e1"])],
        inputs: vec!["in-1".into()],
        outbox: vec![message("m1")],
        ..Batch::default()
    };
    let err = store.commit(again).await.expect_err("applied twice");
    assert!(matches!(&err, Error::Conflict { run_id, expected: 0, actual: 1 } if run_id == "r1"), "{err:?}");
    assert_eq!(store.stream_version("r2").await.expect("version"), 0);
    assert!(store.inputs_seen(&["in-1".into()]).await.expect("seen").is_empty());
    assert!(store.outbox_pending(10).await.expect("outbox").is_empty());
    assert_eq!(event_count(&*store).await, 1);
    // The failed batch took no positions: the next event follows the first.
    let done = store.commit(appends(vec![append("r2", 0, &["e2"])])).await.expect("retry");
    assert_eq!(done.last_position, 2);
    let ids: Vec<String> = store.read_all(0, 10).await.expect("all").into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["r1:1", "r2:1"]);
}

/// Two appends to one run in a batch chain: the second expects the first's end.
pub async fn chained_appends_in_one_batch<S: Store>(store: Arc<S>) {
    let batch = appends(vec![append("r1", 0, &["e1"]), append("r2", 0, &["e2"]), append("r1", 1, &["e3"])]);
    assert_eq!(store.commit(batch).await.expect("chain").events, 3);
    let stream = store.read_stream("r1", 0).await.expect("read");
    assert_eq!(stream.iter().map(label).collect::<Vec<_>>(), vec!["e1", "e3"]);
    let broken = appends(vec![append("r1", 2, &["e4"]), append("r1", 2, &["e5"])]);
    let err = store.commit(broken).await.expect_err("broken chain");
    assert!(matches!(err, Error::Conflict { expected: 2, actual: 3, .. }), "{err:?}");
    assert_eq!(store.stream_version("r1").await.expect("version"), 2);
}

/// One batch of 100 runs x 5 events, with run index and outbox rows, then a follow-up batch.
pub async fn batch_over_many_runs<S: Store>(store: Arc<S>) {
    let runs: Vec<String> = (0..100).map(|r| format!("run-{r:03}")).collect();
    let batch_for = |from: i64| Batch {
        appends: runs
            .iter()
            .map(|run| {
                let ids: Vec<String> = (from + 1..=from + 5).map(|s| format!("{run}-{s}")).collect();
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                append(run, from, &ids)
            })
            .collect(),
        runs: runs.iter().map(|run| run_record(run, 1)).collect(),
        inputs: runs.iter().map(|run| format!("in-{run}-{from}")).collect(),
        outbox: runs.iter().map(|run| message(&format!("m-{run}-{from}"))).collect(),
        ..Batch::default()
    };
    assert_eq!(store.commit(batch_for(0)).await.expect("big batch"), Committed { last_position: 500, events: 500 });
    assert_eq!(store.commit(batch_for(5)).await.expect("second").last_position, 1000);
    for run in [&runs[0], &runs[57], &runs[99]] {
        let seqs: Vec<i64> = store.read_stream(run, 1).await.expect("read").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    }
    assert_eq!(store.outbox_pending(1000).await.expect("outbox").len(), 200);
    assert_eq!(store.list_runs(&crate::RunFilter::default()).await.expect("runs").len(), 100);
    let ids: Vec<String> = runs.iter().map(|run| format!("in-{run}-5")).collect();
    assert_eq!(store.inputs_seen(&ids).await.expect("seen").len(), 100);
}

/// `read_all` returns events in commit order and pages by position.
pub async fn read_all_orders_and_pages<S: Store>(store: Arc<S>) {
    store.commit(appends(vec![append("b", 0, &["b1"]), append("a", 0, &["a1"])])).await.expect("c1");
    store.commit(appends(vec![append("a", 1, &["a2", "a3"])])).await.expect("c2");
    store.commit(appends(vec![append("c", 0, &["c1"]), append("b", 1, &["b2"])])).await.expect("c3");

    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, 2).await.expect("page");
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = last.position;
        ids.extend(page.iter().map(|e| label(e).to_owned()));
    }
    assert_eq!(ids, vec!["b1", "a1", "a2", "a3", "c1", "b2"]);
    assert!(store.read_all(6, 10).await.expect("past the end").is_empty());
    let tail: Vec<i64> = store.read_all(4, 10).await.expect("tail").iter().map(|e| e.position).collect();
    assert_eq!(tail, vec![5, 6]);
    assert!(store.read_all(0, 0).await.expect("limit 0").is_empty());
}

/// `read_streams` reads several whole streams at once: runs in the order asked (a repeat read
/// once, an unknown run empty), each in `seq` order, the same events `read_stream` returns.
pub async fn read_streams_of_several_runs<S: Store>(store: Arc<S>) {
    store.commit(appends(vec![append("a", 0, &["a1", "a2"]), append("b", 0, &["b1"])])).await.expect("c1");
    store.commit(appends(vec![append("c", 0, &["c1"]), append("a", 2, &["a3"])])).await.expect("c2");
    let asked: Vec<String> = ["b", "unknown", "a", "b"].iter().map(|id| id.to_string()).collect();
    let read = store.read_streams(&asked).await.expect("read_streams");
    let ids: Vec<(&str, i64, &str, &str)> =
        read.iter().map(|e| (e.run_id.as_str(), e.seq, e.id.as_str(), label(e))).collect();
    let want = [("b", 1, "b:1", "b1"), ("a", 1, "a:1", "a1"), ("a", 2, "a:2", "a2"), ("a", 3, "a:3", "a3")];
    assert_eq!(ids, want);
    let mut one_by_one = store.read_stream("b", 1).await.expect("b");
    one_by_one.extend(store.read_stream("a", 1).await.expect("a"));
    assert_eq!(read, one_by_one, "the same events, payloads and positions as read_stream");
    assert!(store.read_streams(&[]).await.expect("nothing asked").is_empty());
}
