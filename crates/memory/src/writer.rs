//! Group commit: every write of a [`Store`](crate::Store) goes through one
//! writer task that runs the writes queued at that moment in **one** SQLite
//! transaction, each inside its own savepoint, and commits them with one
//! fsync.
//!
//! Durability is unchanged: a caller's future resolves only after the commit
//! that holds its write returned (with `synchronous = FULL`, after the fsync),
//! so nothing is acknowledged before it is on disk. What changes is the cost
//! under load: while one batch is being committed, the next one collects, so
//! N concurrent turns share one fsync instead of queuing for N of them.
//!
//! Isolation between writes of one batch: a write that fails is rolled back to
//! its savepoint and reported to its caller alone; the others commit. A failed
//! commit is reported to every caller of the batch (none of it was stored).
//! The writer runs no caller code but the write itself (and the audit entry
//! builder an audited append is given), and a caller that stops waiting (its
//! future dropped) does not stop its write.
//!
//! How a batch reaches SQLite: sqlx runs each statement on the connection's
//! own thread and hands the result back, a round trip that costs 60-80 µs on
//! the two-core VMs we measure on. A batch statement by statement (`BEGIN`,
//! then per write a savepoint and its statements, then `COMMIT`) spent most
//! of its time in those round trips while the next batch waited. So the
//! writer, on a thread of its own, takes the connection from the pool, locks
//! it for the batch ([`SqliteConnection::lock_handle`], one round trip) and
//! runs the whole batch on that handle through `rusqlite`, then gives it
//! back with no transaction open. Writes are therefore plain functions of a
//! `rusqlite::Connection`; reads stay on sqlx.

use std::sync::Arc;

use rusqlite::Connection;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ErrorContext, MemoryError};

/// Most writes in one transaction by default; the rest wait for the next one.
pub(crate) const DEFAULT_MAX_BATCH: usize = 256;

/// Opens the savepoint of one write in a batch (see `run_batch`).
const SAVEPOINT: &str = "SAVEPOINT openpista_write";
/// Undoes one failed write of a batch, and nothing before it.
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO openpista_write";

/// Prepared statements the writer keeps (its own and the writes').
const STATEMENTS: usize = 64;

/// Writes waiting for the writer task; senders wait when it is full.
const QUEUE: usize = 1024;

/// What a write hands back to the writer: whether it succeeded (so its
/// savepoint is released or rolled back), and how to tell its caller once the
/// batch's fate is known.
type Deliver = Box<dyn FnOnce(Option<MemoryError>) + Send>;

/// A queued write. Given `Err`, it does not run and hands that error to its
/// caller (its batch could not start).
type Job = Box<dyn FnOnce(Result<&Connection, MemoryError>) -> (bool, Deliver) + Send>;

/// What the writer's queue carries.
enum Msg {
    Write(Job),
    /// Finish what was queued before, give the connection back, stop, and
    /// say so.
    Stop(oneshot::Sender<()>),
}

/// The sending side; cheap to clone with the store.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Msg>,
    ctx: Arc<ErrorContext>,
}

/// How the writer gets its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Keep one pool connection for the writer's whole life, locked for
    /// direct use, with its prepared statements: no round trip at all per
    /// batch. For file databases with more than one connection (reads use
    /// the others).
    Keep,
    /// Take a connection from the pool for each batch and lock it (one
    /// round trip per batch): for a pool of one connection, which reads
    /// need too (such as an in-memory database).
    PerBatch,
}

