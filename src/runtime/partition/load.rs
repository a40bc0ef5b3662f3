//! Loading a run's state: from the cache, or folded from its stored events.

use capstan_engine::run::{Event, Input, RunState, RunStatus};
use capstan_store::StoredEvent;

use super::{Partition, Work};
use crate::runtime::Shared;
use crate::runtime::codec;
use crate::runtime::error::RuntimeError;

impl Partition {
    /// The run's state: from the cache, or folded from its stream (`stored` when the caller
    /// read it already); a new one for `Start`.
    pub(super) async fn load(
        &mut self,
        run_id: &str,
        input: &Input,
        stored: Option<Vec<StoredEvent>>,
    ) -> Result<Work, RuntimeError> {
        if let Some(c) = self.cache.take(run_id) {
            return Ok(Work {
                state: c.state,
                base_version: c.version,
                created_at_ms: c.created_at_ms,
                status: c.status,
                index_dirty: false,
                events: Vec::new(),
            });
        }
        let stored = match stored {
            Some(stored) => stored,
            None => self.shared.store.read_stream(run_id, 1).await?,
        };
        let Some(first) = stored.first() else {
            return match input {
                Input::Start { meta, .. } => {
                    let (definition, _) = self
                        .shared
                        .registry
                        .get(&meta.project, Some(&meta.definition), Some(i64::from(meta.definition_version)))
                        .await?;
                    Ok(Work {
                        state: RunState::new(definition),
                        base_version: 0,
                        created_at_ms: 0,
                        status: "running",
                        index_dirty: false,
                        events: Vec::new(),
                    })
                }
                _ => Err(RuntimeError::NotFound(format!("run {run_id}"))),
            };
        };
        let (state, status) = fold(&self.shared, run_id, &stored).await?;
        Ok(Work {
            state,
            base_version: stored.len() as i64,
            created_at_ms: first.recorded_at_ms,
            status,
            index_dirty: false,
            events: Vec::new(),
        })
    }
}

/// A run's state and index status folded from its whole stream (`stored`, not empty).
pub(in crate::runtime) async fn fold(
    shared: &Shared,
    run_id: &str,
    stored: &[StoredEvent],
) -> Result<(RunState, &'static str), RuntimeError> {
    let first = stored.first().ok_or_else(|| RuntimeError::NotFound(format!("run {run_id}")))?;
    let Event::RunStarted { meta, .. } = codec::decode_event(first)? else {
        return Err(RuntimeError::NotFound(format!("the start of run {run_id}")));
    };
    let (definition, _) =
        shared.registry.get(&meta.project, Some(&meta.definition), Some(i64::from(meta.definition_version))).await?;
    let mut state = RunState::new(definition);
    let mut status = "running";
    for s in stored {
        let event = codec::decode_event(s)?;
        status = match &event {
            Event::RunQueued { .. } => "queued",
            Event::RunAdmitted { .. } => "running",
            Event::RunPaused { .. } => "paused",
            Event::RunResumed { .. } => "running",
            Event::RunFinished { status: RunStatus::Finished, .. } => "finished",
            Event::RunFinished { status: RunStatus::Cancelled, .. } => "cancelled",
            _ => status,
        };
        state.evolve(&event);
    }
    Ok((state, status))
}
