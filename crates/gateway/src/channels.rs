//! The bridge from channel adapters (`openpista-channels`) to the in-process
//! [`Gateway`]: one stable session per conversation (`telegram-<chat id>`, the session cron targets use),
//! `/new`, `/cancel` and `/status`. Answers are the turn's final text.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use openpista_channels::{Inbound, InboundHandler, InboundKind};
use openpista_proto::{AgentEvent, SessionId};

use crate::{Gateway, SendRequest};

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

    fn session(&self, inbound: &Inbound) -> Option<SessionId> {
        let key = (inbound.channel.clone(), inbound.conversation.clone());
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = sessions.get(&key) {
            return Some(id.clone());
        }
        SessionId::parse(&format!("{}-{}", inbound.channel, inbound.conversation)).ok()
    }

    async fn turn(&self, inbound: &Inbound, text: &str) -> String {
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
        let events = match self.gateway.send(req).await {
            Ok(events) => events.collect().await,
            Err(e) => return format!("Sorry, I could not start that: {e}"),
        };
        for event in events.into_iter().rev() {
            match event {
                AgentEvent::Final { text, .. } => return text,
                AgentEvent::Error { message, .. } => {
                    return format!("Sorry, that failed: {message}");
                }
                AgentEvent::Accepted { .. }
                | AgentEvent::TextDelta { .. }
                | AgentEvent::ToolStarted { .. }
                | AgentEvent::ToolFinished { .. } => {}
            }
        }
        "Sorry, the turn ended without an answer.".into()
    }
}

#[async_trait]
impl InboundHandler for GatewayBridge {
    async fn handle(&self, inbound: Inbound) -> String {
        match &inbound.kind {
            InboundKind::Text(text) => self.turn(&inbound, text).await,
            InboundKind::NewSession => {
                let key = (inbound.channel.clone(), inbound.conversation.clone());
                self.sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key, SessionId::generate());
                "Started a new session.".into()
            }
            InboundKind::Cancel => match self.session(&inbound) {
                Some(id) if self.gateway.cancel(&id) => "Cancelled the running turn.".into(),
                _ => "Nothing is running.".into(),
            },
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
