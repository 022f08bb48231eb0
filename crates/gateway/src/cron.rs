//! Cron: scheduled prompts whose answers land in a session.
//!
//! Expressions are parsed with `croner` (5 fields, or 6 with leading
//! seconds) and evaluated in an IANA time zone from `chrono-tz`: the crates
//! tokio-cron-scheduler builds on. We do not use tokio-cron-scheduler itself:
//! its job store is in memory (or its own tables), and our guarantee needs
//! the claim to be *our* SQLite row. The [`CronScheduler`] is one loop: it
//! reloads the jobs from the store, sleeps until the next due occurrence of
//! any job (at most [`RELOAD_INTERVAL`], so jobs added or paused by the CLI
//! are seen) or until its cancellation token fires, and claims each due
//! occurrence with an `INSERT` under UNIQUE `(job_id, scheduled_at)` before
//! starting it. A refused claim means another scheduler (or this one before a
//! restart) already ran it: every occurrence runs at most once.
//!
//! Missed occurrences (the daemon was down, or a run was still going) follow
//! the job's [`MissedPolicy`]: `skip` (the default) drops them; `run_once`
//! runs the latest missed one, once, when the scheduler starts.
//!
//! A run sends the prompt through [`Gateway::send`] into the target session
//! (created on channel `cron` if missing). Targets are `session:<id>` and
//! `telegram:<chat>`; a `telegram:` job runs in the chat's session
//! `telegram-<chat>` and its answer is sent to the chat through the
//! [`Outbox`] (the Telegram adapter's reply handle). Without one (Telegram
//! not enabled) the answer stays in the session and a log line says so. A
//! job whose runs fail `max_failures` times in a row is paused; an audit
//! row, a log line and a message in the target session (and chat) say so.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use openpista_channels::{Outbound, TelegramReplier};
use openpista_memory::{
    AuditEntry, CronJob, MemoryError, MissedPolicy, RunOutcome, RunTrigger, Store,
};
use openpista_proto::{AgentEvent, ChatMessage, SessionId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Gateway, SendRequest};

/// The longest the scheduler sleeps before looking at the jobs again.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// The channel of sessions created by cron runs.
pub const CRON_CHANNEL: &str = "cron";

/// Why a cron operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// The expression does not parse. Fix it; retrying will not help.
    #[error("invalid cron expression {expr:?}: {reason}")]
    InvalidExpression { expr: String, reason: String },
    /// The time zone is not an IANA name (e.g. `Europe/Rome`). Fix it.
    #[error("invalid time zone {0:?}: expected an IANA name such as Europe/Rome or UTC")]
    InvalidTimeZone(String),
    /// The target is not `session:<id>` or `telegram:<chat>`. Fix it.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget { target: String, reason: String },
    /// No job with this id.
    #[error("no cron job {0}")]
    NotFound(i64),
    /// The store failed. Retrying may help if the database was busy.
    #[error("storage: {0}")]
    Storage(#[from] MemoryError),
}

/// A parsed expression in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses `expr` (5 fields, or 6 with seconds first) in time zone `tz`.
    pub fn parse(expr: &str, tz: &str) -> Result<Self, CronError> {
        let tz = Tz::from_str(tz).map_err(|_| CronError::InvalidTimeZone(tz.to_owned()))?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| CronError::InvalidExpression {
                expr: expr.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self { cron, tz })
    }

    /// The first occurrence strictly after `after`, if any. Occurrences
    /// fall on whole seconds.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.trunc_subsecs(0).with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc).trunc_subsecs(0))
    }

    /// The latest occurrence in `(after, until]`, if any.
    pub fn latest_in(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = until.trunc_subsecs(0).with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|t| t.with_timezone(&Utc).trunc_subsecs(0))
            .filter(|t| *t > after)
    }
}

/// Where a job's answers go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A turn in this session.
    Session(SessionId),
    /// A Telegram chat: a turn in session `telegram-<chat>`, whose answer
    /// is sent to the chat.
    Telegram(String),
}

