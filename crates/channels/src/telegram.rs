//! The Telegram adapter: long polling with teloxide's Bot API client (never
//! its `Dispatcher`, whose `dispatch` panics when the first `getMe` fails).
//!
//! Deny by default: only `allowed_users` reach the handler. An unknown user
//! gets one short refusal with their id and a pairing code, and nothing else
//! happens (no model call). Replies are HTML-escaped, split at 4,096
//! characters on line or word boundaries and sent in order; a typing
//! indicator runs while the handler works. Bot API errors (429 with
//! `retry_after`, 5xx, network) are retried with backoff; the polling loop
//! never ends because of them.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use teloxide::RequestError;
use teloxide::prelude::*;
use teloxide::types::{ChatAction, ParseMode, UpdateKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::text::split_escaped;
use crate::{ChannelAdapter, ChannelError, Inbound, InboundHandler, InboundKind, Outbound};

/// The channel's name.
pub const TELEGRAM: &str = "telegram";
/// The official Bot API.
pub const DEFAULT_API_URL: &str = "https://api.telegram.org/";
/// Longest Telegram message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4096;
/// Long-polling timeout (below teloxide's 17 s client timeout).
const POLL_TIMEOUT_SECS: u32 = 10;
/// Attempts per outgoing request before giving up on it.
const SEND_ATTEMPTS: u32 = 6;
/// Longest backoff between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the typing indicator is renewed (Telegram shows it for ~5 s).
const TYPING_EVERY: Duration = Duration::from_secs(4);

/// Reply to a message that is not text.
pub const NOT_SUPPORTED: &str = "Sorry, only text messages are supported yet.";

/// The adapter's settings. The token is never logged.
#[derive(Clone)]
pub struct TelegramConfig {
    /// The bot token.
    pub token: String,
    /// The Bot API base URL; `None` means [`DEFAULT_API_URL`].
    pub api_url: Option<String>,
    /// Numeric Telegram user ids allowed to talk to the agent.
    pub allowed_users: Vec<u64>,
    /// First retry delay; doubles per failure up to 30 s.
    pub backoff: Duration,
}

impl std::fmt::Debug for TelegramConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramConfig")
            .field("token", &"<redacted>")
            .field("api_url", &self.api_url)
            .field("allowed_users", &self.allowed_users)
            .field("backoff", &self.backoff)
            .finish()
    }
}

/// The Telegram adapter.
#[derive(Clone)]
pub struct TelegramAdapter {
    inner: Arc<Inner>,
}

struct Inner {
    bot: Bot,
    allowed: HashSet<u64>,
    backoff: Duration,
    /// Unknown users already refused: user id -> pairing code.
    pending: Mutex<HashMap<u64, String>>,
    codes: RandomState,
}

impl std::fmt::Debug for TelegramAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramAdapter")
            .field("allowed", &self.inner.allowed)
            .finish_non_exhaustive()
    }
}

/// Sends replies into Telegram chats. Cheap to clone.
#[derive(Clone)]
pub struct TelegramReplier {
    bot: Bot,
    backoff: Duration,
}

impl std::fmt::Debug for TelegramReplier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramReplier").finish_non_exhaustive()
    }
}

