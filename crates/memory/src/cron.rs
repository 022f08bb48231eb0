//! Cron jobs and their runs. Parsing expressions and scheduling are the
//! gateway's; this is storage only.
//!
//! An occurrence is claimed with [`Store::claim_cron_run`], an `INSERT` under
//! the UNIQUE `(job_id, scheduled_at)` key, before the job starts: a second
//! claim of the same occurrence (another scheduler, or the same one after a
//! restart) is refused, so every occurrence runs at most once.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;

use crate::error::{MemoryError, corrupt};
use crate::store::{Store, col, from_millis, now_millis, sql_limit, to_u64};

/// What the scheduler does with occurrences missed while it was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissedPolicy {
    /// Missed occurrences are dropped; the next one runs on time (the default).
    #[default]
    Skip,
    /// If any occurrence was missed, the latest of them runs once at start.
    RunOnce,
}

impl MissedPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            MissedPolicy::Skip => "skip",
            MissedPolicy::RunOnce => "run_once",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "skip" => Some(MissedPolicy::Skip),
            "run_once" => Some(MissedPolicy::RunOnce),
            _ => None,
        }
    }
}

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunTrigger {
    /// An occurrence of the expression, on time.
    Schedule,
    /// The one catch-up run of [`MissedPolicy::RunOnce`].
    CatchUp,
    /// `openpista cron run ID`.
    Manual,
}

impl RunTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            RunTrigger::Schedule => "schedule",
            RunTrigger::CatchUp => "catch_up",
            RunTrigger::Manual => "manual",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "schedule" => Some(RunTrigger::Schedule),
            "catch_up" => Some(RunTrigger::CatchUp),
            "manual" => Some(RunTrigger::Manual),
            _ => None,
        }
    }
}

/// How a run ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Running,
    Ok,
    Error,
    /// Stopped by a shutdown; does not count as a failure.
    Cancelled,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Running => "running",
            RunOutcome::Ok => "ok",
            RunOutcome::Error => "error",
            RunOutcome::Cancelled => "cancelled",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "running" => Some(RunOutcome::Running),
            "ok" => Some(RunOutcome::Ok),
            "error" => Some(RunOutcome::Error),
            "cancelled" => Some(RunOutcome::Cancelled),
            _ => None,
        }
    }
}

/// A job to add; validated by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCronJob {
    pub expr: String,
    pub tz: String,
    pub target: String,
    pub prompt: String,
    pub max_failures: u32,
    pub missed_policy: MissedPolicy,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronJob {
    pub id: i64,
    pub expr: String,
    pub tz: String,
    pub target: String,
    pub prompt: String,
    pub paused: bool,
    pub consecutive_failures: u32,
    pub max_failures: u32,
    pub missed_policy: MissedPolicy,
    pub created_at: DateTime<Utc>,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronRun {
    pub id: i64,
    pub job_id: i64,
    pub scheduled_at: DateTime<Utc>,
    pub trigger: RunTrigger,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: RunOutcome,
    pub error: Option<String>,
}

/// What [`Store::finish_cron_run`] did to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedRun {
    /// Failures in a row after this run (0 after a success).
    pub consecutive_failures: u32,
    /// This run paused the job (it reached `max_failures`).
    pub paused_now: bool,
}

const JOB_COLUMNS: &str = "id, expr, tz, target, prompt, paused, consecutive_failures, \
                           max_failures, missed_policy, created_at";

impl Store {
    /// Stores a new job and returns it.
    pub async fn add_cron_job(&self, job: &NewCronJob) -> Result<CronJob, MemoryError> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO cron_jobs (expr, tz, target, prompt, max_failures, missed_policy, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&job.expr)
        .bind(&job.tz)
        .bind(&job.target)
        .bind(&job.prompt)
        .bind(i64::from(job.max_failures.max(1)))
        .bind(job.missed_policy.as_str())
        .bind(now_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        self.get_cron_job(id)
            .await?
            .ok_or_else(|| corrupt("cron_jobs", id, "vanished after insert"))
    }

