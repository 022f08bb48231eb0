//! The one error type of this crate, and how SQLite failures map onto it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openpista_proto::{MessageId, SessionId};
use sqlx::migrate::MigrateError;

/// Everything that can go wrong while storing or reading history.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The directory that should hold the database could not be created.
    ///
    /// Cause: permissions, a read-only file system, or a file where a
    /// directory should be. Retrying helps only after that is fixed.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file exists but is not an SQLite database (SQLITE_NOTADB).
    ///
    /// Cause: a wrong `--db` path or a file overwritten by something else.
    /// The file is left untouched. Retrying does not help.
    #[error(
        "{path} is not an SQLite database; it was left untouched (check the configured database path)"
    )]
    NotADatabase { path: PathBuf },

    /// The database stayed locked by another connection or process for longer
    /// than the busy timeout (SQLITE_BUSY / SQLITE_LOCKED).
    ///
    /// Cause: another openpista process (or an `sqlite3` shell) holding a
    /// write transaction. Retrying helps once that transaction ends.
    #[error(
        "database {path} is locked by another connection or process (waited {waited:?}); \
         is another openpista running?"
    )]
    Locked { path: PathBuf, waited: Duration },

    /// SQLite reports the file itself as damaged (SQLITE_CORRUPT).
    ///
    /// Cause: disk or file-system failure, or outside tampering. Retrying does
    /// not help; restore a backup or start a new database.
    #[error("database {path} is corrupt: {message}")]
    DatabaseCorrupt { path: PathBuf, message: String },

    /// The schema migrations could not be applied.
    ///
    /// Cause: a database written by a newer openpista (unknown migration), a
    /// modified migration file, or a failing migration statement. Retrying
    /// does not help.
    #[error("cannot migrate database {path}: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: MigrateError,
    },

    /// The session does not exist (never created, or deleted).
    ///
    /// Cause: a caller bug or a concurrent `delete_session`. Retrying does not
    /// help; create the session first.
    #[error("session {0} does not exist")]
    SessionNotFound(SessionId),

    /// The session is suspended, so the append that starts a turn
    /// ([`Store::append_turn_unless_suspended`](crate::Store::append_turn_unless_suspended))
    /// stored nothing.
    ///
    /// Cause: an operator or a quota suspended it. Retrying helps only after
    /// `openpista sessions resume`.
    #[error("session {session} is suspended ({reason})")]
    SessionSuspended { session: SessionId, reason: String },

    /// `create_session` was asked for an id that is already taken.
    ///
    /// Cause: a duplicate id. Retrying does not help; use `ensure_session` to
    /// accept an existing session.
    #[error("session {0} already exists")]
    SessionExists(SessionId),

    /// A tool invocation names a message that does not exist in its session.
    ///
    /// Cause: a caller bug. Retrying does not help.
    #[error("message {message_id} does not exist in session {session_id}")]
    MessageNotFound {
        session_id: SessionId,
        message_id: MessageId,
    },

    /// A stored row cannot be turned back into our types: malformed
    /// `tool_calls` JSON, an unknown role or outcome, an invalid session id,
    /// a negative count, a value of the wrong SQL type.
    ///
    /// Cause: the database was edited outside openpista. Retrying does not
    /// help; the row must be repaired or deleted.
    #[error("corrupt row {key} in table {table}: {reason}")]
    CorruptRow {
        table: &'static str,
        key: String,
        reason: String,
    },

    /// A number is too large for an SQLite INTEGER (more than `i64::MAX`).
    ///
    /// Cause: a nonsensical token count or duration from the caller.
    /// Retrying does not help.
    #[error("{field} = {value} is too large to store")]
    OutOfRange { field: &'static str, value: u64 },

    /// A value could not be encoded as JSON for storage.
    ///
    /// Cause: a serializer failure (not expected for our types). Retrying does
    /// not help.
    #[error("cannot encode {what} as JSON: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// The audit trail's head record (`audit_head`) is missing, so no row can
    /// be chained onto it.
    ///
    /// Cause: the database was edited outside openpista. Retrying does not
    /// help; run `openpista audit --verify` and investigate.
    #[error("the audit trail head is missing; the audit tables were edited outside openpista")]
    AuditHeadMissing,

    /// A write was not stored because the transaction it shared with other
    /// writes (group commit) failed, or the store's writer task has stopped
    /// (the store was closed or its runtime shut down).
    ///
    /// Cause: see the message; the first write of a failed batch gets the
    /// underlying error itself. Retrying may help once the cause is fixed.
    #[error("database {path}: {message}")]
    NotStored { path: PathBuf, message: String },

    /// A write failed inside SQLite (the store's writer drives its
    /// connection directly, see `writer.rs`): a constraint or trigger that
    /// refused it, I/O errors, a full disk. Nothing of that write was stored.
    ///
    /// Cause: see the source. Retrying may help for transient I/O or a full
    /// disk once space is freed; not for a refused constraint.
    #[error("database {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// Any other SQLite or pool failure: I/O errors, a full disk, a file that
    /// cannot be opened, a closed pool.
    ///
    /// Cause: see the source. Retrying may help for transient I/O or a full
    /// disk once space is freed; not for the rest.
    #[error("database {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
}

/// SQLite primary result codes we tell apart (the low byte of extended codes).
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_NOTADB: i32 = 26;

/// Where an error happened, so that it can name the file and the wait.
#[derive(Debug, Clone)]
pub(crate) struct ErrorContext {
    pub path: PathBuf,
    pub busy_timeout: Duration,
}

