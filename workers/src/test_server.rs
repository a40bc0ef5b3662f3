//! Test helpers of the delivery workers: a task context for calling a handler directly, and a
//! tiny HTTP/1.1 server on 127.0.0.1 that records each request and answers with whatever the
//! test's function returns, one request per connection.

use std::sync::{Arc, Mutex};

use capstan_proto::{AttemptRef, Award};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::handler::{CancelSignal, TaskContext};

/// A request as the server saw it.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// The method.
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Recorded {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// A query parameter's decoded value.
    pub fn query(&self, name: &str) -> Option<String> {
        let url = reqwest::Url::parse(&format!("http://x{}", self.target)).ok()?;
        url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }
}

/// What to answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Extra headers (Content-Length and Connection are added).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Never answer (to test time limits); the connection stays open until the test ends.
    pub hang: bool,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Reply::raw(status, "application/json", body.to_string().into_bytes())
    }

    /// An answer with a content type.
    pub fn raw(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Reply { status, headers: vec![("Content-Type".into(), content_type.into())], body, hang: false }
    }
}

/// A context for attempt 1 of a task of project `sockshop` with the given input.
pub fn task(task_type: &str, input: serde_json::Value) -> TaskContext {
    let award = Award {
        attempt: AttemptRef { project: "sockshop".into(), run_id: "run-1".into(), task: task_type.into(), attempt: 1 },
        worker_id: "w".into(),
        token: 1,
        task_type: task_type.into(),
        input,
        heartbeat_ms: None,
        start_to_close_ms: None,
    };
    TaskContext::new(award, "w", CancelSignal::new().1)
}

type Respond = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// The running server; stops when dropped.
pub struct TestServer {
    addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    accept: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TestServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start(respond: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let respond: Respond = Arc::new(respond);
        let seen = Arc::clone(&requests);
        let accept = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (respond, seen) = (Arc::clone(&respond), Arc::clone(&seen));
                // Held here so that a hanging connection lives as long as the server.
                open.push(tokio::spawn(serve(stream, respond, seen)));
            }
        });
        TestServer { addr, requests, accept }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The requests seen so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("requests lock").clone()
    }
}

async fn serve(mut stream: TcpStream, respond: Respond, seen: Arc<Mutex<Vec<Recorded>>>) {
    let Some(request) = read_request(&mut stream).await else { return };
    let reply = respond(&request);
    seen.lock().expect("requests lock").push(request);
    if reply.hang {
        std::future::pending::<()>().await;
    }
    let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", reply.body.len()));
    // The client may stop reading early (a bounded body); a broken pipe is expected then.
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&reply.body).await;
    let _ = stream.shutdown().await;
}

async fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize =
        headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Recorded { method, target, headers, body })
}
