//! Lanes: at most one run per project, stage and service at a time, later ones FIFO.
//!
//! The engine starts a run with a service queued (`RunQueued`); this service admits it
//! (`Input::Admit`) once no other run of its lane is running or paused. It is a single task, so
//! admissions never race, and it keeps no state of its own that the store does not hold: at start
//! it rebuilds every lane from the run index (runs `running` or `paused` hold their lane, runs
//! `queued` wait in creation order), then follows what the partitions commit. A crash between a
//! run's end and the next admission is repaired by that rebuild; `Admit` is idempotent, so an
//! admission repeated after a crash changes nothing.
//!
//! Paused runs keep their lane: a queued run never starts beside a paused one's running task
//! (keptn/keptn#5259).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use capstan_engine::run::Input;
use capstan_store::RunRecord;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{Envelope, Reply, Router, Shared};

/// A lane: project, stage and service.
pub type LaneKey = (String, String, String);

/// What a partition tells the lane service after a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneNote {
    /// The run started queued in its lane.
    Queued { lane: LaneKey, run_id: String },
    /// The run ended (finished or cancelled), queued or not.
    Ended { lane: LaneKey, run_id: String },
}

/// The lanes as the service sees them: who holds each one and who waits.
#[derive(Debug, Default)]
pub struct Lanes {
    lanes: HashMap<LaneKey, Lane>,
}

#[derive(Debug, Default)]
struct Lane {
    /// Runs holding the lane (one, except for runs started before lanes existed).
    holders: HashSet<String>,
    /// Runs waiting, oldest first.
    queue: VecDeque<String>,
}

impl Lanes {
    /// Rebuilds the lanes from unfinished runs (oldest first). Returns the runs to admit now.
    pub fn rebuild(runs: &[RunRecord]) -> (Self, Vec<String>) {
        let mut lanes = Lanes::default();
        for r in runs {
            let Some(key) = lane_of(r) else { continue };
            let lane = lanes.lanes.entry(key).or_default();
            match r.status.as_str() {
                "queued" => lane.queue.push_back(r.run_id.clone()),
                "running" | "paused" => {
                    lane.holders.insert(r.run_id.clone());
                }
                _ => {}
            }
        }
        let keys: Vec<LaneKey> = lanes.lanes.keys().cloned().collect();
        let admit = keys.into_iter().filter_map(|k| lanes.promote(&k)).collect();
        (lanes, admit)
    }

    /// Applies a note; returns the run to admit, if the lane became free for one.
    pub fn apply(&mut self, note: LaneNote) -> Option<String> {
        match note {
            LaneNote::Queued { lane, run_id } => {
                let l = self.lanes.entry(lane.clone()).or_default();
                if !l.holders.contains(&run_id) && !l.queue.contains(&run_id) {
                    l.queue.push_back(run_id);
                }
                self.promote(&lane)
            }
            LaneNote::Ended { lane, run_id } => {
                let l = self.lanes.get_mut(&lane)?;
                l.holders.remove(&run_id);
                l.queue.retain(|r| r != &run_id);
                let next = self.promote(&lane);
                if self.lanes.get(&lane).is_some_and(|l| l.holders.is_empty() && l.queue.is_empty()) {
                    self.lanes.remove(&lane);
                }
                next
            }
        }
    }

    /// Runs waiting in a lane, oldest first.
    #[cfg(test)]
    fn waiting(&self, lane: &LaneKey) -> Vec<String> {
        self.lanes.get(lane).map(|l| l.queue.iter().cloned().collect()).unwrap_or_default()
    }

    /// Gives a free lane to its oldest waiting run.
    fn promote(&mut self, key: &LaneKey) -> Option<String> {
        let lane = self.lanes.get_mut(key)?;
        if !lane.holders.is_empty() {
            return None;
        }
        let next = lane.queue.pop_front()?;
        lane.holders.insert(next.clone());
        Some(next)
    }
}

/// The lane of a run in the index, if it has a service.
fn lane_of(r: &RunRecord) -> Option<LaneKey> {
    r.service.as_ref().map(|s| (r.project.clone(), r.stage.clone(), s.clone()))
}

