//! Wire and domain types shared by every openpista crate.
//!
//! This crate holds plain data: ids, chat messages, tool calls, the events a
//! turn streams to whoever asked, and the error codes that go with them. It has
//! no I/O, no tokio and no quinn, so every other crate may depend on it.
//! [`frame`] is the sans-IO frame codec and [`wire`] the protocol's frames.

pub mod frame;
pub mod wire;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of the openpista protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// A fresh approval id: `ap-` and 128 random bits in 32 hex digits, so
/// that an id cannot be guessed (short enough for Telegram's 64-byte button
/// data). The bits are the fully random bytes of two UUID v4s (each has 6
/// fixed version and variant bits in bytes 6 and 8).
pub fn new_approval_id() -> String {
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let bytes = a[..6].iter().chain(&a[9..]).chain(&b[..3]);
    let mut id = String::with_capacity(35);
    id.push_str("ap-");
    for byte in bytes {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// Identifies one conversation (an `AgentSession`).
///
/// Ids are short ASCII strings (`[A-Za-z0-9_.:-]`, at most 64 bytes) so they
/// can travel through channel names, file names and SQL without escaping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

impl SessionId {
    /// A fresh, time-ordered id (UUID v7).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Validates `raw` as a session id.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_SESSION_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidId(raw.chars().take(80).collect()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SessionId {
    type Error = InvalidId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<SessionId> for String {
    fn from(value: SessionId) -> Self {
        value.0
    }
}

/// A session id that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session id {0:?}: use 1-64 characters from A-Z a-z 0-9 _ - . :")]
pub struct InvalidId(pub String);

/// Row id of a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub i64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// Lower-case name as stored and sent to providers.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// A tool call requested by the model.
///
/// `arguments` is the raw JSON text the model produced. It is kept verbatim
/// (it may be invalid JSON) so that history replays exactly and the tool layer
/// can answer a malformed call with an error instead of losing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default)]
    pub content: String,
    /// Calls requested by an assistant message (possibly alongside text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `Role::Tool`: the call this message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `Role::Tool`: the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For `Role::Tool`: absolute paths of images the tool produced (e.g. a
    /// screen capture). Only paths: the bytes are read by a provider that
    /// sends images, and never pasted into `content`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self::plain(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::plain(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls,
            ..Self::plain(Role::Assistant, content)
        }
    }

    pub fn tool_result(
        call_id: impl Into<String>,
        name: impl Into<String>,
        content: impl Into<String>,
    ) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            name: Some(name.into()),
            ..Self::plain(Role::Tool, content)
        }
    }

    fn plain(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
            images: Vec::new(),
        }
    }
}

/// A tool as the model sees it: a name, a description and a JSON schema for
/// its arguments (an object schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDefinition {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// Token accounting for one LLM call or one turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

/// How a tool invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolOutcome {
    /// Ran and succeeded (exit code 0 for commands).
    Ok,
    /// Ran and failed, or its arguments were rejected.
    Error,
    /// Refused by policy before running.
    Denied,
    /// Killed at its deadline.
    Timeout,
    /// Stopped because the turn was cancelled.
    Cancelled,
}

impl ToolOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolOutcome::Ok => "ok",
            ToolOutcome::Error => "error",
            ToolOutcome::Denied => "denied",
            ToolOutcome::Timeout => "timeout",
            ToolOutcome::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "ok" => Some(ToolOutcome::Ok),
            "error" => Some(ToolOutcome::Error),
            "denied" => Some(ToolOutcome::Denied),
            "timeout" => Some(ToolOutcome::Timeout),
            "cancelled" => Some(ToolOutcome::Cancelled),
            _ => None,
        }
    }
}

/// Machine-readable error codes, listed in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was malformed (bad JSON, unknown type, invalid id).
    BadRequest,
    /// Authentication failed or is missing.
    Unauthorized,
    /// The session does not exist.
    NotFound,
    /// The turn was cancelled.
    Cancelled,
    /// The model provider failed (after retries, if any).
    LlmError,
    /// The model did not finish within the maximum number of tool rounds.
    MaxRounds,
    /// Storage failed.
    StorageError,
    /// A limit or quota was exceeded.
    LimitExceeded,
    /// The session is suspended (by an operator, or after a burst of failed
    /// tool calls) and refuses turns until `openpista sessions resume`.
    SessionSuspended,
    /// The client speaks a protocol version this server does not.
    UnsupportedVersion,
    /// A frame's length prefix exceeds the limit.
    FrameTooLarge,
    /// Bytes that are not a valid frame (truncated, not UTF-8, not JSON).
    InvalidFrame,
    /// Too many requests or messages; slow down.
    RateLimited,
    /// The server is shutting down.
    ShuttingDown,
    /// Anything else; the message says what.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::LlmError => "llm_error",
            ErrorCode::MaxRounds => "max_rounds",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::SessionSuspended => "session_suspended",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

/// What a running turn reports, in order, to whoever asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The user's message is stored; the turn will run.
    Accepted {
        session_id: SessionId,
        message_id: MessageId,
    },
    /// A piece of assistant text, as generated.
    TextDelta { text: String },
    /// A tool call is about to run.
    ToolStarted {
        call_id: String,
        name: String,
        args: String,
    },
    /// A tool call ended.
    ToolFinished {
        call_id: String,
        name: String,
        outcome: ToolOutcome,
        duration_ms: u64,
        /// The (capped) text fed back to the model.
        output: String,
    },
    /// A tool call waits for a human decision (sent on the wire as the
    /// `approval_required` frame). Answer with `approve {id, decision}`
    /// from the channel and session that asked.
    ApprovalRequired {
        id: String,
        tool: String,
        args: String,
    },
    /// The turn ended with this final assistant text.
    Final { text: String, usage: Usage },
    /// The turn ended with an error.
    Error { code: ErrorCode, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_validated() {
        assert!(SessionId::parse("abc-123_x.y:z").is_ok());
        assert!(SessionId::parse("").is_err());
        assert!(SessionId::parse("a b").is_err());
        assert!(SessionId::parse("../etc").is_err());
        assert!(SessionId::parse(&"x".repeat(65)).is_err());
        let generated = SessionId::generate();
        assert_eq!(SessionId::parse(generated.as_str()), Ok(generated));
    }

    #[test]
    fn session_id_deserialization_validates() {
        let bad: Result<SessionId, _> = serde_json::from_str("\"a;b\"");
        assert!(bad.is_err());
    }

    #[test]
    fn events_are_tagged_snake_case() {
        let ev = AgentEvent::Final {
            text: "hi".into(),
            usage: Usage::default(),
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "final");
        let ev = AgentEvent::Error {
            code: ErrorCode::MaxRounds,
            message: "x".into(),
        };
        assert_eq!(serde_json::to_value(&ev).unwrap()["code"], "max_rounds");
    }

    #[test]
    fn roles_and_outcomes_round_trip() {
        for r in [Role::System, Role::User, Role::Assistant, Role::Tool] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        for o in [
            ToolOutcome::Ok,
            ToolOutcome::Error,
            ToolOutcome::Denied,
            ToolOutcome::Timeout,
            ToolOutcome::Cancelled,
        ] {
            assert_eq!(ToolOutcome::parse(o.as_str()), Some(o));
        }
    }
}
