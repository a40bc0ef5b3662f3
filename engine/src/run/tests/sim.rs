//! Property tests: random DAGs driven by a small simulator of workers, timers and operators that
//! feeds every decision's effects back as inputs, with late, duplicated and stale messages and
//! timers firing in random order. Every recorded event is checked against the invariants.

use std::collections::{BTreeMap, BTreeSet};

use capstan_proto::{Award, SequenceFinished};
use proptest::prelude::*;

use super::*;

/// One generated task: dependency bits (only earlier tasks count), dispatch, policy, retries,
/// flags and an approval kind (0..=5 none, 6 automatic, 7 manual).
type Gen = (u16, u8, u8, u32, bool, bool, u8, bool, u8);

fn build(gens: &[Gen]) -> Arc<Definition> {
    let mut tasks = Vec::new();
    for (i, &(deps, dispatch, award, attempts, idempotent, cof, timing, requires, kind)) in gens.iter().enumerate() {
        let deps: Vec<String> = (0..i).filter(|j| deps & (1 << j) != 0).map(|j| format!("t{j}")).collect();
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        let mut t = task(&format!("t{i}"), &deps);
        t.dispatch = [DispatchMode::Auction, DispatchMode::Queue, DispatchMode::Fanout, DispatchMode::Queue]
            [dispatch as usize % 4];
        // The fourth kind: a queue task whose offers carry their token (idempotent tasks only).
        t.claim = !(dispatch % 4 == 3 && idempotent);
        t.award = [AwardPolicy::First, AwardPolicy::LowestCost, AwardPolicy::EarliestFinish][award as usize % 3];
        t.retry = RetryPolicy {
            max_attempts: attempts,
            initial_interval: 100,
            backoff_coefficient: 2.0,
            max_interval: 1_000,
            non_retryable: vec!["fatal".into()],
        };
        t.timeouts = Timeouts {
            schedule_to_start: Some(5_000),
            start_to_close: Some(20_000),
            heartbeat: (timing % 2 == 0).then_some(3_000),
            bid_window: 100,
        };
        t.triggered_after = (timing % 3 == 0).then_some(500);
        t.idempotent = idempotent;
        t.continue_on_failure = cof;
        if requires {
            t.requires.insert("zone".into(), "eu".into());
        }
        if kind >= 6 {
            t.task_type = APPROVAL_TYPE.into();
            let mode = if kind == 7 { "manual" } else { "automatic" };
            t.properties.insert("pass".into(), json!(mode));
            t.properties.insert("warning".into(), json!("manual"));
            if timing % 2 == 1 {
                t.properties.insert("timeout".into(), json!("30s"));
            }
        }
        tasks.push(t);
    }
    single(tasks)
}

/// SplitMix64: the simulator's own deterministic randomness, seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

struct Sim {
    run: Run,
    rng: Rng,
    inbox: Vec<Input>,
    delivered: Vec<Input>,
    timers: BTreeMap<String, (TimerKind, u64)>,
    awards: Vec<Award>,
    notified: Vec<SequenceFinished>,
    // Invariant bookkeeping.
    tokens: BTreeSet<u64>,
    last_tokens: BTreeMap<String, u64>,
    awarded: BTreeSet<(String, u32)>,
    accepted: BTreeSet<(String, u32, String)>,
    ended: BTreeSet<String>,
    started: BTreeMap<String, u32>,
}

const WORKERS: [(&str, &str); 3] = [("w0", "eu"), ("w1", "us"), ("w2", "eu")];