impl Writer {
    /// Starts the writer for `pool` on a thread of its own. It stops when
    /// [`Writer::stop`] is called or the last `Writer` clone is dropped.
    ///
    /// A thread, not a task on the caller's runtime: the batch runs
    /// synchronously on the connection (see the module docs), and on a
    /// shared runtime it would have waited behind the ready tasks at each
    /// step and blocked a worker while it ran.
    pub(crate) async fn spawn(
        pool: SqlitePool,
        ctx: Arc<ErrorContext>,
        max_batch: usize,
        hold: Hold,
    ) -> Result<Writer, MemoryError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stopped = |source| MemoryError::Database {
            path: ctx.path.clone(),
            source: sqlx::Error::Io(source),
        };
        // The runtime is built on the new thread (and dropped there): a
        // runtime must not be dropped inside the caller's async context.
        let (started, running) = oneshot::channel();
        let task_ctx = ctx.clone();
        std::thread::Builder::new()
            .name("openpista-db-writer".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let _ = started.send(Ok(()));
                runtime.block_on(run(pool, task_ctx, rx, max_batch, hold));
            })
            .map_err(stopped)?;
        match running.await {
            Ok(Ok(())) => Ok(Writer { tx, ctx }),
            Ok(Err(e)) => Err(stopped(e)),
            Err(_) => Err(ctx.writer_stopped()),
        }
    }

    /// Stops the writer after the writes queued so far, and returns once
    /// its connection is back in the pool. Later writes fail with
    /// [`ErrorContext::writer_stopped`].
    pub(crate) async fn stop(&self) {
        let (ack, stopped) = oneshot::channel();
        if self.tx.send(Msg::Stop(ack)).await.is_ok() {
            let _ = stopped.await;
        }
    }

    /// Runs `write` on the writer's connection inside a write transaction
    /// shared with the other writes queued now, and returns its result once
    /// that transaction is committed.
    ///
    /// `write` runs on the writer's thread and must not block on anything
    /// but SQLite.
    pub(crate) async fn write<T, F>(&self, write: F) -> Result<T, MemoryError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MemoryError> + Send + 'static,
    {
        let (done, result) = oneshot::channel::<Result<T, MemoryError>>();
        let job: Job = Box::new(move |conn| {
            let outcome = match conn {
                Ok(conn) => write(conn),
                Err(e) => Err(e),
            };
            let ok = outcome.is_ok();
            let deliver: Deliver = Box::new(move |commit_error| {
                let _ = done.send(match (outcome, commit_error) {
                    (Ok(value), None) => Ok(value),
                    (Ok(_), Some(e)) | (Err(e), _) => Err(e),
                });
            });
            (ok, deliver)
        });
        if self.tx.send(Msg::Write(job)).await.is_err() {
            return Err(self.ctx.writer_stopped());
        }
        result.await.map_err(|_| self.ctx.writer_stopped())?
    }
}

