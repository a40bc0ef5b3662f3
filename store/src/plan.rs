//! Backend-independent preparation of a [`Batch`]: validation, de-duplication and sequencing.
//!
//! Every backend runs a commit through the same steps so that they fail the same way:
//! 1. [`Plan::new`] rejects a batch that contradicts itself (an input id twice, a bad version);
//! 2. the backend records the inputs (an id already seen -> `DuplicateInput`);
//! 3. [`Plan::sequence`] checks expected versions against the current ones (`Conflict`);
//! 4. the backend inserts the events at the seqs the check allowed, so their ids
//!    ([`crate::event_id`]) are new by construction;
//! 5. the rest is written: run index upserts, outbox rows, timer cancels, then timer sets.
//!
//! Timer cancels are applied before timer sets, so a batch that cancels a timer and sets it again
//! (for example a task that finished and a retry that started in the same group commit) keeps the
//! new timer: a lost timer could leave a task hanging, a stale one is ignored by the engine.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::BTreeMap;

use crate::{
    Batch, Error, EvaluationRecord, NewEvent, OutboxMessage, Result, RunRecord, StreamAppend, TimerCancel, TimerRow,
};

/// A validated batch, ready for any backend to write.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The appends, in batch order (several appends to one run chain their versions).
    pub appends: Vec<StreamAppend>,
    /// Run index upserts, one per run (the last one in the batch wins), sorted by run id so
    /// concurrent writers lock rows in the same order.
    pub runs: Vec<RunRecord>,
    /// Input ids, in batch order.
    pub inputs: Vec<String>,
    /// When the inputs were applied (ms since the epoch).
    pub inputs_at_ms: i64,
    /// Outbox messages, in batch order.
    pub outbox: Vec<OutboxMessage>,
    /// Timer sets, one per `(run_id, key)` (the last wins), sorted by key.
    pub set_timers: Vec<TimerRow>,
    /// Timer cancels, sorted by key.
    pub cancel_timers: Vec<TimerCancel>,
    /// Evaluation results, one per `(run_id, task)` (the first wins).
    pub evaluations: Vec<EvaluationRecord>,
}

/// One event to insert, with its place in its stream.
#[derive(Debug)]
pub(crate) struct Sequenced<'a> {
    pub run_id: &'a str,
    pub seq: i64,
    pub event: &'a NewEvent,
}

impl Plan {
    /// Validates the batch on its own, before touching any storage.
    pub fn new(batch: Batch) -> Result<Self> {
        let mut inputs_seen = HashSet::new();
        for id in &batch.inputs {
            if !inputs_seen.insert(id.as_str()) {
                return Err(Error::DuplicateInput(id.clone()));
            }
        }
        for append in &batch.appends {
            if append.run_id.is_empty() {
                return Err(Error::Invalid("an append has an empty run id".into()));
            }
            if append.expected_version < 0 {
                return Err(Error::Invalid(format!(
                    "run {}: negative expected version {}",
                    append.run_id, append.expected_version
                )));
            }
        }
        let runs: BTreeMap<String, RunRecord> = batch.runs.into_iter().map(|r| (r.run_id.clone(), r)).collect();
        let set_timers: BTreeMap<(String, String), TimerRow> =
            batch.set_timers.into_iter().map(|t| ((t.run_id.clone(), t.key.clone()), t)).collect();
        let mut seen_evaluations = HashSet::new();
        let evaluations = batch
            .evaluations
            .into_iter()
            .filter(|e| seen_evaluations.insert((e.run_id.clone(), e.task.clone())))
            .collect();
        let mut cancel_timers = batch.cancel_timers;
        cancel_timers.sort_by(|a, b| (&a.run_id, &a.key).cmp(&(&b.run_id, &b.key)));
        Ok(Plan {
            appends: batch.appends,
            runs: runs.into_values().collect(),
            inputs: batch.inputs,
            inputs_at_ms: batch.inputs_at_ms,
            outbox: batch.outbox,
            set_timers: set_timers.into_values().collect(),
            cancel_timers,
            evaluations,
        })
    }

