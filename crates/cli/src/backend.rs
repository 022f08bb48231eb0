//! Where `run` and `repl` send their messages: the in-process gateway (the
//! default) or a daemon over QUIC (`--remote`). Both speak the same
//! operations, so the commands print the same way either way.

use std::time::Duration;

use anyhow::{Result, anyhow};
use futures::StreamExt as _;
use openpista_agent::Origin;
use openpista_client::{Client, Event, EventStream};
use openpista_gateway::{Gateway, SendRequest, TurnEvents};
use openpista_proto::wire::{Decision, SessionInfo};
use openpista_proto::{AgentEvent, SessionId};

/// The channel CLI sessions are recorded under.
const CHANNEL: &str = "cli";

/// A gateway to talk to.
#[derive(Debug)]
pub enum Backend {
    /// The agent runs in this process, behind the in-process gateway.
    Local(Gateway),
    /// A daemon, reached with the SDK.
    Remote(Client),
}

/// The events of one turn.
#[derive(Debug)]
pub enum Events {
    Local(TurnEvents),
    Remote(EventStream),
}

impl Events {
    /// The next event; `None` after the last. A lost connection is an error.
    pub async fn next(&mut self) -> Option<Result<AgentEvent>> {
        match self {
            Events::Local(events) => events.recv().await.map(Ok),
            Events::Remote(stream) => match stream.next().await? {
                Ok(Event::Agent(ev)) => Some(Ok(ev)),
                Ok(Event::ApprovalRequired { id, tool, args }) => {
                    Some(Ok(AgentEvent::ApprovalRequired { id, tool, args }))
                }
                Err(e) => Some(Err(anyhow!(e).context("the daemon connection"))),
            },
        }
    }
}

impl Backend {
    /// Sends `text` to `session` (a new session when `None`).
    pub async fn send(&self, session: Option<&SessionId>, text: &str) -> Result<Events> {
        match self {
            Backend::Local(gateway) => {
                let req = SendRequest {
                    session_id: session.cloned(),
                    text: text.to_owned(),
                    idempotency_key: None,
                    channel: CHANNEL.into(),
                    create_missing: false,
                };
                Ok(Events::Local(gateway.send(req).await?))
            }
            Backend::Remote(client) => Ok(Events::Remote(client.send(session, text).await?)),
        }
    }

    /// Answers an approval request of a turn this CLI started.
    pub async fn approve(&self, id: &str, decision: Decision) -> Result<()> {
        match self {
            Backend::Local(gateway) => {
                gateway
                    .approve(id, decision, &Origin::channel(CHANNEL), None)
                    .await?
            }
            Backend::Remote(client) => client.approve(id, decision).await?,
        }
        Ok(())
    }

    /// Cancels the session's running turn.
    pub async fn cancel(&self, session: &SessionId) {
        match self {
            Backend::Local(gateway) => {
                gateway.cancel(session);
            }
            Backend::Remote(client) => {
                if let Err(e) = client.cancel(session).await {
                    eprintln!("error: cancelling: {e}");
                }
            }
        }
    }

    /// The newest sessions first.
    pub async fn sessions(&self, limit: u32) -> Result<Vec<SessionInfo>> {
        Ok(match self {
            Backend::Local(gateway) => gateway.list_sessions(Some(limit)).await?,
            Backend::Remote(client) => client.sessions(Some(limit)).await?,
        })
    }

    /// Fails unless `session` exists.
    pub async fn check_session(&self, session: &SessionId) -> Result<()> {
        match self {
            Backend::Local(gateway) => gateway.history(session, Some(1)).await.map(drop)?,
            Backend::Remote(client) => client.history(session, Some(1)).await.map(drop)?,
        }
        Ok(())
    }

    /// A fresh session. Locally it is created at once; a daemon creates it
    /// with the first message (`None`).
    pub async fn new_session(&self) -> Result<Option<SessionId>> {
        match self {
            Backend::Local(gateway) => Ok(Some(
                gateway.agent().create_session(CHANNEL).await?.id().clone(),
            )),
            Backend::Remote(_) => Ok(None),
        }
    }

    /// Lets running turns store their results, or says goodbye to the daemon.
    pub async fn close(&self) {
        match self {
            Backend::Local(gateway) => {
                gateway.shutdown(Duration::from_secs(2)).await;
            }
            Backend::Remote(client) => client.close().await,
        }
    }
}
