//! `openpista cron`: add, list, remove, pause, resume and run scheduled
//! prompts. The daemon (`openpista start`) runs them on schedule; `cron run`
//! runs one now, in this process, through the same path.

use std::process::ExitCode;

use anyhow::Result;
use openpista_gateway::{Gateway, Outbox, run_occurrence_to, validate_cron};
use openpista_memory::{MissedPolicy, NewCronJob, RunOutcome, RunTrigger};

use crate::config::{Env, Loaded};
use crate::{CronCommand, MissedArg, wiring};

pub async fn cron(loaded: &Loaded, env: &Env, cmd: CronCommand) -> Result<ExitCode> {
    match cmd {
        CronCommand::Add {
            expr,
            tz,
            to,
            max_failures,
            missed,
            prompt,
        } => {
            if let Err(e) = validate_cron(&expr, &tz, &to) {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
            let store = wiring::store(loaded).await?;
            let job = store
                .add_cron_job(&NewCronJob {
                    expr,
                    tz,
                    target: to,
                    prompt,
                    max_failures,
                    missed_policy: match missed {
                        MissedArg::Skip => MissedPolicy::Skip,
                        MissedArg::RunOnce => MissedPolicy::RunOnce,
                    },
                })
                .await?;
            if job.target.starts_with("telegram:") {
                eprintln!(
                    "note: Telegram delivery arrives with the Telegram adapter; until then answers are stored in the session telegram-{}",
                    job.target.trim_start_matches("telegram:")
                );
            }
            println!("added cron job {}", job.id);
            Ok(ExitCode::SUCCESS)
        }
        CronCommand::List { json } => {
            let store = wiring::store(loaded).await?;
            let jobs = store.list_cron_jobs().await?;
            if json {
                let rows: Vec<_> = jobs
                    .iter()
                    .map(|j| {
                        serde_json::json!({
                            "id": j.id, "expr": j.expr, "tz": j.tz, "target": j.target,
                            "prompt": j.prompt, "paused": j.paused,
                            "consecutive_failures": j.consecutive_failures,
                            "max_failures": j.max_failures,
                            "missed_policy": j.missed_policy.as_str(),
                            "created_at": j.created_at.to_rfc3339(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if jobs.is_empty() {
                println!("no cron jobs");
            } else {
                for j in jobs {
                    println!(
                        "{:>4}  {:<20} {:<16} {:<24} {:<7} {}",
                        j.id,
                        j.expr,
                        j.tz,
                        j.target,
                        if j.paused { "paused" } else { "active" },
                        j.prompt.replace('\n', " ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CronCommand::Rm { id } => {
            let store = wiring::store(loaded).await?;
            done(store.delete_cron_job(id).await?, id, "deleted")
        }
        CronCommand::Pause { id } => {
            let store = wiring::store(loaded).await?;
            done(store.set_cron_paused(id, true).await?, id, "paused")
        }
        CronCommand::Resume { id } => {
            let store = wiring::store(loaded).await?;
            done(store.set_cron_paused(id, false).await?, id, "resumed")
        }
        CronCommand::Run { id } => {
            let store = wiring::store(loaded).await?;
            let Some(job) = store.get_cron_job(id).await? else {
                eprintln!("error: no cron job {id}");
                return Ok(ExitCode::from(1));
            };
            let outbox = Outbox {
                telegram: wiring::telegram(loaded, env, store.clone())?
                    .map(|t| openpista_channels::ChannelAdapter::replier(&t)),
            };
            let agent = wiring::agent(loaded, env).await?;
            let gateway = Gateway::new(agent, &loaded.config.gateway);
            let report =
                run_occurrence_to(&gateway, &job, chrono_now(), RunTrigger::Manual, &outbox)
                    .await?;
            let Some(report) = report else {
                eprintln!("error: this occurrence was already claimed; try again");
                return Ok(ExitCode::from(1));
            };
            println!("{}", report.text);
            eprintln!(
                "[cron job {id}: run {} {} in session {}]",
                report.run_id,
                report.outcome.as_str(),
                report.session_id
            );
            if report.paused_now {
                eprintln!("job {id} is now paused after failing in a row");
            }
            Ok(if report.outcome == RunOutcome::Ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn done(found: bool, id: i64, what: &str) -> Result<ExitCode> {
    if found {
        println!("{what} cron job {id}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: no cron job {id}");
        Ok(ExitCode::from(1))
    }
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}
