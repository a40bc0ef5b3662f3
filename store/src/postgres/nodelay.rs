//! `TCP_NODELAY` on the pool's connections: a workaround for sqlx 0.9.0.
//!
//! sqlx 0.9.0 opens TCP connections without `TCP_NODELAY` (a regression of 0.9.0, sqlx issue
//! #4335, fixed upstream by pull request #4336 but not in a release when this was written). With
//! Nagle's algorithm on, a request longer than one TCP segment ends with a partial segment that
//! the kernel holds back until the server acknowledges the previous one, and the server delays
//! that acknowledgement by up to 40 ms. A group commit binding a hundred events is such a
//! request (more than 64 KiB on loopback, more than 1.4 KiB across a network): measured here,
//! the commit call took 45-50 ms instead of 5 ms, and `capstan bench` on PostgreSQL ran at a
//! third of its speed.
//!
//! sqlx does not hand out its socket, so after each new connection this sets the option on every
//! TCP socket of this process whose peer is the database server. It reaches a socket through a
//! duplicate of its descriptor taken with pidfd_getfd(2) (Linux 5.6+), which shares the socket,
//! so no unsafe code is needed. Where that is refused (an old kernel, a seccomp profile that
//! blocks it), it warns once and connections work as before, only slower for large commits; a
//! Unix socket URL (`?host=/var/run/postgresql`) avoids the problem altogether. Remove this module
//! once the sqlx in use sets `TCP_NODELAY` itself (the test below then fails its control).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, warn};

/// Where the database listens: the connections whose peer matches get `TCP_NODELAY`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Server {
    pub port: u16,
    /// The server's address when the URL names one; a host name matches any address.
    pub ip: Option<IpAddr>,
}

impl Server {
    /// The server `options` connect to over TCP; `None` for a Unix socket (no Nagle there).
    pub fn of(options: &sqlx::postgres::PgConnectOptions) -> Option<Self> {
        let host = options.get_host();
        (!host.starts_with('/')).then(|| Server { port: options.get_port(), ip: host.parse().ok() })
    }

    fn matches(&self, peer: &SocketAddr) -> bool {
        peer.port() == self.port && self.ip.is_none_or(|ip| ip == peer.ip())
    }
}

/// Whether the "cannot set TCP_NODELAY" warning was already given.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets `TCP_NODELAY` on every TCP socket of this process connected to `server`; returns how
/// many it set. Failures are logged, never returned: the connection works without it.
pub(super) fn apply(server: Server) -> usize {
    match sockets_to(server) {
        Ok(sockets) => {
            let mut set = 0;
            for socket in sockets {
                match rustix::net::sockopt::set_tcp_nodelay(&socket, true) {
                    Ok(()) => set += 1,
                    Err(e) => warn_once(&e.into()),
                }
            }
            debug!(set, port = server.port, "TCP_NODELAY on database connections");
            set
        }
        Err(e) => {
            warn_once(&e);
            0
        }
    }
}

fn warn_once(error: &std::io::Error) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            %error,
            "cannot set TCP_NODELAY on PostgreSQL connections; large commits may wait up to 40 ms \
             each (connect through a Unix socket to avoid it)"
        );
    }
}

/// Duplicates of this process's TCP sockets whose peer is `server`.
fn sockets_to(server: Server) -> std::io::Result<Vec<rustix::fd::OwnedFd>> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Only sockets; the link of a descriptor closed meanwhile is simply gone.
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        let dup = match pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) {
            Ok(dup) => dup,
            // Closed between listing and duplicating.
            Err(rustix::io::Errno::BADF) => continue,
            // Refused (EPERM under a seccomp profile, ENOSYS before Linux 5.6): say so.
            Err(e) => return Err(e.into()),
        };
        let stream = rustix::net::sockopt::socket_type(&dup).is_ok_and(|t| t == rustix::net::SocketType::STREAM);
        let peer = rustix::net::getpeername(&dup).ok().flatten().and_then(|a| SocketAddr::try_from(a).ok());
        if stream && peer.is_some_and(|p| server.matches(&p)) {
            found.push(dup);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    use super::*;

    const URL: &str = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable";

    fn nodelay_of_connections(server: Server) -> Vec<bool> {
        sockets_to(server)
            .expect("sockets readable")
            .iter()
            .map(|s| rustix::net::sockopt::tcp_nodelay(s).expect("getsockopt"))
            .collect()
    }

    /// The control shows sqlx still leaves Nagle on (when it fails, sqlx was fixed: remove the
    /// module); then the store's connections have `TCP_NODELAY`. It counts every connection of
    /// the process, so it relies on nextest running each test in a process of its own.
    #[tokio::test]
    async fn store_connections_have_tcp_nodelay() {
        let url = std::env::var("CAPSTAN_TEST_POSTGRES_URL").unwrap_or_else(|_| URL.to_owned());
        let options = PgConnectOptions::from_str(&url).expect("URL");
        if options.get_host().starts_with('/') {
            panic!("this test needs a TCP URL in CAPSTAN_TEST_POSTGRES_URL, not a Unix socket");
        }
        let server = Server { port: options.get_port(), ip: options.get_host().parse().ok() };

        let plain = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("PostgreSQL is required by this test");
        let before = nodelay_of_connections(server);
        assert_eq!(before, [false], "control: a plain sqlx connection (sqlx fixed? remove the workaround)");

        let schema = format!("capstan_test_{}", uuid::Uuid::new_v4().simple());
        let store = super::super::PostgresStore::connect_with_schema(&url, &schema).await.expect("connect");
        sqlx::query("SELECT 1").execute(store.pool()).await.expect("query");
        let after = nodelay_of_connections(server);
        plain.close().await;
        store.drop_schema().await.expect("drop test schema");
        assert!(after.len() >= 2, "the store's connection is among them: {after:?}");
        assert!(after.iter().all(|on| *on), "{after:?}");
    }

    #[test]
    fn a_server_matches_its_port_and_address() {
        let any = Server { port: 5432, ip: None };
        let local = Server { port: 5432, ip: Some("127.0.0.1".parse().expect("ip")) };
        assert!(any.matches(&"10.0.0.1:5432".parse().expect("addr")));
        assert!(!any.matches(&"10.0.0.1:5433".parse().expect("addr")));
        assert!(local.matches(&"127.0.0.1:5432".parse().expect("addr")));
        assert!(!local.matches(&"10.0.0.1:5432".parse().expect("addr")));
    }
}
