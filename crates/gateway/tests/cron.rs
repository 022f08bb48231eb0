//! The cron scheduler over the real gateway (scripted model, SQLite in a
//! temp dir): occurrences fire into their session, run at most once, follow
//! the missed policy across a restart, and failing jobs get paused.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use openpista_gateway::{CronScheduler, GatewayConfig, run_occurrence};
use openpista_memory::{CronJob, CronRun, MissedPolicy, NewCronJob, RunOutcome, RunTrigger, Store};
use openpista_proto::{Role, SessionId};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

fn every_second(target: &str, policy: MissedPolicy) -> NewCronJob {
    NewCronJob {
        expr: "*/1 * * * * *".into(),
        tz: "Europe/Rome".into(),
        target: target.into(),
        prompt: "ping".into(),
        max_failures: 3,
        missed_policy: policy,
    }
}

/// Waits (bounded) until `f` holds for the job's runs; returns them.
async fn wait_runs(store: &Store, job: i64, f: impl Fn(&[CronRun]) -> bool) -> Vec<CronRun> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let runs = store.cron_runs(job, 1000).await.unwrap();
        if f(&runs) {
            return runs;
        }
        assert!(Instant::now() < deadline, "timed out; runs: {runs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn finished(runs: &[CronRun]) -> usize {
    runs.iter()
        .filter(|r| r.outcome != RunOutcome::Running)
        .count()
}

async fn stop(s: CronScheduler) {
    assert!(s.stop(DEADLINE).await, "runs did not finish");
}

#[tokio::test]
async fn a_seconds_job_fires_into_its_session() {
    let h = common::harness("on_exhausted = \"echo\"", &GatewayConfig::default()).await;
    let job = h
        .store
        .add_cron_job(&every_second("session:daily", MissedPolicy::Skip))
        .await
        .unwrap();
    let s = CronScheduler::start(h.gateway.clone(), CancellationToken::new());
    let runs = wait_runs(&h.store, job.id, |r| finished(r) >= 1).await;
    stop(s).await;
    let run = runs
        .iter()
        .find(|r| r.outcome != RunOutcome::Running)
        .unwrap();
    assert_eq!(run.outcome, RunOutcome::Ok, "{run:?}");
    assert_eq!(run.trigger, RunTrigger::Schedule);
    let id = SessionId::parse("daily").unwrap();
    let session = h.store.get_session(&id).await.unwrap().unwrap();
    assert_eq!(session.channel, "cron");
    let history = h.gateway.history(&id, None).await.unwrap();
    assert_eq!(history[0].role, Role::User);
    assert_eq!(history[0].content, "ping");
    assert_eq!(history[1].role, Role::Assistant);
    assert_eq!(history[1].content, "ping");
}

