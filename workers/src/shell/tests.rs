//! Shell worker tests. They run real processes, so they use real time and bound every wait
//! instead of pausing the clock (paused time would fire the timeouts while a process runs).

use std::time::{Duration, Instant};

use capstan_proto::{AttemptRef, Award, TaskResult};
use serde_json::{Value, json};

use super::*;
use crate::handler::{CancelSignal, CancelSwitch};

fn ctx(properties: Value, start_to_close_ms: Option<u64>) -> (TaskContext, CancelSwitch) {
    let award = Award {
        attempt: AttemptRef {
            project: "p".into(),
            run_id: "r".into(),
            task: "t".into(),
            attempt: 1,
        },
        worker_id: "w".into(),
        token: 1,
        task_type: "shell".into(),
        input: json!({"properties": properties, "trigger": {"x": 1}}),
        heartbeat_ms: None,
        start_to_close_ms,
    };
    let (switch, signal) = CancelSignal::new();
    (TaskContext::new(award, "w", signal), switch)
}

async fn run(properties: Value) -> Outcome {
    ShellWorker::new().handle(ctx(properties, None).0).await
}

fn error_kind(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Error(e) => &e.kind,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn exit_zero_passes_with_output() {
    let outcome =
        run(json!({"command": "echo hello; echo oops >&2", "env": {"GREETING": "hi"}})).await;
    let Outcome::Finished { result, output } = outcome else {
        panic!("expected a result")
    };
    assert_eq!(result, TaskResult::Pass);
    assert_eq!(output["exitCode"], 0);
    assert_eq!(output["stdout"], "hello\n");
    assert_eq!(output["stderr"], "oops\n");
    assert_eq!(output["stdoutTruncated"], false);
}

#[tokio::test]
async fn argv_lists_run_without_a_shell_and_env_reaches_them() {
    let outcome =
        run(json!({"command": ["printenv", "GREETING"], "env": {"GREETING": "hi there"}})).await;
    let Outcome::Finished { output, .. } = outcome else {
        panic!("expected a result")
    };
    assert_eq!(output["stdout"], "hi there\n");
}

#[tokio::test]
async fn non_zero_exit_is_an_exit_code_error_unless_mapped() {
    let outcome = run(json!({"command": "echo broken >&2; exit 3"})).await;
    assert_eq!(error_kind(&outcome), "exit-code");
    let Outcome::Error(e) = outcome else {
        unreachable!()
    };
    assert!(
        e.message.contains("exit code 3") && e.message.contains("broken"),
        "{}",
        e.message
    );

    let mapped = run(json!({"command": "exit 3", "exitResults": {"3": "warning"}})).await;
    let Outcome::Finished { result, output } = mapped else {
        panic!("expected a result")
    };
    assert_eq!(
        (result, output["exitCode"].as_i64()),
        (TaskResult::Warning, Some(3))
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let start = Instant::now();
    // The shell does not exec the last command here, so `sleep` is a grandchild holding stdout.
    let outcome = run(json!({"command": "sleep 30; echo never", "timeout": "300ms"})).await;
    assert_eq!(error_kind(&outcome), "timeout");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );

    // Without a timeout property, the start-to-close budget applies.
    let (task, _switch) = ctx(json!({"command": "sleep 30"}), Some(200));
    assert_eq!(
        error_kind(&ShellWorker::new().handle(task).await),
        "timeout"
    );
}

#[tokio::test]
async fn output_is_bounded_to_its_tail() {
    let worker = ShellWorker::with_config(ShellConfig {
        output_limit: 1000,
        ..ShellConfig::default()
    });
    let (task, _switch) = ctx(
        json!({"command": "head -c 100000 /dev/zero | tr '\\0' a; printf END"}),
        None,
    );
    let Outcome::Finished { output, .. } = worker.handle(task).await else {
        panic!("expected a result")
    };
    let stdout = output["stdout"].as_str().unwrap_or_default();
    assert_eq!(stdout.len(), 1000);
    assert!(stdout.ends_with("aaaEND"));
    assert_eq!(output["stdoutTruncated"], true);
}

#[tokio::test]
async fn cancellation_kills_the_command() {
    let (task, switch) = ctx(json!({"command": "sleep 30"}), None);
    let running = tokio::spawn(async move { ShellWorker::new().handle(task).await });
    let start = Instant::now();
    switch.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("ends soon")
        .expect("no panic");
    assert_eq!(error_kind(&outcome), "cancelled");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn bad_input_is_reported_as_such() {
    for properties in [
        json!({}),
        json!({"command": ""}),
        json!({"command": [1, 2]}),
        json!({"command": "true", "timeout": "soon"}),
        json!({"command": "true", "env": "A=1"}),
    ] {
        assert_eq!(
            error_kind(&run(properties.clone()).await),
            "bad-input",
            "{properties}"
        );
    }
    assert_eq!(
        error_kind(&run(json!({"command": ["/no/such/binary"]})).await),
        "spawn"
    );
}

#[test]
fn timeouts_parse() {
    let cases = [
        (json!("300ms"), Some(Duration::from_millis(300))),
        (json!("10s"), Some(Duration::from_secs(10))),
        (json!("5m"), Some(Duration::from_secs(300))),
        (json!("1h"), Some(Duration::from_secs(3600))),
        (json!(2.5), Some(Duration::from_millis(2500))),
        (json!("10"), None),
        (json!("1d"), None),
        (json!(-1), None),
    ];
    for (input, expected) in cases {
        assert_eq!(parse_timeout(&input), expected, "{input}");
    }
}