/// Where a batch runs.
enum Source<'a> {
    Held(&'a Connection),
    Pool(&'a SqlitePool),
}

async fn run(
    pool: SqlitePool,
    ctx: Arc<ErrorContext>,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    hold: Hold,
) {
    if hold == Hold::Keep {
        match pool.acquire().await {
            Ok(mut conn) => {
                if let Some(stop) = keep(&mut conn, &ctx, &mut rx, max_batch).await {
                    // Closed rather than returned: its return would be a
                    // task on this thread's runtime, which ends now.
                    let _ = conn.close().await;
                    finish(rx, stop);
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "store writer: no connection to keep"),
        }
        // Could not keep one: take one per batch instead.
    }
    let stop = serve(Source::Pool(&pool), &ctx, &mut rx, max_batch).await;
    finish(rx, stop);
}

/// Serves every batch on `conn`, locked for direct use until the writer
/// stops. `None` if the connection could not be locked (nothing was served);
/// otherwise how serving ended (see [`serve`]).
async fn keep(
    conn: &mut SqliteConnection,
    ctx: &ErrorContext,
    rx: &mut mpsc::Receiver<Msg>,
    max_batch: usize,
) -> Option<Vec<oneshot::Sender<()>>> {
    let mut handle = match conn.lock_handle().await {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!(error = %e, "store writer: could not lock a connection");
            return None;
        }
    };
    // SAFETY: as in `run_batch`; `db` is dropped before `handle`.
    let db = match unsafe { Connection::from_handle(handle.as_raw_handle().as_ptr()) } {
        Ok(db) => db,
        Err(e) => {
            tracing::warn!(error = %e, "store writer: no direct handle");
            return None;
        }
    };
    db.set_prepared_statement_cache_capacity(STATEMENTS);
    let stop = serve(Source::Held(&db), ctx, rx, max_batch).await;
    drop(db);
    drop(handle);
    Some(stop)
}

/// Stops taking writes (those still queued fail: their callers get
/// `writer_stopped`) and acknowledges the stop requests.
fn finish(mut rx: mpsc::Receiver<Msg>, stop: Vec<oneshot::Sender<()>>) {
    rx.close();
    drop(rx);
    for ack in stop {
        let _ = ack.send(());
    }
}

/// Runs batches until the queue closes or stop requests arrive (returned).
async fn serve(
    source: Source<'_>,
    ctx: &ErrorContext,
    rx: &mut mpsc::Receiver<Msg>,
    max_batch: usize,
) -> Vec<oneshot::Sender<()>> {
    let mut msgs = Vec::with_capacity(max_batch);
    loop {
        if rx.recv_many(&mut msgs, max_batch).await == 0 {
            return Vec::new();
        }
        let mut jobs = Vec::with_capacity(msgs.len());
        let mut stop = Vec::new();
        for msg in msgs.drain(..) {
            match msg {
                Msg::Write(job) if stop.is_empty() => jobs.push(job),
                // Queued after the stop: refused like any later write.
                Msg::Write(job) => {
                    let (_, deliver) = job(Err(ctx.writer_stopped()));
                    deliver(None);
                }
                Msg::Stop(ack) => stop.push(ack),
            }
        }
        if !jobs.is_empty() {
            commit_batch(&source, ctx, jobs).await;
        }
        if !stop.is_empty() {
            return stop;
        }
    }
}

/// Runs `jobs` in one transaction and tells each caller its outcome.
async fn commit_batch(source: &Source<'_>, ctx: &ErrorContext, jobs: Vec<Job>) {
    let mut pending: Vec<(bool, Deliver)> = Vec::with_capacity(jobs.len());
    let result = match source {
        Source::Held(db) => run_on(db, ctx, jobs, &mut pending),
        Source::Pool(pool) => run_batch(pool, ctx, jobs, &mut pending).await,
    };
    match result {
        Ok(()) => {
            for (_, deliver) in pending {
                deliver(None);
            }
        }
        Err((error, unrun)) => {
            // Nothing of this batch was stored: every caller gets the error.
            let copy = ctx.replicate(&error);
            let mut error = Some(error);
            for (ok, deliver) in pending {
                // A write that failed on its own keeps its own error.
                if ok {
                    deliver(Some(match error.take() {
                        Some(e) => e,
                        None => ctx.replicate(&copy),
                    }));
                } else {
                    deliver(None);
                }
            }
            // Jobs not run get the error too, without running.
            for job in unrun {
                let e = match error.take() {
                    Some(e) => e,
                    None => ctx.replicate(&copy),
                };
                let (_, deliver) = job(Err(e));
                deliver(None);
            }
        }
    }
}

/// The batch itself. On failure returns the error and the jobs not yet run.
async fn run_batch(
    pool: &SqlitePool,
    ctx: &ErrorContext,
    jobs: Vec<Job>,
    pending: &mut Vec<(bool, Deliver)>,
) -> Result<(), (MemoryError, Vec<Job>)> {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return Err((ctx.sql(e), jobs)),
    };
    let mut handle = match conn.lock_handle().await {
        Ok(handle) => handle,
        Err(e) => return Err((ctx.sql(e), jobs)),
    };
    // SAFETY: `handle` guarantees that sqlx makes no call on this sqlite3
    // handle (nor on its statements) until it is dropped, and it outlives
    // `db`, which does not close the handle (`from_handle` is the borrowing
    // constructor) and finalizes the statements it prepared when dropped.
    // Both libraries link the same `libsqlite3-sys` (one SQLite library).
    let db = match unsafe { Connection::from_handle(handle.as_raw_handle().as_ptr()) } {
        Ok(db) => db,
        Err(e) => return Err((ctx.sqlite(e), jobs)),
    };
    let result = run_on(&db, ctx, jobs, pending);
    let clean = db.is_autocommit();
    drop(db);
    drop(handle);
    if !clean {
        // Still in a transaction (its ROLLBACK failed): never lend it again.
        conn.close_on_drop();
    }
    result
}

