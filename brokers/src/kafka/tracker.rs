//! Which offsets of a competing subscription may be committed. Deliveries are acked out of order,
//! but Kafka keeps one committed offset per partition, so the commit stops at the lowest offset
//! that was read and is not yet settled; everything after it comes again after a crash.
//!
//! The commit also carries, as its metadata, how far this member *delivered* (handed to the
//! application). The next owner of the partition counts anything below that mark as a
//! redelivery, which is how `Delivery::redeliveries` survives a consumer's death or a rebalance.

use std::collections::{BTreeSet, HashMap};

/// Prefix of the commit metadata that records how far a member delivered.
const DELIVERED_PREFIX: &str = "capstan-delivered=";

/// One offset to commit: the position (next offset to read) and the metadata that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Commit {
    pub partition: i32,
    pub position: i64,
    pub metadata: String,
}

/// What the tracker knows about one assigned partition.
#[derive(Debug)]
struct Track {
    /// Which assignment this partition belongs to; settles of an older one are ignored.
    generation: u64,
    /// Read (handed to the subscription) and not yet settled.
    unsettled: BTreeSet<i64>,
    /// One past the highest offset read; the position when nothing is unsettled.
    read_to: Option<i64>,
    /// One past the highest offset delivered by this member or, from the commit metadata, by the
    /// members before it.
    delivered_to: i64,
    /// Offsets below this were delivered by a previous owner: their delivery is a redelivery.
    redelivered_below: i64,
    dirty: bool,
}

/// The offsets of all partitions a consumer owns.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    partitions: HashMap<i32, Track>,
    generation: u64,
}

impl Tracker {
    /// The current assignment generation, stamped on every message read.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A new assignment: `(partition, committed metadata)` for each partition now owned.
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = (i32, Option<String>)>) {
        self.generation += 1;
        for (partition, metadata) in partitions {
            let delivered = metadata.as_deref().and_then(parse_delivered).unwrap_or(0);
            self.partitions.insert(
                partition,
                Track {
                    generation: self.generation,
                    unsettled: BTreeSet::new(),
                    read_to: None,
                    delivered_to: delivered,
                    redelivered_below: delivered,
                    dirty: false,
                },
            );
        }
    }

    /// Partitions taken away (revoked or lost): what was read from them is another member's now.
    pub fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>) {
        self.generation += 1;
        for p in partitions {
            self.partitions.remove(&p);
        }
    }

    /// Records that `offset` was read; false when the partition is not (or no longer) owned.
    pub fn read(&mut self, partition: i32, offset: i64, generation: u64) -> bool {
        let Some(t) = self.owned(partition, generation) else { return false };
        t.unsettled.insert(offset);
        t.read_to = Some(t.read_to.map_or(offset + 1, |r| r.max(offset + 1)));
        true
    }

    /// Records a delivery to the application. `None` when the message is stale (its partition
    /// moved on); otherwise whether an earlier owner had already delivered it.
    pub fn deliver(&mut self, partition: i32, offset: i64, generation: u64) -> Option<bool> {
        let t = self.owned(partition, generation)?;
        if !t.unsettled.contains(&offset) {
            return None;
        }
        t.delivered_to = t.delivered_to.max(offset + 1);
        t.dirty = true;
        Some(offset < t.redelivered_below)
    }

    /// Settles an offset (acked, re-published by nack, or dead-lettered). Stale settles are no-ops.
    pub fn settle(&mut self, partition: i32, offset: i64, generation: u64) {
        if let Some(t) = self.owned(partition, generation)
            && t.unsettled.remove(&offset)
        {
            t.dirty = true;
        }
    }

    /// The commits that changed since the last call.
    pub fn take_commits(&mut self) -> Vec<Commit> {
        let mut out = Vec::new();
        for (&partition, t) in &mut self.partitions {
            if !t.dirty {
                continue;
            }
            t.dirty = false;
            let Some(position) = t.unsettled.first().copied().or(t.read_to) else { continue };
            out.push(Commit { partition, position, metadata: format!("{DELIVERED_PREFIX}{}", t.delivered_to) });
        }
        out.sort_by_key(|c| c.partition);
        out
    }

    fn owned(&mut self, partition: i32, generation: u64) -> Option<&mut Track> {
        self.partitions.get_mut(&partition).filter(|t| t.generation == generation)
    }
}

fn parse_delivered(metadata: &str) -> Option<i64> {
    metadata.strip_prefix(DELIVERED_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(partition: i32, position: i64, delivered: i64) -> Commit {
        Commit { partition, position, metadata: format!("{DELIVERED_PREFIX}{delivered}") }
    }

    #[test]
    fn commits_stop_at_the_lowest_unsettled_offset() {
        let mut t = Tracker::default();
        t.assign([(0, None)]);
        let g = t.generation();
        for offset in 0..3 {
            assert!(t.read(0, offset, g));
            assert_eq!(t.deliver(0, offset, g), Some(false));
        }
        assert_eq!(t.take_commits(), vec![commit(0, 0, 3)], "nothing settled yet");
        t.settle(0, 2, g);
        t.settle(0, 1, g);
        assert_eq!(t.take_commits(), vec![commit(0, 0, 3)], "offset 0 still holds the commit");
        t.settle(0, 0, g);
        assert_eq!(t.take_commits(), vec![commit(0, 3, 3)]);
        assert_eq!(t.take_commits(), vec![], "nothing changed since");
    }

    #[test]
    fn read_but_undelivered_offsets_hold_the_commit() {
        let mut t = Tracker::default();
        t.assign([(1, None)]);
        let g = t.generation();
        t.read(1, 10, g);
        t.read(1, 11, g);
        t.deliver(1, 11, g);
        t.settle(1, 11, g);
        assert_eq!(t.take_commits(), vec![commit(1, 10, 12)]);
    }

    #[test]
    fn a_previous_owners_deliveries_count_as_redeliveries() {
        let mut t = Tracker::default();
        t.assign([(0, Some("capstan-delivered=5".into())), (1, Some("someone else's".into()))]);
        let g = t.generation();
        for (p, o) in [(0, 4), (0, 5), (1, 0)] {
            t.read(p, o, g);
        }
        assert_eq!(t.deliver(0, 4, g), Some(true));
        assert_eq!(t.deliver(0, 5, g), Some(false));
        assert_eq!(t.deliver(1, 0, g), Some(false));
    }

    #[test]
    fn stale_generations_are_ignored() {
        let mut t = Tracker::default();
        t.assign([(0, None)]);
        let old = t.generation();
        t.read(0, 0, old);
        t.revoke([0]);
        t.assign([(0, None)]);
        assert_eq!(t.deliver(0, 0, old), None, "read under the old assignment");
        t.settle(0, 0, old);
        assert!(!t.read(3, 0, t.generation()), "partition 3 is not owned");
        assert_eq!(t.take_commits(), vec![]);
    }
}