/// Follows the partitions' notes and admits runs until shutdown.
pub(super) async fn run(
    shared: Arc<Shared>,
    router: Router,
    mut notes: mpsc::UnboundedReceiver<LaneNote>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut lanes = loop {
        match shared.store.unfinished_runs().await {
            Ok(runs) => {
                let (lanes, admit) = Lanes::rebuild(&runs);
                if !admit.is_empty() {
                    info!(runs = admit.len(), "admitting queued runs whose lanes are free");
                }
                for run_id in admit {
                    if !send_admit(&router, run_id).await {
                        return;
                    }
                }
                break lanes;
            }
            Err(e) => {
                warn!(error = %e, "cannot read unfinished runs to rebuild lanes; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    loop {
        let note = tokio::select! {
            biased;
            note = notes.recv() => match note { Some(n) => n, None => return },
            _ = shutdown.changed() => return,
        };
        debug!(?note, "lane note");
        if let Some(run_id) = lanes.apply(note)
            && !send_admit(&router, run_id).await
        {
            return;
        }
    }
}

/// Routes an `Admit` to the run's partition; false when the runtime is shutting down.
async fn send_admit(router: &Router, run_id: String) -> bool {
    debug!(%run_id, "admitting run");
    let env = Envelope {
        run_id,
        input_id: None,
        project: None,
        input: Input::Admit,
        consumed_timer: None,
        reply: Reply::None,
    };
    router.route(env).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(service: &str) -> LaneKey {
        ("p".into(), "dev".into(), service.into())
    }

    fn queued(service: &str, run: &str) -> LaneNote {
        LaneNote::Queued { lane: lane(service), run_id: run.into() }
    }

    fn ended(service: &str, run: &str) -> LaneNote {
        LaneNote::Ended { lane: lane(service), run_id: run.into() }
    }

    fn record(run: &str, service: Option<&str>, status: &str) -> RunRecord {
        RunRecord {
            run_id: run.into(),
            project: "p".into(),
            context_id: "c".into(),
            stage: "dev".into(),
            sequence: "delivery".into(),
            service: service.map(str::to_string),
            definition: "d".into(),
            definition_version: 1,
            status: status.into(),
            result: None,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn one_run_per_lane_in_fifo_order_and_lanes_are_independent() {
        let mut lanes = Lanes::default();
        assert_eq!(lanes.apply(queued("cart", "r1")), Some("r1".into()));
        assert_eq!(lanes.apply(queued("cart", "r2")), None);
        assert_eq!(lanes.apply(queued("cart", "r3")), None);
        // Another service runs beside it.
        assert_eq!(lanes.apply(queued("orders", "o1")), Some("o1".into()));
        assert_eq!(lanes.waiting(&lane("cart")), vec!["r2".to_string(), "r3".to_string()]);
        // A waiting run cancelled leaves the queue without taking the lane.
        assert_eq!(lanes.apply(ended("cart", "r2")), None);
        assert_eq!(lanes.apply(ended("cart", "r1")), Some("r3".into()));
        assert_eq!(lanes.apply(ended("cart", "r3")), None);
        assert!(lanes.waiting(&lane("cart")).is_empty());
        // A repeated note changes nothing.
        assert_eq!(lanes.apply(queued("orders", "o1")), None);
        assert_eq!(lanes.apply(queued("orders", "o2")), None);
        assert_eq!(lanes.apply(ended("orders", "o1")), Some("o2".into()));
    }

    #[test]
    fn rebuild_keeps_holders_including_paused_runs_and_admits_free_lanes() {
        let runs = vec![
            record("a1", Some("cart"), "paused"),
            record("a2", Some("cart"), "queued"),
            record("b1", Some("orders"), "queued"),
            record("b2", Some("orders"), "queued"),
            record("x", None, "running"),
        ];
        let (mut lanes, admit) = Lanes::rebuild(&runs);
        assert_eq!(admit, vec!["b1".to_string()]);
        assert_eq!(lanes.waiting(&lane("cart")), vec!["a2".to_string()]);
        assert_eq!(lanes.apply(ended("cart", "a1")), Some("a2".into()));
        assert_eq!(lanes.apply(ended("orders", "b1")), Some("b2".into()));
    }
}
