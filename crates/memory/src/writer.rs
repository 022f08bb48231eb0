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
//! The writer task never runs caller code other than the write itself, and a
//! caller that stops waiting (its future dropped) does not stop its write.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Acquire, Connection};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ErrorContext, MemoryError};

/// Most writes in one transaction by default; the rest wait for the next one.
pub(crate) const DEFAULT_MAX_BATCH: usize = 256;

/// Writes waiting for the writer task; senders wait when it is full.
const QUEUE: usize = 1024;

/// A boxed future borrowing the writer's connection.
pub(crate) type WriteFuture<'c, T> =
    Pin<Box<dyn Future<Output = Result<T, MemoryError>> + Send + 'c>>;

/// What a write hands back to the writer: whether it succeeded (so its
/// savepoint is released or rolled back), and how to tell its caller once the
/// batch's fate is known.
type Deliver = Box<dyn FnOnce(Option<MemoryError>) + Send>;

/// A queued write. Given `Err`, it does not run and hands that error to its
/// caller (its batch could not start).
type Job = Box<
    dyn for<'c> FnOnce(
            Result<&'c mut SqliteConnection, MemoryError>,
        ) -> Pin<Box<dyn Future<Output = (bool, Deliver)> + Send + 'c>>
        + Send,
>;

/// The sending side; cheap to clone with the store.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
    ctx: Arc<ErrorContext>,
}

impl Writer {
    /// Starts the writer task for `pool`. It stops when the last `Writer`
    /// clone is dropped.
    pub(crate) fn spawn(pool: SqlitePool, ctx: Arc<ErrorContext>, max_batch: usize) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, ctx.clone(), rx, max_batch));
        Writer { tx, ctx }
    }

    /// Runs `write` on the writer's connection inside a write transaction
    /// shared with the other writes queued now, and returns its result once
    /// that transaction is committed.
    ///
    /// `write` must use only the connection it is given (the pool may have no
    /// other connection free).
    pub(crate) async fn write<T, F>(&self, write: F) -> Result<T, MemoryError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, T> + Send + 'static,
    {
        let (done, result) = oneshot::channel::<Result<T, MemoryError>>();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                let outcome = match conn {
                    Ok(conn) => write(conn).await,
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
            })
        });
        if self.tx.send(job).await.is_err() {
            return Err(self.ctx.writer_stopped());
        }
        result.await.map_err(|_| self.ctx.writer_stopped())?
    }
}

async fn run(
    pool: SqlitePool,
    ctx: Arc<ErrorContext>,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
) {
    let mut jobs = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut jobs, max_batch).await > 0 {
        commit_batch(&pool, &ctx, std::mem::take(&mut jobs)).await;
    }
}

/// Runs `jobs` in one transaction and tells each caller its outcome.
async fn commit_batch(pool: &SqlitePool, ctx: &ErrorContext, jobs: Vec<Job>) {
    let mut pending: Vec<(bool, Deliver)> = Vec::with_capacity(jobs.len());
    let result = run_batch(pool, ctx, jobs, &mut pending).await;
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
                let (_, deliver) = job(Err(e)).await;
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
    let mut tx = match conn.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => return Err((ctx.sql(e), jobs)),
    };
    let single = jobs.len() == 1;
    let mut jobs = jobs.into_iter();
    while let Some(job) = jobs.next() {
        if single {
            // No savepoint needed: a failure rolls the whole transaction back.
            let (ok, deliver) = job(Ok(&mut tx)).await;
            pending.push((ok, deliver));
            if !ok {
                let _ = tx.rollback().await;
                return Ok(());
            }
            continue;
        }
        let mut savepoint = match tx.begin().await {
            Ok(sp) => sp,
            Err(e) => return Err((ctx.sql(e), jobs.collect())),
        };
        let (ok, deliver) = job(Ok(&mut savepoint)).await;
        pending.push((ok, deliver));
        let closed = if ok {
            savepoint.commit().await
        } else {
            savepoint.rollback().await
        };
        if let Err(e) = closed {
            return Err((ctx.sql(e), jobs.collect()));
        }
    }
    tx.commit().await.map_err(|e| (ctx.sql(e), Vec::new()))
}
