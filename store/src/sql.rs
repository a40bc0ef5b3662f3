//! Helpers shared by the SQL backends: mapping sqlx errors onto [`Error`] and small conversions.

use crate::Error;

/// Maps a sqlx error onto the variant that tells the caller what to do.
///
/// The commit path detects duplicate inputs itself and names the id, so a unique violation
/// reaching this function is a race it did not foresee. Only one on the input id constraint
/// means "already applied" (`DuplicateInput`, so the caller drops the input);
/// any other (say two writers taking the same stream seq) is `Unavailable`, because a retry
/// re-checks versions and then reports the real conflict, whereas dropping the input would lose
/// it. Other data or constraint errors are the caller's (`Invalid`); everything else is a
/// backend that failed or went away (`Unavailable`).
pub(crate) fn db_error(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            // PostgreSQL names the constraint; SQLite only says "UNIQUE constraint failed: t.c".
            let on_an_id =
                db.constraint() == Some("processed_inputs_pkey") || db.message().ends_with("processed_inputs.id");
            if on_an_id { Error::DuplicateInput(db.message().to_owned()) } else { Error::Unavailable(Box::new(err)) }
        }
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // PostgreSQL class 22 is "data exception" and 23 "integrity constraint violation";
            // SQLite reports constraint failures as SQLITE_CONSTRAINT (19) or its extended codes.
            let caller_fault =
                code.starts_with("22") || code.starts_with("23") || code.parse::<i64>().is_ok_and(|c| c & 0xff == 19);
            if caller_fault { Error::Invalid(db.message().to_owned()) } else { Error::Unavailable(Box::new(err)) }
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            Error::Invalid(format!("stored data does not decode: {err}"))
        }
        _ => Error::Unavailable(Box::new(err)),
    }
}

/// Maps a migration failure: the schema could not be brought up to date.
pub(crate) fn migrate_error(err: sqlx::migrate::MigrateError) -> Error {
    Error::Unavailable(Box::new(err))
}

/// A `usize` limit as SQL's `i64` (saturating, since no table holds `i64::MAX` rows).
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Decodes a JSON payload stored as text (SQLite keeps JSON as TEXT).
#[cfg(feature = "sqlite")]
pub(crate) fn parse_json(text: &str) -> Result<serde_json::Value, Error> {
    serde_json::from_str(text).map_err(|e| Error::Invalid(format!("stored payload is not JSON: {e}")))
}