/// [`run_jobs`], then makes sure no transaction is left open, whatever
/// happened: the connection serves reads (sqlx) between batches.
fn run_on(
    db: &Connection,
    ctx: &ErrorContext,
    jobs: Vec<Job>,
    pending: &mut Vec<(bool, Deliver)>,
) -> Result<(), (MemoryError, Vec<Job>)> {
    let result = run_jobs(db, ctx, jobs, pending);
    if !db.is_autocommit() {
        let _ = db.execute_batch("ROLLBACK");
    }
    result
}

/// Runs one write. A write that panics counts as failed (rolled back like
/// any failed write) instead of taking the writer thread, and every later
/// write, down with it; its caller, whose answer channel went with the
/// panic, gets [`ErrorContext::writer_stopped`].
fn run_job(job: Job, db: &Connection) -> (bool, Deliver) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(db)))) {
        Ok(done) => done,
        Err(_) => {
            tracing::error!("a store write panicked; it was rolled back");
            (false, Box::new(|_| {}))
        }
    }
}

/// Runs one of the writer's fixed statements (cached).
fn exec(db: &Connection, sql: &str) -> rusqlite::Result<()> {
    db.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// `BEGIN IMMEDIATE`, the writes, `COMMIT`: all on the writer's thread.
fn run_jobs(
    db: &Connection,
    ctx: &ErrorContext,
    jobs: Vec<Job>,
    pending: &mut Vec<(bool, Deliver)>,
) -> Result<(), (MemoryError, Vec<Job>)> {
    if !db.is_autocommit() {
        // A transaction left over (a ROLLBACK that failed before): end it.
        let _ = exec(db, "ROLLBACK");
    }
    if let Err(e) = exec(db, "BEGIN IMMEDIATE") {
        return Err((ctx.sqlite(e), jobs));
    }
    let single = jobs.len() == 1;
    let mut jobs = jobs.into_iter();
    while let Some(job) = jobs.next() {
        if single {
            // No savepoint needed: a failure rolls the whole transaction back.
            let (ok, deliver) = run_job(job, db);
            pending.push((ok, deliver));
            if !ok {
                let _ = exec(db, "ROLLBACK");
                return Ok(());
            }
            continue;
        }
        // A savepoint per write, so that a failing write is rolled back alone.
        // A write that succeeded needs no `RELEASE`: its savepoint stays on
        // the stack, the next write's nests inside it, and `COMMIT` commits
        // them all. `ROLLBACK TO` goes back to the newest savepoint of that
        // name, which is this write's.
        if let Err(e) = exec(db, SAVEPOINT) {
            return Err((ctx.sqlite(e), std::iter::once(job).chain(jobs).collect()));
        }
        let (ok, deliver) = run_job(job, db);
        pending.push((ok, deliver));
        if db.is_autocommit() {
            // SQLite itself rolled the whole transaction back on this
            // write's error (a full disk, an I/O error): the writes before
            // it are gone too.
            return Err((ctx.rolled_back(), jobs.collect()));
        }
        if !ok && let Err(e) = exec(db, ROLLBACK_TO_SAVEPOINT) {
            return Err((ctx.sqlite(e), jobs.collect()));
        }
    }
    if db.is_autocommit() {
        return Err((ctx.rolled_back(), Vec::new()));
    }
    exec(db, "COMMIT").map_err(|e| (ctx.sqlite(e), Vec::new()))
}
