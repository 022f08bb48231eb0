//! Opening the database: pragmas, migrations, and the helpers every query uses.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use crate::error::{ErrorContext, MemoryError, corrupt};
use crate::writer::{DEFAULT_MAX_BATCH, Hold, Writer};

/// The schema, embedded from the workspace's `migrations/` directory.
static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Default wait for another writer before giving up with [`MemoryError::Locked`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How to open a [`Store`]. `StoreOptions::default()` suits the daemon and the cli.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// How long a statement waits for another connection's write lock before
    /// failing with [`MemoryError::Locked`].
    pub busy_timeout: Duration,
    /// Size of the connection pool (SQLite allows one writer at a time; the
    /// others only read).
    pub max_connections: u32,
    /// Most writes grouped into one transaction (one fsync). 1 turns group
    /// commit off: every write is its own transaction (for comparisons).
    pub max_batch: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            max_connections: 4,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

impl StoreOptions {
    /// Sets [`StoreOptions::busy_timeout`].
    pub fn with_busy_timeout(mut self, busy_timeout: Duration) -> Self {
        self.busy_timeout = busy_timeout;
        self
    }

    /// Sets [`StoreOptions::max_batch`] (at least 1).
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// Sets [`StoreOptions::max_connections`] (at least 1).
    pub fn with_max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections.max(1);
        self
    }
}

/// The openpista database: sessions, their messages and tool invocations.
///
/// Cheap to clone; clones share one connection pool and one writer task.
/// Every write that belongs together (a message and its session's
/// `updated_at`, an assistant message and its tool results) is atomic, so a
/// crash leaves either all of it or none of it.
///
/// Writes are group-committed (see `writer.rs`): the writes queued while the
/// previous commit runs share the next transaction and its fsync, each in its
/// own savepoint. A write returns only after its transaction committed.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: SqlitePool,
    pub(crate) ctx: Arc<ErrorContext>,
    writer: Writer,
}

impl Store {
    /// Opens (creating if needed) the database at `path` with default options.
    ///
    /// See [`Store::open_with`].
    pub async fn open(path: &Path) -> Result<Store, MemoryError> {
        Self::open_with(path, &StoreOptions::default()).await
    }

