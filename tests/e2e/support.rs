//! Test support: an in-process engine over any store, and scripted workers that speak the wire
//! protocol directly (so tests can make them misbehave: never start, stop heartbeating, run too
//! long, answer twice, answer with a stale token).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan::runtime::{Runtime, RuntimeConfig, RuntimeHandle, SystemClock};
use capstan_brokers::memory::MemoryBroker;
use capstan_brokers::{Broker, Message, SubscriptionMode};
use capstan_proto::{
    Award, Bid, Claim, CloudEvent, DispatchMode, Finished, Progress, TaskError, TaskOffer, TaskResult, WorkerInfo, ext,
    topics, types,
};
use capstan_store::{RunRecord, Store};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// What a scripted worker does with an awarded attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// Start, heartbeat, finish after `after` with this result.
    Complete { after: Duration, result: TaskResult, error: Option<&'static str> },
    /// Take the award and never say anything again.
    NeverStart,
    /// Start, then fall silent (no heartbeats, no result).
    StopHeartbeating,
    /// Start and heartbeat, but finish only after `after` (longer than start-to-close).
    RunTooLong { after: Duration },
    /// Finish twice, the second time with the same token.
    AnswerTwice,
}

/// A script: the behaviour for (task, attempt).
pub type Script = Arc<dyn Fn(&str, u32) -> Behaviour + Send + Sync>;

/// Everything scripted workers did, for assertions.
#[derive(Debug, Default, Clone)]
pub struct WorkerLog {
    /// (worker, task, attempt, token) of every award received.
    pub awards: Vec<(String, String, u32, u64)>,
    /// (worker, task, attempt, token) of every finished message sent.
    pub finished: Vec<(String, String, u32, u64)>,
    /// Rejections received: (worker, task, reason).
    pub rejections: Vec<(String, String, String)>,
}

/// Publishes one worker message to the engine.
pub async fn send(broker: &dyn Broker, worker: &str, ty: &str, run_id: &str, data: Value) {
    let event = CloudEvent::new(uuid::Uuid::new_v4().to_string(), format!("test/{worker}"), ty)
        .with_data(data)
        .with_ext(ext::RUN, run_id)
        .with_ext(ext::WORKER, worker);
    broker
        .publish(vec![Message { topic: topics::ENGINE_INPUTS.into(), key: run_id.into(), event }])
        .await
        .expect("publish to the engine");
}

/// Starts a scripted worker for `task_types`; it runs until the returned handle is aborted.
pub async fn scripted_worker(
    broker: Arc<dyn Broker>,
    id: &str,
    labels: BTreeMap<String, String>,
    task_types: &[&str],
    script: Script,
    log: Arc<Mutex<WorkerLog>>,
) -> Vec<JoinHandle<()>> {
    let info = WorkerInfo { id: id.to_string(), labels };
    let mut handles = Vec::new();
    let mut direct = broker
        .subscribe(&topics::worker(id), SubscriptionMode::Competing { group: id.to_string() })
        .await
        .expect("subscribe worker topic");
    for ty in task_types {
        for (topic, mode) in [
            (topics::tasks(ty), SubscriptionMode::Broadcast),
            (topics::queue(ty), SubscriptionMode::Competing { group: format!("capstan-workers-{ty}") }),
        ] {
            let mut sub = broker.subscribe(&topic, mode).await.expect("subscribe offers");
            let broker = broker.clone();
            let info = info.clone();
            handles.push(tokio::spawn(async move {
                while let Ok(d) = sub.next().await {
                    let _ = d.ack().await;
                    let Ok(offer) = d.message.event.payload::<TaskOffer>() else { continue };
                    let meets = offer.requires.iter().all(|(k, v)| info.labels.get(k) == Some(v));
                    if !meets {
                        continue;
                    }
                    let run = offer.attempt.run_id.clone();
                    match offer.dispatch {
                        DispatchMode::Auction => {
                            let bid = Bid {
                                attempt: offer.attempt,
                                worker: info.clone(),
                                cost: 1.0,
                                estimated_ms: 10,
                                free_slots: 1,
                            };
                            send(&*broker, &info.id, types::TASK_BID, &run, serde_json::to_value(bid).expect("json"))
                                .await;
                        }
                        DispatchMode::Queue | DispatchMode::Fanout => {
                            let claim = Claim { attempt: offer.attempt, worker: info.clone() };
                            send(
                                &*broker,
                                &info.id,
                                types::TASK_CLAIM,
                                &run,
                                serde_json::to_value(claim).expect("json"),
                            )
                            .await;
                        }
                    }
                }
            }));
        }
    }
    let id = id.to_string();
    handles.push(tokio::spawn(async move {
        while let Ok(d) = direct.next().await {
            let _ = d.ack().await;
            let event = &d.message.event;
            match event.ty.as_str() {
                types::TASK_AWARDED => {
                    let Ok(award) = event.payload::<Award>() else { continue };
                    log.lock().expect("log").awards.push((
                        id.clone(),
                        award.attempt.task.clone(),
                        award.attempt.attempt,
                        award.token,
                    ));
                    let behaviour = script(&award.attempt.task, award.attempt.attempt);
                    tokio::spawn(perform(broker.clone(), id.clone(), award, behaviour, log.clone()));
                }
                types::TASK_REJECTED => {
                    if let Ok(r) = event.payload::<capstan_proto::Rejection>() {
                        log.lock().expect("log").rejections.push((id.clone(), r.attempt.task, r.reason));
                    }
                }
                _ => {}
            }
        }
    }));
    handles
}

