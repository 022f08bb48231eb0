//! The frames of protocol version 1 (see `docs/PROTOCOL.md`).
//!
//! A connection's first bidirectional stream carries the handshake
//! (`hello` -> `welcome` or `error`); every later request opens its own
//! bidirectional stream, sends one [`ClientFrame`] and reads
//! [`ServerFrame`]s until a terminal one (`final`, `error`, or the single
//! reply of a non-streaming request).

use serde::{Deserialize, Serialize};

use crate::{AgentEvent, ChatMessage, ErrorCode, SessionId};

/// The ALPN protocol id.
pub const ALPN: &[u8] = b"openpista/1";

/// A decision on an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Run this one call.
    Approve,
    /// Refuse it.
    Deny,
    /// Run it, and the same tool with the same arguments again in this
    /// session without asking (remembered for the session, bounded).
    Always,
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// First frame of a connection.
    Hello {
        protocol_version: u32,
        #[serde(default)]
        token: Option<String>,
        client_name: String,
    },
    /// Run a turn; the reply is a stream of events.
    SendMessage {
        #[serde(default)]
        session_id: Option<SessionId>,
        text: String,
        /// A retried send with the same key runs once.
        idempotency_key: String,
    },
    /// Newest sessions first.
    ListSessions {
        #[serde(default)]
        limit: Option<u32>,
    },
    /// A session's newest messages, oldest first.
    GetHistory {
        session_id: SessionId,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Cancel the session's running turn.
    Cancel { session_id: SessionId },
    /// Kill, suspend or resume a session (reply: `session_controlled`).
    ControlSession {
        session_id: SessionId,
        action: SessionAction,
    },
    /// Answer an approval request.
    Approve { id: String, decision: Decision },
    /// Server status.
    Status {},
}

/// A session as listed to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub channel: String,
    pub title: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub message_count: u64,
    /// What the session is doing now.
    #[serde(default)]
    pub state: SessionState,
    /// Why it is suspended (when `state` is `suspended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_reason: Option<String>,
}

/// What a session is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// No turn is running.
    #[default]
    Idle,
    /// A turn is running.
    Running,
    /// A running turn waits for a human decision on a tool call.
    WaitingApproval,
    /// The session refuses turns until resumed.
    Suspended,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Idle => "idle",
            SessionState::Running => "running",
            SessionState::WaitingApproval => "waiting-approval",
            SessionState::Suspended => "suspended",
        }
    }
}

/// What `control_session` does to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionAction {
    /// Cancel the running turn (its processes and containers are killed).
    Kill,
    /// Cancel the running turn and refuse new ones until `resume`.
    Suspend,
    /// Accept turns again.
    Resume,
}

/// What a server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The handshake succeeded.
    Welcome {
        server_version: String,
        protocol_version: u32,
        max_frame_size: u64,
    },
    /// Reply to `list_sessions`.
    Sessions { sessions: Vec<SessionInfo> },
    /// Reply to `get_history`.
    History {
        session_id: SessionId,
        messages: Vec<ChatMessage>,
    },
    /// Reply to `cancel`.
    Cancelled { was_running: bool },
    /// Reply to `approve`.
    Approved { id: String },
    /// Reply to `control_session`: the session's state afterwards, and
    /// whether a running turn was cancelled.
    SessionControlled {
        session_id: SessionId,
        state: SessionState,
        was_running: bool,
    },
    /// Reply to `status`.
    StatusReport {
        server_version: String,
        uptime_secs: u64,
        live_sessions: u64,
        running_turns: u64,
        connections: u64,
    },
    /// A tool call waits for a human decision.
    ApprovalRequired {
        id: String,
        tool: String,
        args: String,
    },
    /// A request failed (terminal for its stream).
    Error { code: ErrorCode, message: String },
    /// An event of a running turn (`accepted`, `text_delta`, `tool_started`,
    /// `tool_finished`, `final`, `error`).
    #[serde(untagged)]
    Event(AgentEvent),
}

impl ServerFrame {
    /// Whether this frame ends its request stream.
    pub fn is_terminal(&self) -> bool {
        match self {
            ServerFrame::Event(AgentEvent::Final { .. } | AgentEvent::Error { .. }) => true,
            ServerFrame::Event(_) | ServerFrame::ApprovalRequired { .. } => false,
            ServerFrame::Welcome { .. }
            | ServerFrame::Sessions { .. }
            | ServerFrame::History { .. }
            | ServerFrame::Cancelled { .. }
            | ServerFrame::Approved { .. }
            | ServerFrame::SessionControlled { .. }
            | ServerFrame::StatusReport { .. }
            | ServerFrame::Error { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_documented_shapes() {
        let hello = serde_json::to_value(ClientFrame::Hello {
            protocol_version: 1,
            token: Some("t".into()),
            client_name: "c".into(),
        })
        .unwrap();
        assert_eq!(
            hello,
            serde_json::json!({"type": "hello", "protocol_version": 1, "token": "t", "client_name": "c"})
        );
        let ev = serde_json::to_value(ServerFrame::Event(AgentEvent::TextDelta {
            text: "x".into(),
        }))
        .unwrap();
        assert_eq!(ev, serde_json::json!({"type": "text_delta", "text": "x"}));
        let back: ServerFrame =
            serde_json::from_value(serde_json::json!({"type": "final", "text": "t", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}))
                .unwrap();
        assert!(back.is_terminal());
    }

    #[test]
    fn unknown_fields_are_refused_from_clients() {
        let r: Result<ClientFrame, _> = serde_json::from_str(r#"{"type":"status","sudo":true}"#);
        assert!(r.is_err());
    }
}
