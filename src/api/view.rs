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
        let (name, update): (&str, Box<dyn FnOnce(&mut TaskView)>) = match &event {
            Event::TaskDelayed { task, .. } => (task, Box::new(|t| t.state = "delayed".into())),
            Event::TaskOffered { task, attempt, .. } => {
                let a = *attempt;
                (task, Box::new(move |t| {
                    t.state = "offered".into();
                    t.attempt = a;
                }))
            }
            Event::TaskAwarded { task, worker, .. } => {
                let w = worker.id.clone();
                (task, Box::new(move |t| {
                    t.state = "awarded".into();
                    t.worker = w;
                }))
            }
            Event::TaskStarted { task, .. } => (task, Box::new(|t| t.state = "running".into())),
            Event::AttemptEnded { task, retry_at: Some(_), .. } => (task, Box::new(|t| t.state = "retrying".into())),
            Event::ApprovalRequested { task, .. } => (task, Box::new(|t| t.state = "waiting-approval".into())),
            Event::TaskEnded { task, status, result, .. } => {
                let state = match status {
                    TaskStatus::Finished => "ended",
                    TaskStatus::TimedOut => "timed-out",
                    TaskStatus::Cancelled => "cancelled",
                    TaskStatus::Skipped => "skipped",
                    TaskStatus::OutcomeUnknown => "outcome-unknown",
                };
                let r = result.as_str().to_string();
                (task, Box::new(move |t| {
                    t.state = state.into();
                    t.result = r;
                }))
            }
            _ => continue,
        };
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
        update(&mut tasks[index]);
    }
    tasks
}
