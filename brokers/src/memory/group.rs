//! One delivery group of a topic: a named competing group, or the private group behind one
//! broadcast subscription. It holds every unsettled message and decides who gets what next.
//!
//! Each message is an entry in one of three states:
//!
//! | state     | on `take` by a member              | on ack  | on nack(d)          | on timer / holder gone |
//! |-----------|------------------------------------|---------|---------------------|------------------------|
//! | ready     | in flight to that member           | removed | (not held: ignored) | -                      |
//! | delayed   | -                                  | removed | (not held: ignored) | ready when `d` passed  |
//! | in flight | -                                  | removed | delayed by `d`      | ready (redelivery)     |
//!
//! Ready entries go out in publish order (lowest sequence first), redeliveries included, so a
//! group with one member sees each key's messages in publish order.

use foldhash::HashMap;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Message;

/// A member's identity within its group.
pub(crate) type MemberId = u64;

/// One unsettled message.
struct Entry {
    message: Arc<Message>,
    /// How many times the entry was handed out so far.
    deliveries: u32,
    state: EntryState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Ready,
    Delayed { until: Instant },
    InFlight { member: MemberId, delivery: u64, deadline: Instant },
}

#[derive(Default)]
struct GroupState {
    next_seq: u64,
    next_member: MemberId,
    next_delivery: u64,
    members: usize,
    entries: HashMap<u64, Entry>,
    /// Sequences of ready entries; the lowest goes out first.
    ready: BTreeSet<u64>,
    /// When delayed entries become ready and in-flight entries pass their ack deadline.
    timers: BTreeSet<(Instant, u64)>,
}

/// What a member gets when it asks for the next message.
pub(crate) enum Take {
    /// A message to hand out; `delivery` names this hand-out for nack.
    Message { message: Arc<Message>, seq: u64, delivery: u64, redeliveries: u32 },
    /// Nothing ready: wait for a notification, or until the given time when a timer is due.
    Wait(Option<Instant>),
}

/// The shared state of one group; members, publishers and ackers all hold an `Arc` of it.
pub(crate) struct Group {
    state: Mutex<GroupState>,
    notify: Notify,
    ack_deadline: Duration,
}

impl Group {
    /// An empty group whose hand-outs expire after `ack_deadline`.
    pub(crate) fn new(ack_deadline: Duration) -> Self {
        Group { state: Mutex::new(GroupState::default()), notify: Notify::new(), ack_deadline }
    }

