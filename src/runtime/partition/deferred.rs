//! Timers a partition keeps in memory instead of writing them at once.
//!
//! Most timers are moot within milliseconds: a task's re-offer and schedule-to-start deadlines
//! once a worker claims and starts it, its start-to-close deadline once it finishes. Written
//! through, each one is a row inserted by one commit and deleted by the next: on the compare
//! workload (one task per run) 6 of ~22 row writes per run. A timer of a kind the engine
//! derives from the run's state (`RunState::derives`) is therefore kept here and written only
//! when it has lived `KEEP_MS`, or `FLUSH_LEAD_MS` before it is due, whichever comes first;
//! cancelled before that, it never reaches the store.
//!
//! A crash loses what is kept here. The store keeps a checkpoint per partition: the event
//! position up to which every timer this partition set is in the timers table (or moot). A
//! timer is kept here only when the commit that set it appended events to its run, so after a
//! crash the runtime finds every run whose timers may be lost among the events after the lowest
//! checkpoint, and derives their timers again from their states (`recovery.rs`).
//!
//! Batches change this map when they are decided, before their commit. Each batch records what
//! it changed ([`Undo`]): a failed commit puts the map back, a successful one dates the timers
//! it set by the commit's position and forgets those it wrote.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;

use capstan_engine::Timestamp;
use capstan_engine::run::TimerKind;
use capstan_store::{Committed, Position, TimerRow};

use crate::runtime::codec;

/// A timer goes to the store this long before it is due, so that the timer service fires it
/// on time from there.
pub const FLUSH_LEAD_MS: i64 = 250;
/// The longest a timer stays in memory only: this bounds how much a crash leaves to derive.
pub const KEEP_MS: i64 = 1_000;
/// Timers due sooner than this after they are set are written at once.
pub const DEFER_MIN_MS: i64 = 2 * FLUSH_LEAD_MS;
/// How often, at most, a partition's checkpoint is written.
pub const CHECKPOINT_EVERY_MS: i64 = 1_000;

/// A timer's identity: its run and key.
pub type TimerKey = (String, String);

/// A timer a batch sets: kept here (its row is built only if it is ever written), or a row to
/// write at once.
#[derive(Debug)]
pub enum Setting {
    Keep { kind: TimerKind, fire_at_ms: i64 },
    Write(TimerRow),
}

#[derive(Debug, Clone)]
struct Entry {
    kind: TimerKind,
    fire_at_ms: i64,
    /// When it goes to the store.
    flush_at: i64,
    /// The position before the events of the commit that set it; `None` while that commit is
    /// under way. Recovery reads the events after it.
    before: Option<Position>,
    /// Written by a batch whose commit is under way: a later cancel must then reach the store.
    flushing: bool,
}

/// The store's row of a kept timer.
fn row(key: &TimerKey, kind: &TimerKind, fire_at_ms: i64) -> TimerRow {
    codec::engine_timer_row(&key.0, kind, Timestamp(fire_at_ms.max(0) as u64))
}

/// What one batch changed, to undo it if its commit fails or settle it once it succeeds.
#[derive(Debug, Default)]
pub struct Undo {
    /// Each key's entry before the batch changed it, in the order changed.
    log: Vec<(TimerKey, Option<Entry>)>,
    /// Keys the batch writes to the store.
    flushed: Vec<TimerKey>,
}

impl Undo {
    fn record(&mut self, key: &TimerKey, before: Option<Entry>) {
        self.log.push((key.clone(), before));
    }
}

/// The timers a partition keeps in memory, and its checkpoint.
#[derive(Debug)]
pub struct Deferred {
    entries: HashMap<TimerKey, Entry>,
    /// No entry is due to be written before this (may be early after removals).
    next_flush_at: i64,
    /// The position of this partition's last commit that appended events.
    last_position: Position,
    /// The checkpoint last written, and when.
    written: Position,
    written_at_ms: i64,
    /// Derived messages (awards, notifications) handed to the relay and not yet published,
    /// oldest first: the position before the events they come from, and the hold's number. A
    /// restart sends them again only for runs after the checkpoint, so it stays before these.
    held: VecDeque<(Position, u64)>,
    /// The number of the last hold.
    last_hold: u64,
}

