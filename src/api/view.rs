//! Read models the API derives from a run's events: where each task stands. Derived on demand
//! from the event log (the truth), so they need no table of their own.

use capstan_engine::run::{Event, TaskStatus};
use capstan_store::StoredEvent;

use crate::runtime::codec;

/// Where one task of a run stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    /// The task's name.
    pub name: String,
    /// delayed, offered, awarded, running, retrying, waiting-approval, ended, cancelled,
    /// timed-out, skipped or outcome-unknown.
    pub state: String,
    /// pass, warning or fail once ended.
    pub result: String,
    /// The latest attempt number.
    pub attempt: u32,
    /// The worker of the latest award.
    pub worker: String,
}

/// The tasks seen in `events`, in the order they first appeared. Unreadable events are skipped:
/// a view must not fail because one old row does not decode.
pub fn task_views(events: &[StoredEvent]) -> Vec<TaskView> {
    let mut tasks: Vec<TaskView> = Vec::new();
    for stored in events {
        let Ok(event) = codec::decode_event(stored) else { continue };
        let Some(name) = task_of(&event) else { continue };
        let index = match tasks.iter().position(|t| t.name == name) {
            Some(i) => i,
            None => {
                tasks.push(TaskView {
                    name: name.to_string(),
                    state: String::new(),
                    result: String::new(),
                    attempt: 0,
                    worker: String::new(),
                });
                tasks.len() - 1
            }
        };
        let t = &mut tasks[index];
        match &event {
            Event::TaskDelayed { .. } => t.state = "delayed".into(),
            Event::TaskOffered { attempt, .. } => {
                t.state = "offered".into();
                t.attempt = *attempt;
            }
            Event::TaskAwarded { worker, .. } => {
                t.state = "awarded".into();
                t.worker = worker.id.clone();
            }
            Event::TaskStarted { .. } => t.state = "running".into(),
            Event::AttemptEnded { retry_at: Some(_), .. } => t.state = "retrying".into(),
            Event::ApprovalRequested { .. } => t.state = "waiting-approval".into(),
            Event::TaskEnded { status, result, .. } => {
                t.state = match status {
                    TaskStatus::Finished => "ended",
                    TaskStatus::TimedOut => "timed-out",
                    TaskStatus::Cancelled => "cancelled",
                    TaskStatus::Skipped => "skipped",
                    TaskStatus::OutcomeUnknown => "outcome-unknown",
                }
                .into();
                t.result = result.as_str().to_string();
            }
            _ => {}
        }
    }
    tasks
}

/// The task an event changes the standing of, if any.
fn task_of(event: &Event) -> Option<&str> {
    match event {
        Event::TaskDelayed { task, .. }
        | Event::TaskOffered { task, .. }
        | Event::TaskAwarded { task, .. }
        | Event::TaskStarted { task, .. }
        | Event::AttemptEnded { task, retry_at: Some(_), .. }
        | Event::ApprovalRequested { task, .. }
        | Event::TaskEnded { task, .. } => Some(task),
        _ => None,
    }
}