    /// The job `id`, if it exists.
    pub async fn get_cron_job(&self, id: i64) -> Result<Option<CronJob>, MemoryError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM cron_jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        row.as_ref().map(decode_job).transpose()
    }

    /// Every job, oldest first.
    pub async fn list_cron_jobs(&self) -> Result<Vec<CronJob>, MemoryError> {
        let rows = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM cron_jobs ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        rows.iter().map(decode_job).collect()
    }

    /// Deletes a job and its runs; returns whether it existed.
    pub async fn delete_cron_job(&self, id: i64) -> Result<bool, MemoryError> {
        let done = sqlx::query("DELETE FROM cron_jobs WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Pauses or resumes a job (resuming also clears its failure count);
    /// returns whether it exists.
    pub async fn set_cron_paused(&self, id: i64, paused: bool) -> Result<bool, MemoryError> {
        let sql = if paused {
            "UPDATE cron_jobs SET paused = 1 WHERE id = ?"
        } else {
            "UPDATE cron_jobs SET paused = 0, consecutive_failures = 0 WHERE id = ?"
        };
        let done = sqlx::query(sql)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Claims the occurrence `(job_id, scheduled_at)` by recording its run as
    /// `running`. Returns the run id, or `None` if the occurrence was already
    /// claimed (it must not run again) or the job is gone.
    pub async fn claim_cron_run(
        &self,
        job_id: i64,
        scheduled_at: DateTime<Utc>,
        trigger: RunTrigger,
    ) -> Result<Option<i64>, MemoryError> {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO cron_runs (job_id, scheduled_at, trigger, started_at, outcome)
             SELECT id, ?, ?, ?, 'running' FROM cron_jobs WHERE id = ?
             ON CONFLICT (job_id, scheduled_at) DO NOTHING
             RETURNING id",
        )
        .bind(scheduled_at.timestamp_millis())
        .bind(trigger.as_str())
        .bind(now_millis())
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        Ok(id)
    }

    /// Records how run `run_id` ended and updates its job's failure count in
    /// one transaction: a success clears it, an error adds one and pauses the
    /// job when it reaches `max_failures`; a cancelled run changes nothing.
    pub async fn finish_cron_run(
        &self,
        run_id: i64,
        outcome: RunOutcome,
        error: Option<&str>,
    ) -> Result<FinishedRun, MemoryError> {
        let mut tx = self.begin_write().await?;
        let job_id: Option<i64> = sqlx::query_scalar(
            "UPDATE cron_runs SET outcome = ?, error = ?, finished_at = ? WHERE id = ? RETURNING job_id",
        )
        .bind(outcome.as_str())
        .bind(error)
        .bind(now_millis())
        .bind(run_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.sql(e))?;
        let Some(job_id) = job_id else {
            self.commit(tx).await?;
            return Ok(FinishedRun {
                consecutive_failures: 0,
                paused_now: false,
            });
        };
        let update = match outcome {
            RunOutcome::Ok => Some("UPDATE cron_jobs SET consecutive_failures = 0 WHERE id = ?"),
            RunOutcome::Error => Some(
                "UPDATE cron_jobs SET consecutive_failures = consecutive_failures + 1 WHERE id = ?",
            ),
            RunOutcome::Running | RunOutcome::Cancelled => None,
        };
        if let Some(sql) = update {
            sqlx::query(sql)
                .bind(job_id)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.sql(e))?;
        }
        let paused_now = sqlx::query(
            "UPDATE cron_jobs SET paused = 1
             WHERE id = ? AND paused = 0 AND consecutive_failures >= max_failures",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.sql(e))?
        .rows_affected()
            > 0;
        let failures: Option<i64> =
            sqlx::query_scalar("SELECT consecutive_failures FROM cron_jobs WHERE id = ?")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.sql(e))?;
        self.commit(tx).await?;
        let failures = to_u64(failures.unwrap_or(0), "cron_jobs", &job_id, "failures")?;
        Ok(FinishedRun {
            consecutive_failures: u32::try_from(failures).unwrap_or(u32::MAX),
            paused_now,
        })
    }

    /// The newest `limit` runs of a job, newest first.
    pub async fn cron_runs(&self, job_id: i64, limit: usize) -> Result<Vec<CronRun>, MemoryError> {
        let rows = sqlx::query(
            "SELECT id, job_id, scheduled_at, trigger, started_at, finished_at, outcome, error
             FROM cron_runs WHERE job_id = ? ORDER BY scheduled_at DESC, id DESC LIMIT ?",
        )
        .bind(job_id)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        rows.iter().map(decode_run).collect()
    }

    /// The latest occurrence of the job that was claimed by a schedule or a
    /// catch-up (manual runs do not count), for deciding what was missed.
    pub async fn last_scheduled_cron_run(
        &self,
        job_id: i64,
    ) -> Result<Option<DateTime<Utc>>, MemoryError> {
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(scheduled_at) FROM cron_runs
             WHERE job_id = ? AND trigger IN ('schedule', 'catch_up')",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        at.map(|ms| from_millis(ms, "cron_runs", &job_id))
            .transpose()
    }
}