impl Sim {
    fn step(&mut self, input: Input) {
        let ctx = Ctx { now: Timestamp(self.run.now), random: self.rng.next() };
        let decided = self.run.state.decide(&input, &ctx);
        assert_eq!(decided, self.run.state.decide(&input, &ctx), "decide is deterministic");
        let mut applied = self.run.state.clone();
        assert_eq!(applied.apply(&input, &ctx), decided, "apply decides as decide does");
        let d = match (decided, &input) {
            (Ok(d), _) => d,
            (Err(Error::NotAwaitingApproval { .. }), Input::Approve { .. }) => {
                assert_eq!(applied, self.run.state, "a refused approval changed the state");
                return;
            }
            (Err(e), _) => panic!("{input:?} refused: {e}\n{}", self.run.history()),
        };
        for e in &d.events {
            self.check(e, &input);
            self.run.state.evolve(e);
            self.run.events.push(e.clone());
        }
        assert_eq!(applied, self.run.state, "apply and the fold of its events differ\n{}", self.run.history());
        self.check_applied_twice(&input, &d);
        if let Input::Bid(_) | Input::Claim(_) | Input::Started(_) | Input::Heartbeat(_) | Input::Finished(_) = input {
            self.delivered.push(input);
        }
        for effect in d.effects {
            self.effect(effect);
        }
        self.check_derived();
        self.check_derived_messages();
    }

    /// An input the runtime records no id for (`Input::idempotent_by_state`), once accepted,
    /// decides nothing new when it comes again: no event, and nothing that would stop the
    /// worker (a rejection or a cancel of that attempt). Without this the runtime's
    /// deduplication table would be needed for it.
    fn check_applied_twice(&mut self, input: &Input, first: &Decision) {
        let accepted = first.events.iter().any(|e| !matches!(e, Event::InputRejected { .. }));
        if !input.idempotent_by_state() || !accepted {
            return;
        }
        let ctx = Ctx { now: Timestamp(self.run.now), random: self.rng.next() };
        let again = self.run.state.decide(input, &ctx).expect("a redelivery decides");
        assert!(again.events.is_empty(), "{input:?} applied twice: {:?}\n{}", again.events, self.run.history());
        let (worker, attempt) = match input {
            Input::Claim(c) => (&c.worker.id, &c.attempt),
            Input::Bid(b) => (&b.worker.id, &b.attempt),
            Input::Started(p) | Input::Heartbeat(p) => (&p.worker_id, &p.attempt),
            Input::Finished(f) => (&f.worker_id, &f.attempt),
            _ => unreachable!("not idempotent by state"),
        };
        for effect in &again.effects {
            if let Effect::Send { worker_id, message: WorkerMessage::Rejection(r) } = effect {
                assert!(worker_id != worker || r.attempt != *attempt, "{input:?} again: {effect:?}");
            }
            if let Effect::Send { worker_id, message: WorkerMessage::Cancel(c) } = effect {
                assert!(worker_id != worker || c.attempt != *attempt, "{input:?} again: {effect:?}");
            }
        }
    }

    /// What a restarted runtime would set again from the state alone covers every live timer
    /// of a derived kind (at the same time, but for a re-offer's), and whatever it adds or
    /// leaves out is moot when it fires.
    fn check_derived(&self) {
        let st = &self.run.state;
        let derived: BTreeMap<String, (TimerKind, u64)> =
            st.derived_timers(Timestamp(self.run.now)).into_iter().map(|(k, at)| (k.key(), (k, at.0))).collect();
        for (key, (kind, at)) in &self.timers {
            if !st.derives(kind) {
                continue;
            }
            match derived.get(key) {
                Some((_, d)) if !matches!(kind, TimerKind::Reoffer { .. }) => {
                    assert_eq!(d, at, "{key} derived at another time\n{}", self.run.history())
                }
                Some(_) => {}
                None => assert!(self.moot(kind, *at), "live {key} not derived\n{}", self.run.history()),
            }
        }
        for (key, (kind, at)) in &derived {
            assert!(st.derives(kind), "{key} derived but not derivable");
            if !self.timers.contains_key(key) {
                assert!(self.moot(kind, *at), "{key} derived but neither live nor moot\n{}", self.run.history());
            }
        }
    }