impl Deferred {
    /// An empty map; `position` is where the store's events ended when the partition started
    /// (every timer before it is in the store, or derived again).
    pub fn new(position: Position) -> Self {
        Deferred {
            entries: HashMap::new(),
            next_flush_at: i64::MAX,
            last_position: position,
            written: position,
            written_at_ms: 0,
            held: VecDeque::new(),
            last_hold: 0,
        }
    }

    /// How many timers are kept in memory.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keeps a timer in memory. Returns its row when it must be written instead: the store is
    /// about to get an earlier value of it from a batch under way, which this one must follow.
    pub fn keep(
        &mut self,
        key: TimerKey,
        kind: TimerKind,
        fire_at_ms: i64,
        now_ms: i64,
        undo: &mut Undo,
    ) -> Option<TimerRow> {
        let previous = self.entries.remove(&key);
        if previous.as_ref().is_some_and(|e| e.flushing) {
            undo.record(&key, previous);
            return Some(row(&key, &kind, fire_at_ms));
        }
        // Set again while kept (a resume re-arming a delay): it keeps its first position, the
        // one recovery must read from.
        let before = previous.as_ref().and_then(|e| e.before);
        let flush_at = (now_ms + KEEP_MS).min(fire_at_ms - FLUSH_LEAD_MS);
        let flush_at = previous.as_ref().map_or(flush_at, |e| e.flush_at.min(flush_at));
        self.next_flush_at = self.next_flush_at.min(flush_at);
        undo.record(&key, previous);
        self.entries.insert(key, Entry { kind, fire_at_ms, flush_at, before, flushing: false });
        None
    }

    /// A timer written through: whatever was kept of it is replaced by the store's row.
    pub fn write_through(&mut self, key: &TimerKey, undo: &mut Undo) {
        if let Some(e) = self.entries.remove(key) {
            undo.record(key, Some(e));
        }
    }

