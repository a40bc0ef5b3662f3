//! Payloads (`data`) of the worker protocol's CloudEvents. Field names are camelCase on the wire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Declares payloads whose attempt fields (`project`, `runId`, `task`, `attempt`) sit at the top
/// level of their JSON beside their own fields, and adds their `attempt: AttemptRef` field. Serializing
/// flattens `attempt`. Decoding reads a twin with the four fields inline instead: serde decodes
/// a flattened struct by buffering every field first, which cost decoding from JSON text twice
/// the payload's own work (ingest: 3k -> 6k instructions per worker report).
macro_rules! attempt_payloads {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty, )*
        }
    )*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            #[serde(flatten)]
            pub attempt: AttemptRef,
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Inline {
                    project: String,
                    run_id: String,
                    task: String,
                    attempt: u32,
                    $( $(#[$field_meta])* $field: $ty, )*
                }
                let inline = Inline::deserialize(deserializer)?;
                Ok($name {
                    attempt: AttemptRef {
                        project: inline.project,
                        run_id: inline.run_id,
                        task: inline.task,
                        attempt: inline.attempt,
                    },
                    $( $field: inline.$field, )*
                })
            }
        }
    )*};
}

/// The result of a task, a run or an evaluation. Keptn's `failed` is read as `fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskResult {
    Pass,
    Warning,
    #[serde(alias = "failed")]
    Fail,
}

impl TaskResult {
    /// The worse of two results (fanout: the worst result wins).
    pub fn worst(self, other: TaskResult) -> TaskResult {
        self.max(other)
    }

    /// The lower-case name used on the wire and in selectors.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskResult::Pass => "pass",
            TaskResult::Warning => "warning",
            TaskResult::Fail => "fail",
        }
    }

    /// Parses `pass`, `warning`, `fail` or Keptn's `failed`.
    pub fn parse(s: &str) -> Option<TaskResult> {
        match s {
            "pass" => Some(TaskResult::Pass),
            "warning" => Some(TaskResult::Warning),
            "fail" | "failed" => Some(TaskResult::Fail),
            _ => None,
        }
    }
}

/// How a task reaches workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DispatchMode {
    /// Offer, collect bids, award the best; the default.
    #[default]
    Auction,
    /// Competing consumers: the first valid claim wins.
    Queue,
    /// Keptn's semantics: every subscriber may start; done when all that started finished.
    Fanout,
}

/// A worker's identity and advertised labels.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Identifies one attempt of one task of one run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRef {
    pub project: String,
    pub run_id: String,
    pub task: String,
    pub attempt: u32,
}

attempt_payloads! {
    /// `task.offered`: an attempt on offer to the workers of a task type.
    pub struct TaskOffer {
        pub context_id: String,
        pub stage: String,
        pub sequence: String,
        #[serde(default)]
        pub service: Option<String>,
        pub task_type: String,
        pub dispatch: DispatchMode,
        /// Trigger data merged with the outputs of the dependencies and the task's properties.
        pub input: Value,
        /// Labels a worker must carry to be awarded the attempt.
        #[serde(default)]
        pub requires: BTreeMap<String, String>,
        /// When the bid window closes (ms since the Unix epoch), for auctions.
        #[serde(default)]
        pub bid_deadline_ms: Option<u64>,
        /// Heartbeat interval the worker must keep, if any (ms).
        #[serde(default)]
        pub heartbeat_ms: Option<u64>,
        /// Start-to-close budget (ms).
        #[serde(default)]
        pub start_to_close_ms: Option<u64>,
        /// The fencing token of a claim-free queue offer (a task with `claim: false`): the
        /// member that receives it starts at once under this token, without a claim and an
        /// award; its first report binds the attempt to it. `None`: bid or claim first.
        #[serde(default)]
        pub token: Option<u64>,
        /// When the attempt's schedule-to-start timeout ends (ms since the Unix epoch), for a
        /// claim-free offer: one received later belongs to an attempt the engine has ended, and
        /// the worker drops it instead of running it.
        #[serde(default)]
        pub start_by_ms: Option<u64>,
    }

    /// `task.bid`: a worker offers to run an attempt.
    pub struct Bid {
        pub worker: WorkerInfo,
        /// Lower is better; the worker's own notion (e.g. current load).
        #[serde(default)]
        pub cost: f64,
        /// Estimated duration in ms.
        #[serde(default)]
        pub estimated_ms: u64,
        /// Free capacity (slots) of the worker.
        #[serde(default)]
        pub free_slots: u32,
    }

    /// `task.claim`: a worker takes a queued attempt (queue dispatch) or starts one (fanout).
    pub struct Claim {
        pub worker: WorkerInfo,
    }

    /// `task.awarded`: the engine gives the attempt to one worker with a fencing token.
    pub struct Award {
        pub worker_id: String,
        pub token: u64,
        pub task_type: String,
        pub input: Value,
        #[serde(default)]
        pub heartbeat_ms: Option<u64>,
        #[serde(default)]
        pub start_to_close_ms: Option<u64>,
    }

    /// `task.rejected`: a bid, claim or report was refused (lost auction, stale token, run over).
    pub struct Rejection {
        pub worker_id: String,
        pub reason: String,
    }

    /// `task.cancelled`: stop working on an attempt.
    pub struct TaskCancel {
        #[serde(default)]
        pub worker_id: Option<String>,
        pub reason: String,
    }

    /// `task.started` and `task.heartbeat`: the holder of a token reports progress.
    pub struct Progress {
        pub worker_id: String,
        pub token: u64,
    }
}