    /// What a restarted runtime would publish again from the state alone: exactly the awards
    /// `decide` sent to holders that have neither started nor ended, as they were sent, and
    /// once the run is over its one notification.
    fn check_derived_messages(&self) {
        let st = &self.run.state;
        let mut derived = st.derived_messages();
        if st.is_over() {
            assert_eq!(self.notified.len(), 1, "one notification per run\n{}", self.run.history());
            assert_eq!(derived, vec![Effect::Notify(self.notified[0].clone())], "{}", self.run.history());
            return;
        }
        assert!(self.notified.is_empty(), "a notification before the end");
        for a in &self.awards {
            let live = st.index(&a.attempt.task).map(|i| &st.tasks[i]).is_some_and(|t| {
                t.attempt == a.attempt.attempt
                    && matches!(t.phase, TaskPhase::Awarded | TaskPhase::Running)
                    && t.holders.iter().any(|h| h.token == a.token && !h.started && h.outcome.is_none())
            });
            let at = derived.iter().position(|m| {
                matches!(m, Effect::Send { worker_id, message: WorkerMessage::Award(d) } if d == a && *worker_id == a.worker_id)
            });
            match (live, at) {
                (true, Some(at)) => _ = derived.remove(at),
                (true, None) => panic!("the award {a:?} is not derived\n{}", self.run.history()),
                (false, Some(_)) => {
                    panic!("the award {a:?} is derived but its holder moved on\n{}", self.run.history())
                }
                (false, None) => {}
            }
        }
        assert!(derived.is_empty(), "derived but never sent: {derived:?}\n{}", self.run.history());
    }

    /// Whether `kind` firing at `at` would change nothing.
    fn moot(&self, kind: &TimerKind, at: u64) -> bool {
        let ctx = Ctx { now: Timestamp(self.run.now.max(at)), random: 0 };
        let d = self.run.state.decide(&timer(kind.clone()), &ctx).expect("a timer of a known task applies");
        d.events.is_empty() && d.effects.is_empty()
    }

    /// Checks one event against the state it is about to be folded into.
    fn check(&mut self, e: &Event, input: &Input) {
        let st = &self.run.state;
        assert!(!st.is_over(), "no event after the run ended: {e:?}");
        let deps_ended = |task: &str| {
            let spec = st.sequence().and_then(|s| s.task(task)).expect("known task");
            spec.depends_on.iter().all(|d| matches!(st.task(d).map(|t| t.status), Some(TaskPhase::Ended(_))))
        };
        match e {
            Event::TaskOffered { task, attempt: 1, offer: 1, .. }
            | Event::TaskDelayed { task, .. }
            | Event::ApprovalRequested { task, .. } => {
                assert!(deps_ended(task), "{task} started before its dependencies ended");
            }
            Event::TaskOffered { task, attempt, .. } => {
                if let Some(s) = self.started.get(task) {
                    let idempotent = st.sequence().and_then(|q| q.task(task)).is_some_and(|t| t.idempotent);
                    assert!(idempotent || attempt <= s, "{task} offered again after it started");
                }
            }
            Event::TaskAwarded { task, attempt, token, .. } => {
                // A claim-free offer takes its token when offered, so awards across tasks may
                // come in another order; within a task they increase.
                assert!(self.tokens.insert(*token), "token {token} awarded twice");
                let last = self.last_tokens.insert(task.clone(), *token).unwrap_or(0);
                assert!(*token > last, "tokens of {task} strictly increase");
                let fanout =
                    st.sequence().and_then(|q| q.task(task)).is_some_and(|t| t.dispatch == DispatchMode::Fanout);
                assert!(fanout || self.awarded.insert((task.clone(), *attempt)), "{task}#{attempt} awarded twice");
            }
            Event::TaskStarted { task, attempt, .. } => {
                self.started.entry(task.clone()).or_insert(*attempt);
            }
            Event::AttemptEnded { task, attempt, worker_id: Some(w), .. } => {
                assert!(self.accepted.insert((task.clone(), *attempt, w.clone())), "result accepted twice");
            }
            Event::TaskEnded { task, .. } => {
                assert!(self.ended.insert(task.clone()), "{task} ended twice")
            }
            Event::RunFinished { .. } => {
                assert!(st.tasks().all(|t| matches!(t.status, TaskPhase::Ended(_))), "run ended with open tasks");
            }
            Event::InputRejected { .. } => {
                assert!(matches!(input, Input::Started(_) | Input::Heartbeat(_) | Input::Finished(_)));
            }
            _ => {}
        }
    }