    /// A timer cancelled. Returns whether the store must delete it too (it may be there).
    pub fn cancel(&mut self, key: &TimerKey, undo: &mut Undo) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                let flushing = e.flushing;
                undo.record(key, Some(e));
                flushing
            }
            None => true,
        }
    }

    /// Moves the timers due to be written into `out` (they stay here, marked, until the batch
    /// writing them is committed).
    pub fn flush_due(&mut self, now_ms: i64, undo: &mut Undo, out: &mut Vec<TimerRow>) {
        if now_ms < self.next_flush_at {
            return;
        }
        let mut next = i64::MAX;
        for (key, e) in self.entries.iter_mut().filter(|(_, e)| !e.flushing) {
            if e.flush_at <= now_ms {
                undo.log.push((key.clone(), Some(e.clone())));
                undo.flushed.push(key.clone());
                e.flushing = true;
                out.push(row(key, &e.kind, e.fire_at_ms));
            } else {
                next = next.min(e.flush_at);
            }
        }
        self.next_flush_at = next;
    }

    /// The batch's commit failed: its changes are undone, newest first.
    pub fn undo(&mut self, undo: Undo) {
        for (key, before) in undo.log.into_iter().rev() {
            match before {
                Some(e) => {
                    self.next_flush_at = self.next_flush_at.min(e.flush_at);
                    self.entries.insert(key, e);
                }
                None => {
                    self.entries.remove(&key);
                }
            }
        }
    }

    /// The batch is committed (`None`: it had nothing to write): the timers it kept are dated by
    /// its position, those it wrote are forgotten. A key the batch changed that still waits for
    /// its date was kept by this batch (or set again by the one decided behind it, which this
    /// earlier date only makes recovery read from a little sooner).
    pub fn settled(&mut self, undo: Undo, committed: Option<Committed>) {
        let before = match committed {
            Some(c) if c.events > 0 => c.last_position - c.events as Position,
            _ => self.last_position,
        };
        if let Some(c) = committed.filter(|c| c.events > 0) {
            self.last_position = self.last_position.max(c.last_position);
        }
        for (key, _) in undo.log {
            if let Some(e) = self.entries.get_mut(&key)
                && e.before.is_none()
            {
                e.before = Some(before);
            }
        }
        for key in undo.flushed {
            if self.entries.get(&key).is_some_and(|e| e.flushing) {
                self.entries.remove(&key);
            }
        }
    }

    /// Derived messages from events after `before` go to the relay: the checkpoint stays at
    /// or before `before` until the relay says it published them ([`Self::relayed`] with the
    /// number returned; the relay publishes in the order handed).
    pub fn hold(&mut self, before: Position) -> u64 {
        self.last_hold += 1;
        self.held.push_back((before, self.last_hold));
        self.last_hold
    }

    /// The relay published the messages of every hold up to number `through`.
    pub fn relayed(&mut self, through: u64) {
        while self.held.front().is_some_and(|&(_, n)| n <= through) {
            self.held.pop_front();
        }
    }

    /// The position up to which every timer this partition set is in the store (or moot) and
    /// every derived message it sent is published. Timers of batches still committing date
    /// from after the last committed position.
    pub fn checkpoint(&self) -> Position {
        let held = self.held.front().map(|&(before, _)| before);
        self.entries.values().filter_map(|e| e.before).chain(held).fold(self.last_position, Position::min)
    }

    /// The checkpoint to write now, if it moved and the last write is old enough.
    pub fn checkpoint_due(&mut self, now_ms: i64) -> Option<Position> {
        let at = self.checkpoint();
        if at <= self.written || now_ms < self.written_at_ms + CHECKPOINT_EVERY_MS {
            return None;
        }
        self.written = at;
        self.written_at_ms = now_ms;
        Some(at)
    }

    /// When an idle partition has something to do here: write timers, or its checkpoint (also
    /// when only other partitions wrote events, up to `log_end`, see [`Self::idle`]).
    pub fn wake_at(&self, log_end: Position) -> Option<i64> {
        let flush = (!self.entries.is_empty()).then_some(self.next_flush_at);
        let behind = self.checkpoint().max(if self.holds_nothing() { log_end } else { 0 }) > self.written;
        let checkpoint = behind.then_some(self.written_at_ms + CHECKPOINT_EVERY_MS);
        flush.into_iter().chain(checkpoint).min()
    }

    /// The partition is idle (no batch decided or committing) and the log ends at `log_end`
    /// (positions of commits already returned). With no timer in memory, nothing of this
    /// partition lies after its checkpoint, so the checkpoint may move there: a partition
    /// that gets no runs must not hold every recovery back to where it last committed.
    pub fn idle(&mut self, log_end: Position) {
        if self.holds_nothing() {
            self.last_position = self.last_position.max(log_end);
        }
    }

    /// Neither a timer nor an unpublished message of this partition lies after its checkpoint.
    fn holds_nothing(&self) -> bool {
        self.entries.is_empty() && self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(task: &str) -> TimerKind {
        TimerKind::Delay { task: task.into() }
    }

    /// The row a kept timer `k` of run `run` is written as.
    fn row(run: &str, k: &str, at: i64) -> TimerRow {
        super::row(&key(run, k), &kind(k), at)
    }

    fn key(run: &str, k: &str) -> TimerKey {
        (run.into(), k.into())
    }

    fn committed(last: Position, events: usize) -> Option<Committed> {
        Some(Committed { last_position: last, events })
    }

    /// A map started at `start` that kept timer `a` (due in a minute) in a commit of two events
    /// ending at `last`.
    fn kept_a(start: Position, last: Position) -> Deferred {
        let mut d = Deferred::new(start);
        let mut u = Undo::default();
        d.keep(key("r", "a"), kind("a"), 60_000, 0, &mut u);
        d.settled(u, committed(last, 2));
        d
    }

    #[test]
    fn a_timer_cancelled_in_time_never_reaches_the_store() {
        let mut d = Deferred::new(10);
        let mut u = Undo::default();
        assert!(d.keep(key("r", "a"), kind("a"), 60_000, 1_000, &mut u).is_none());
        d.settled(u, committed(13, 3));
        assert_eq!(d.checkpoint(), 10, "the timer holds the checkpoint before its commit's events");
        let mut u = Undo::default();
        assert!(!d.cancel(&key("r", "a"), &mut u), "kept only: nothing to delete in the store");
        d.settled(u, committed(15, 2));
        assert_eq!((d.len(), d.checkpoint()), (0, 15));
    }

    #[test]
    fn timers_are_written_after_a_while_or_before_they_are_due() {
        let mut d = Deferred::new(0);
        let mut u = Undo::default();
        d.keep(key("r", "long"), kind("long"), 3_600_000, 1_000, &mut u);
        d.keep(key("r", "soon"), kind("soon"), 1_600, 1_000, &mut u);
        d.settled(u, committed(2, 2));
        let mut out = Vec::new();
        d.flush_due(1_349, &mut Undo::default(), &mut out);
        assert!(out.is_empty());
        assert_eq!(d.wake_at(0), Some(1_350));
        let mut u = Undo::default();
        d.flush_due(1_350, &mut u, &mut out);
        assert_eq!(out, vec![row("r", "soon", 1_600)], "250 ms before it is due");
        // The row is built only now, from the kept kind, and fires as that timer.
        let fired = codec::decode_timer(&out[0]).expect("an engine timer row");
        assert_eq!(fired.target_run, "r");
        assert_eq!(fired.input, capstan_engine::run::Input::Timer(kind("soon")));
        assert_eq!(out[0].key, kind("soon").key());
        d.settled(u, committed(3, 1));
        let mut u = Undo::default();
        out.clear();
        d.flush_due(2_000, &mut u, &mut out);
        assert_eq!(out, vec![row("r", "long", 3_600_000)], "after one second in memory");
        assert!(d.cancel(&key("r", "long"), &mut u), "being written: the store must delete it too");
    }

    #[test]
    fn a_failed_commit_puts_the_map_back() {
        let mut d = kept_a(5, 7);
        let mut u = Undo::default();
        d.cancel(&key("r", "a"), &mut u);
        d.keep(key("r", "b"), kind("b"), 60_000, 0, &mut u);
        let mut out = Vec::new();
        d.flush_due(5_000, &mut u, &mut out);
        assert_eq!(out, vec![row("r", "b", 60_000)]);
        d.undo(u);
        assert_eq!(d.len(), 1, "a is back, b is gone");
        let mut out = Vec::new();
        d.flush_due(5_000, &mut Undo::default(), &mut out);
        assert_eq!(out, vec![row("r", "a", 60_000)], "a is due to be written again");
        assert_eq!(d.checkpoint(), 5);
    }

    #[test]
    fn the_checkpoint_is_written_when_it_moved_at_most_once_a_second() {
        let mut d = Deferred::new(0);
        d.settled(Undo::default(), committed(4, 4));
        assert_eq!(d.checkpoint_due(10_000), Some(4));
        d.settled(Undo::default(), committed(9, 5));
        assert_eq!(d.checkpoint_due(10_500), None, "too soon");
        assert_eq!(d.wake_at(9), Some(11_000));
        assert_eq!(d.checkpoint_due(11_000), Some(9));
        assert_eq!(d.wake_at(9), None);
    }

    #[test]
    fn unpublished_derived_messages_hold_the_checkpoint_before_their_commit() {
        let mut d = Deferred::new(0);
        d.settled(Undo::default(), committed(4, 4));
        d.settled(Undo::default(), committed(7, 3));
        assert_eq!(d.hold(4), 1);
        d.settled(Undo::default(), committed(9, 2));
        assert_eq!(d.hold(7), 2);
        assert_eq!(d.checkpoint(), 4, "before the first commit whose messages wait");
        d.idle(40);
        assert_eq!(d.checkpoint(), 4, "an idle partition with messages waiting does not move on");
        d.relayed(0);
        assert_eq!(d.checkpoint(), 4);
        d.relayed(1);
        assert_eq!(d.checkpoint(), 7);
        d.relayed(2);
        assert_eq!(d.checkpoint(), 9);
        d.idle(40);
        assert_eq!(d.checkpoint(), 40);
    }

    #[test]
    fn an_idle_partition_moves_its_checkpoint_to_the_end_of_the_log_only_with_nothing_kept() {
        let mut d = kept_a(3, 5);
        assert_eq!(d.wake_at(40), Some(1_000), "the kept timer is written first");
        d.idle(40);
        assert_eq!(d.checkpoint(), 3, "a kept timer holds the checkpoint back");
        let mut u = Undo::default();
        d.cancel(&key("r", "a"), &mut u);
        d.settled(u, committed(6, 1));
        assert_eq!(d.checkpoint_due(1_000), Some(6));
        assert_eq!(d.wake_at(40), Some(2_000), "other partitions wrote up to 40");
        d.idle(40);
        assert_eq!(d.checkpoint_due(2_000), Some(40));
        assert_eq!(d.wake_at(40), None);
    }
}
