//! The one connection every write of a [`SqliteStore`](super::SqliteStore) goes through.
//!
//! A file database's writer is a connection of its own behind a lock, not a pool: sqlx pings a
//! pooled connection each time it comes back (a round trip to the connection's thread), and the
//! next commit's acquire waited for that ping, on the path every batch takes. An in-memory
//! database keeps its single pooled connection, which its reads go through as well (see
//! `SqliteStore::read`).
//!
//! A commit's `BEGIN IMMEDIATE` and `COMMIT` travel inside its scripts (two round trips for the
//! whole commit, see `commit.rs`), out of sqlx's transaction tracking. A commit cut short in
//! between (its future dropped) would leave the transaction open, so [`Writer::open`] is set
//! while one may be open, and the next holder rolls it back first.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, MutexGuard};
use tracing::warn;

use crate::sql::db_error;
use crate::{Error, Result};

#[derive(Debug)]
enum Conn {
    /// A file database's writer; `None` once closed.
    Own(Mutex<Option<SqliteConnection>>),
    /// An in-memory database's only connection.
    Shared(SqlitePool),
}

#[derive(Debug)]
pub(super) struct Writer {
    conn: Conn,
    /// A transaction begun by a script may still be open on the connection.
    open: AtomicBool,
}

/// A connection held until dropped: the writer, or a pooled one.
pub(super) enum Held<'a> {
    Own(MutexGuard<'a, Option<SqliteConnection>>),
    Pooled(PoolConnection<Sqlite>),
}

impl Deref for Held<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        match self {
            Held::Own(guard) => guard.as_ref().expect("a held writer is open"),
            Held::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self {
            Held::Own(guard) => guard.as_mut().expect("a held writer is open"),
            Held::Pooled(conn) => conn,
        }
    }
}

impl Writer {
    pub fn own(conn: SqliteConnection) -> Self {
        Writer { conn: Conn::Own(Mutex::new(Some(conn))), open: AtomicBool::new(false) }
    }

    pub fn shared(pool: SqlitePool) -> Self {
        Writer { conn: Conn::Shared(pool), open: AtomicBool::new(false) }
    }

    /// Waits for the writer; rolls back a transaction a cut-short commit left open.
    pub async fn hold(&self) -> Result<Held<'_>> {
        let mut held = match &self.conn {
            Conn::Own(conn) => {
                let guard = conn.lock().await;
                if guard.is_none() {
                    return Err(Error::Unavailable("the store is closed".into()));
                }
                Held::Own(guard)
            }
            Conn::Shared(pool) => Held::Pooled(pool.acquire().await.map_err(db_error)?),
        };
        if self.open.load(Ordering::Acquire) {
            self.end(&mut held).await;
        }
        Ok(held)
    }

    /// Marks a transaction as (possibly) open, before the script that begins it is sent.
    pub fn begin(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Marks the transaction as ended by a script that committed it.
    pub fn committed(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// Rolls back whatever transaction is open on `held` (none is fine: a script can fail
    /// before its `BEGIN` took effect, or at its `COMMIT`, which leaves the transaction open).
    pub async fn end(&self, held: &mut Held<'_>) {
        match sqlx::raw_sql("ROLLBACK").execute(&mut **held).await {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.message().contains("no transaction is active") => {}
            Err(e) => {
                // Left marked open: the next holder tries again.
                warn!(error = %e, "rolling back the writer's transaction failed");
                return;
            }
        }
        self.open.store(false, Ordering::Release);
    }

    /// Closes a file database's connection (checkpointing the WAL); later writes fail as
    /// unavailable.
    pub async fn close(&self) {
        match &self.conn {
            Conn::Own(conn) => {
                if let Some(conn) = conn.lock().await.take()
                    && let Err(e) = conn.close().await
                {
                    warn!(error = %e, "closing the SQLite writer failed");
                }
            }
            Conn::Shared(pool) => pool.close().await,
        }
    }
}