/// Why an attempt failed without a result, as the worker classifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskError {
    /// A short machine-readable kind (e.g. `timeout`, `exit-code`, `bad-input`), matched against
    /// the task's `nonRetryable` list.
    pub kind: String,
    pub message: String,
}

attempt_payloads! {
    /// `task.finished`: the attempt ended, with a result or an error.
    pub struct Finished {
        pub worker_id: String,
        pub token: u64,
        pub result: TaskResult,
        #[serde(default)]
        pub output: Value,
        /// Set when the attempt failed with an error (then `result` is `fail`); retry rules apply.
        #[serde(default)]
        pub error: Option<TaskError>,
    }
}

/// `sequence.triggered`: start a sequence in a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SequenceTrigger {
    pub project: String,
    pub stage: String,
    pub sequence: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub data: Value,
    /// Joins an existing promotion chain; a new one is made when absent.
    #[serde(default)]
    pub context_id: Option<String>,
}

/// `sequence.finished`: a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SequenceFinished {
    pub project: String,
    pub run_id: String,
    pub context_id: String,
    pub stage: String,
    pub sequence: String,
    #[serde(default)]
    pub service: Option<String>,
    pub result: TaskResult,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keptn_failed_reads_as_fail() {
        let r: TaskResult = serde_json::from_value(json!("failed")).unwrap();
        assert_eq!(r, TaskResult::Fail);
        assert_eq!(TaskResult::Pass.worst(TaskResult::Warning), TaskResult::Warning);
    }

    /// Every attempt payload reads back what it wrote, from text and from a `Value`, with the
    /// attempt's fields at the top level; a missing attempt field is an error.
    #[test]
    fn attempt_payloads_round_trip_with_their_attempt_inline() {
        fn check<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(payload: T) {
            let text = serde_json::to_string(&payload).unwrap();
            let value: Value = serde_json::from_str(&text).unwrap();
            for field in ["project", "runId", "task", "attempt"] {
                assert!(value.get(field).is_some(), "{field} missing in {text}");
                let mut without = value.clone();
                without.as_object_mut().unwrap().remove(field);
                assert!(serde_json::from_value::<T>(without).is_err(), "decoded without {field}");
            }
            assert_eq!(serde_json::from_str::<T>(&text).unwrap(), payload, "{text}");
            assert_eq!(serde_json::from_value::<T>(value).unwrap(), payload, "{text}");
        }
        let attempt = AttemptRef { project: "p".into(), run_id: "r".into(), task: "t".into(), attempt: 3 };
        let worker = WorkerInfo { id: "w".into(), labels: [("zone".to_string(), "eu".to_string())].into() };
        check(TaskOffer {
            attempt: attempt.clone(),
            context_id: "c".into(),
            stage: "s".into(),
            sequence: "q".into(),
            service: Some("svc".into()),
            task_type: "deploy".into(),
            dispatch: DispatchMode::Queue,
            input: json!({"a": [1, "two"]}),
            requires: [("zone".to_string(), "eu".to_string())].into(),
            bid_deadline_ms: Some(9),
            heartbeat_ms: None,
            start_to_close_ms: Some(60_000),
            token: Some(7),
            start_by_ms: Some(11),
        });
        check(Bid { attempt: attempt.clone(), worker: worker.clone(), cost: 1.5, estimated_ms: 20, free_slots: 2 });
        check(Claim { attempt: attempt.clone(), worker });
        check(Award {
            attempt: attempt.clone(),
            worker_id: "w".into(),
            token: 7,
            task_type: "deploy".into(),
            input: json!({"x": {"y": null}}),
            heartbeat_ms: Some(1_000),
            start_to_close_ms: None,
        });
        check(Rejection { attempt: attempt.clone(), worker_id: "w".into(), reason: "late".into() });
        check(TaskCancel { attempt: attempt.clone(), worker_id: None, reason: "run cancelled".into() });
        check(Progress { attempt: attempt.clone(), worker_id: "w".into(), token: 7 });
        check(Finished {
            attempt,
            worker_id: "w".into(),
            token: 7,
            result: TaskResult::Fail,
            output: Value::Null,
            error: Some(TaskError { kind: "timeout".into(), message: "slow".into() }),
        });
    }

    #[test]
    fn finished_wire_shape() {
        let f = Finished {
            attempt: AttemptRef { project: "p".into(), run_id: "r".into(), task: "t".into(), attempt: 1 },
            worker_id: "w".into(),
            token: 7,
            result: TaskResult::Pass,
            output: json!({"x": 1}),
            error: None,
        };
        let v = serde_json::to_value(&f).unwrap();
        expect_test::expect![[r#"{"attempt":1,"error":null,"output":{"x":1},"project":"p","result":"pass","runId":"r","task":"t","token":7,"workerId":"w"}"#]]
            .assert_eq(&v.to_string());
        assert_eq!(serde_json::from_value::<Finished>(v).unwrap(), f);
    }
}
