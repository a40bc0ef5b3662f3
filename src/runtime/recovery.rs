//! At start, before any partition runs: sets again the timers a crash may have lost, and sends
//! again the awards and notifications it may have kept from the broker.
//!
//! Partitions keep short-lived timers in memory (`partition/deferred.rs`) and record, per
//! partition, a checkpoint: the event position up to which every timer they set is in the
//! store. A timer is kept in memory only when the commit that set it appended events to its
//! run, so every run whose timers a crash may have lost has events after the lowest checkpoint.
//! This reads those events, folds each such run, and writes the timers the engine derives from
//! the state of each one that is not over (`RunState::derived_timers`). A timer already in the store is
//! written again at the same time (a re-offer: now); one the run no longer relies on is moot
//! when it fires.
//!
//! Awards and notifications are published after the commit without an outbox row, and a
//! partition's checkpoint passes a commit only once the relay published its messages. So the
//! same runs hold every such message a crash may have lost: this publishes again the ones each
//! state relies on (`RunState::derived_messages`: awards to holders that have neither started
//! nor ended, the notification of a run that ended), under their original ids. A worker
//! already running the attempt, or done with it, knows the award by its token. Then every
//! checkpoint moves to the end of the log.
//!
//! The work is bounded by what partitions keep in memory: about a second of commits.

use std::collections::HashSet;

use capstan_engine::Timestamp;
use capstan_store::{Batch, Position};
use tracing::{info, warn};

use super::error::RuntimeError;
use super::{Shared, codec, partition};

/// Events read per page, and runs folded per commit.
const PAGE: usize = 1_000;
const RUNS_PER_COMMIT: usize = 256;

/// Derives the timers and messages lost since the lowest checkpoint, then moves every
/// checkpoint (those of `names` and any left by another partitioning) to the end of the log,
/// which it returns. A store or broker that fails stops the start.
pub async fn derive_lost(shared: &Shared, names: &[String]) -> Result<Position, RuntimeError> {
    let store = &shared.store;
    let checkpoints = store.timer_checkpoints().await?;
    let end = store.last_position().await?;
    // No checkpoint: a new store, or one written by a version that kept no timer in memory.
    let from = checkpoints.iter().map(|(_, at)| *at).min().unwrap_or(end);
    let mut runs: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut after = from;
    while after < end {
        let page = store.read_all(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        runs.extend(page.into_iter().filter(|e| seen.insert(e.run_id.clone())).map(|e| e.run_id));
    }
    let now_ms = shared.clock.now_ms();
    let time = codec::rfc3339(now_ms);
    let mut derived = 0;
    let mut sent = 0;
    for chunk in runs.chunks(RUNS_PER_COMMIT) {
        let events = store.read_streams(chunk).await?;
        let mut batch = Batch::default();
        let mut messages = Vec::new();
        for stream in events.chunk_by(|a, b| a.run_id == b.run_id) {
            let run_id = &stream[0].run_id;
            // A run that cannot be folded (unreadable events, a definition gone) is refused at its
            // next input too; it must not keep the others from starting. A store that fails
            // stops the start: it is retried, not skipped.
            let state = match partition::fold(shared, run_id, stream).await {
                Ok((state, _)) => state,
                Err(e @ RuntimeError::Store(_)) => return Err(e),
                Err(e) => {
                    warn!(%run_id, error = %e, "cannot fold the run to derive its timers and messages");
                    continue;
                }
            };
            for (kind, at) in state.derived_timers(Timestamp(now_ms as u64)) {
                batch.set_timers.push(codec::engine_timer_row(run_id, &kind, at));
            }
            messages.extend(codec::derived_messages(&state, &time));
        }
        derived += batch.set_timers.len();
        if !batch.set_timers.is_empty() {
            store.commit(batch).await?;
        }
        sent += messages.len();
        if !messages.is_empty() {
            shared.broker.publish(std::mem::take(&mut messages)).await?;
        }
    }
    if !runs.is_empty() {
        info!(
            from,
            to = end,
            runs = runs.len(),
            timers = derived,
            messages = sent,
            "derived the timers and messages of the runs since the checkpoint"
        );
    }
    let stale = checkpoints.into_iter().map(|(name, _)| name);
    let all: HashSet<String> = names.iter().cloned().chain(stale).collect();
    for name in all {
        store.set_timer_checkpoint(&name, end).await?;
    }
    Ok(end)
}
