//! Timers derived from a state alone. Most timers a run sets are moot within milliseconds (a
//! task's schedule-to-start deadline once it starts, its start-to-close deadline once it ends).
//! The runtime may therefore keep such a timer in memory and write it only once it has lived a
//! while, provided that after a crash it can set again every timer the lost memory held. This
//! module is that derivation: which timers a state relies on, and when they are due.
//!
//! Only kinds whose deadline the events determine are derived (`RunState::derives`):
//! schedule-to-start, start-to-close, retry, delay and approval timeout at their exact times,
//! and the re-offer of a queue or fanout offer at `now` (its wait is random, and offering again
//! right after a restart is what a lost offer needs anyway; a claim-free offer, which may be
//! running unreported, waits `CLAIM_FREE_REOFFER_MS` more). Heartbeat deadlines move without
//! events, and an auction's bid window and its re-offer depend on bids and on timers that fired
//! without events: those are never derived, so the runtime always writes them at once.
//!
//! A derived timer may be one the live run had no longer armed (a delay that fired while the
//! run was paused, say). Such a timer is moot when it fires; the simulator checks both halves.
//!
//! The same holds for two kinds of messages ([`RunState::derived_messages`]): the award of an
//! attempt whose holder has neither started nor ended, and the notification that the run
//! ended. The runtime publishes them after the commit without an outbox row and, after a
//! crash, sends them again from the states of the runs after its checkpoint. A worker knows an
//! award it already took by its attempt and token, and the ids of both messages are derived
//! from what they say, so a consumer can drop a copy by id.

use capstan_proto::DispatchMode;

use super::flow::{CLAIM_FREE_REOFFER_MS, sequence_finished};
use super::state::{RunState, TaskPhase};
use super::types::{Effect, TimerKind, WorkerMessage};
use crate::duration::{Timestamp, parse_duration};

impl RunState {
    /// Whether [`RunState::derived_timers`] would set `kind` again for this state: the runtime may
    /// then keep it in memory only. `false` for kinds whose deadlines the events do not carry
    /// and for tasks this run does not know.
    pub fn derives(&self, kind: &TimerKind) -> bool {
        let task = match kind {
            TimerKind::Heartbeat { .. } | TimerKind::BidWindow { .. } => return false,
            TimerKind::Reoffer { task, .. } => {
                return self
                    .index(task)
                    .and_then(|i| self.spec(i))
                    .is_some_and(|s| s.dispatch != DispatchMode::Auction);
            }
            TimerKind::ScheduleToStart { task, .. }
            | TimerKind::StartToClose { task, .. }
            | TimerKind::Retry { task, .. }
            | TimerKind::Delay { task }
            | TimerKind::ApprovalTimeout { task } => task,
        };
        self.index(task).is_some()
    }

    /// Whether the runtime may publish `effect` without an outbox row because
    /// [`RunState::derived_messages`] sends it again from the state after a crash: an award or a
    /// notification that the run ended.
    pub fn derives_message(effect: &Effect) -> bool {
        matches!(effect, Effect::Send { message: WorkerMessage::Award(_), .. } | Effect::Notify(_))
    }

    /// The messages this state relies on having reached their consumers, as `decide` sent them:
    /// the award of every holder of a current attempt that has neither started nor ended, and,
    /// once the run is over, the notification that it ended.
    pub fn derived_messages(&self) -> Vec<Effect> {
        let mut messages = Vec::new();
        let Some(meta) = &self.meta else { return messages };
        if let Some((_, result)) = self.finished {
            messages.push(Effect::Notify(sequence_finished(meta, result)));
            return messages;
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if !matches!(t.phase, TaskPhase::Awarded | TaskPhase::Running) {
                continue;
            }
            let Some(spec) = self.spec(i) else { continue };
            for h in t.holders.iter().filter(|h| !h.started && h.outcome.is_none()) {
                let award = self.award_message(i, spec, &h.worker_id, h.token);
                messages.push(Effect::Send { worker_id: h.worker_id.clone(), message: WorkerMessage::Award(award) });
            }
        }
        messages
    }

    /// Every timer of a kind [`RunState::derives`] that this state relies on, with its due time.
    /// `now` is when a derived re-offer fires. Empty once the run is over.
    pub fn derived_timers(&self, now: Timestamp) -> Vec<(TimerKind, Timestamp)> {
        let mut timers = Vec::new();
        if self.is_over() || self.meta.is_none() {
            return timers;
        }
        let specs = self.sequence().map(|s| s.tasks.as_slice()).unwrap_or(&[]);
        for (spec, t) in specs.iter().zip(&self.tasks) {
            let task = || spec.name.clone();
            let attempt = t.attempt;
            match t.phase {
                TaskPhase::Offered | TaskPhase::Awarded | TaskPhase::Running => {
                    let started = t.holders.iter().any(|h| h.started);
                    if let (Some(limit), Some(since), false) = (spec.timeouts.schedule_to_start, t.offered_at, started)
                    {
                        timers.push((TimerKind::ScheduleToStart { task: task(), attempt }, since.plus(limit)));
                    }
                    if let (Some(limit), Some(since)) = (spec.timeouts.start_to_close, t.awarded_at)
                        && !t.holders.is_empty()
                    {
                        timers.push((TimerKind::StartToClose { task: task(), attempt }, since.plus(limit)));
                    }
                    if t.phase == TaskPhase::Offered && t.holders.is_empty() && spec.dispatch != DispatchMode::Auction {
                        // A claim-free offer may be running unreported at a member: left to the
                        // broker for as long as a live one would be (`CLAIM_FREE_REOFFER_MS`).
                        let at = if t.offered_token.is_some() { now.plus(CLAIM_FREE_REOFFER_MS) } else { now };
                        timers.push((TimerKind::Reoffer { task: task(), attempt, offer: t.offer }, at));
                    }
                }
                TaskPhase::Backoff => {
                    if let Some(until) = t.until {
                        timers.push((TimerKind::Retry { task: task(), attempt }, until));
                    }
                }
                TaskPhase::Delayed => {
                    if let Some(until) = t.until {
                        timers.push((TimerKind::Delay { task: task() }, until));
                    }
                }
                TaskPhase::AwaitingApproval => {
                    let limit =
                        spec.properties.get("timeout").and_then(|v| v.as_str()).and_then(|v| parse_duration(v).ok());
                    if let (Some(limit), Some(since)) = (limit, t.offered_at) {
                        timers.push((TimerKind::ApprovalTimeout { task: task() }, since.plus(limit)));
                    }
                }
                TaskPhase::Pending | TaskPhase::Ended(_) => {}
            }
        }
        timers
    }
}
