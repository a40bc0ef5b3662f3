//! Runs the conformance suite ([`crate::testing`]) against every backend compiled in: one
//! `#[tokio::test]` per case per backend, so a failure names both.

use std::sync::Arc;

use crate::Store;
use crate::testing::CaseFuture;

/// Runs `case` on its own task so that a panic still lets the caller clean up, then re-raises it.
async fn run_isolated<S: Store>(store: Arc<S>, case: impl FnOnce(Arc<S>) -> CaseFuture) -> Result<(), String> {
    match tokio::spawn(case(store)).await {
        Ok(()) => Ok(()),
        Err(err) if err.is_panic() => {
            let panic = err.into_panic();
            Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "case panicked".to_owned()))
        }
        Err(err) => Err(format!("case task failed: {err}")),
    }
}

mod memory {
    use super::*;
    use crate::memory::MemoryStore;

    async fn run(case: impl FnOnce(Arc<MemoryStore>) -> CaseFuture) {
        if let Err(msg) = run_isolated(Arc::new(MemoryStore::new()), case).await {
            panic!("{msg}");
        }
    }

    crate::store_conformance!(run);

    #[tokio::test]
    async fn suite_runs_every_case() {
        crate::testing::suite(|| async { MemoryStore::new() }).await;
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use crate::sqlite::SqliteStore;

    async fn run(case: impl FnOnce(Arc<SqliteStore>) -> CaseFuture) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("capstan.db")).await.expect("open SQLite store");
        let outcome = run_isolated(Arc::new(store.clone()), case).await;
        store.close().await;
        if let Err(msg) = outcome {
            panic!("{msg}");
        }
    }

    crate::store_conformance!(run);

    #[tokio::test]
    async fn in_memory_database_passes_the_suite() {
        crate::testing::suite(|| async { SqliteStore::open_in_memory().await.expect("in-memory SQLite") }).await;
    }

    #[tokio::test]
    async fn reopening_keeps_committed_events() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capstan.db");
        let store = SqliteStore::open(&path).await.expect("open");
        let batch = crate::testing::appends(vec![crate::testing::append("r1", 0, &["e1", "e2"])]);
        crate::CommitLog::commit(&store, batch).await.expect("commit");
        store.close().await;
        let store = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(crate::EventReader::stream_version(&store, "r1").await.expect("version"), 2);
        store.close().await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::postgres::PostgresStore;

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable";

    /// Connects with a fresh random schema; fails loudly (never skips) when the server is down.
    async fn fresh() -> PostgresStore {
        let url = std::env::var("CAPSTAN_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let schema = format!("capstan_test_{}", uuid::Uuid::new_v4().simple());
        match PostgresStore::connect_with_schema(&url, &schema).await {
            Ok(store) => store,
            Err(err) => panic!(
                "PostgreSQL at {url} is required by these tests and is unreachable ({err}); \
                 start it with deploy/local/services.sh or set CAPSTAN_TEST_POSTGRES_URL"
            ),
        }
    }

    async fn run(case: impl FnOnce(Arc<PostgresStore>) -> CaseFuture) {
        let store = fresh().await;
        let outcome = run_isolated(Arc::new(store.clone()), case).await;
        store.drop_schema().await.expect("drop test schema");
        if let Err(msg) = outcome {
            panic!("{msg}");
        }
    }

    crate::store_conformance!(run);

    #[tokio::test]
    async fn migrate_is_idempotent() {
        let store = fresh().await;
        store.migrate().await.expect("second migrate");
        store.drop_schema().await.expect("drop test schema");
    }

    #[tokio::test]
    async fn bad_schema_name_is_invalid() {
        let err = PostgresStore::connect_with_schema(DEFAULT_URL, "Bad;Name").await.expect_err("invalid");
        assert!(matches!(err, crate::Error::Invalid(_)), "{err:?}");
    }
}
