//! A small TCP fault proxy: it forwards connections to an upstream address and, on demand, cuts
//! every open connection and refuses new ones for a while. Placed between `capstan server` and
//! PostgreSQL it simulates a database outage without restarting the database other tests share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; it stops with the runtime that started it.
#[derive(Clone)]
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Raised (incremented) on every cut; each connection ends when it changes.
    cuts: watch::Sender<u64>,
    /// New connections are refused until this time (ms since the epoch).
    refuse_until_ms: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (cuts, _) = watch::channel(0u64);
        let proxy = FaultProxy { addr, cuts, refuse_until_ms: Arc::new(AtomicU64::new(0)) };
        let p = proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if now_ms() < p.refuse_until_ms.load(Ordering::SeqCst) {
                    drop(client); // an outage: the connection is closed at once
                    continue;
                }
                let mut cut = p.cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                    // Dropping both sockets here closes them: the client sees its connection die.
                });
            }
        });
        proxy
    }

    /// Cuts every open connection and refuses new ones for `outage`.
    pub fn cut(&self, outage: Duration) {
        self.refuse_until_ms.store(now_ms() + outage.as_millis() as u64, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }
}
