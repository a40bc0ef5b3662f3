//! A run's history as text: one stable line per event, for snapshot tests and the CLI.

use std::fmt::Write;

use super::types::{AttemptOutcome, Event, TaskStatus};

/// Renders events one per line, numbered from 1, with the fields a reader needs to follow the
/// run. The format is stable: snapshot tests and the CLI rely on it.
pub fn render_history(events: &[Event]) -> String {
    let mut out = String::new();
    for (n, event) in events.iter().enumerate() {
        let line = render(event);
        // Writing into a String cannot fail.
        let _ = writeln!(out, "{} {line}", n + 1);
    }
    out
}

fn render(event: &Event) -> String {
    match event {
        Event::RunStarted { meta, at, .. } => {
            format!("@{} run-started {} {}.{}", at.0, meta.run_id, meta.stage, meta.sequence)
        }
        Event::TaskDelayed { task, until, at } => {
            format!("@{} task-delayed {task} until={}", at.0, until.0)
        }
        Event::TaskOffered { task, attempt, offer, at, .. } => {
            format!("@{} task-offered {task}#{attempt} offer={offer}", at.0)
        }
        Event::BidRecorded { task, attempt, bid, at } => format!(
            "@{} bid-recorded {task}#{attempt} worker={} cost={} estimate={}ms free={}",
            at.0, bid.worker.id, bid.cost, bid.estimated_ms, bid.free_slots
        ),
        Event::TaskAwarded { task, attempt, worker, token, at } => {
            format!("@{} task-awarded {task}#{attempt} worker={} token={token}", at.0, worker.id)
        }
        Event::TaskStarted { task, attempt, worker_id, token, at } => {
            format!("@{} task-started {task}#{attempt} worker={worker_id} token={token}", at.0)
        }
        Event::AttemptEnded { task, attempt, worker_id, outcome, retry_at, at } => {
            let mut s = format!("@{} attempt-ended {task}#{attempt}", at.0);
            if let Some(w) = worker_id {
                s += &format!(" worker={w}");
            }
            s += &format!(" {}", outcome_text(outcome));
            if let Some(r) = retry_at {
                s += &format!(" retry-at={}", r.0);
            }
            s
        }
        Event::ApprovalRequested { task, at } => format!("@{} approval-requested {task}", at.0),
        Event::TaskEnded { task, status, result, at, .. } => {
            let text = status_text(*status);
            if *status == TaskStatus::Skipped {
                format!("@{} task-ended {task} {text}", at.0)
            } else {
                format!("@{} task-ended {task} {text} {}", at.0, result.as_str())
            }
        }
        Event::InputRejected { input, task, worker_id, reason, at } => format!(
            "@{} input-rejected {input} task={} worker={}: {reason}",
            at.0,
            task.as_deref().unwrap_or("-"),
            worker_id.as_deref().unwrap_or("-")
        ),
        Event::RunQueued { at } => format!("@{} run-queued", at.0),
        Event::RunAdmitted { at } => format!("@{} run-admitted", at.0),
        Event::RunPaused { at } => format!("@{} run-paused", at.0),
        Event::RunResumed { at } => format!("@{} run-resumed", at.0),
        Event::RunFinished { status, result, next, at } => {
            let status = match status {
                super::types::RunStatus::Finished => "finished",
                super::types::RunStatus::Cancelled => "cancelled",
            };
            let mut s = format!("@{} run-finished {status} {}", at.0, result.as_str());
            for n in next {
                s += &format!(" next={}.{}", n.stage, n.sequence);
            }
            s
        }
    }
}

fn outcome_text(outcome: &AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::Finished { result, error: Some(e), .. } => {
            format!("{} error={}", result.as_str(), e.kind)
        }
        AttemptOutcome::Finished { result, .. } => result.as_str().to_string(),
        AttemptOutcome::TimedOut { timeout } => format!("timed-out({})", timeout_text(*timeout)),
        AttemptOutcome::Cancelled => "cancelled".to_string(),
    }
}

fn timeout_text(kind: super::types::TimeoutKind) -> &'static str {
    match kind {
        super::types::TimeoutKind::ScheduleToStart => "schedule-to-start",
        super::types::TimeoutKind::StartToClose => "start-to-close",
        super::types::TimeoutKind::Heartbeat => "heartbeat",
    }
}

fn status_text(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Finished => "finished",
        TaskStatus::TimedOut => "timed-out",
        TaskStatus::Cancelled => "cancelled",
        TaskStatus::Skipped => "skipped",
        TaskStatus::OutcomeUnknown => "outcome-unknown",
    }
}
