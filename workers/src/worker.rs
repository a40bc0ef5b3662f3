//! The [`Worker`]: configuration, subscriptions and the loop that answers the engine.
//!
//! How the loop reacts (a slot is free when reservations + running attempts < max_concurrency):
//!
//! | message                    | condition                                   | reaction                          |
//! |----------------------------|---------------------------------------------|-----------------------------------|
//! | offer (auction)            | a slot free, bids open < bids_per_slot x    | note the bid, send `bid`          |
//! |                            | slots, and the bid function bids            |                                   |
//! | offer (auction)            | no slot free or too many bids open          | keep it, bid once a slot frees    |
//! |                            | (see `deferred`)                            | (for `queue_retry_delay` at most) |
//! | offer (auction)            | otherwise (the bid function declines)       | nothing (a decline is silence)    |
//! | offer (queue / fanout)     | a slot free and the bid function would bid  | reserve a slot, send `claim`      |
//! | offer (queue)              | every slot taken (see "Flow control")       | hold it until a slot frees        |
//! | offer (queue)              | otherwise                                   | nack: another member may take it  |
//! | offer (queue, with token)  | a slot free and the bid function would bid  | start it (claim-free, see below)  |
//! | award for this worker      | a slot free                                 | start the attempt                 |
//! | award for this worker      | every slot running                          | wait for a slot, then start it    |
//! | award                      | already running that attempt                | nothing (a redelivered award)     |
//! | award                      | that attempt with that token already taken  | nothing (a republished award)     |
//! | rejection                  | reserved / waiting / running                | release / drop it / cancel it     |
//! | cancellation               | running / waiting / reserved                | cancel it / drop it / release     |
//! | reservation past its time  | no award came (bid window + grace)          | release the slot                  |
//! | attempt ended              |                                             | free its slot (to a waiting award |
//! |                            |                                             | or a held offer)                  |
//! | offer held past            | every slot still taken                      | nack: another member may take it  |
//! | `queue_retry_delay`        |                                             |                                   |
//! | shutdown or broker closed  |                                             | cancel running attempts, return   |
//! | any of these               | its payload does not decode                 | dead-letter it with the reason    |
//!
//! A slot counts as taken by a running attempt, an award waiting for a slot and a claim. An
//! auction bid does not take one: most bids lose, and their rejection is a round trip away
//! ([`WorkerConfig::bids_per_slot`] bounds them instead).
//!
//! Flow control: the queues are read against credit kept at the free slots (see `intake`), so
//! a worker whose slots all run takes no queue offers and leaves them to members with room. One
//! that comes anyway (several queues, each with the credit of the same free slot) is held until
//! a slot frees, or handed back after `queue_retry_delay`.
//!
//! Every delivery is acked once handled (queue offers the worker cannot take are nacked). One
//! with a malformed payload goes to the broker's dead letters instead, where it is kept with the
//! reason; if the broker cannot take it, it is nacked and comes again.
//!
//! A bid or claim does not hold the loop while the broker confirms it (a JetStream publish
//! waits a round trip for its acknowledgement, and a loop that waited capped a worker at one
//! claim per round trip). The slot is reserved at once and the send is polled with the loop's
//! other work; its offer is settled when the broker answered: acked once sent, and if the send
//! failed the slot is released and a queue offer nacked, so another member may take it.
//!
//! A claim-free offer (a queue offer that carries its fencing token, `claim: false` in the
//! definition) is started at once under that token. Its delivery is the attempt's lease: it is
//! acked once the attempt's first report (`started`, or `finished` for a quick one) is out, and
//! handed back if the attempt ends without one (a shutdown, a result that could not be sent),
//! so a member that dies first leaves the offer to another. The engine takes the first report
//! under the token and refuses any other worker's, which stops a second copy.
//!
//! "Already taken" is the worker's memory of the awards it started: in memory, and with
//! [`WorkerConfig::journal`] also on disk, written before the handler starts, so that it outlives
//! a restart of the worker.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capstan_brokers::{Broker, Delivery, Message, SubscriptionMode};
use capstan_proto::{
    AttemptRef, Award, Bid, Claim, DispatchMode, Rejection, TaskCancel, TaskOffer, WorkerInfo, topics, types,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::attempt::{Done, DoneGuard, Emitter, run_attempt};
use crate::handler::{BidTerms, CancelSignal, CancelSwitch, Handler, RunPlace};
use crate::journal::{Journal, Taken};
use crate::{Error, Result};

mod config;
mod deferred;
mod intake;
mod settle;
mod slots;

pub use config::WorkerConfig;
use deferred::Kept;
use intake::{Held, Intake};
use settle::{Settle, bad_payload, declined};
use slots::Reservation;

/// Decides whether and how to bid for an offer, given the free slots (at least 1).
pub type BidFn = Arc<dyn Fn(&TaskOffer, u32) -> Option<BidTerms> + Send + Sync>;

/// A worker: configuration, bid function and handler. Run it with [`Worker::run`].
pub struct Worker {
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    bid: Option<BidFn>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Where a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    Offers,
    /// The queue subscription with this index into the loop's `intake`.
    Queue(usize),
    Inbox,
}

struct Running {
    token: u64,
    cancel: CancelSwitch,
}

/// A bid or claim the broker has not confirmed yet, with the offer it answers.
type Sending = Pin<Box<dyn Future<Output = Sent> + Send>>;

/// A bid or claim the broker answered.
struct Sent {
    source: Source,
    /// The offer's delivery, unless it was settled already (a kept auction offer).
    delivery: Option<Delivery>,
    attempt: AttemptRef,
    result: std::result::Result<(), capstan_brokers::Error>,
}

impl Worker {
    /// A worker with the default bid function: bid when a slot is free and the labels meet the
    /// offer's requirements, with cost = busy slots.
    pub fn new(config: WorkerConfig, handler: impl Handler) -> Self {
        Worker { config, handler: Arc::new(handler), bid: None }
    }

    /// Replaces the bid function; it is only asked when a slot is free.
    pub fn bid_with(mut self, bid: impl Fn(&TaskOffer, u32) -> Option<BidTerms> + Send + Sync + 'static) -> Self {
        self.bid = Some(Arc::new(bid));
        self
    }

    /// Records awards in a journal file (see [`WorkerConfig::journal`]).
    pub fn journal(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.journal = Some(path.into());
        self
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Subscribes and answers the engine until `shutdown` completes (then `Ok`) or the broker
    /// fails or closes (then `Err`). Running attempts are cancelled when it returns.
    pub async fn run(self, broker: Arc<dyn Broker>, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        self.config.validate()?;
        let mut taken = Taken::default();
        let journal = match &self.config.journal {
            Some(path) => {
                let (journal, loaded) = Journal::open(path)?;
                for (attempt, token) in loaded {
                    taken.insert(attempt, token);
                }
                Some(journal)
            }
            None => None,
        };
        let cap = 2 * self.config.max_concurrency as usize + 16;
        let (tx, mut rx) = mpsc::channel::<std::result::Result<(Source, Delivery), capstan_brokers::Error>>(cap);
        // One pump per subscription feeds the loop; dropping the set at return aborts them and
        // drops the subscriptions, so whatever they held goes back to the broker.
        let mut pumps = JoinSet::new();
        let mut subscriptions = Vec::new();
        let mut intake = Vec::new();
        for t in &self.config.task_types {
            subscriptions.push((topics::tasks(t), SubscriptionMode::Broadcast, Source::Offers, None));
            // A queue is read only against credit: as many offers as slots are free.
            let queue = Intake::new();
            subscriptions.push((
                topics::queue(t),
                SubscriptionMode::Competing { group: format!("capstan-workers-{t}") },
                Source::Queue(intake.len()),
                Some(queue.credit.clone()),
            ));
            intake.push(queue);
        }
        // The inbox comes last: once it has a member, the worker hears everything (nothing is
        // answered before the loop runs, so no award can precede it).
        subscriptions.push((
            topics::worker(&self.config.id),
            SubscriptionMode::Competing { group: self.config.id.clone() },
            Source::Inbox,
            None,
        ));
        for (topic, mode, source, credit) in subscriptions {
            let mut sub = match credit {
                Some(credit) => broker.subscribe_with_credit(&topic, mode, credit).await?,
                None => broker.subscribe(&topic, mode).await?,
            };
            let tx = tx.clone();
            pumps.spawn(async move {
                loop {
                    let next = sub.next().await;
                    let stop = next.is_err();
                    if tx.send(next.map(|d| (source, d))).await.is_err() || stop {
                        return;
                    }
                }
            });
        }
        drop(tx);
        tracing::info!(worker = %self.config.id, types = ?self.config.task_types, "worker running");

        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let info = WorkerInfo { id: self.config.id.clone(), labels: self.config.labels.clone() };
        let mut state = LoopState {
            emitter: Emitter::new(broker, info),
            reserved: HashMap::new(),
            bids_open: 0,
            running: HashMap::new(),
            waiting: VecDeque::new(),
            intake,
            held: VecDeque::new(),
            deferred: Kept::default(),
            taken,
            journal,
            done_tx,
            sending: FuturesUnordered::new(),
            worker: &self,
        };
        tokio::pin!(shutdown);
        state.refill().await;
        let outcome = loop {
            let expiry = state.reserved.values().map(|r| r.until).chain(state.held_until()).min();
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                next = rx.recv() => match next {
                    Some(Ok((source, delivery))) => state.delivered(source, delivery).await,
                    Some(Err(e)) => break Err(Error::Broker(e)),
                    None => break Err(Error::Broker(capstan_brokers::Error::Closed)),
                },
                Some(sent) = state.sending.next(), if !state.sending.is_empty() => state.sent(sent).await,
                Some(done) = done_rx.recv() => state.ended(done).await,
                _ = sleep_until_opt(expiry) => {
                    let now = Instant::now();
                    let mut bids_gone = 0;
                    state.reserved.retain(|a, r| {
                        let keep = r.until > now;
                        if !keep {
                            tracing::debug!(task = %a.task, run = %a.run_id, "no award came; slot released");
                            bids_gone += usize::from(r.bid);
                        }
                        keep
                    });
                    state.bids_open -= bids_gone;
                }
            }
            state.refill().await;
        };
        state.stop(&mut done_rx).await;
        tracing::info!(worker = %self.config.id, "worker stopped");
        outcome
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The loop's state: reservations (with their expiry), running attempts and awards waiting for
/// a slot.
struct LoopState<'w> {
    emitter: Emitter,
    reserved: HashMap<AttemptRef, Reservation>,
    /// How many of `reserved` are bids.
    bids_open: usize,
    running: HashMap<AttemptRef, Running>,
    /// Awards that came while every slot was running, in order; at most `bid_limit()`.
    waiting: VecDeque<(Award, Option<RunPlace>)>,
    /// The credit of each queue subscription (see `intake`).
    intake: Vec<Intake>,
    /// Queue offers that came while every slot was taken, oldest first.
    held: VecDeque<Held>,
    /// Auction offers that came when the worker could not bid, oldest first (see `deferred`).
    deferred: Kept,
    taken: Taken,
    journal: Option<Journal>,
    done_tx: mpsc::UnboundedSender<Done>,
    /// Bids and claims on their way to the broker.
    sending: FuturesUnordered<Sending>,
    worker: &'w Worker,
}

impl LoopState<'_> {
    fn terms(&self, offer: &TaskOffer, free: u32) -> Option<BidTerms> {
        if free == 0 {
            return None;
        }
        match &self.worker.bid {
            Some(bid) => bid(offer, free),
            None => self
                .worker
                .config
                .meets(&offer.requires)
                .then(|| BidTerms { cost: f64::from(self.worker.config.max_concurrency - free), estimated_ms: 0 }),
        }
    }

    /// A delivery from a pump: a queue offer that finds every slot taken waits for one.
    async fn delivered(&mut self, source: Source, delivery: Delivery) {
        if let Source::Queue(index) = source {
            self.arrived(index);
            if self.free_slots() == 0 && delivery.message.event.ty == types::TASK_OFFERED {
                match self.hold(source, delivery) {
                    Ok(()) => return,
                    Err(delivery) => return self.settle(&delivery, Settle::Retry).await,
                }
            }
        }
        self.handle(source, delivery).await;
    }

    async fn handle(&mut self, source: Source, delivery: Delivery) {
        let event = &delivery.message.event;
        let settle = match (source, event.ty.as_str()) {
            (Source::Offers | Source::Queue(_), types::TASK_OFFERED) => match event.payload::<TaskOffer>() {
                Ok(offer) => match self.on_offer(source, offer) {
                    Answer::Settle(settle) => settle,
                    Answer::Send(attempt, message) => {
                        return self.send(source, Some(delivery), attempt, message).await;
                    }
                    Answer::Start(start) => {
                        let (award, place) = *start;
                        return self.launch(award, Some(place), Some(delivery));
                    }
                },
                Err(e) => bad_payload(event, &e),
            },
            (Source::Inbox, types::TASK_AWARDED) => match event.payload::<Award>() {
                Ok(award) => self.on_award(award),
                Err(e) => bad_payload(event, &e),
            },
            (Source::Inbox, types::TASK_REJECTED) => match event.payload::<Rejection>() {
                Ok(r) => self.release(&r.attempt, &r.reason),
                Err(e) => bad_payload(event, &e),
            },
            (Source::Inbox, types::TASK_CANCELLED) => match event.payload::<TaskCancel>() {
                Ok(c) if c.worker_id.as_ref().is_none_or(|w| *w == self.worker.config.id) => {
                    self.release(&c.attempt, &c.reason)
                }
                Ok(_) => Settle::Ack,
                Err(e) => bad_payload(event, &e),
            },
            (_, other) => {
                tracing::debug!(ty = other, ?source, "ignoring an event of no concern");
                Settle::Ack
            }
        };
        self.settle(&delivery, settle).await;
    }

    /// Sends a bid or claim; the offer is settled once the broker answered. A send the broker
    /// finishes at once (the in-memory one) is settled right here, else it waits in `sending`.
    async fn send(&mut self, source: Source, delivery: Option<Delivery>, attempt: AttemptRef, message: Box<Message>) {
        let emitter = self.emitter.clone();
        let mut sending: Sending = Box::pin(async move {
            let result = emitter.publish(*message).await;
            Sent { source, delivery, attempt, result }
        });
        match futures::poll!(sending.as_mut()) {
            Poll::Ready(sent) => self.sent(sent).await,
            Poll::Pending => self.sending.push(sending),
        }
    }

    /// Settles the offer a bid or claim answered; a failed send releases its slot, and a queue
    /// offer comes again for another member.
    async fn sent(&mut self, sent: Sent) {
        let Sent { source, delivery, attempt, result } = sent;
        let settle = match result {
            Ok(()) => Settle::Ack,
            Err(e) => {
                tracing::warn!(error = %e, task = %attempt.task, "could not send a bid or claim");
                self.unreserve(&attempt);
                declined(source)
            }
        };
        if let Some(delivery) = delivery {
            self.settle(&delivery, settle).await;
        }
    }

    /// Answers an offer: with a bid or claim to send (its slot reserved), or a settle at once.
    fn on_offer(&mut self, source: Source, offer: TaskOffer) -> Answer {
        let a = offer.attempt.clone();
        if self.reserved.contains_key(&a) || self.running.contains_key(&a) || self.is_waiting(&a) {
            return Answer::Settle(Settle::Ack); // a re-offer of what we already answered
        }
        let bid = offer.dispatch == DispatchMode::Auction;
        if bid && !self.may_bid() {
            if self.worker.bid.is_some() || self.worker.config.meets(&offer.requires) {
                self.defer(offer);
            }
            return Answer::Settle(Settle::Ack);
        }
        let free = self.free_slots();
        let Some(terms) = self.terms(&offer, free) else {
            tracing::debug!(task = %a.task, run = %a.run_id, free, bids = self.bids_open, "not bidding");
            return Answer::Settle(declined(source));
        };
        if let (Some(token), DispatchMode::Queue) = (offer.token, offer.dispatch) {
            if self.taken.contains(&a, token) {
                return Answer::Settle(Settle::Ack); // this worker ran it already
            }
            if offer.start_by_ms.is_some_and(|by| until_epoch_ms(by).is_zero()) {
                // Its attempt has timed out at the engine: running it would only be refused.
                tracing::debug!(task = %a.task, run = %a.run_id, "dropping a stale claim-free offer");
                return Answer::Settle(Settle::Ack);
            }
            // A claim-free offer: ours to run at once under its token. The offer is settled
            // once the attempt's first report is out (see `run_attempt`).
            let place = RunPlace::of(&offer);
            let award = Award {
                attempt: a,
                worker_id: self.worker.config.id.clone(),
                token,
                task_type: offer.task_type,
                input: offer.input,
                heartbeat_ms: offer.heartbeat_ms,
                start_to_close_ms: offer.start_to_close_ms,
            };
            return Answer::Start(Box::new((award, place)));
        }
        let worker = self.emitter.worker().clone();
        let message = match offer.dispatch {
            DispatchMode::Auction => {
                let bid = Bid {
                    attempt: a.clone(),
                    worker,
                    cost: terms.cost,
                    estimated_ms: terms.estimated_ms,
                    free_slots: free,
                };
                self.emitter.message(types::TASK_BID, &a, None, &bid)
            }
            DispatchMode::Queue | DispatchMode::Fanout => {
                self.emitter.message(types::TASK_CLAIM, &a, None, &Claim { attempt: a.clone(), worker })
            }
        };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, task = %a.task, "could not build a bid or claim");
                return Answer::Settle(declined(source));
            }
        };
        let wait = match (offer.dispatch, offer.bid_deadline_ms) {
            (DispatchMode::Auction, Some(deadline)) => until_epoch_ms(deadline) + self.worker.config.award_grace,
            _ => self.worker.config.award_timeout,
        };
        self.reserve(a.clone(), Reservation { until: Instant::now() + wait, place: RunPlace::of(&offer), bid });
        Answer::Send(a, Box::new(message))
    }

    fn on_award(&mut self, award: Award) -> Settle {
        let a = award.attempt.clone();
        if award.worker_id != self.worker.config.id {
            tracing::warn!(to = %award.worker_id, task = %a.task, "award addressed to another worker");
            return Settle::Ack;
        }
        if let Some(r) = self.running.get(&a) {
            if r.token != award.token {
                tracing::warn!(task = %a.task, running = r.token, awarded = award.token, "second award of a running attempt");
            }
            return Settle::Ack;
        }
        if self.taken.contains(&a, award.token) || self.is_waiting(&a) {
            tracing::debug!(task = %a.task, run = %a.run_id, token = award.token, "a repeated award");
            return Settle::Ack;
        }
        // A late award (after the reservation expired) is taken too.
        let place = self.unreserve(&a).map(|r| r.place);
        if self.running.len() < self.worker.config.max_concurrency as usize {
            self.launch(award, place, None);
        } else if self.waiting.len() < self.bid_limit() {
            tracing::debug!(task = %a.task, run = %a.run_id, "every slot is running; the award waits for one");
            self.waiting.push_back((award, place));
        } else {
            tracing::warn!(task = %a.task, run = %a.run_id, "award without a free slot; left to time out");
        }
        Settle::Ack
    }

    /// Runs an attempt this worker holds: awarded, or taken from a claim-free offer whose
    /// delivery (`lease`) the attempt settles once it has reported.
    fn launch(&mut self, award: Award, place: Option<RunPlace>, lease: Option<Delivery>) {
        let a = award.attempt.clone();
        let (switch, signal) = CancelSignal::new();
        self.running.insert(a.clone(), Running { token: award.token, cancel: switch });
        self.taken.insert(a.clone(), award.token);
        let done = DoneGuard { tx: self.done_tx.clone(), attempt: a, lease };
        let config = &self.worker.config;
        // A claim-free attempt reports by the award timeout at the latest, so its offer is
        // settled long before a broker would hand it to another member.
        let started_after =
            if done.lease.is_some() { config.started_after.min(config.award_timeout) } else { config.started_after };
        tokio::spawn(run_attempt(
            self.emitter.clone(),
            self.journal.clone(),
            Arc::clone(&self.worker.handler),
            award,
            place,
            signal,
            config.cancel_grace,
            started_after,
            done,
        ));
    }

    /// Frees an ended attempt's slot. A claim-free offer it hands back goes back to the broker
    /// now, and is forgotten as taken: should it come here again, it is run again.
    async fn ended(&mut self, done: Done) {
        self.running.remove(&done.attempt);
        if let Some(delivery) = done.lease {
            tracing::info!(task = %done.attempt.task, run = %done.attempt.run_id, "handing a claim-free offer back");
            self.taken.remove(&done.attempt);
            self.settle(&delivery, Settle::Retry).await;
        }
        if self.running.len() < self.worker.config.max_concurrency as usize
            && let Some((award, place)) = self.waiting.pop_front()
        {
            self.launch(award, place, None);
        }
    }

    /// Cancels every running attempt and waits for them to end (bounded by the cancel grace).
    async fn stop(&mut self, done_rx: &mut mpsc::UnboundedReceiver<Done>) {
        self.release_held().await;
        if !self.waiting.is_empty() {
            // Never started: the engine times them out (schedule-to-start or start-to-close).
            tracing::info!(awards = self.waiting.len(), "dropping the awards that waited for a slot");
            self.waiting.clear();
        }
        for r in self.running.values() {
            r.cancel.cancel();
        }
        let deadline = Instant::now() + self.worker.config.cancel_grace + Duration::from_millis(100);
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(done)) => self.ended(done).await,
                _ => break,
            }
        }
    }
}

/// How the loop answers an offer.
enum Answer {
    /// Settle the offer now.
    Settle(Settle),
    /// Send this bid or claim for the attempt (its slot is reserved), then settle the offer.
    Send(AttemptRef, Box<Message>),
    /// Run this attempt of a claim-free offer now; the offer is its lease.
    Start(Box<(Award, RunPlace)>),
}

/// Time left until a wall-clock deadline in ms since the Unix epoch (zero if past).
fn until_epoch_ms(deadline_ms: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_millis(deadline_ms).saturating_sub(now)
}