impl TelegramAdapter {
    /// An adapter for `cfg`; fails only on an unparsable API URL.
    pub fn new(cfg: &TelegramConfig) -> Result<Self, ChannelError> {
        let raw = cfg.api_url.as_deref().unwrap_or(DEFAULT_API_URL);
        let url = url::Url::parse(raw).map_err(|_| ChannelError::InvalidApiUrl(raw.to_owned()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                bot: Bot::new(cfg.token.clone()).set_api_url(url),
                allowed: cfg.allowed_users.iter().copied().collect(),
                backoff: cfg.backoff,
                pending: Mutex::new(HashMap::new()),
                codes: RandomState::new(),
            }),
        })
    }

    /// Unknown users refused so far, with their pairing codes.
    pub fn pending_pairs(&self) -> Vec<(u64, String)> {
        let pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending.iter().map(|(u, c)| (*u, c.clone())).collect()
    }

    fn pairing_code(&self, user: u64) -> String {
        let n = self.inner.codes.hash_one(user) % 1_000_000;
        format!("{n:06}")
    }

    async fn handle_message(&self, msg: Message, handler: Arc<dyn InboundHandler>) {
        let Some(user) = msg.from.as_ref().map(|u| u.id.0) else {
            return;
        };
        if !msg.chat.is_private() {
            return;
        }
        let chat = msg.chat.id;
        let replier = self.replier();
        if !self.inner.allowed.contains(&user) {
            let code = self.pairing_code(user);
            let first = self
                .inner
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(user, code.clone())
                .is_none();
            if first {
                tracing::info!(user, "telegram: refused unknown user");
                let text = format!(
                    "Sorry, I only talk to people my owner has approved. Your Telegram id is {user}; pairing code {code}. The owner can approve you with: openpista telegram pair {code}"
                );
                replier.send_logged(chat, &text).await;
            }
            return;
        }
        let Some(text) = msg.text() else {
            replier.send_logged(chat, NOT_SUPPORTED).await;
            return;
        };
        let kind = match command(text) {
            Some("start") => {
                let hello = "Hi! I'm your openpista agent. Send me a message. Commands: /new starts a fresh session, /cancel stops the running turn, /status shows the gateway's state.";
                replier.send_logged(chat, hello).await;
                return;
            }
            Some("new") => InboundKind::NewSession,
            Some("cancel") => InboundKind::Cancel,
            Some("status") => InboundKind::Status,
            _ => InboundKind::Text(text.to_owned()),
        };
        let typing = CancellationToken::new();
        if matches!(kind, InboundKind::Text(_)) {
            tokio::spawn(keep_typing(self.inner.bot.clone(), chat, typing.clone()));
        }
        let _stop_typing = typing.drop_guard();
        let inbound = Inbound {
            channel: TELEGRAM.to_owned(),
            conversation: chat.0.to_string(),
            user: user.to_string(),
            kind,
        };
        let answer = handler.handle(inbound).await;
        drop(_stop_typing);
        replier.send_logged(chat, &answer).await;
    }

    async fn wait_for_bot(&self, shutdown: &CancellationToken) -> bool {
        let mut failures = 0u32;
        loop {
            let res = tokio::select! {
                _ = shutdown.cancelled() => return false,
                r = self.inner.bot.get_me() => r,
            };
            match res {
                Ok(me) => {
                    tracing::info!(bot = %me.username(), "telegram: connected");
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    let wait = retry_delay(&e, self.inner.backoff, failures);
                    tracing::warn!(error = %e, ?wait, "telegram: getMe failed; retrying");
                    if !sleep_or_cancel(wait, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl ChannelAdapter for TelegramAdapter {
    type Replier = TelegramReplier;

    fn name(&self) -> &'static str {
        TELEGRAM
    }

    fn replier(&self) -> TelegramReplier {
        TelegramReplier {
            bot: self.inner.bot.clone(),
            backoff: self.inner.backoff,
        }
    }

    async fn run(
        &self,
        handler: Arc<dyn InboundHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), ChannelError> {
        let tracker = TaskTracker::new();
        if self.wait_for_bot(&shutdown).await {
            let mut offset = 0i32;
            let mut failures = 0u32;
            loop {
                let res = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = self.inner.bot.get_updates().offset(offset).timeout(POLL_TIMEOUT_SECS) => r,
                };
                match res {
                    Ok(updates) => {
                        failures = 0;
                        for update in updates {
                            offset = update.id.as_offset();
                            if let UpdateKind::Message(msg) = update.kind {
                                let this = self.clone();
                                tracker.spawn(this.handle_message_owned(msg, handler.clone()));
                            }
                        }
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let wait = retry_delay(&e, self.inner.backoff, failures);
                        tracing::warn!(error = %e, ?wait, "telegram: getUpdates failed; retrying");
                        if !sleep_or_cancel(wait, &shutdown).await {
                            break;
                        }
                    }
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

impl TelegramAdapter {
    async fn handle_message_owned(self, msg: Message, handler: Arc<dyn InboundHandler>) {
        self.handle_message(msg, handler).await;
    }
}

impl TelegramReplier {
    /// Sends `out` to its chat: escaped, split, in order, with retries.
    pub async fn send(&self, out: &Outbound) -> Result<(), ChannelError> {
        let chat: i64 = out
            .conversation
            .parse()
            .map_err(|_| ChannelError::InvalidConversation(out.conversation.clone()))?;
        self.send_text(ChatId(chat), &out.text).await
    }

    async fn send_text(&self, chat: ChatId, text: &str) -> Result<(), ChannelError> {
        for part in split_escaped(text, MAX_MESSAGE_CHARS) {
            let mut failures = 0u32;
            loop {
                let res = self
                    .bot
                    .send_message(chat, part.clone())
                    .parse_mode(ParseMode::Html)
                    .await;
                match res {
                    Ok(_) => break,
                    Err(e) if retryable(&e) && failures + 1 < SEND_ATTEMPTS => {
                        failures += 1;
                        let wait = retry_delay(&e, self.backoff, failures);
                        tracing::warn!(error = %e, ?wait, "telegram: sendMessage failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        return Err(ChannelError::Platform {
                            channel: TELEGRAM,
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    async fn send_logged(&self, chat: ChatId, text: &str) {
        if let Err(e) = self.send_text(chat, text).await {
            tracing::warn!(error = %e, "telegram: reply dropped");
        }
    }
}

/// The command name of `/cmd` or `/cmd@bot ...`, if `text` is a command.
fn command(text: &str) -> Option<&str> {
    let first = text.strip_prefix('/')?.split_whitespace().next()?;
    Some(first.split('@').next().unwrap_or(first))
}

async fn keep_typing(bot: Bot, chat: ChatId, stop: CancellationToken) {
    loop {
        if let Err(e) = bot.send_chat_action(chat, ChatAction::Typing).await {
            tracing::debug!(error = %e, "telegram: typing indicator failed");
        }
        if !sleep_or_cancel(TYPING_EVERY, &stop).await {
            return;
        }
    }
}

/// Sleeps `wait`; false if `cancel` fired first.
async fn sleep_or_cancel(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Whether retrying `e` can help: rate limits, network and server trouble.
fn retryable(e: &RequestError) -> bool {
    match e {
        RequestError::RetryAfter(_)
        | RequestError::Network(_)
        | RequestError::Io(_)
        | RequestError::InvalidJson { .. } => true,
        RequestError::Api(api) => matches!(api, teloxide::ApiError::Unknown(_)),
        RequestError::MigrateToChatId(_) => false,
    }
}

/// The wait before retry number `failures`: Telegram's `retry_after` when
/// given, else exponential backoff from `base`, capped.
fn retry_delay(e: &RequestError, base: Duration, failures: u32) -> Duration {
    if let RequestError::RetryAfter(secs) = e {
        return Duration::from_secs(secs.seconds().into());
    }
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_recognised_with_or_without_the_bot_name() {
        assert_eq!(command("/new"), Some("new"));
        assert_eq!(command("/status@pista_bot now"), Some("status"));
        assert_eq!(command("hello /new"), None);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let e = RequestError::Io(Arc::new(std::io::Error::other("x")));
        let base = Duration::from_millis(100);
        assert_eq!(retry_delay(&e, base, 1), base);
        assert_eq!(retry_delay(&e, base, 3), base * 4);
        assert_eq!(retry_delay(&e, base, 40), MAX_BACKOFF);
    }
}