    /// The workers' and the runtime's side: effects become future inputs.
    fn effect(&mut self, effect: Effect) {
        match effect {
            Effect::Offer(o) => {
                for (id, zone) in WORKERS {
                    if !self.rng.chance(70) {
                        continue;
                    }
                    if let Some(token) = o.token {
                        // Claim-free: a member that meets the requirements starts at once,
                        // reporting `started` or (with `started_after`) only its end.
                        if o.requires.get("zone").is_none_or(|z| z == zone) {
                            let reports_started = self.rng.chance(70);
                            self.work(&o.attempt.task, o.attempt.attempt, id, token, reports_started);
                        }
                        continue;
                    }
                    let w = worker(id, &[("zone", zone)]);
                    let input = match o.dispatch {
                        DispatchMode::Auction => {
                            let cost = self.rng.below(4) as f64;
                            let est = self.rng.below(3) as u64;
                            bid(&o.attempt.task, o.attempt.attempt, w, cost, est, self.rng.below(3) as u32)
                        }
                        _ => Input::Claim(Claim { attempt: o.attempt.clone(), worker: w }),
                    };
                    self.inbox.push(input);
                }
            }
            Effect::Send { message: WorkerMessage::Award(a), .. } => {
                self.work(&a.attempt.task, a.attempt.attempt, &a.worker_id, a.token, true);
                self.awards.push(a);
            }
            Effect::Notify(n) => self.notified.push(n),
            Effect::Send { .. } | Effect::StartRun { .. } => {}
            Effect::SetTimer { kind, at } => _ = self.timers.insert(kind.key(), (kind, at.0)),
            Effect::CancelTimer { kind } => _ = self.timers.remove(&kind.key()),
        }
    }

    /// A worker's reports on an attempt it holds (or took from a claim-free offer), unless it
    /// is lost (5 %).
    fn work(&mut self, task: &str, n: u32, w: &str, token: u64, reports_started: bool) {
        if self.rng.chance(5) {
            return;
        }
        if reports_started {
            self.inbox.push(started(task, n, w, token));
        }
        if self.rng.chance(30) {
            self.inbox.push(heartbeat(task, n, w, token));
        }
        let input = match self.rng.below(100) {
            0..8 => failed(task, n, w, token, "flaky"),
            8..10 => failed(task, n, w, token, "fatal"),
            10..13 => finished(task, n, w, token, TaskResult::Fail),
            13..25 => finished(task, n, w, token, TaskResult::Warning),
            _ => finished(task, n, w, token, TaskResult::Pass),
        };
        self.inbox.push(input);
    }

    fn fire(&mut self, key: &str) {
        if let Some((kind, at)) = self.timers.remove(key) {
            self.run.now = self.run.now.max(at);
            self.step(timer(kind));
        }
    }

    fn awaiting(&self) -> Option<String> {
        self.run.state.tasks().find(|t| t.status == TaskPhase::AwaitingApproval).map(|t| t.name)
    }