async fn perform(broker: Arc<dyn Broker>, id: String, award: Award, behaviour: Behaviour, log: Arc<Mutex<WorkerLog>>) {
    let run = award.attempt.run_id.clone();
    let progress = Progress { attempt: award.attempt.clone(), worker_id: id.clone(), token: award.token };
    let progress_json = serde_json::to_value(&progress).expect("json");
    if behaviour == Behaviour::NeverStart {
        return;
    }
    send(&*broker, &id, types::TASK_STARTED, &run, progress_json.clone()).await;
    let (after, result, error) = match behaviour {
        Behaviour::Complete { after, result, error } => (after, result, error),
        Behaviour::RunTooLong { after } => (after, TaskResult::Pass, None),
        Behaviour::AnswerTwice => (Duration::from_millis(5), TaskResult::Pass, None),
        Behaviour::StopHeartbeating | Behaviour::NeverStart => return,
    };
    let beat = award.heartbeat_ms.map(|h| Duration::from_millis((h / 3).max(10)));
    let deadline = tokio::time::Instant::now() + after;
    while let Some(b) = beat {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(b.min(deadline - now)).await;
        send(&*broker, &id, types::TASK_HEARTBEAT, &run, progress_json.clone()).await;
    }
    tokio::time::sleep_until(deadline).await;
    let finished = Finished {
        attempt: award.attempt.clone(),
        worker_id: id.clone(),
        token: award.token,
        result,
        output: json!({ format!("{}_by", award.attempt.task): id }),
        error: error.map(|k| TaskError { kind: k.to_string(), message: format!("scripted {k}") }),
    };
    let times = if behaviour == Behaviour::AnswerTwice { 2 } else { 1 };
    for _ in 0..times {
        log.lock().expect("log").finished.push((
            id.clone(),
            award.attempt.task.clone(),
            award.attempt.attempt,
            award.token,
        ));
        send(&*broker, &id, types::TASK_FINISHED, &run, serde_json::to_value(&finished).expect("json")).await;
    }
}

/// An engine over `store` with a fresh in-memory broker.
pub async fn engine(store: Arc<dyn Store>, config: RuntimeConfig) -> (RuntimeHandle, Arc<dyn Broker>) {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let rt = Runtime::start(config, store, broker.clone(), Arc::new(SystemClock)).await.expect("runtime starts");
    (rt, broker)
}

/// Waits until the run has ended (or panics after `limit`).
pub async fn wait_run_over(store: &dyn Store, run_id: &str, limit: Duration) -> RunRecord {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(r) = store.get_run(run_id).await.expect("get_run")
            && r.is_over()
        {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "run {run_id} did not end within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The run's events as (kind, payload), in order, checking that seq numbers have no gaps.
pub async fn history(store: &dyn Store, run_id: &str) -> Vec<capstan_engine::run::Event> {
    let stored = store.read_stream(run_id, 1).await.expect("read_stream");
    for (i, s) in stored.iter().enumerate() {
        assert_eq!(s.seq, i as i64 + 1, "gap in the event sequence of run {run_id}");
    }
    stored.iter().map(|s| capstan::runtime::codec::decode_event(s).expect("decodes")).collect()
}

/// Runs an SDK worker on `broker` until the returned sender says stop (or is dropped).
pub fn spawn_worker(worker: capstan_workers::Worker, broker: Arc<dyn Broker>) -> tokio::sync::watch::Sender<bool> {
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let shutdown = async move {
            while !*rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        worker.run(broker, shutdown).await.expect("worker runs");
    });
    stop
}