impl Target {
    /// Parses `session:<id>` or `telegram:<chat>`.
    pub fn parse(raw: &str) -> Result<Self, CronError> {
        let bad = |reason: &str| CronError::InvalidTarget {
            target: raw.to_owned(),
            reason: reason.to_owned(),
        };
        match raw.split_once(':') {
            Some(("session", id)) => SessionId::parse(id)
                .map(Target::Session)
                .map_err(|e| bad(&e.to_string())),
            Some(("telegram", chat)) => {
                let ok = !chat.is_empty()
                    && chat.len() <= 64
                    && chat
                        .bytes()
                        .enumerate()
                        .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'));
                if ok {
                    Ok(Target::Telegram(chat.to_owned()))
                } else {
                    Err(bad("a Telegram chat is a number"))
                }
            }
            _ => Err(bad("expected session:<id> or telegram:<chat>")),
        }
    }

    /// The session that receives the turn.
    pub fn session_id(&self) -> Result<SessionId, CronError> {
        match self {
            Target::Session(id) => Ok(id.clone()),
            Target::Telegram(chat) => SessionId::parse(&format!("telegram-{chat}")).map_err(|e| {
                CronError::InvalidTarget {
                    target: format!("telegram:{chat}"),
                    reason: e.to_string(),
                }
            }),
        }
    }
}

/// Checks a job before it is stored: expression, time zone and target.
pub fn validate(expr: &str, tz: &str, target: &str) -> Result<(), CronError> {
    Schedule::parse(expr, tz)?;
    Target::parse(target)?.session_id()?;
    Ok(())
}

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub run_id: i64,
    pub session_id: SessionId,
    pub outcome: RunOutcome,
    /// The answer (`ok`) or the error.
    pub text: String,
    /// This run paused the job.
    pub paused_now: bool,
}

/// Where answers for channel targets go: the adapters' reply handles.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    /// The Telegram adapter's replier, when Telegram is enabled.
    pub telegram: Option<TelegramReplier>,
}

impl Outbox {
    /// Sends `text` to `target` if it is a channel; logs what happened.
    async fn deliver(&self, job: i64, target: &Target, text: &str) {
        let Target::Telegram(chat) = target else {
            return;
        };
        let Some(replier) = &self.telegram else {
            tracing::warn!(
                job,
                chat,
                "Telegram is not enabled ([channels.telegram]); the answer is stored in the session only"
            );
            return;
        };
        let out = Outbound {
            conversation: chat.clone(),
            text: text.to_owned(),
        };
        match replier.send(&out).await {
            Ok(()) => tracing::info!(job, chat, "cron answer delivered to Telegram"),
            Err(e) => {
                tracing::warn!(job, chat, error = %e, "cron answer not delivered to Telegram")
            }
        }
    }
}

/// Claims `(job, scheduled_at)` and, if the claim succeeds, runs the job
/// through `gateway` and records the outcome. `Ok(None)`: the occurrence
/// was already claimed, so nothing ran. Channel targets are not delivered
/// to (see [`run_occurrence_to`]).
pub async fn run_occurrence(
    gateway: &Gateway,
    job: &CronJob,
    scheduled_at: DateTime<Utc>,
    trigger: RunTrigger,
) -> Result<Option<RunReport>, CronError> {
    run_occurrence_to(gateway, job, scheduled_at, trigger, &Outbox::default()).await
}

/// [`run_occurrence`], delivering the answer (or the pause notice) of a
/// channel target through `outbox`.
pub async fn run_occurrence_to(
    gateway: &Gateway,
    job: &CronJob,
    scheduled_at: DateTime<Utc>,
    trigger: RunTrigger,
    outbox: &Outbox,
) -> Result<Option<RunReport>, CronError> {
    let store = gateway.agent().store();
    let target = Target::parse(&job.target)?;
    let session_id = target.session_id()?;
    let Some(run_id) = store.claim_cron_run(job.id, scheduled_at, trigger).await? else {
        tracing::debug!(job = job.id, %scheduled_at, "occurrence already claimed");
        return Ok(None);
    };
    let req = SendRequest {
        session_id: Some(session_id.clone()),
        text: job.prompt.clone(),
        idempotency_key: Some(format!(
            "cron:{}:{}",
            job.id,
            scheduled_at.timestamp_millis()
        )),
        channel: CRON_CHANNEL.to_owned(),
        create_missing: true,
    };
    let (outcome, text) = match gateway.send(req).await {
        Err(crate::GatewayError::ShuttingDown) => (RunOutcome::Cancelled, "shutting down".into()),
        Err(e) => (RunOutcome::Error, e.to_string()),
        Ok(events) => {
            let events = events.collect().await;
            match events.last() {
                Some(AgentEvent::Final { text, .. }) => (RunOutcome::Ok, text.clone()),
                Some(AgentEvent::Error { message, .. }) if !gateway.is_accepting() => {
                    (RunOutcome::Cancelled, message.clone())
                }
                Some(AgentEvent::Error { message, .. }) => (RunOutcome::Error, message.clone()),
                _ => (RunOutcome::Error, "the turn ended without an answer".into()),
            }
        }
    };
    let error = (outcome != RunOutcome::Ok).then_some(text.as_str());
    let finished = store.finish_cron_run(run_id, outcome, error).await?;
    tracing::info!(
        job = job.id,
        run = run_id,
        outcome = outcome.as_str(),
        "cron run finished"
    );
    if outcome == RunOutcome::Ok {
        outbox.deliver(job.id, &target, &text).await;
    }
    if finished.paused_now {
        let note = announce_pause(
            store,
            job,
            &session_id,
            finished.consecutive_failures,
            &text,
        )
        .await?;
        outbox.deliver(job.id, &target, &note).await;
    }
    Ok(Some(RunReport {
        run_id,
        session_id,
        outcome,
        text,
        paused_now: finished.paused_now,
    }))
}

