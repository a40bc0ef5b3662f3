//! A cache of run states bounded by memory, least recently used out first. Finished runs are not
//! kept.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;

use capstan_engine::run::RunState;

/// A cached run with what the partition needs besides the state.
pub struct Cached {
    pub state: RunState,
    /// Events in the run's stream (the expected version of the next append).
    pub version: i64,
    pub created_at_ms: i64,
    pub status: &'static str,
}

/// What an entry costs besides its state (`RunState::approx_bytes` charges the state's own
/// struct): its map slot and the map's spare slots (about half as many again), and two slots of
/// the order queue (stale ones wait there until compaction). The run id's two copies are added
/// per entry.
const ENTRY_OVERHEAD: usize =
    size_of::<(String, Entry)>() * 3 / 2 - size_of::<RunState>() + 2 * size_of::<(String, u64)>();

/// LRU bounded by the states' estimated bytes (`RunState::approx_bytes`), so a few runs with
/// megabytes of trigger data or thousands of tasks cannot grow the process the way a count
/// bound would let them. A state larger than the whole budget is not kept.
///
/// A state is taken out while a batch decides on it and put back as soon as the batch is
/// decided, before its commit, so the next batch can be decided meanwhile; a partition whose
/// commit fails takes those states out again (the store is the truth). A state evicted before
/// its commit is folded from the store without the batch's events, and the next append to that
/// run then fails its expected-version check instead of writing over them.
pub struct RunCache {
    budget: usize,
    used: usize,
    entries: HashMap<String, Entry>,
    order: VecDeque<(String, u64)>,
    generation: u64,
}

struct Entry {
    generation: u64,
    bytes: usize,
    cached: Cached,
}

impl RunCache {
    /// A cache holding states of at most `budget` estimated bytes in all.
    pub fn new(budget: usize) -> Self {
        RunCache { budget, used: 0, entries: HashMap::new(), order: VecDeque::new(), generation: 0 }
    }

    /// Whether a run's state is held.
    pub fn contains(&self, run_id: &str) -> bool {
        self.entries.contains_key(run_id)
    }

    /// How many states are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The estimated bytes of the states held, never above the budget.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used
    }

    /// Removes and returns a run's state.
    pub fn take(&mut self, run_id: &str) -> Option<Cached> {
        let entry = self.entries.remove(run_id)?;
        self.used -= entry.bytes;
        Some(entry.cached)
    }

    /// Puts a run's state back as most recently used, evicting the least recently used until
    /// the states fit the budget again. Returns how many states were evicted.
    pub fn put(&mut self, run_id: String, cached: Cached) -> usize {
        let bytes = cached.state.approx_bytes() + 2 * run_id.capacity().next_multiple_of(16) + ENTRY_OVERHEAD;
        self.generation += 1;
        self.order.push_back((run_id.clone(), self.generation));
        if let Some(old) = self.entries.insert(run_id, Entry { generation: self.generation, bytes, cached }) {
            self.used -= old.bytes;
        }
        self.used += bytes;
        let mut evicted = 0;
        while self.used > self.budget {
            let Some((id, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&id).is_some_and(|e| e.generation == generation) {
                let entry = self.entries.remove(&id).expect("checked above");
                self.used -= entry.bytes;
                evicted += 1;
            }
        }
        // Stale order entries (runs touched again or taken) would otherwise pile up.
        if self.order.len() > self.entries.len() * 4 + 64 {
            let entries = &self.entries;
            self.order.retain(|(id, g)| entries.get(id).is_some_and(|e| e.generation == *g));
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use capstan_engine::duration::Timestamp;
    use capstan_engine::run::{Ctx, Input, RunMeta};
    use serde_json::{Value, json};

    use super::*;

    const DEFINITION: &str = "
apiVersion: capstan.dev/v1
kind: Shipyard
metadata: {name: shop}
spec:
  stages:
    - name: dev
      sequences:
        - name: delivery
          tasks:
            - name: deploy
";

    /// A started run with `data` as its trigger data.
    fn started(run_id: &str, data: Value) -> Cached {
        let def = Arc::new(capstan_engine::parse(DEFINITION).expect("a valid definition"));
        let mut state = RunState::new(def);
        let meta = RunMeta {
            run_id: run_id.into(),
            context_id: "c".into(),
            project: "p".into(),
            stage: "dev".into(),
            sequence: "delivery".into(),
            service: None,
            definition: "shop".into(),
            definition_version: 1,
            triggered_by: None,
        };
        let decision =
            state.decide(&Input::Start { meta, data }, &Ctx { now: Timestamp(0), random: 0 }).expect("starts");
        for e in &decision.events {
            state.evolve(e);
        }
        Cached { state, version: decision.events.len() as i64, created_at_ms: 0, status: "running" }
    }

    fn cost(run_id: &str, data: Value) -> usize {
        let mut probe = RunCache::new(usize::MAX);
        probe.put(run_id.into(), started(run_id, data));
        probe.used()
    }

    #[test]
    fn small_states_fill_the_budget_least_recently_used_out_first() {
        let each = cost("r-00", json!({}));
        let mut cache = RunCache::new(each * 10);
        for i in 0..10 {
            cache.put(format!("r-{i:02}"), started(&format!("r-{i:02}"), json!({})));
        }
        assert_eq!(cache.len(), 10);
        // Touch r-00 so that r-01 is the least recently used.
        let r0 = cache.take("r-00").expect("cached");
        cache.put("r-00".into(), r0);
        assert_eq!(cache.put("r-10".into(), started("r-10", json!({}))), 1);
        assert_eq!(cache.len(), 10);
        assert!(cache.contains("r-00") && cache.contains("r-10") && !cache.contains("r-01"));
        assert!(cache.used() <= each * 10);
    }

    #[test]
    fn a_large_state_evicts_by_bytes_not_by_count() {
        let small = cost("r-00", json!({}));
        let blob = json!({"blob": "x".repeat(small * 5)});
        let large = cost("big", blob.clone());
        assert!(large > small * 5, "{large} vs {small}");
        let mut cache = RunCache::new(small * 10);
        for i in 0..10 {
            cache.put(format!("r-{i:02}"), started(&format!("r-{i:02}"), json!({})));
        }
        let evicted = cache.put("big".into(), started("big", blob));
        assert_eq!(evicted, 10 - (cache.len() - 1));
        // At least five small states made room for the big one, the oldest first.
        assert!(cache.contains("big"));
        assert!(cache.len() <= 5, "{} states held", cache.len());
        assert!(!cache.contains("r-00") && cache.contains("r-09"));
        assert!(cache.used() <= small * 10);

        // Taking it back frees its bytes.
        let before = cache.used();
        cache.take("big").expect("cached");
        assert_eq!(cache.used(), before - large);
    }

    #[test]
    fn a_state_larger_than_the_budget_is_not_kept() {
        let small = cost("r-00", json!({}));
        let mut cache = RunCache::new(small * 4);
        cache.put("r-00".into(), started("r-00", json!({})));
        cache.put("huge".into(), started("huge", json!({"blob": "x".repeat(small * 8)})));
        assert!(!cache.contains("huge"));
        assert!(cache.used() <= small * 4);
        // Putting the same run again replaces its charge instead of adding to it.
        let mut cache = RunCache::new(small * 4);
        for _ in 0..20 {
            cache.put("r-00".into(), started("r-00", json!({})));
        }
        assert_eq!((cache.len(), cache.used()), (1, small));
    }
}
