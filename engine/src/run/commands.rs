//! Commands on a whole run: start, cancel, pause, resume, and a person's approval.

use serde_json::{Value, json};

use super::state::TaskPhase;
use super::step::Step;
use super::types::{AttemptOutcome, Error, Event, RunMeta, RunStatus, TaskResult, TaskStatus, TimerKind};

impl Step<'_, '_> {
    /// Commands other than `Start` need a started run that is not over.
    fn live(&self) -> Result<(), Error> {
        if self.st.meta.is_none() {
            Err(Error::NotStarted)
        } else if self.st.is_over() {
            Err(Error::RunOver)
        } else {
            Ok(())
        }
    }

    /// `RunStarted`, then every task without dependencies; a run with a service queues first
    /// (`RunQueued`): at most one run per project, stage and service runs at a time, and the
    /// runtime admits the next one when the lane frees up.
    pub fn start(&mut self, meta: &RunMeta, data: &Value) -> Result<(), Error> {
        if let Some(m) = &self.st.meta {
            return Err(Error::AlreadyStarted(m.run_id.clone()));
        }
        if self.st.def.sequence(&meta.stage, &meta.sequence).is_none() {
            return Err(Error::UnknownSequence {
                definition: self.st.def.name.clone(),
                stage: meta.stage.clone(),
                sequence: meta.sequence.clone(),
            });
        }
        self.emit(Event::RunStarted { meta: meta.clone(), data: data.clone(), at: self.now() });
        if meta.service.is_some() {
            self.emit(Event::RunQueued { at: self.now() });
        } else {
            self.advance();
        }
        Ok(())
    }

    /// The lane is free: a queued run starts its tasks. Admitting a run that is not queued
    /// (admitted already, or never queued) changes nothing, so the runtime may repeat it.
    pub fn admit_run(&mut self) -> Result<(), Error> {
        self.live()?;
        if self.st.queued {
            self.emit(Event::RunAdmitted { at: self.now() });
            self.advance();
        }
        Ok(())
    }

    /// Every open task ends `Cancelled` (its holders are told), every task not yet under way
    /// is `Skipped`, and the run finishes `Cancelled` with `fail`, promoting nothing.
    pub fn cancel(&mut self, reason: &str) -> Result<(), Error> {
        self.live()?;
        for i in 0..self.st.tasks.len() {
            let name = self.name(i);
            let t = self.task(i);
            let (phase, attempt) = (t.phase, t.attempt);
            match phase {
                TaskPhase::Pending | TaskPhase::Delayed => continue,
                TaskPhase::Ended(_) => continue,
                TaskPhase::Offered | TaskPhase::Awarded | TaskPhase::Running => {
                    self.cancel_attempt_timers(i, None);
                    if !self.task(i).holders.is_empty() {
                        self.cancel_holders(i, reason);
                        self.emit(Event::AttemptEnded {
                            task: name,
                            attempt,
                            worker_id: None,
                            outcome: AttemptOutcome::Cancelled,
                            retry_at: None,
                            at: self.now(),
                        });
                    }
                }
                TaskPhase::Backoff => self.cancel_timer(TimerKind::Retry { task: name, attempt }),
                TaskPhase::AwaitingApproval => self.cancel_timer(TimerKind::ApprovalTimeout { task: name }),
            }
            self.end_task(i, TaskStatus::Cancelled, TaskResult::Fail, Value::Null);
        }
        self.skip_unstarted();
        self.emit(Event::RunFinished {
            status: RunStatus::Cancelled,
            result: TaskResult::Fail,
            next: Vec::new(),
            at: self.now(),
        });
        self.notify(TaskResult::Fail);
        Ok(())
    }

    /// Nothing new is offered until `Resume`; attempts under way go on. Pausing twice is a no-op.
    pub fn pause(&mut self) -> Result<(), Error> {
        self.live()?;
        if self.st.queued {
            return Err(Error::Queued);
        }
        if !self.st.paused {
            self.emit(Event::RunPaused { at: self.now() });
        }
        Ok(())
    }

    /// Offers what became ready while paused. Delays and backoffs that came due while paused
    /// were dropped by their timers, so they are re-armed (a past time fires at once).
    pub fn resume(&mut self) -> Result<(), Error> {
        self.live()?;
        if self.st.queued {
            return Err(Error::Queued);
        }
        if !self.st.paused {
            return Ok(());
        }
        self.emit(Event::RunResumed { at: self.now() });
        for i in 0..self.st.tasks.len() {
            let t = self.task(i);
            let (task, attempt, until) = (self.name(i), t.attempt, t.until.unwrap_or(self.now()));
            match t.phase {
                TaskPhase::Delayed => self.set_timer(TimerKind::Delay { task }, until),
                TaskPhase::Backoff => self.set_timer(TimerKind::Retry { task, attempt }, until),
                _ => {}
            }
        }
        self.advance();
        Ok(())
    }

    /// A person decides a manual approval.
    pub fn approve(&mut self, task: &str, approved: bool, by: &str) -> Result<(), Error> {
        self.live()?;
        let i = self.st.index(task).ok_or_else(|| Error::UnknownTask(task.to_string()))?;
        if self.task(i).phase != TaskPhase::AwaitingApproval {
            return Err(Error::NotAwaitingApproval { task: task.to_string() });
        }
        self.cancel_timer(TimerKind::ApprovalTimeout { task: task.to_string() });
        let result = if approved { TaskResult::Pass } else { TaskResult::Fail };
        let output = json!({"approval": {"approved": approved, "by": by}});
        self.end_task(i, TaskStatus::Finished, result, output);
        self.advance();
        Ok(())
    }
}