    /// The lock; a panic elsewhere cannot leave the state half-changed (every change is a few
    /// infallible collection operations), so a poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The notifier members wait on; woken on new messages, nacks, departures and close.
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }

    /// Adds messages in order and wakes the waiting members.
    pub(crate) fn push(&self, messages: &[Arc<Message>]) {
        {
            let mut st = self.lock();
            for message in messages {
                let seq = st.next_seq;
                st.next_seq += 1;
                st.entries.insert(seq, Entry { message: Arc::clone(message), deliveries: 0, state: EntryState::Ready });
                st.ready.insert(seq);
            }
        }
        self.notify.notify_waiters();
    }

    /// Registers a new member.
    pub(crate) fn join(&self) -> MemberId {
        let mut st = self.lock();
        st.members += 1;
        st.next_member += 1;
        st.next_member
    }

    /// Removes a member; what it held becomes ready again at once (consumer death).
    pub(crate) fn leave(&self, member: MemberId) {
        let mut released = false;
        {
            let mut st = self.lock();
            st.members = st.members.saturating_sub(1);
            let held: Vec<(u64, Instant)> = st
                .entries
                .iter()
                .filter_map(|(seq, e)| match e.state {
                    EntryState::InFlight { member: m, deadline, .. } if m == member => Some((*seq, deadline)),
                    _ => None,
                })
                .collect();
            for (seq, deadline) in held {
                st.timers.remove(&(deadline, seq));
                st.ready.insert(seq);
                if let Some(e) = st.entries.get_mut(&seq) {
                    e.state = EntryState::Ready;
                }
                released = true;
            }
        }
        if released {
            self.notify.notify_waiters();
        }
    }

    /// Hands the next ready message to `member`, after making due timers ready.
    pub(crate) fn take(&self, member: MemberId, now: Instant) -> Take {
        let mut st = self.lock();
        while let Some(&(due, seq)) = st.timers.first() {
            if due > now {
                break;
            }
            st.timers.pop_first();
            if let Some(e) = st.entries.get_mut(&seq) {
                e.state = EntryState::Ready;
                st.ready.insert(seq);
            }
        }
        let Some(seq) = st.ready.pop_first() else {
            return Take::Wait(st.timers.first().map(|(due, _)| *due));
        };
        st.next_delivery += 1;
        let delivery = st.next_delivery;
        let deadline = now + self.ack_deadline;
        st.timers.insert((deadline, seq));
        let entry = st.entries.get_mut(&seq).expect("a ready sequence always has an entry");
        entry.state = EntryState::InFlight { member, delivery, deadline };
        let redeliveries = entry.deliveries;
        entry.deliveries += 1;
        Take::Message { message: Arc::clone(&entry.message), seq, delivery, redeliveries }
    }

    /// Settles a message for good, whoever holds it now: a late ack of a hand-out that already
    /// expired still saves the group a duplicate. Whether it was still unsettled.
    pub(crate) fn ack(&self, seq: u64) -> bool {
        let mut st = self.lock();
        let Some(entry) = st.entries.remove(&seq) else {
            return false;
        };
        match entry.state {
            EntryState::Ready => {
                st.ready.remove(&seq);
            }
            EntryState::Delayed { until } => {
                st.timers.remove(&(until, seq));
            }
            EntryState::InFlight { deadline, .. } => {
                st.timers.remove(&(deadline, seq));
            }
        }
        true
    }

    /// Gives a held message back for redelivery after `delay`. Only the current hand-out may do
    /// so: a stale nack (the message expired and went elsewhere) must not disturb the new holder.
    pub(crate) fn nack(&self, seq: u64, delivery: u64, delay: Duration, now: Instant) {
        {
            let mut st = self.lock();
            let Some(entry) = st.entries.get_mut(&seq) else {
                return;
            };
            let EntryState::InFlight { delivery: current, deadline, .. } = entry.state else {
                return;
            };
            if current != delivery {
                return;
            }
            st.timers.remove(&(deadline, seq));
            let entry = st.entries.get_mut(&seq).expect("entry checked above");
            if delay.is_zero() {
                entry.state = EntryState::Ready;
                st.ready.insert(seq);
            } else {
                let until = now + delay;
                entry.state = EntryState::Delayed { until };
                st.timers.insert((until, seq));
            }
        }
        // Waiting members may sleep without a deadline; they must learn about the new timer.
        self.notify.notify_waiters();
    }

    /// Unsettled messages (ready, delayed or in flight).
    pub(crate) fn backlog(&self) -> usize {
        self.lock().entries.len()
    }

    /// Current members.
    pub(crate) fn members(&self) -> usize {
        self.lock().members
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::CloudEvent;

    fn msg(id: &str) -> Arc<Message> {
        Arc::new(Message { topic: "t".into(), key: "k".into(), event: CloudEvent::new(id, "s", "ty") })
    }

    fn taken(take: Take) -> (String, u64, u64, u32) {
        match take {
            Take::Message { message, seq, delivery, redeliveries } => {
                (message.event.id.clone(), seq, delivery, redeliveries)
            }
            Take::Wait(_) => panic!("expected a message"),
        }
    }

    #[test]
    fn walks_every_row_of_the_table() {
        let g = Group::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let m = g.join();
        g.push(&[msg("a"), msg("b"), msg("c")]);

        // ready -> in flight, in publish order
        let (id, a, da, r) = taken(g.take(m, t0));
        assert_eq!((id.as_str(), r), ("a", 0));
        // in flight -> delayed by nack; a stale nack changes nothing
        g.nack(a, da + 100, Duration::ZERO, t0);
        g.nack(a, da, Duration::from_secs(1), t0);
        let (id, b, _, _) = taken(g.take(m, t0));
        assert_eq!(id, "b");
        // ack of a ready entry removes it
        let c_seq = b + 1;
        g.ack(c_seq);
        // delayed -> ready when due; redelivery counted
        assert!(matches!(g.take(m, t0), Take::Wait(Some(_))));
        let (id, a2, _, r) = taken(g.take(m, t0 + Duration::from_secs(1)));
        assert_eq!((id.as_str(), r, a2), ("a", 1, a));
        assert!(g.ack(a), "an unsettled entry is settled");
        assert!(!g.ack(a), "a second settle finds nothing");
        // in flight -> ready at the ack deadline
        let (id, _, _, r) = taken(g.take(m, t0 + Duration::from_secs(31)));
        assert_eq!((id.as_str(), r), ("b", 1));
        // in flight -> ready when the holder leaves
        let other = g.join();
        g.leave(m);
        let (id, seq, _, r) = taken(g.take(other, t0 + Duration::from_secs(31)));
        assert_eq!((id.as_str(), r), ("b", 2));
        g.ack(seq);
        assert_eq!(g.backlog(), 0);
        assert_eq!(g.members(), 1);
    }
}
