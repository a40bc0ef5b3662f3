//! `EchoWorker`: a no-op handler for tests, benchmarks and demos. It passes with a small output
//! after an optional delay, and can fail its first attempts on purpose to show retries.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use crate::handler::{Handler, Outcome, TaskContext};

/// How an [`EchoWorker`] behaves.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// How long each attempt takes.
    pub delay: Duration,
    /// Attempts numbered up to this one fail with `fail_kind` (0: none fail).
    pub fail_first: u32,
    /// The error kind of the deliberate failures.
    pub fail_kind: String,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            delay: Duration::ZERO,
            fail_first: 0,
            fail_kind: "demo-failure".into(),
        }
    }
}

/// The no-op handler.
#[derive(Debug, Clone, Default)]
pub struct EchoWorker {
    config: EchoConfig,
}

impl EchoWorker {
    /// An echo handler that passes at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// An echo handler with the given behaviour.
    pub fn with_config(config: EchoConfig) -> Self {
        EchoWorker { config }
    }
}

#[async_trait]
impl Handler for EchoWorker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        if !self.config.delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(self.config.delay) => {}
                _ = task.cancelled() => return Outcome::error("cancelled", "cancelled while echoing"),
            }
        }
        let attempt = task.attempt();
        if attempt <= self.config.fail_first {
            return Outcome::error(
                self.config.fail_kind.clone(),
                format!(
                    "attempt {attempt} fails on purpose (the first {} do)",
                    self.config.fail_first
                ),
            );
        }
        Outcome::pass(json!({"echo": true, "worker": task.worker_id(), "attempt": attempt}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::CancelSignal;
    use capstan_proto::{AttemptRef, Award};

    fn ctx(attempt: u32) -> TaskContext {
        let award = Award {
            attempt: AttemptRef {
                project: "p".into(),
                run_id: "r".into(),
                task: "t".into(),
                attempt,
            },
            worker_id: "w".into(),
            token: 1,
            task_type: "echo".into(),
            input: json!({}),
            heartbeat_ms: None,
            start_to_close_ms: None,
        };
        TaskContext::new(award, "w", CancelSignal::new().1)
    }

    #[tokio::test(start_paused = true)]
    async fn fails_the_first_attempts_then_passes_after_its_delay() {
        let echo = EchoWorker::with_config(EchoConfig {
            delay: Duration::from_secs(2),
            fail_first: 2,
            fail_kind: "flaky".into(),
        });
        let start = tokio::time::Instant::now();
        for attempt in 1..=2 {
            let Outcome::Error(e) = echo.handle(ctx(attempt)).await else {
                panic!("attempt {attempt} must fail")
            };
            assert_eq!(e.kind, "flaky");
        }
        assert_eq!(
            echo.handle(ctx(3)).await,
            Outcome::pass(json!({"echo": true, "worker": "w", "attempt": 3}))
        );
        assert_eq!(start.elapsed(), Duration::from_secs(6));
    }
}