async fn announce_pause(
    store: &Store,
    job: &CronJob,
    session_id: &SessionId,
    failures: u32,
    last_error: &str,
) -> Result<String, CronError> {
    tracing::warn!(
        job = job.id,
        failures,
        error = last_error,
        "cron job paused after failing in a row"
    );
    store
        .append_audit(&AuditEntry {
            session_id: Some(session_id.clone()),
            actor: "cron".into(),
            action: "cron_paused".into(),
            detail: serde_json::json!({"job_id": job.id, "consecutive_failures": failures}),
        })
        .await?;
    store.ensure_session(session_id, CRON_CHANNEL).await?;
    let note = format!(
        "[cron] job {} was paused after {failures} failed runs in a row (last error: {last_error}). \
         Resume it with `openpista cron resume {}`.",
        job.id, job.id
    );
    store
        .append_message(
            session_id,
            &ChatMessage::assistant(note.clone(), Vec::new()),
            None,
        )
        .await?;
    Ok(note)
}

/// The scheduler loop; see the module docs.
#[derive(Debug)]
pub struct CronScheduler {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl CronScheduler {
    /// Starts the loop over `gateway`'s store. It stops when `cancel` fires
    /// or [`CronScheduler::stop`] is called.
    pub fn start(gateway: Gateway, cancel: CancellationToken) -> Self {
        Self::start_with(gateway, cancel, Outbox::default())
    }

    /// [`CronScheduler::start`], delivering channel targets through `outbox`.
    pub fn start_with(gateway: Gateway, cancel: CancellationToken, outbox: Outbox) -> Self {
        let tracker = TaskTracker::new();
        let span = tracing::info_span!("cron");
        tracker.spawn(tracing::Instrument::instrument(
            run_loop(gateway, cancel.clone(), tracker.clone(), Arc::new(outbox)),
            span,
        ));
        Self { cancel, tracker }
    }