fn decode_job(row: &SqliteRow) -> Result<CronJob, MemoryError> {
    const T: &str = "cron_jobs";
    let id: i64 = col(row, "id", T, &"?")?;
    let policy: String = col(row, "missed_policy", T, &id)?;
    let failures: i64 = col(row, "consecutive_failures", T, &id)?;
    let max: i64 = col(row, "max_failures", T, &id)?;
    let paused: i64 = col(row, "paused", T, &id)?;
    let created_at: i64 = col(row, "created_at", T, &id)?;
    let small = |v: i64, field: &str| -> Result<u32, MemoryError> {
        u32::try_from(v).map_err(|_| corrupt(T, id, format!("{field} is out of range ({v})")))
    };
    Ok(CronJob {
        expr: col(row, "expr", T, &id)?,
        tz: col(row, "tz", T, &id)?,
        target: col(row, "target", T, &id)?,
        prompt: col(row, "prompt", T, &id)?,
        paused: paused != 0,
        consecutive_failures: small(failures, "consecutive_failures")?,
        max_failures: small(max, "max_failures")?,
        missed_policy: MissedPolicy::parse(&policy)
            .ok_or_else(|| corrupt(T, id, format!("unknown missed_policy {policy:?}")))?,
        created_at: from_millis(created_at, T, &id)?,
        id,
    })
}

fn decode_run(row: &SqliteRow) -> Result<CronRun, MemoryError> {
    const T: &str = "cron_runs";
    let id: i64 = col(row, "id", T, &"?")?;
    let trigger: String = col(row, "trigger", T, &id)?;
    let outcome: String = col(row, "outcome", T, &id)?;
    let scheduled_at: i64 = col(row, "scheduled_at", T, &id)?;
    let started_at: i64 = col(row, "started_at", T, &id)?;
    let finished_at: Option<i64> = col(row, "finished_at", T, &id)?;
    Ok(CronRun {
        job_id: col(row, "job_id", T, &id)?,
        scheduled_at: from_millis(scheduled_at, T, &id)?,
        trigger: RunTrigger::parse(&trigger)
            .ok_or_else(|| corrupt(T, id, format!("unknown trigger {trigger:?}")))?,
        started_at: from_millis(started_at, T, &id)?,
        finished_at: finished_at.map(|ms| from_millis(ms, T, &id)).transpose()?,
        outcome: RunOutcome::parse(&outcome)
            .ok_or_else(|| corrupt(T, id, format!("unknown outcome {outcome:?}")))?,
        error: col(row, "error", T, &id)?,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> NewCronJob {
        NewCronJob {
            expr: "0 * * * *".into(),
            tz: "UTC".into(),
            target: "session:s1".into(),
            prompt: "hi".into(),
            max_failures: 2,
            missed_policy: MissedPolicy::Skip,
        }
    }

    #[tokio::test]
    async fn an_occurrence_is_claimed_once_and_failures_pause() {
        let store = Store::open_in_memory().await.unwrap();
        let j = store.add_cron_job(&job()).await.unwrap();
        let t = DateTime::from_timestamp_millis(1_000_000).unwrap();
        let run = store
            .claim_cron_run(j.id, t, RunTrigger::Schedule)
            .await
            .unwrap();
        assert!(run.is_some());
        assert_eq!(
            store
                .claim_cron_run(j.id, t, RunTrigger::Schedule)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .claim_cron_run(999, t, RunTrigger::Manual)
                .await
                .unwrap(),
            None
        );
        let f = store
            .finish_cron_run(run.unwrap(), RunOutcome::Error, Some("boom"))
            .await
            .unwrap();
        assert_eq!(
            f,
            FinishedRun {
                consecutive_failures: 1,
                paused_now: false
            }
        );
        let t2 = DateTime::from_timestamp_millis(2_000_000).unwrap();
        let run2 = store
            .claim_cron_run(j.id, t2, RunTrigger::Schedule)
            .await
            .unwrap()
            .unwrap();
        let f = store
            .finish_cron_run(run2, RunOutcome::Error, Some("boom"))
            .await
            .unwrap();
        assert!(f.paused_now);
        assert!(store.get_cron_job(j.id).await.unwrap().unwrap().paused);
        assert_eq!(store.last_scheduled_cron_run(j.id).await.unwrap(), Some(t2));
        assert!(store.set_cron_paused(j.id, false).await.unwrap());
        let j2 = store.get_cron_job(j.id).await.unwrap().unwrap();
        assert!(!j2.paused && j2.consecutive_failures == 0);
        assert_eq!(store.cron_runs(j.id, 10).await.unwrap().len(), 2);
        assert!(store.delete_cron_job(j.id).await.unwrap());
        assert!(store.cron_runs(j.id, 10).await.unwrap().is_empty());
    }
}
