//! Connections for the per-batch statements (the commit call, `inputs_seen`, `read_streams`),
//! lent out and taken back without sqlx's pool.
//!
//! sqlx 0.9 pings every pooled connection when it comes back to the pool (a Sync message and a
//! wait for ReadyForQuery: a round trip that wakes both processes), and that ping cannot be
//! turned off. Measured on `capstan bench` (PostgreSQL + memory, one task per run, 64 in flight,
//! a sqlx patched not to ping, three interleaved pairs): 2,069 -> 2,208 tasks/s, Capstan's CPU
//! per task 216 -> 181 µs. Here a connection whose statement finished, with or without a
//! database error, goes back as it is. One whose statement was cut short (an I/O error, or the
//! caller's future dropped mid-statement, which is what sqlx's ping guards against) is closed
//! instead, and a new one is opened when needed. A connection that died while idle fails its next
//! statement as `Unavailable`, which every caller retries; the retry gets a fresh connection.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::{PgConnectOptions, PgSeverity};
use sqlx::{Connection, PgConnection};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::sql::db_error;
use crate::{Error, Result};

/// Idle connections and the limit on how many are out at once.
#[derive(Debug)]
pub(super) struct Lender {
    options: PgConnectOptions,
    idle: Mutex<Vec<PgConnection>>,
    limit: Semaphore,
    /// Connections opened so far (for tests).
    opened: AtomicU64,
    #[cfg(target_os = "linux")]
    nodelay: Option<super::nodelay::Server>,
}

impl Lender {
    /// Lends at most `limit` connections at once, opened with `options` when none is idle.
    pub fn new(options: PgConnectOptions, limit: usize) -> Self {
        #[cfg(target_os = "linux")]
        let nodelay = super::nodelay::Server::of(&options);
        Lender {
            options,
            idle: Mutex::new(Vec::new()),
            limit: Semaphore::new(limit.max(1)),
            opened: AtomicU64::new(0),
            #[cfg(target_os = "linux")]
            nodelay,
        }
    }

    /// How many connections were opened so far.
    #[cfg(test)]
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Closes the idle connections (the lent ones close when dropped).
    pub async fn close(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().expect("idle connections"));
        for conn in idle {
            // The store is going away; a connection that cannot say goodbye is dropped anyway.
            let _ = conn.close().await;
        }
    }

    /// An idle connection, or a new one.
    pub async fn lend(&self) -> Result<Lease<'_>> {
        let permit = self.limit.acquire().await.map_err(|_| Error::Unavailable("the store is closed".into()))?;
        let idle = self.idle.lock().expect("idle connections").pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = PgConnection::connect_with(&self.options).await.map_err(db_error)?;
                #[cfg(target_os = "linux")]
                if let Some(server) = self.nodelay {
                    super::nodelay::apply(server);
                }
                self.opened.fetch_add(1, Ordering::Relaxed);
                conn
            }
        };
        Ok(Lease { conn: Some(conn), lender: self, _permit: permit })
    }
}

/// A lent connection. It goes back when [`Lease::settle`] says its statement finished; dropped
/// otherwise, it is closed.
pub(super) struct Lease<'a> {
    conn: Option<PgConnection>,
    lender: &'a Lender,
    _permit: SemaphorePermit<'a>,
}

impl Lease<'_> {
    /// The connection, for one statement.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a lease holds its connection until settled")
    }

    /// Gives the connection back unless `result` says the statement did not finish cleanly,
    /// and passes the result on.
    pub fn settle<T>(mut self, result: std::result::Result<T, sqlx::Error>) -> std::result::Result<T, sqlx::Error> {
        let finished = match &result {
            Ok(_) => true,
            // The server answered; sqlx reads whatever is left up to ReadyForQuery before the
            // connection's next statement. A FATAL (or PANIC) error ends the session, though:
            // that is how a terminated backend says goodbye.
            Err(sqlx::Error::Database(e)) => !e
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|e| matches!(e.severity(), PgSeverity::Fatal | PgSeverity::Panic)),
            Err(_) => false,
        };
        if finished && let Some(conn) = self.conn.take() {
            self.lender.idle.lock().expect("idle connections").push(conn);
        }
        result
    }
}