    /// Stops the loop and waits (at most `deadline`) for running jobs.
    /// Returns whether they all finished.
    pub async fn stop(&self, deadline: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

async fn run_loop(
    gateway: Gateway,
    cancel: CancellationToken,
    tracker: TaskTracker,
    outbox: Arc<Outbox>,
) {
    let started = Utc::now();
    // Per job: occurrences at or before this are handled.
    let mut cursors: HashMap<i64, DateTime<Utc>> = HashMap::new();
    let running: Arc<Mutex<HashSet<i64>>> = Arc::default();
    while !cancel.is_cancelled() {
        let now = Utc::now();
        let mut wake = now + RELOAD_INTERVAL;
        match gateway.agent().store().list_cron_jobs().await {
            Err(e) => tracing::warn!(error = %e, "cannot load cron jobs"),
            Ok(jobs) => {
                cursors.retain(|id, _| jobs.iter().any(|j| j.id == *id));
                for job in jobs {
                    let schedule = match Schedule::parse(&job.expr, &job.tz) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(job = job.id, error = %e, "skipping an invalid job");
                            continue;
                        }
                    };
                    let cursor = match cursors.get(&job.id) {
                        Some(c) => *c,
                        None => {
                            let first = first_cursor(
                                &gateway, &job, &schedule, started, now, &tracker, &running,
                                &outbox,
                            )
                            .await;
                            cursors.insert(job.id, first);
                            first
                        }
                    };
                    if job.paused {
                        cursors.insert(job.id, now);
                        continue;
                    }
                    if let Some(due) = schedule.latest_in(cursor, now) {
                        cursors.insert(job.id, due);
                        spawn_run(
                            &gateway,
                            &tracker,
                            &running,
                            &outbox,
                            job.clone(),
                            due,
                            RunTrigger::Schedule,
                        );
                    }
                    let base = cursors.get(&job.id).copied().unwrap_or(now).max(now);
                    if let Some(next) = schedule.next_after(base) {
                        wake = wake.min(next);
                    }
                }
            }
        }
        let sleep = (wake - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Where a job's cursor starts when the scheduler first sees it, after the
/// catch-up run of [`MissedPolicy::RunOnce`] if one is due.
#[allow(clippy::too_many_arguments)] // the loop's state, passed down once
async fn first_cursor(
    gateway: &Gateway,
    job: &CronJob,
    schedule: &Schedule,
    started: DateTime<Utc>,
    now: DateTime<Utc>,
    tracker: &TaskTracker,
    running: &Arc<Mutex<HashSet<i64>>>,
    outbox: &Arc<Outbox>,
) -> DateTime<Utc> {
    // A job added while we run starts from its creation; one that existed
    // before we started starts from our start (earlier ones were missed).
    let from = job.created_at.max(started).min(now);
    if job.paused || job.missed_policy == MissedPolicy::Skip || job.created_at >= started {
        return from;
    }
    let last = match gateway
        .agent()
        .store()
        .last_scheduled_cron_run(job.id)
        .await
    {
        Ok(last) => last.unwrap_or(job.created_at),
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "cannot read the last run; not catching up");
            return from;
        }
    };
    if let Some(missed) = schedule.latest_in(last, started) {
        tracing::info!(job = job.id, %missed, "running one missed occurrence (run_once)");
        spawn_run(
            gateway,
            tracker,
            running,
            outbox,
            job.clone(),
            missed,
            RunTrigger::CatchUp,
        );
    }
    from
}

fn spawn_run(
    gateway: &Gateway,
    tracker: &TaskTracker,
    running: &Arc<Mutex<HashSet<i64>>>,
    outbox: &Arc<Outbox>,
    job: CronJob,
    at: DateTime<Utc>,
    trigger: RunTrigger,
) {
    {
        let mut set = running.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(job.id) {
            tracing::info!(job = job.id, %at, "previous run still going; occurrence skipped");
            return;
        }
    }
    let gateway = gateway.clone();
    let running = running.clone();
    let outbox = outbox.clone();
    tracker.spawn(async move {
        if let Err(e) = run_occurrence_to(&gateway, &job, at, trigger, &outbox).await {
            tracing::warn!(job = job.id, error = %e, "cron run failed to record");
        }
        running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.id);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_zones_and_targets_are_checked() {
        assert!(Schedule::parse("*/1 * * * * *", "Europe/Rome").is_ok());
        assert!(Schedule::parse("0 9 * * 1-5", "UTC").is_ok());
        let e = Schedule::parse("61 * * * *", "UTC").unwrap_err();
        assert!(matches!(e, CronError::InvalidExpression { .. }), "{e}");
        let e = Schedule::parse("0 9 * * *", "Mars/Olympus").unwrap_err();
        assert!(e.to_string().contains("Mars/Olympus"), "{e}");
        assert_eq!(
            Target::parse("telegram:42")
                .unwrap()
                .session_id()
                .unwrap()
                .as_str(),
            "telegram-42"
        );
        assert!(Target::parse("session:daily").is_ok());
        assert!(Target::parse("telegram:abc").is_err());
        assert!(Target::parse("email:x").is_err());
    }

    #[test]
    fn occurrences_follow_the_time_zone() {
        let s = Schedule::parse("0 9 * * *", "Europe/Rome").unwrap();
        let after = DateTime::parse_from_rfc3339("2026-01-10T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let next = s.next_after(after).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-01-11T08:00:00+00:00");
        assert_eq!(s.latest_in(after, next), Some(next));
        assert_eq!(s.latest_in(next, next), None);
    }
}