impl ErrorContext {
    pub(crate) fn new(path: &Path, busy_timeout: Duration) -> Self {
        Self {
            path: path.to_path_buf(),
            busy_timeout,
        }
    }

    /// Maps an sqlx error onto the variant that says what went wrong.
    pub(crate) fn sql(&self, err: sqlx::Error) -> MemoryError {
        let primary = match &err {
            sqlx::Error::Database(db) => db
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .map(|code| code & 0xff),
            _ => None,
        };
        self.by_code(primary, &err)
            .unwrap_or(MemoryError::Database {
                path: self.path.clone(),
                source: err,
            })
    }

    /// The variant for SQLite primary result codes we tell apart: a lock
    /// held too long, a file that is not a database, a corrupt one.
    fn by_code(&self, primary: Option<i32>, err: &dyn std::fmt::Display) -> Option<MemoryError> {
        match primary {
            Some(SQLITE_BUSY | SQLITE_LOCKED) => Some(MemoryError::Locked {
                path: self.path.clone(),
                waited: self.busy_timeout,
            }),
            Some(SQLITE_NOTADB) => Some(MemoryError::NotADatabase {
                path: self.path.clone(),
            }),
            Some(SQLITE_CORRUPT) => Some(MemoryError::DatabaseCorrupt {
                path: self.path.clone(),
                message: err.to_string(),
            }),
            _ => None,
        }
    }

    /// Maps an error of the writer's direct SQLite calls like
    /// [`ErrorContext::sql`] does an sqlx error.
    pub(crate) fn sqlite(&self, err: rusqlite::Error) -> MemoryError {
        let primary = match &err {
            rusqlite::Error::SqliteFailure(e, _) => Some(e.extended_code & 0xff),
            _ => None,
        };
        self.by_code(primary, &err).unwrap_or(MemoryError::Write {
            path: self.path.clone(),
            source: err,
        })
    }

    /// The same failure again, for the next caller of a failed batch (the
    /// first gets `err` itself).
    pub(crate) fn replicate(&self, err: &MemoryError) -> MemoryError {
        match err {
            MemoryError::Locked { path, waited } => MemoryError::Locked {
                path: path.clone(),
                waited: *waited,
            },
            MemoryError::NotADatabase { path } => MemoryError::NotADatabase { path: path.clone() },
            MemoryError::DatabaseCorrupt { path, message } => MemoryError::DatabaseCorrupt {
                path: path.clone(),
                message: message.clone(),
            },
            other => MemoryError::NotStored {
                path: self.path.clone(),
                message: format!("the write was not stored: {other}"),
            },
        }
    }

    /// SQLite rolled a whole batch back on one write's error (it does so on
    /// a full disk or an I/O error): the others' writes were lost with it.
    pub(crate) fn rolled_back(&self) -> MemoryError {
        MemoryError::NotStored {
            path: self.path.clone(),
            message: "the write was not stored: SQLite rolled back the transaction it shared \
                      with a failing write (a full disk or an I/O error?)"
                .into(),
        }
    }

    /// Like [`ErrorContext::sqlite`], but a value that cannot be read as
    /// its type is a corrupt row of `table`.
    pub(crate) fn sqlite_row(
        &self,
        err: rusqlite::Error,
        table: &'static str,
        key: &dyn std::fmt::Display,
    ) -> MemoryError {
        match err {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => corrupt(table, key, err),
            err => self.sqlite(err),
        }
    }

    /// The writer is gone (store closed), or dropped this write's answer
    /// (it panicked).
    pub(crate) fn writer_stopped(&self) -> MemoryError {
        MemoryError::NotStored {
            path: self.path.clone(),
            message: "the write was not stored: the store is closed, or the write failed \
                      unexpectedly (see the log)"
                .into(),
        }
    }

    /// Like [`ErrorContext::sqlite`], but a uniqueness violation means `id`
    /// is taken.
    pub(crate) fn sqlite_insert_session(
        &self,
        err: rusqlite::Error,
        id: &SessionId,
    ) -> MemoryError {
        let unique = matches!(
            &err,
            rusqlite::Error::SqliteFailure(e, _)
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
        );
        if unique {
            MemoryError::SessionExists(id.clone())
        } else {
            self.sqlite(err)
        }
    }

    /// Maps a migration failure, keeping lock and not-a-database errors clear.
    pub(crate) fn migrate(&self, err: MigrateError) -> MemoryError {
        match err {
            MigrateError::Execute(inner) => match self.sql(inner) {
                MemoryError::Database { source, .. } => MemoryError::Migrate {
                    path: self.path.clone(),
                    source: MigrateError::Execute(source),
                },
                clear => clear,
            },
            MigrateError::ExecuteMigration(inner, version) => match self.sql(inner) {
                MemoryError::Database { source, .. } => MemoryError::Migrate {
                    path: self.path.clone(),
                    source: MigrateError::ExecuteMigration(source, version),
                },
                clear => clear,
            },
            other => MemoryError::Migrate {
                path: self.path.clone(),
                source: other,
            },
        }
    }
}

/// A [`MemoryError::CorruptRow`] for `table`, row `key`.
pub(crate) fn corrupt(
    table: &'static str,
    key: impl ToString,
    reason: impl ToString,
) -> MemoryError {
    MemoryError::CorruptRow {
        table,
        key: key.to_string(),
        reason: reason.to_string(),
    }
}
