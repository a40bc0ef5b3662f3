//! At start, before any partition runs: sets again the timers a crash may have lost.
//!
//! Partitions keep short-lived timers in memory (`partition/deferred.rs`) and record, per
//! partition, a checkpoint: the event position up to which every timer they set is in the
//! store. A timer is kept in memory only when the commit that set it appended events to its
//! run, so every run whose timers a crash may have lost has events after the lowest checkpoint.
//! This reads those events, folds each such run that is not over, and writes the timers the
//! engine derives from its state (`RunState::derived_timers`). A timer already in the store is
//! written again at the same time (a re-offer: now); one the run no longer relies on is moot
//! when it fires. Then every checkpoint moves to the end of the log.
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

/// Derives the timers lost since the lowest checkpoint, then moves every checkpoint (those of
/// `names` and any left by another partitioning) to the end of the log, which it returns.
pub async fn derive_lost_timers(shared: &Shared, names: &[String]) -> Result<Position, RuntimeError> {
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
    let mut derived = 0;
    for chunk in runs.chunks(RUNS_PER_COMMIT) {
        let events = store.read_streams(chunk).await?;
        let mut batch = Batch::default();
        for stream in events.chunk_by(|a, b| a.run_id == b.run_id) {
            let run_id = &stream[0].run_id;
            // A run that cannot be folded (unreadable events, a definition gone) is refused at its
            // next input too; it must not keep the others from starting. A store that fails
            // stops the start: it is retried, not skipped.
            let state = match partition::fold(shared, run_id, stream).await {
                Ok((state, _)) => state,
                Err(e @ RuntimeError::Store(_)) => return Err(e),
                Err(e) => {
                    warn!(%run_id, error = %e, "cannot fold the run to derive its timers");
                    continue;
                }
            };
            for (kind, at) in state.derived_timers(Timestamp(now_ms as u64)) {
                batch.set_timers.push(codec::engine_timer_row(run_id, &kind, at));
            }
        }
        derived += batch.set_timers.len();
        if !batch.set_timers.is_empty() {
            store.commit(batch).await?;
        }
    }
    if !runs.is_empty() {
        info!(
            from,
            to = end,
            runs = runs.len(),
            timers = derived,
            "derived the timers of the runs since the checkpoint"
        );
    }
    let stale = checkpoints.into_iter().map(|(name, _)| name);
    let all: HashSet<String> = names.iter().cloned().chain(stale).collect();
    for name in all {
        store.set_timer_checkpoint(&name, end).await?;
    }
    Ok(end)
}
