//! Channel adapters: where messages come from and replies go back to
//! (Telegram, and the terminal: [`cli`]). Channels never depend on the agent or the gateway: an
//! adapter turns a platform's updates into [`Inbound`] messages, hands them to
//! an [`InboundHandler`] (the gateway bridge, in `openpista-gateway`), and
//! sends the handler's answer back to the conversation the message came from,
//! and only there, through its cloneable reply handle.
//!
//! Not here: sessions, models, turns (the gateway's and the agent's).

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub mod cli;
pub mod telegram;
pub mod text;

pub use cli::{CliAdapter, CliReplier, StdioAdapter};
/// The redacting secret type the token is held in.
pub use secrecy::{ExposeSecret, SecretString};
pub use telegram::{TelegramAdapter, TelegramConfig, TelegramReplier};

/// One message from a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The channel's name (`telegram`).
    pub channel: String,
    /// The conversation (a chat id); replies go here.
    pub conversation: String,
    /// What the session is keyed by within the channel: the conversation
    /// for a private chat, `<chat>-<user>` in a group.
    pub session_key: String,
    /// The sender's platform id.
    pub user: String,
    /// What was asked.
    pub kind: InboundKind,
}

/// What an [`Inbound`] message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundKind {
    /// Plain text for the agent.
    Text(String),
    /// Start a fresh session in this conversation (`/new`).
    NewSession,
    /// Cancel the running turn (`/cancel`).
    Cancel,
    /// Report the gateway's status (`/status`).
    Status,
    /// A decision on an approval request (a pressed button); the handler
    /// checks that this user and conversation may answer it.
    Approval { id: String, choice: ApprovalChoice },
}

/// What a handler answers to an [`InboundKind::Approval`] it refuses
/// (someone else's request, or one no longer waiting).
pub const APPROVAL_REFUSED: &str = "Sorry, this request is not yours, or it is no longer waiting.";

/// A human's answer to an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalChoice {
    /// Run this call once.
    Approve,
    /// Refuse it.
    Deny,
    /// Run it, and the same call again in this session without asking.
    Always,
}

/// An approval request to show in the conversation, with buttons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalPrompt {
    /// The approval id the buttons answer.
    pub id: String,
    /// Plain text describing the call (the adapter escapes it).
    pub text: String,
}

/// One reply to a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The conversation to answer (from [`Inbound::conversation`]).
    pub conversation: String,
    /// Plain text; the adapter escapes and splits it.
    pub text: String,
}

/// Where a handler shows the reply so far while it works (the adapter
/// renders it as a draft, throttled), and asks for approvals. Updating it is
/// optional.
#[derive(Debug)]
pub struct Draft {
    text: tokio::sync::watch::Sender<String>,
    prompts: Option<tokio::sync::mpsc::UnboundedSender<ApprovalPrompt>>,
}

impl Draft {
    /// A draft nobody shows (commands, tests); approval prompts go nowhere.
    pub fn none() -> Self {
        Self {
            text: tokio::sync::watch::channel(String::new()).0,
            prompts: None,
        }
    }

    /// A draft feeding `text` and, if given, `prompts`.
    pub(crate) fn new(
        text: tokio::sync::watch::Sender<String>,
        prompts: Option<tokio::sync::mpsc::UnboundedSender<ApprovalPrompt>>,
    ) -> Self {
        Self { text, prompts }
    }

    /// Replaces the text shown so far.
    pub fn show(&self, text_so_far: &str) {
        self.text.send_replace(text_so_far.to_owned());
    }

    /// Shows an approval request with Approve / Deny / Always buttons.
    /// Returns false when this conversation cannot show one (the request
    /// then times out, which denies it).
    pub fn ask(&self, prompt: ApprovalPrompt) -> bool {
        self.prompts
            .as_ref()
            .is_some_and(|p| p.send(prompt).is_ok())
    }
}

/// What handles inbound messages (the gateway bridge). Answers with the
/// plain text to send back.
#[async_trait]
pub trait InboundHandler: Send + Sync {
    /// Handles one message and returns the final reply text, showing the
    /// reply so far in `draft` while it works.
    async fn handle(&self, inbound: Inbound, draft: Draft) -> String;
}

/// A channel adapter: runs until `shutdown` fires, feeding messages to the
/// handler; never returns early because the platform misbehaves.
#[async_trait]
pub trait ChannelAdapter: Send + Sync {
    /// The handle that sends replies back into this channel.
    type Replier: Clone + Send + Sync;

    /// The channel's name (`telegram`).
    fn name(&self) -> &'static str;

    /// A cloneable handle sending [`Outbound`] replies into this channel.
    fn replier(&self) -> Self::Replier;

    /// Polls the platform and feeds the handler until `shutdown`.
    async fn run(
        &self,
        handler: std::sync::Arc<dyn InboundHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), ChannelError>;
}

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The configured API URL does not parse; fix the config (no retry helps).
    #[error("invalid api url {0:?}")]
    InvalidApiUrl(String),
    /// A setting is out of range; fix the config (no retry helps).
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// The conversation id is not one this channel uses; a bug or a forged id.
    #[error("invalid conversation id {0:?}")]
    InvalidConversation(String),
    /// The platform kept failing after every retry; a later attempt may work.
    #[error("{channel} request failed after retries: {message}")]
    Platform {
        channel: &'static str,
        message: String,
    },
}