#[tokio::test]
async fn an_occurrence_claimed_twice_runs_once() {
    let h = common::harness("on_exhausted = \"echo\"", &GatewayConfig::default()).await;
    let job = h
        .store
        .add_cron_job(&every_second("telegram:42", MissedPolicy::Skip))
        .await
        .unwrap();
    let at = DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    // Two schedulers (or one before and after a restart) reach the same occurrence.
    let (a, b) = tokio::join!(
        run_occurrence(&h.gateway, &job, at, RunTrigger::Schedule),
        run_occurrence(&h.gateway, &job, at, RunTrigger::Schedule),
    );
    let ran: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert_eq!(ran[0].session_id.as_str(), "telegram-42");
    assert!(
        run_occurrence(&h.gateway, &job, at, RunTrigger::Schedule)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(h.llm.requests().len(), 1);
    assert_eq!(h.store.cron_runs(job.id, 10).await.unwrap().len(), 1);
}

/// Runs a job, stops the scheduler, waits over two occurrences, starts a new
/// scheduler (jobs reload from the store) and returns the runs with the
/// stop and restart instants.
async fn restart(policy: MissedPolicy) -> (Vec<CronRun>, DateTime<Utc>, DateTime<Utc>) {
    let h = common::harness("on_exhausted = \"echo\"", &GatewayConfig::default()).await;
    let job: CronJob = h
        .store
        .add_cron_job(&every_second("session:r", policy))
        .await
        .unwrap();
    let s = CronScheduler::start(h.gateway.clone(), CancellationToken::new());
    wait_runs(&h.store, job.id, |r| finished(r) >= 1).await;
    stop(s).await;
    let stopped = Utc::now();
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let restarted = Utc::now();
    let s = CronScheduler::start(h.gateway.clone(), CancellationToken::new());
    wait_runs(&h.store, job.id, |r| {
        r.iter()
            .any(|r| r.scheduled_at > restarted && r.outcome != RunOutcome::Running)
    })
    .await;
    stop(s).await;
    let runs = h.store.cron_runs(job.id, 1000).await.unwrap();
    assert!(
        runs.iter().all(|r| r.outcome == RunOutcome::Ok),
        "{runs:#?}"
    );
    (runs, stopped, restarted)
}

#[tokio::test]
async fn skip_policy_does_not_catch_up_after_a_restart() {
    let (runs, stopped, restarted) = restart(MissedPolicy::Skip).await;
    assert!(
        runs.iter().all(|r| r.trigger == RunTrigger::Schedule),
        "{runs:#?}"
    );
    let in_gap = runs
        .iter()
        .filter(|r| r.scheduled_at > stopped && r.scheduled_at <= restarted)
        .count();
    assert_eq!(in_gap, 0, "{runs:#?}");
}

#[tokio::test]
async fn run_once_policy_catches_up_exactly_once_after_a_restart() {
    let (runs, stopped, restarted) = restart(MissedPolicy::RunOnce).await;
    let catch_up: Vec<_> = runs
        .iter()
        .filter(|r| r.trigger == RunTrigger::CatchUp)
        .collect();
    assert_eq!(catch_up.len(), 1, "{runs:#?}");
    assert!(catch_up[0].scheduled_at > stopped && catch_up[0].scheduled_at <= restarted);
    let in_gap = runs
        .iter()
        .filter(|r| r.scheduled_at > stopped && r.scheduled_at <= restarted)
        .count();
    assert_eq!(in_gap, 1, "{runs:#?}");
}

#[tokio::test]
async fn a_job_failing_three_times_in_a_row_is_paused() {
    let script = "[[reply]]\nerror = \"outage 1\"\n[[reply]]\nerror = \"outage 2\"\n[[reply]]\nerror = \"outage 3\"\n";
    let h = common::harness(script, &GatewayConfig::default()).await;
    let job = h
        .store
        .add_cron_job(&every_second("session:flaky", MissedPolicy::Skip))
        .await
        .unwrap();
    let s = CronScheduler::start(h.gateway.clone(), CancellationToken::new());
    let deadline = Instant::now() + DEADLINE;
    while !h.store.get_cron_job(job.id).await.unwrap().unwrap().paused {
        assert!(Instant::now() < deadline, "never paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(s).await;
    let runs = h.store.cron_runs(job.id, 100).await.unwrap();
    assert_eq!(runs.len(), 3, "{runs:#?}");
    assert!(
        runs.iter().all(|r| r.outcome == RunOutcome::Error),
        "{runs:#?}"
    );
    let job = h.store.get_cron_job(job.id).await.unwrap().unwrap();
    assert_eq!(job.consecutive_failures, 3);
    let id = SessionId::parse("flaky").unwrap();
    let history = h.gateway.history(&id, None).await.unwrap();
    let last = history.last().unwrap();
    assert!(
        last.content.contains("paused after 3 failed runs"),
        "{history:#?}"
    );
    let audit = h.store.audit(100, Some(&id)).await.unwrap();
    assert!(
        audit.iter().any(|a| a.action == "cron_paused"),
        "{audit:#?}"
    );
}
