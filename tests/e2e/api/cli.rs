//! The client commands against a real server: apply, trigger, get, list, watch (exit codes 0
//! pass, 2 warning, 3 fail), approve, cancel, with table, JSON and YAML output.

use std::process::{Command, Output};

use super::Server;

fn capstan(server: &Server, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(args)
        .env("CAPSTAN_SERVER", &server.grpc)
        .env("CAPSTAN_TOKEN", token)
        .output()
        .expect("run capstan")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(server: &Server, token: &str, args: &[&str]) -> String {
    let out = capstan(server, token, args);
    assert!(out.status.success(), "capstan {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_drive_a_server() {
    let server = Server::start("");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shipyard.yaml");
    std::fs::write(&file, super::SHIPYARD).unwrap();
    let applied = ok(&server, "admin-a", &["apply", "-f", file.to_str().unwrap(), "--project", "a"]);
    assert_eq!(applied, "applied shop v1 to project a");

    for (sequence, code) in [("quick", 0), ("shaky", 2), ("broken", 3)] {
        let run = ok(&server, "op-a", &["trigger", "--project", "a", "--stage", "dev", "--sequence", sequence]);
        let watched = capstan(&server, "view-a", &["watch", &run]);
        assert_eq!(watched.status.code(), Some(code), "{sequence}: {}", text(&watched));
        assert!(text(&watched).contains("RUN Finished"), "{}", text(&watched));
    }

    let data = dir.path().join("data.json");
    std::fs::write(&data, r#"{"version": "1.2.3"}"#).unwrap();
    let data_arg = format!("@{}", data.display());
    let run = ok(
        &server,
        "op-a",
        &[
            "trigger",
            "--project",
            "a",
            "--stage",
            "dev",
            "--sequence",
            "delivery",
            "--service",
            "cart",
            "--data",
            &data_arg,
        ],
    );
    let mut c = server.clients(Some("view-a")).await;
    c.wait_run(&run, |r| super::waiting(r, "gate")).await;
    let got: serde_json::Value = serde_json::from_str(&ok(&server, "view-a", &["get", &run, "-o", "json"])).unwrap();
    assert_eq!(got["service"], "cart");
    assert_eq!(got["tasks"][1]["state"], "waiting-approval", "{got}");
    let listed = ok(&server, "view-a", &["list", "--project", "a", "--sequence", "delivery", "-o", "yaml"]);
    assert!(listed.contains(&run), "{listed}");
    let table = ok(&server, "view-a", &["list", "--project", "a"]);
    assert_eq!(table.lines().count(), 5, "a header and four runs:\n{table}");

    let refused = capstan(&server, "view-a", &["approve", &run, "gate"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused).contains("PermissionDenied"), "{}", text(&refused));
    let not_waiting = capstan(&server, "op-a", &["approve", &run, "build"]);
    assert!(text(&not_waiting).contains("FailedPrecondition"), "{}", text(&not_waiting));
    ok(&server, "op-a", &["approve", &run, "gate"]);
    let watched = capstan(&server, "view-a", &["watch", &run]);
    assert_eq!(watched.status.code(), Some(0), "{}", text(&watched));

    let open = ok(&server, "op-a", &["trigger", "--project", "a", "--stage", "dev", "--sequence", "delivery"]);
    c.wait_run(&open, |r| super::waiting(r, "gate")).await;
    ok(&server, "op-a", &["pause", &open]);
    ok(&server, "op-a", &["resume", &open]);
    ok(&server, "op-a", &["cancel", &open]);
    let watched = capstan(&server, "view-a", &["watch", &open]);
    assert_eq!(watched.status.code(), Some(3), "a cancelled run fails: {}", text(&watched));

    let unknown = capstan(&server, "nobody", &["get", &run]);
    assert!(text(&unknown).contains("Unauthenticated"), "{}", text(&unknown));
}
