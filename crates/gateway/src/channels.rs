//! The bridge from channel adapters (`openpista-channels`) to the in-process
//! [`Gateway`]: one stable session per conversation (`<channel>-<session
//! key>`, e.g. `telegram-<chat id>`, the session cron targets use), `/new`,
//! `/cancel` and `/status`. The reply so far is shown in the adapter's draft
//! as the model streams; the answer is the turn's final text.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use openpista_agent::Origin;
use openpista_channels::{
    APPROVAL_REFUSED, ApprovalChoice, ApprovalPrompt, Draft, Inbound, InboundHandler, InboundKind,
};
use openpista_proto::wire::Decision;
use openpista_proto::{AgentEvent, ErrorCode, SessionId};

use crate::{Gateway, SendRequest};

/// What a cancelled turn answers.
pub const CANCELLED_REPLY: &str = "Stopped.";
/// What an accepted approval button answers.
pub const APPROVED_REPLY: &str = "Approved.";
/// What an accepted `always` button answers.
pub const ALWAYS_REPLY: &str = "Approved for this session.";
/// What an accepted deny button answers.
pub const DENIED_REPLY: &str = "Denied.";

/// Feeds channel messages into a [`Gateway`].
#[derive(Debug)]
pub struct GatewayBridge {
    gateway: Gateway,
    /// Conversations moved to a fresh session by `/new`.
    sessions: Mutex<HashMap<(String, String), SessionId>>,
}

impl GatewayBridge {
    /// A bridge into `gateway`.
    pub fn new(gateway: Gateway) -> Self {
        Self {
            gateway,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn key(inbound: &Inbound) -> (String, String) {
        (inbound.channel.clone(), inbound.session_key.clone())
    }

    fn session(&self, inbound: &Inbound) -> Option<SessionId> {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = sessions.get(&Self::key(inbound)) {
            return Some(id.clone());
        }
        SessionId::parse(&format!("{}-{}", inbound.channel, inbound.session_key)).ok()
    }

    async fn turn(&self, inbound: &Inbound, text: &str, draft: &Draft) -> String {
        let Some(id) = self.session(inbound) else {
            return "Sorry, this conversation has no usable session id.".into();
        };
        let req = SendRequest {
            session_id: Some(id),
            text: text.to_owned(),
            idempotency_key: None,
            channel: inbound.channel.clone(),
            create_missing: true,
        };
        let sent = self
            .gateway
            .send_from(req, Some(inbound.user.clone()))
            .await;
        let mut events = match sent {
            Ok(events) => events,
            Err(e) => return format!("Sorry, I could not start that: {e}"),
        };
        let mut so_far = String::new();
        while let Some(event) = events.recv().await {
            match event {
                AgentEvent::TextDelta { text } => {
                    so_far.push_str(&text);
                    draft.show(&so_far);
                }
                // A tool round's text is not the answer; start over.
                AgentEvent::ToolStarted { .. } => so_far.clear(),
                AgentEvent::Final { text, .. } => return text,
                AgentEvent::Error {
                    code: ErrorCode::Cancelled,
                    ..
                } => return CANCELLED_REPLY.into(),
                AgentEvent::Error { message, .. } => {
                    return format!("Sorry, that failed: {message}");
                }
                AgentEvent::ApprovalRequired { id, tool, args } => {
                    let args: String = args.chars().take(1000).collect();
                    let text = format!("Allow {tool} {args}?");
                    if !draft.ask(ApprovalPrompt { id, text }) {
                        tracing::warn!(
                            channel = %inbound.channel,
                            "this conversation cannot show an approval request; it will time out"
                        );
                    }
                }
                AgentEvent::Accepted { .. } | AgentEvent::ToolFinished { .. } => {}
            }
        }
        "Sorry, the turn ended without an answer.".into()
    }
}

#[async_trait]
impl InboundHandler for GatewayBridge {
    async fn handle(&self, inbound: Inbound, draft: Draft) -> String {
        match &inbound.kind {
            InboundKind::Text(text) => self.turn(&inbound, text, &draft).await,
            InboundKind::NewSession => {
                self.sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(Self::key(&inbound), SessionId::generate());
                "Started a new session.".into()
            }
            InboundKind::Cancel => match self.session(&inbound) {
                Some(id) if self.gateway.cancel(&id) => "Cancelling the running turn.".into(),
                _ => "Nothing is running.".into(),
            },
            InboundKind::Approval { id, choice } => {
                let decision = match choice {
                    ApprovalChoice::Approve => Decision::Approve,
                    ApprovalChoice::Deny => Decision::Deny,
                    ApprovalChoice::Always => Decision::Always,
                };
                let by = Origin {
                    channel: inbound.channel.clone(),
                    user: Some(inbound.user.clone()),
                };
                let Some(session) = self.session(&inbound) else {
                    return APPROVAL_REFUSED.into();
                };
                match self
                    .gateway
                    .approve(id, decision, &by, Some(&session))
                    .await
                {
                    Ok(()) => match choice {
                        ApprovalChoice::Approve => APPROVED_REPLY.into(),
                        ApprovalChoice::Deny => DENIED_REPLY.into(),
                        ApprovalChoice::Always => ALWAYS_REPLY.into(),
                    },
                    Err(_) => APPROVAL_REFUSED.into(),
                }
            }
            InboundKind::Status => {
                let s = self.gateway.status();
                format!(
                    "Up {}s; {} live sessions, {} running turns.",
                    s.uptime_secs, s.live_sessions, s.running_turns
                )
            }
        }
    }
}
