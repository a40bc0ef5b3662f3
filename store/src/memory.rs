//! [`MemoryStore`]: the whole store in process memory, for engine and runtime tests.
//!
//! One `std::sync::Mutex` guards everything; no lock is held across an `.await`, so a plain mutex
//! is both correct and cheaper than an async one. A commit validates the whole batch before it
//! changes anything, which makes it atomic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::plan::Plan;
use crate::{
    Batch, CommitLog, Committed, DefinitionRecord, Definitions, Error, EvaluationRecord, Evaluations, EventReader,
    Outbox, OutboxMessage, OutboxRow, Position, Result, RunFilter, RunIndex, RunRecord, StoredEvent, TimerRow, Timers,
};

/// An in-memory [`Store`](crate::Store). Cheap to create; everything is lost on drop.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// All events in position order; `events[i].position == i + 1`.
    events: Vec<StoredEvent>,
    /// Per run, the indexes into `events` of its stream, in seq order.
    streams: HashMap<String, Vec<usize>>,
    /// Processed input ids with the time of their commit.
    inputs: HashMap<String, i64>,
    runs: HashMap<String, RunRecord>,
    outbox: BTreeMap<i64, OutboxMessage>,
    last_outbox_seq: i64,
    timers: BTreeMap<(String, String), TimerRow>,
    timer_checkpoints: BTreeMap<String, Position>,
    /// Evaluation results in commit order, unique by `(run_id, task)`.
    evaluations: Vec<EvaluationRecord>,
    /// Per `(project, name)`, the versions in order.
    definitions: BTreeMap<(String, String), Vec<DefinitionRecord>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied batch (batches are validated
        // before any change), so a poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn version(&self, run_id: &str) -> i64 {
        self.streams.get(run_id).map_or(0, |s| s.len() as i64)
    }
}

#[async_trait]
impl CommitLog for MemoryStore {
    async fn commit(&self, batch: Batch) -> Result<Committed> {
        let plan = Plan::new(batch)?;
        let mut inner = self.lock();
        if let Some(id) = plan.inputs.iter().find(|id| inner.inputs.contains_key(*id)) {
            return Err(Error::DuplicateInput(id.clone()));
        }
        let current: HashMap<String, i64> =
            plan.append_run_ids().into_iter().map(|r| (r.clone(), inner.version(&r))).collect();
        let sequenced = plan.sequence(&current)?;

        // Everything is checked: from here on nothing can fail.
        let mut last_position = 0;
        for s in &sequenced {
            let position = inner.events.len() as Position + 1;
            let index = inner.events.len();
            inner.events.push(StoredEvent {
                position,
                run_id: s.run_id.to_owned(),
                seq: s.seq,
                id: crate::event_id(s.run_id, s.seq),
                kind: s.event.kind.clone(),
                payload: s.event.payload.to_value(),
                recorded_at_ms: s.event.recorded_at_ms,
            });
            inner.streams.entry(s.run_id.to_owned()).or_default().push(index);
            last_position = position;
        }
        let events = sequenced.len();
        drop(sequenced);
        let inputs_at_ms = plan.inputs_at_ms;
        inner.inputs.extend(plan.inputs.into_iter().map(|id| (id, inputs_at_ms)));
        for run in plan.runs {
            inner.runs.insert(run.run_id.clone(), run);
        }
        for message in plan.outbox {
            inner.last_outbox_seq += 1;
            let seq = inner.last_outbox_seq;
            inner.outbox.insert(seq, message);
        }
        for cancel in plan.cancel_timers {
            let key = (cancel.run_id, cancel.key);
            let matches = match (inner.timers.get(&key), cancel.only_if_fire_at) {
                (Some(timer), Some(at)) => timer.fire_at_ms == at,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if matches {
                inner.timers.remove(&key);
            }
        }
        for timer in plan.set_timers {
            inner.timers.insert((timer.run_id.clone(), timer.key.clone()), timer);
        }
        for e in plan.evaluations {
            if !inner.evaluations.iter().any(|x| x.run_id == e.run_id && x.task == e.task) {
                inner.evaluations.push(e);
            }
        }
        Ok(Committed { last_position, events })
    }

    async fn prune_processed_inputs(&self, before_ms: i64, limit: usize) -> Result<u64> {
        let mut inner = self.lock();
        let mut old: Vec<(i64, &str)> =
            inner.inputs.iter().filter(|(_, at)| **at < before_ms).map(|(id, at)| (*at, id.as_str())).collect();
        old.sort_unstable();
        old.truncate(limit);
        let old: Vec<String> = old.into_iter().map(|(_, id)| id.to_owned()).collect();
        for id in &old {
            inner.inputs.remove(id);
        }
        Ok(old.len() as u64)
    }
}

#[async_trait]
impl EventReader for MemoryStore {
    async fn read_stream(&self, run_id: &str, from_seq: i64) -> Result<Vec<StoredEvent>> {
        let inner = self.lock();
        let Some(stream) = inner.streams.get(run_id) else {
            return Ok(Vec::new());
        };
        Ok(stream.iter().map(|&i| &inner.events[i]).filter(|e| e.seq >= from_seq).cloned().collect())
    }

    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<StoredEvent>> {
        let inner = self.lock();
        // Positions are 1-based indexes into `events`, so `after` is the first index to return.
        let start = usize::try_from(after.max(0)).unwrap_or(usize::MAX).min(inner.events.len());
        Ok(inner.events[start..].iter().take(limit).cloned().collect())
    }

