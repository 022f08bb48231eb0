//! `openpista sessions list | kill | suspend | resume`: each session's state,
//! and operator control of a session.
//!
//! With a daemon running (the local one, or `--remote`), these go through the
//! client SDK over QUIC, so `list` shows live states (idle, running,
//! waiting-approval, suspended) and `kill` cancels the daemon's running turn
//! (its tool processes and containers are killed). Without one, `list`,
//! `suspend` and `resume` use the database directly (nothing can be running)
//! and `kill` says that nothing runs.

use std::process::ExitCode;

use anyhow::{Context, Result};
use openpista_client::Client;
use openpista_gateway::{DaemonState, running_pid};
use openpista_memory::AuditEntry;
use openpista_proto::SessionId;
use openpista_proto::wire::{SessionAction, SessionInfo, SessionState};

use crate::RemoteArgs;
use crate::config::Loaded;
use crate::{daemon, wiring};

/// `sessions list`.
pub async fn list(
    loaded: &Loaded,
    remote: &RemoteArgs,
    limit: u32,
    json: bool,
) -> Result<ExitCode> {
    let list = match reach(loaded, remote).await? {
        Some(client) => {
            let list = client
                .sessions(Some(limit))
                .await
                .context("asking the daemon");
            client.close().await;
            list?
        }
        None => {
            let store = wiring::store(loaded).await?;
            store
                .list_sessions(limit as usize)
                .await?
                .into_iter()
                .map(|s| SessionInfo {
                    state: if s.suspended_reason.is_some() {
                        SessionState::Suspended
                    } else {
                        SessionState::Idle
                    },
                    suspended_reason: s.suspended_reason,
                    created_at: s.created_at.to_rfc3339(),
                    updated_at: s.updated_at.to_rfc3339(),
                    message_count: s.message_count,
                    title: s.title,
                    channel: s.channel,
                    id: s.id,
                })
                .collect()
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no sessions yet");
    } else {
        for s in list {
            println!(
                "{}  {:<16} {:<8} {:>4} msgs  {}  {}",
                s.id,
                s.state.as_str(),
                s.channel,
                s.message_count,
                s.updated_at,
                s.title.unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sessions kill | suspend | resume ID`.
pub async fn control(
    loaded: &Loaded,
    remote: &RemoteArgs,
    id: &SessionId,
    action: SessionAction,
) -> Result<ExitCode> {
    if let Some(client) = reach(loaded, remote).await? {
        let done = client.control_session(id, action).await;
        client.close().await;
        let (state, was_running) = match done {
            Ok(done) => done,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        let what = match action {
            SessionAction::Kill if was_running => "killed its running turn",
            SessionAction::Kill => "had no running turn",
            SessionAction::Suspend if was_running => "suspended (its running turn was killed)",
            SessionAction::Suspend => "suspended",
            SessionAction::Resume => "resumed",
        };
        println!("{id}: {what}; now {}", state.as_str());
        return Ok(ExitCode::SUCCESS);
    }
    let store = wiring::store(loaded).await?;
    let Some(suspended) = store.suspension(id).await? else {
        eprintln!("error: no session {id}");
        return Ok(ExitCode::from(1));
    };
    let (action_name, state) = match action {
        SessionAction::Kill => {
            println!(
                "{id}: openpista is not running, so no turn runs; now {}",
                if suspended.is_some() {
                    "suspended"
                } else {
                    "idle"
                }
            );
            return Ok(ExitCode::SUCCESS);
        }
        SessionAction::Suspend => {
            store
                .suspend_session(id, "suspended by the operator")
                .await?;
            ("session_suspended", SessionState::Suspended)
        }
        SessionAction::Resume => {
            store.resume_session(id).await?;
            ("session_resumed", SessionState::Idle)
        }
    };
    store
        .append_audit(&AuditEntry {
            session_id: Some(id.clone()),
            actor: "operator".to_owned(),
            action: action_name.to_owned(),
            detail: serde_json::json!({ "was_running": false }),
        })
        .await?;
    println!("{id}: now {}", state.as_str());
    Ok(ExitCode::SUCCESS)
}

/// A client of the daemon: `--remote`, or the local daemon if it runs.
async fn reach(loaded: &Loaded, remote: &RemoteArgs) -> Result<Option<Client>> {
    let p = &loaded.paths;
    let addr = match remote.remote {
        Some(addr) => addr,
        None => match DaemonState::read(&p.state_file)? {
            Some(state) if running_pid(&p.pid_file)?.is_some() => state.addr,
            _ => return Ok(None),
        },
    };
    Ok(Some(daemon::connect(loaded, remote, addr).await?))
}
