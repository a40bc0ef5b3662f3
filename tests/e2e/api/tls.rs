//! TLS on both APIs from configured PEM files: gRPC over TLS answers a health check and a call,
//! HTTPS answers `/healthz`, and a plain-text client gets nowhere.

use std::process::Command;

use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::Server;

/// A self-signed certificate for localhost and 127.0.0.1, made with the openssl CLI.
fn self_signed(dir: &std::path::Path) -> (String, String) {
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-keyout", &key, "-out", &cert])
        .output()
        .expect("openssl is needed to make a test certificate");
    assert!(status.status.success(), "openssl failed: {}", String::from_utf8_lossy(&status.stderr));
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_speak_tls_from_configured_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path());
    let server = Server::start(&format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n"));
    let grpc_port = server.grpc.rsplit(':').next().expect("port").to_string();
    let http_port = server.http.rsplit(':').next().expect("port").to_string();

    let pem = std::fs::read(&cert).expect("cert");
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{grpc_port}"))
        .expect("uri")
        .tls_config(tls)
        .expect("client TLS")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("gRPC over TLS: {e:?}\n{}", server.log()));
    let mut health = HealthClient::new(channel);
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    assert_eq!(health.check(check).await.expect("health over TLS").into_inner().status, ServingStatus::Serving as i32);

    let https = Command::new("curl")
        .args(["-fsS", "--cacert", &cert, &format!("https://localhost:{http_port}/healthz")])
        .output()
        .expect("curl runs");
    assert!(https.status.success(), "HTTPS /healthz: {}", String::from_utf8_lossy(&https.stderr));

    let cli = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["list", "--project", "a", "--token", "view-a", "--server", &format!("https://localhost:{grpc_port}")])
        .args(["--ca-cert", &cert])
        .output()
        .expect("capstan list runs");
    assert!(cli.status.success(), "the CLI over TLS: {}", String::from_utf8_lossy(&cli.stderr));

    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://localhost:{http_port}/healthz")])
        .output()
        .expect("curl runs");
    assert!(!plain.status.success(), "plain HTTP must not be served on the TLS port");
}
