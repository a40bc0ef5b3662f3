//! A Python grpcio client that has no .proto files learns the API through server reflection,
//! triggers a run and watches it to the end (tests/e2e/api/python/run.sh installs grpcio).

use std::process::Command;

use super::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_uses_reflection_to_trigger_and_watch() {
    let server = Server::start("");
    server.clients(Some("admin-a")).await.apply("a").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/api/python/run.sh");
    let address = server.grpc.trim_start_matches("http://").to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash").args([script, &address, "op-a", "a", "quick"]).output()
    })
    .await
    .expect("join")
    .expect("run the Python client (python3 and pip are required)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON from the Python client");
    let kinds: Vec<&str> = answer["kinds"].as_array().expect("kinds").iter().filter_map(|k| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"run-started"), "{answer}");
    assert_eq!(kinds.last(), Some(&"run-finished"), "{answer}");
    let mut c = server.clients(Some("view-a")).await;
    let run = c.wait_run(answer["runId"].as_str().expect("runId"), |r| r.status == "finished").await;
    assert_eq!(run.result, "pass");
}
