//! A bounded cache of run states, least recently used out first. Finished runs are not kept.

use std::collections::{HashMap, VecDeque};

use capstan_engine::run::RunState;

/// A cached run with what the partition needs besides the state.
pub struct Cached {
    pub state: RunState,
    /// Events in the run's stream (the expected version of the next append).
    pub version: i64,
    pub created_at_ms: i64,
    pub status: &'static str,
}

/// LRU by count. A state is taken out while a batch decides on it and put back as soon as the
/// batch is decided, before its commit, so the next batch can be decided meanwhile; a partition
/// whose commit fails takes those states out again (the store is the truth). A state evicted
/// before its commit is folded from the store without the batch's events, and the next append
/// to that run then fails its expected-version check instead of writing over them.
pub struct RunCache {
    capacity: usize,
    entries: HashMap<String, (u64, Cached)>,
    order: VecDeque<(String, u64)>,
    generation: u64,
}

impl RunCache {
    /// A cache holding at most `capacity` runs.
    pub fn new(capacity: usize) -> Self {
        RunCache { capacity: capacity.max(1), entries: HashMap::new(), order: VecDeque::new(), generation: 0 }
    }

    /// Whether a run's state is held.
    pub fn contains(&self, run_id: &str) -> bool {
        self.entries.contains_key(run_id)
    }

    /// Removes and returns a run's state.
    pub fn take(&mut self, run_id: &str) -> Option<Cached> {
        self.entries.remove(run_id).map(|(_, c)| c)
    }

    /// Puts a run's state back as most recently used, evicting the least recently used.
    pub fn put(&mut self, run_id: String, cached: Cached) {
        self.generation += 1;
        self.order.push_back((run_id.clone(), self.generation));
        self.entries.insert(run_id, (self.generation, cached));
        while self.entries.len() > self.capacity {
            let Some((id, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&id).is_some_and(|(g, _)| *g == generation) {
                self.entries.remove(&id);
            }
        }
        // Stale order entries (runs touched again or taken) would otherwise pile up.
        if self.order.len() > self.capacity * 4 + 64 {
            let entries = &self.entries;
            self.order.retain(|(id, g)| entries.get(id).is_some_and(|(eg, _)| eg == g));
        }
    }
}