    /// One random action: a message in any order, a timer firing early, a duplicate, a stale
    /// report, an operator command, or time passing.
    fn chaos(&mut self) {
        match self.rng.below(100) {
            0..50 if !self.inbox.is_empty() => {
                let input = self.inbox.remove(self.rng.below(self.inbox.len()));
                self.step(input);
            }
            50..65 if !self.timers.is_empty() => {
                let key = self.timers.keys().nth(self.rng.below(self.timers.len())).cloned();
                self.fire(&key.unwrap_or_default());
            }
            65..72 if !self.delivered.is_empty() => {
                let input = self.delivered[self.rng.below(self.delivered.len())].clone();
                self.step(input);
            }
            72..76 if !self.awards.is_empty() => {
                let a = self.awards[self.rng.below(self.awards.len())].clone();
                let input = finished(&a.attempt.task, a.attempt.attempt, &a.worker_id, a.token, TaskResult::Pass);
                self.step(input);
            }
            76..80 => {
                let input = if self.run.state.is_paused() { Input::Resume } else { Input::Pause };
                self.step(input);
            }
            80..85 => {
                if let Some(task) = self.awaiting() {
                    let approved = self.rng.chance(70);
                    self.step(Input::Approve { task, approved, by: "sim".into() });
                }
            }
            _ => self.run.now += self.rng.below(400) as u64,
        }
    }

    /// Well-behaved progress: resume, approve, deliver in order, else fire the earliest timer.
    fn drain(&mut self) {
        if self.run.state.is_paused() {
            self.step(Input::Resume);
        } else if let Some(task) = self.awaiting() {
            self.step(Input::Approve { task, approved: true, by: "sim".into() });
        } else if !self.inbox.is_empty() {
            let input = self.inbox.remove(0);
            self.step(input);
        } else if let Some(key) = self.timers.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone()) {
            self.fire(&key);
        } else {
            panic!("nothing left to do but the run is not over\n{}", self.run.history());
        }
    }
}

fn simulate(gens: &[Gen], seed: u64, chaos_steps: usize) {
    let def = build(gens);
    let mut sim = Sim {
        run: Run::new(def.clone()),
        rng: Rng(seed),
        inbox: Vec::new(),
        delivered: Vec::new(),
        timers: BTreeMap::new(),
        awards: Vec::new(),
        notified: Vec::new(),
        tokens: BTreeSet::new(),
        last_tokens: BTreeMap::new(),
        awarded: BTreeSet::new(),
        accepted: BTreeSet::new(),
        ended: BTreeSet::new(),
        started: BTreeMap::new(),
    };
    sim.step(Input::Start { meta: meta("dev", "delivery"), data: json!({"seed": seed}) });
    let mut steps = 0;
    while !sim.run.state.is_over() {
        steps += 1;
        assert!(steps < 20_000, "the run did not end\n{}", sim.run.history());
        if steps < chaos_steps { sim.chaos() } else { sim.drain() }
    }
    // Reports after the end are answered without growing the log.
    for input in sim.delivered.clone().into_iter().take(5) {
        let before = sim.run.events.len();
        sim.step(input);
        assert_eq!(sim.run.events.len(), before);
    }
    // The stored (serialized) events fold into exactly the live state.
    let stored = serde_json::to_string(&sim.run.events).expect("events serialize");
    let events: Vec<Event> = serde_json::from_str(&stored).expect("events deserialize");
    let mut fresh = RunState::new(def);
    for e in &events {
        fresh.evolve(e);
    }
    assert_eq!(fresh, sim.run.state);
    assert_eq!(fresh.version(), events.len() as u64);
}

fn gens() -> impl Strategy<Value = Vec<Gen>> {
    let one = (
        any::<u16>(),
        0u8..4,
        0u8..3,
        1u32..4,
        any::<bool>(),
        prop::bool::weighted(0.3),
        0u8..6,
        prop::bool::weighted(0.3),
        0u8..8,
    );
    prop::collection::vec(one, 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_runs_hold_the_invariants(gens in gens(), seed in any::<u64>(), chaos in 0usize..400) {
        simulate(&gens, seed, chaos);
    }
}
