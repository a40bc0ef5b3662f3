//! The one conformance suite every [`Store`] backend must pass.
//!
//! Each case is a public `async fn case<S: Store>(store: Arc<S>)` that panics on a violation and
//! expects a fresh, empty store. Two ways to run them:
//! - [`store_conformance!`](crate::store_conformance) generates one `#[tokio::test]` per case,
//!   given a runner `async fn run(case: impl FnOnce(Arc<S>) -> CaseFuture)` that makes the store,
//!   runs the case and cleans up (see `store/src/conformance.rs` for the three backends);
//! - [`suite`] runs every case in turn, each on a store from `make`.
//!
//! Available in this crate's tests and, with the `testing` feature, to other crates.

mod streams;
mod tables;

use crate::RawJson;
use serde_json::json;
use std::future::Future;
use std::pin::Pin;

pub use streams::*;
pub use tables::*;

use crate::{
    Batch, EvaluationRecord, NewEvent, OutboxMessage, RunRecord, Store, StoredEvent, StreamAppend, TimerCancel,
    TimerRow,
};

/// A boxed conformance case, as handed to a runner.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Generates one `#[tokio::test]` per conformance case, each calling `$run` with the case.
///
/// `$run` is an async fn taking `impl FnOnce(Arc<S>) -> CaseFuture`; it owns the store's
/// lifecycle (fresh store before, cleanup after, even when the case panics).
#[macro_export]
macro_rules! store_conformance {
    ($run:path) => {
        $crate::__store_cases!(tests($run));
    };
}

/// The list of cases, expanded as tests or as the body of [`suite`]. Not public API.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_cases {
    ($mode:ident $arg:tt) => {
        $crate::__store_cases!(@go $mode $arg;
            append_and_read_back,
            empty_and_eventless_batches,
            conflict_writes_nothing,
            concurrent_appends_one_wins,
            concurrent_commits_keep_positions_dense,
            duplicate_input_writes_nothing,
            prune_processed_inputs_before_the_cut,
            an_append_applied_twice_writes_nothing,
            chained_appends_in_one_batch,
            batch_over_many_runs,
            read_all_orders_and_pages,
            read_streams_of_several_runs,
            outbox_pending_and_delete,
            timers_upsert_and_replace,
            timers_cancel_with_and_without_guard,
            timers_due_order_and_next,
            timer_checkpoints_and_last_position,
            run_index_upsert_and_get,
            run_index_filters_and_paging,
            unfinished_runs_oldest_first,
            definitions_versioning,
            evaluations_newest_first_per_lane
        );
    };
    (@go tests ($run:path); $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $run(|store| -> $crate::testing::CaseFuture {
                    ::std::boxed::Box::pin($crate::testing::$case(store))
                })
                .await;
            }
        )+
    };
    (@go suite ($make:ident); $($case:ident),+) => {
        $(
            $crate::testing::$case(::std::sync::Arc::new($make().await)).await;
        )+
    };
}

/// Runs every conformance case in turn, each on a fresh store from `make`.
pub async fn suite<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    crate::__store_cases!(suite(make));
}

/// An event with a small JSON payload holding `label`, by which a case tells events apart.
pub fn event(label: &str) -> NewEvent {
    NewEvent {
        kind: "capstan.test".to_owned(),
        payload: RawJson::from_value(&json!({ "label": label, "nested": { "n": 1, "list": [1, "two", null] } })),
        recorded_at_ms: 1_700_000_000_000,
    }
}

/// The label of an event made by [`event`].
pub fn label(event: &StoredEvent) -> &str {
    event.payload["label"].as_str().unwrap_or_default()
}

/// An append of events with the given labels.
pub fn append(run_id: &str, expected_version: i64, labels: &[&str]) -> StreamAppend {
    StreamAppend {
        run_id: run_id.to_owned(),
        expected_version,
        events: labels.iter().map(|label| event(label)).collect(),
    }
}

/// A batch holding only these appends.
pub fn appends(appends: Vec<StreamAppend>) -> Batch {
    Batch { appends, ..Batch::default() }
}

/// A running run record in project `p`, stage `dev`, created at `created_at_ms`.
pub fn run_record(run_id: &str, created_at_ms: i64) -> RunRecord {
    RunRecord {
        run_id: run_id.to_owned(),
        project: "p".to_owned(),
        context_id: format!("ctx-{run_id}"),
        stage: "dev".to_owned(),
        sequence: "delivery".to_owned(),
        service: Some("checkout".to_owned()),
        definition: "shipyard".to_owned(),
        definition_version: 1,
        status: "running".to_owned(),
        result: None,
        created_at_ms,
        updated_at_ms: created_at_ms,
    }
}

/// An outbox message whose payload includes bytes that are not UTF-8.
pub fn message(id: &str) -> OutboxMessage {
    let mut payload = format!("{{\"id\":\"{id}\"}}").into_bytes();
    payload.extend_from_slice(&[0, 0xff, 0xfe]);
    OutboxMessage { id: id.to_owned(), topic: "capstan.events".to_owned(), key: "run".to_owned(), payload }
}

/// A timer.
pub fn timer(run_id: &str, key: &str, fire_at_ms: i64) -> TimerRow {
    TimerRow {
        run_id: run_id.to_owned(),
        key: key.to_owned(),
        fire_at_ms,
        payload: json!({ "key": key, "at": fire_at_ms }),
    }
}

/// A timer cancel, guarded by `only_if_fire_at` when given.
pub fn cancel(run_id: &str, key: &str, only_if_fire_at: Option<i64>) -> TimerCancel {
    TimerCancel { run_id: run_id.to_owned(), key: key.to_owned(), only_if_fire_at }
}

/// An evaluation result of run `run_id`'s task `task` in project `p`, stage `dev`.
pub fn evaluation(run_id: &str, task: &str, service: &str, at: i64) -> EvaluationRecord {
    EvaluationRecord {
        run_id: run_id.to_owned(),
        task: task.to_owned(),
        project: "p".to_owned(),
        stage: "dev".to_owned(),
        service: Some(service.to_owned()).filter(|s| !s.is_empty()),
        result: if at % 2 == 0 { "pass" } else { "fail" }.to_owned(),
        score: Some(at as f64),
        evaluation: json!({ "score": at, "values": { "p90": at * 10 } }),
        created_at_ms: at,
    }
}