    /// Opens (creating if needed) the database at `path` and brings its schema
    /// up to date.
    ///
    /// Creates missing parent directories. Connections use WAL,
    /// `foreign_keys = ON`, the configured `busy_timeout`, and
    /// `synchronous = FULL`: with WAL, `NORMAL` survives a process crash but
    /// may lose the last commits on power loss, and a message we acknowledged
    /// must not disappear, so we pay one fsync per commit.
    ///
    /// A file that is not SQLite gives [`MemoryError::NotADatabase`] and is not
    /// modified; a database held by another writer for longer than the busy
    /// timeout gives [`MemoryError::Locked`].
    pub async fn open_with(path: &Path, options: &StoreOptions) -> Result<Store, MemoryError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| MemoryError::CreateDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        let ctx = ErrorContext::new(path, options.busy_timeout);
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout)
            // Savepoint journals (one per write in a batch) stay in memory.
            .pragma("temp_store", "memory");
        // No ping before handing out a connection: a SQLite connection is a
        // file handle in this process, not a socket that can go stale, and
        // the ping is a round trip to the connection's thread per acquire.
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .test_before_acquire(false)
            .connect_with(connect)
            .await
            .map_err(|e| ctx.sql(e))?;
        let ctx = Arc::new(ctx);
        // The writer keeps a connection of its own when reads have others.
        let hold = if options.max_connections >= 2 {
            Hold::Keep
        } else {
            Hold::PerBatch
        };
        let store = Store {
            writer: Writer::spawn(pool.clone(), ctx.clone(), options.max_batch.max(1), hold)
                .await?,
            pool,
            ctx,
        };
        store.migrate().await?;
        tracing::debug!(path = %path.display(), "opened store");
        Ok(store)
    }

    /// A private database in memory, gone when the last clone is dropped.
    /// For tests.
    pub async fn open_in_memory() -> Result<Store, MemoryError> {
        let ctx = ErrorContext::new(Path::new(":memory:"), DEFAULT_BUSY_TIMEOUT);
        let connect = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true);
        // Each in-memory connection is its own database: keep exactly one, forever.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect)
            .await
            .map_err(|e| ctx.sql(e))?;
        let ctx = Arc::new(ctx);
        let store = Store {
            writer: Writer::spawn(pool.clone(), ctx.clone(), DEFAULT_MAX_BATCH, Hold::PerBatch)
                .await?,
            pool,
            ctx,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database file (`:memory:` for [`Store::open_in_memory`]).
    pub fn path(&self) -> &Path {
        &self.ctx.path
    }

    /// Runs SQLite's `PRAGMA integrity_check` and returns the problems it
    /// reports; empty when the database is sound.
    pub async fn integrity_check(&self) -> Result<Vec<String>, MemoryError> {
        let rows = sqlx::query("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.ctx.sql(e))?;
        let mut problems = Vec::new();
        for row in rows {
            let line: String = row.try_get(0).map_err(|e| self.ctx.sql(e))?;
            if line != "ok" {
                problems.push(line);
            }
        }
        Ok(problems)
    }

    /// Stops the writer after the writes queued so far, then closes every
    /// connection, waiting for those in use to be returned. Afterwards,
    /// writes through any clone of this store fail with
    /// [`MemoryError::NotStored`] and reads with [`MemoryError::Database`].
    pub async fn close(&self) {
        // The writer first: it may keep a connection.
        self.writer.stop().await;
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<(), MemoryError> {
        match MIGRATOR.run(&self.pool).await {
            Ok(()) => Ok(()),
            // Two processes opening a fresh database at once both try the first
            // migration; the loser fails on "table exists". Once the winner has
            // committed, a second run sees the migration applied.
            Err(MigrateError::ExecuteMigration(first, version)) => {
                tracing::debug!(version, error = %first, "migration failed; retrying once");
                MIGRATOR
                    .run(&self.pool)
                    .await
                    .map_err(|e| self.ctx.migrate(e))
            }
            Err(e) => Err(self.ctx.migrate(e)),
        }
    }

    /// Starts a write transaction of its own that takes the write lock at once
    /// (`BEGIN IMMEDIATE`), outside the group commit. For rare writes; the
    /// hot paths use [`Store::write`].
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, MemoryError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.ctx.sql(e))
    }

    /// Commits `tx`, mapping failures.
    pub(crate) async fn commit(&self, tx: Transaction<'static, Sqlite>) -> Result<(), MemoryError> {
        tx.commit().await.map_err(|e| self.ctx.sql(e))
    }

    /// Runs `write` atomically in the next group-committed write transaction
    /// (which takes the write lock at once, `BEGIN IMMEDIATE`, so the busy
    /// timeout applies) and returns its result once that transaction is
    /// committed. An `Err` from `write` rolls back only `write`'s changes.
    ///
    /// `write` runs on the writer's thread with the batch's connection (see
    /// `writer.rs`) and gets the store's error context for mapping errors.
    pub(crate) async fn write<T, F>(&self, write: F) -> Result<T, MemoryError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, &ErrorContext) -> Result<T, MemoryError> + Send + 'static,
    {
        let ctx = self.ctx.clone();
        self.writer.write(move |conn| write(conn, &ctx)).await
    }

    /// Maps an sqlx error with this store's context.
    pub(crate) fn sql(&self, err: sqlx::Error) -> MemoryError {
        self.ctx.sql(err)
    }
}

/// Now, as stored: unix milliseconds, UTC.
pub(crate) fn now_millis() -> i64 {
    Utc::now().timestamp_millis()
}

/// Converts a stored timestamp back, or reports the row as corrupt.
pub(crate) fn from_millis(
    millis: i64,
    table: &'static str,
    key: &dyn std::fmt::Display,
) -> Result<DateTime<Utc>, MemoryError> {
    DateTime::from_timestamp_millis(millis)
        .ok_or_else(|| corrupt(table, key, format!("timestamp {millis} is out of range")))
}

/// A `u64` for an INTEGER column.
pub(crate) fn to_i64(field: &'static str, value: u64) -> Result<i64, MemoryError> {
    i64::try_from(value).map_err(|_| MemoryError::OutOfRange { field, value })
}

/// A stored INTEGER that must not be negative.
pub(crate) fn to_u64(
    value: i64,
    table: &'static str,
    key: &dyn std::fmt::Display,
    field: &str,
) -> Result<u64, MemoryError> {
    u64::try_from(value).map_err(|_| corrupt(table, key, format!("{field} is negative ({value})")))
}

/// A `LIMIT` value; `usize::MAX` and friends mean "no limit".
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Reads column `name` of a row of `table`, reporting a type mismatch as a
/// corrupt row rather than a database failure.
pub(crate) fn col<'r, T>(
    row: &'r SqliteRow,
    name: &str,
    table: &'static str,
    key: &dyn std::fmt::Display,
) -> Result<T, MemoryError>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(name)
        .map_err(|e| corrupt(table, key, format!("column {name}: {e}")))
}