    async fn stream_version(&self, run_id: &str) -> Result<i64> {
        Ok(self.lock().version(run_id))
    }

    async fn inputs_seen(&self, ids: &[String]) -> Result<Vec<String>> {
        let inner = self.lock();
        Ok(ids.iter().filter(|id| inner.inputs.contains_key(*id)).cloned().collect())
    }

    async fn last_position(&self) -> Result<Position> {
        Ok(self.lock().events.len() as Position)
    }
}

#[async_trait]
impl Outbox for MemoryStore {
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let inner = self.lock();
        Ok(inner.outbox.iter().take(limit).map(|(&seq, message)| OutboxRow { seq, message: message.clone() }).collect())
    }

    async fn outbox_delete(&self, seqs: &[i64]) -> Result<()> {
        let mut inner = self.lock();
        for seq in seqs {
            inner.outbox.remove(seq);
        }
        Ok(())
    }
}

#[async_trait]
impl Timers for MemoryStore {
    async fn timers_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TimerRow>> {
        let inner = self.lock();
        let mut due: Vec<TimerRow> = inner.timers.values().filter(|t| t.fire_at_ms <= now_ms).cloned().collect();
        due.sort_by(|a, b| (a.fire_at_ms, &a.run_id, &a.key).cmp(&(b.fire_at_ms, &b.run_id, &b.key)));
        due.truncate(limit);
        Ok(due)
    }

    async fn next_timer_at(&self, after_ms: i64) -> Result<Option<i64>> {
        Ok(self.lock().timers.values().map(|t| t.fire_at_ms).filter(|at| *at > after_ms).min())
    }

    async fn timer_checkpoints(&self) -> Result<Vec<(String, Position)>> {
        Ok(self.lock().timer_checkpoints.iter().map(|(name, at)| (name.clone(), *at)).collect())
    }

    async fn set_timer_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.lock().timer_checkpoints.insert(name.to_string(), position);
        Ok(())
    }
}

/// Whether a run passes the filter's equality conditions and cursor.
fn matches(run: &RunRecord, f: &RunFilter) -> bool {
    let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
    eq(&f.project, &run.project)
        && eq(&f.stage, &run.stage)
        && eq(&f.sequence, &run.sequence)
        && f.service.as_deref().is_none_or(|w| run.service.as_deref() == Some(w))
        && eq(&f.status, &run.status)
        && eq(&f.context_id, &run.context_id)
        && f.before
            .as_ref()
            .is_none_or(|(at, id)| run.created_at_ms < *at || (run.created_at_ms == *at && run.run_id < *id))
}

#[async_trait]
impl RunIndex for MemoryStore {
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        Ok(self.lock().runs.get(run_id).cloned())
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        let inner = self.lock();
        let mut runs: Vec<RunRecord> = inner.runs.values().filter(|r| matches(r, filter)).cloned().collect();
        runs.sort_by(|a, b| (b.created_at_ms, &b.run_id).cmp(&(a.created_at_ms, &a.run_id)));
        if filter.limit > 0 {
            runs.truncate(filter.limit);
        }
        Ok(runs)
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
        let inner = self.lock();
        let mut runs: Vec<RunRecord> = inner.runs.values().filter(|r| !r.is_over()).cloned().collect();
        runs.sort_by(|a, b| (a.created_at_ms, &a.run_id).cmp(&(b.created_at_ms, &b.run_id)));
        Ok(runs)
    }
}

#[async_trait]
impl Definitions for MemoryStore {
    async fn put_definition(&self, project: &str, name: &str, source: &str, now_ms: i64) -> Result<i64> {
        let mut inner = self.lock();
        let versions = inner.definitions.entry((project.to_owned(), name.to_owned())).or_default();
        if let Some(latest) = versions.last()
            && latest.source == source
        {
            return Ok(latest.version);
        }
        let version = versions.last().map_or(1, |d| d.version + 1);
        versions.push(DefinitionRecord {
            project: project.to_owned(),
            name: name.to_owned(),
            version,
            source: source.to_owned(),
            created_at_ms: now_ms,
        });
        Ok(version)
    }

    async fn get_definition(
        &self,
        project: &str,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<DefinitionRecord>> {
        let inner = self.lock();
        let Some(versions) = inner.definitions.get(&(project.to_owned(), name.to_owned())) else {
            return Ok(None);
        };
        Ok(match version {
            Some(v) => versions.iter().find(|d| d.version == v).cloned(),
            None => versions.last().cloned(),
        })
    }

    async fn list_definitions(&self, project: &str) -> Result<Vec<DefinitionRecord>> {
        let inner = self.lock();
        Ok(inner
            .definitions
            .iter()
            .filter(|((p, _), _)| p == project)
            .filter_map(|(_, versions)| versions.last().cloned())
            .collect())
    }
}

#[async_trait]
impl Evaluations for MemoryStore {
    async fn recent_evaluations(
        &self,
        project: &str,
        stage: &str,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EvaluationRecord>> {
        let inner = self.lock();
        Ok(inner
            .evaluations
            .iter()
            .rev()
            .filter(|e| e.project == project && e.stage == stage && e.service.as_deref() == service)
            .take(limit)
            .cloned()
            .collect())
    }
}