    /// How many events the batch appends.
    pub fn event_count(&self) -> usize {
        self.appends.iter().map(|a| a.events.len()).sum()
    }

    /// The first append to each run, in batch order (later ones to the same run chain from it).
    fn first_appends(&self) -> impl Iterator<Item = &StreamAppend> {
        let mut seen = HashSet::new();
        self.appends.iter().filter(move |a| seen.insert(a.run_id.as_str()))
    }

    /// The distinct run ids the batch appends to, in first-seen order.
    pub fn append_run_ids(&self) -> Vec<String> {
        self.first_appends().map(|a| a.run_id.clone()).collect()
    }

    /// Each run's expected version at its first append, in first-seen order: what the stored
    /// version must be for the whole batch to apply (later appends to a run chain from it).
    #[cfg(feature = "postgres")]
    pub fn first_expected_versions(&self) -> Vec<(String, i64)> {
        self.first_appends().map(|a| (a.run_id.clone(), a.expected_version)).collect()
    }

    /// Checks every expected version against `current` (a run missing there has version 0) and
    /// numbers the events. Appends to the same run chain: the second expects the first's end.
    pub fn sequence<S: std::hash::BuildHasher>(
        &self,
        current: &std::collections::HashMap<String, i64, S>,
    ) -> Result<Vec<Sequenced<'_>>> {
        let mut versions: HashMap<&str, i64> = HashMap::new();
        let mut out = Vec::with_capacity(self.event_count());
        for append in &self.appends {
            let run_id = append.run_id.as_str();
            let actual = *versions.entry(run_id).or_insert_with(|| current.get(run_id).copied().unwrap_or(0));
            if actual != append.expected_version {
                return Err(Error::Conflict {
                    run_id: append.run_id.clone(),
                    expected: append.expected_version,
                    actual,
                });
            }
            for (i, event) in append.events.iter().enumerate() {
                out.push(Sequenced { run_id, seq: actual + 1 + i as i64, event });
            }
            versions.insert(run_id, actual + append.events.len() as i64);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RawJson;
    use serde_json::json;

    fn event(label: &str) -> NewEvent {
        NewEvent { kind: "k".into(), payload: RawJson::from_value(&json!(label)), recorded_at_ms: 1 }
    }

    fn append(run: &str, expected: i64, ids: &[&str]) -> StreamAppend {
        StreamAppend {
            run_id: run.into(),
            expected_version: expected,
            events: ids.iter().map(|id| event(id)).collect(),
        }
    }

    #[test]
    fn chained_appends_to_one_run_number_on() {
        let batch = Batch { appends: vec![append("r", 2, &["a", "b"]), append("r", 4, &["c"])], ..Batch::default() };
        let plan = Plan::new(batch).expect("valid");
        let current = std::collections::HashMap::from([("r".to_owned(), 2)]);
        let seqs: Vec<i64> = plan.sequence(&current).expect("no conflict").iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
    }

    #[test]
    fn in_batch_duplicates_and_bad_versions_are_rejected() {
        let dup_input = Batch { inputs: vec!["i".into(), "i".into()], ..Batch::default() };
        assert!(matches!(Plan::new(dup_input), Err(Error::DuplicateInput(id)) if id == "i"));
        let negative = Batch { appends: vec![append("r", -1, &["e"])], ..Batch::default() };
        assert!(matches!(Plan::new(negative), Err(Error::Invalid(_))));
    }

    #[test]
    fn last_upsert_of_a_run_or_timer_wins() {
        let run = |status: &str| RunRecord {
            run_id: "r".into(),
            project: "p".into(),
            context_id: "c".into(),
            stage: "s".into(),
            sequence: "q".into(),
            service: None,
            definition: "d".into(),
            definition_version: 1,
            status: status.into(),
            result: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        let batch = Batch { runs: vec![run("running"), run("finished")], ..Batch::default() };
        let plan = Plan::new(batch).expect("valid");
        assert_eq!(plan.runs.len(), 1);
        assert_eq!(plan.runs[0].status, "finished");
    }
}
