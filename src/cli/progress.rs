//! Live progress lines for runs, read from the event log (the truth), so the same view works in
//! process, after a restart, and later against a server.

use std::collections::HashMap;

use capstan_engine::run::{AttemptOutcome, Event, RunMeta, TaskStatus};
use capstan_store::StoredEvent;

/// Turns stored events into one human line each, remembering which run is which.
#[derive(Default)]
pub struct ProgressPrinter {
    runs: HashMap<String, RunMeta>,
    started_ms: Option<i64>,
}

impl ProgressPrinter {
    /// A printer whose clock starts at `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        ProgressPrinter { runs: HashMap::new(), started_ms: Some(start_ms) }
    }

    /// Learns a run's identity without printing (for runs started before we began watching).
    pub fn remember(&mut self, meta: RunMeta) {
        self.runs.insert(meta.run_id.clone(), meta);
    }

    /// The line for one event, or `None` for events not worth a line.
    pub fn line(&mut self, stored: &StoredEvent, event: &Event) -> Option<String> {
        if let Event::RunStarted { meta, .. } = event {
            self.runs.insert(meta.run_id.clone(), meta.clone());
        }
        let elapsed = stored.recorded_at_ms - self.started_ms.unwrap_or(stored.recorded_at_ms);
        let place = match self.runs.get(&stored.run_id) {
            Some(m) => format!("{}/{}", m.stage, m.sequence),
            None => format!("run {}", short(&stored.run_id)),
        };
        let what = describe(event)?;
        Some(format!("[{:>6.2}s] {place:<22} {what}", elapsed as f64 / 1000.0))
    }
}

/// The first 8 characters of an id.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn describe(event: &Event) -> Option<String> {
    Some(match event {
        Event::RunStarted { meta, .. } => match &meta.triggered_by {
            Some(parent) => format!("run {} started (promoted from {})", short(&meta.run_id), short(parent)),
            None => format!("run {} started (context {})", short(&meta.run_id), short(&meta.context_id)),
        },
        Event::TaskDelayed { task, until, at } => {
            format!("{task:<18} delayed {:.1}s", until.since(*at) as f64 / 1000.0)
        }
        Event::TaskOffered { task, attempt, offer, .. } => {
            if *offer > 1 {
                format!("{task:<18} attempt {attempt} offered again (offer {offer})")
            } else {
                format!("{task:<18} attempt {attempt} offered")
            }
        }
        Event::BidRecorded { .. } => return None,
        Event::TaskAwarded { task, attempt, worker, token, .. } => {
            format!("{task:<18} attempt {attempt} awarded to {} (token {token})", worker.id)
        }
        Event::TaskStarted { task, attempt, worker_id, .. } => {
            format!("{task:<18} attempt {attempt} started by {worker_id}")
        }
        Event::AttemptEnded { task, attempt, outcome, retry_at, at, worker_id } => {
            let how = match outcome {
                AttemptOutcome::Finished { result, error: Some(e), .. } => {
                    format!("{} ({}: {})", result.as_str(), e.kind, e.message)
                }
                AttemptOutcome::Finished { result, .. } => result.as_str().to_string(),
                AttemptOutcome::TimedOut { timeout } => format!("timed out ({timeout:?})"),
                AttemptOutcome::Cancelled => "cancelled".to_string(),
            };
            let by = worker_id.as_deref().map(|w| format!(" by {w}")).unwrap_or_default();
            match retry_at {
                Some(r) => {
                    format!("{task:<18} attempt {attempt} {how}{by}; retry in {:.1}s", r.since(*at) as f64 / 1000.0)
                }
                None => format!("{task:<18} attempt {attempt} {how}{by}"),
            }
        }
        Event::ApprovalRequested { task, .. } => format!("{task:<18} waits for a manual approval"),
        Event::TaskEnded { task, status, result, .. } => match status {
            TaskStatus::Finished => format!("{task:<18} => {}", result.as_str()),
            other => format!("{task:<18} => {} ({other:?})", result.as_str()),
        },
        Event::InputRejected { input, task, worker_id, reason, .. } => format!(
            "{:<18} refused {input} from {}: {reason}",
            task.as_deref().unwrap_or("-"),
            worker_id.as_deref().unwrap_or("?")
        ),
        Event::RunQueued { .. } => "run queued behind another run of this service".to_string(),
        Event::RunAdmitted { .. } => "run admitted: its lane is free".to_string(),
        Event::RunPaused { .. } => "run paused".to_string(),
        Event::RunResumed { .. } => "run resumed".to_string(),
        Event::RunFinished { status, result, next, .. } => {
            let next: Vec<String> = next.iter().map(|n| format!("{}.{}", n.stage, n.sequence)).collect();
            let then = if next.is_empty() { String::new() } else { format!(" -> triggers {}", next.join(", ")) };
            format!("RUN {:?}: {}{then}", status, result.as_str().to_uppercase())
        }
    })
}
