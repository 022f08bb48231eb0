//! The Telegram adapter: long polling with teloxide's Bot API client (never
//! its `Dispatcher`, whose `dispatch` panics when the first `getMe` fails).
//!
//! Deny by default: only `allowed_users` and users the owner paired reach the
//! handler. An unknown user gets one short refusal with their id and a
//! pairing code (stored with an expiry in the [`Store`]; the owner approves
//! it with `openpista telegram pair CODE`, also while the daemon runs), and
//! nothing else happens: no model call. Private chats only, unless `groups`
//! is on (then sessions are keyed per chat and user).
//!
//! While a turn runs the chat shows a typing indicator, and once the turn
//! has run for `draft_interval` the reply so far appears as a draft message
//! that is edited at most once per `draft_interval`. The final text replaces
//! the draft and, if longer than 4,096 characters, continues in further
//! messages, split on line or word boundaries and sent in order. Text is
//! HTML-escaped. Bot API errors (429 with `retry_after`, 5xx, network) are
//! retried with backoff; the polling loop never ends because of them.
//! Updates the adapter does not handle (edited messages, button presses,
//! channel posts, ...) are answered or ignored with a log line.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use openpista_memory::Store;
use rand::Rng as _;
use secrecy::{ExposeSecret as _, SecretString};
use teloxide::RequestError;
use teloxide::prelude::*;
use teloxide::types::{ChatAction, MessageId, ParseMode, UpdateKind};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::text::split_escaped;
use crate::{
    APPROVAL_REFUSED, ApprovalChoice, ApprovalPrompt, ChannelAdapter, ChannelError, Draft, Inbound,
    InboundHandler, InboundKind, Outbound,
};

/// The channel's name.
pub const TELEGRAM: &str = "telegram";
/// The official Bot API.
pub const DEFAULT_API_URL: &str = "https://api.telegram.org/";
/// Longest Telegram message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4096;
/// Longest inbound text passed on (Telegram itself caps messages at 4,096).
pub const MAX_INBOUND_CHARS: usize = 16_384;
/// Longest long-polling timeout accepted.
pub const MAX_POLL_TIMEOUT_SECS: u32 = 50;
/// Attempts per outgoing request before giving up on it.
const SEND_ATTEMPTS: u32 = 6;
/// Longest backoff between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the typing indicator is renewed (Telegram shows it for ~5 s).
const TYPING_EVERY: Duration = Duration::from_secs(4);

/// Reply to a message that is not text.
pub const NOT_SUPPORTED: &str = "Sorry, only text messages are supported yet.";
/// Reply to `/start`.
pub const HELLO: &str = "Hi! I'm your openpista agent. Send me a message. Commands: /new starts a fresh session, /cancel stops the running turn, /status shows the gateway's state.";
/// Reply to a text longer than [`MAX_INBOUND_CHARS`].
pub const TOO_LONG: &str = "Sorry, that message is too long.";
/// Reply to a command the adapter does not know.
pub const UNKNOWN_COMMAND: &str = "Unknown command. Try /start, /new, /cancel or /status.";
/// Answer to a button press the adapter does not know.
pub const UNKNOWN_BUTTON: &str = "This button is not active.";
/// The approval buttons' labels; their callback data is `ap:<y|n|a>:<id>`.
pub const APPROVAL_BUTTONS: [(&str, &str); 3] = [("Approve", "y"), ("Deny", "n"), ("Always", "a")];

/// The adapter's settings. The token is a [`SecretString`]: never printed.
#[derive(Clone, Debug)]
pub struct TelegramConfig {
    /// The bot token.
    pub token: SecretString,
    /// The Bot API base URL; `None` means [`DEFAULT_API_URL`].
    pub api_url: Option<String>,
    /// Numeric Telegram user ids allowed to talk to the agent (besides
    /// the users paired in the store).
    pub allowed_users: Vec<u64>,
    /// Answer in groups too (sessions keyed per chat and user).
    pub groups: bool,
    /// Long-polling timeout of `getUpdates`, in seconds.
    pub poll_timeout_secs: u32,
    /// How long a turn runs before its draft appears, and the least time
    /// between two edits of it.
    pub draft_interval: Duration,
    /// How long a pairing code stays valid.
    pub pairing_ttl: Duration,
    /// First retry delay; doubles per failure up to 30 s.
    pub backoff: Duration,
}

impl TelegramConfig {
    /// The defaults for `token`.
    pub fn new(token: SecretString) -> Self {
        Self {
            token,
            api_url: None,
            allowed_users: Vec::new(),
            groups: false,
            poll_timeout_secs: 10,
            draft_interval: Duration::from_secs(1),
            pairing_ttl: Duration::from_secs(3600),
            backoff: Duration::from_secs(1),
        }
    }
}

/// The Telegram adapter. Cheap to clone.
#[derive(Clone)]
pub struct TelegramAdapter {
    inner: Arc<Inner>,
}

struct Inner {
    bot: Bot,
    store: Store,
    allowed: HashSet<u64>,
    groups: bool,
    poll_timeout_secs: u32,
    draft_interval: Duration,
    pairing_ttl: Duration,
    backoff: Duration,
}

impl std::fmt::Debug for TelegramAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramAdapter")
            .field("allowed", &self.inner.allowed)
            .field("groups", &self.inner.groups)
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
    /// An adapter for `cfg` that keeps pairings in `store`; fails on an
    /// unparsable API URL or an out-of-range setting.
    pub fn new(cfg: &TelegramConfig, store: Store) -> Result<Self, ChannelError> {
        let raw = cfg.api_url.as_deref().unwrap_or(DEFAULT_API_URL);
        let url = url::Url::parse(raw).map_err(|_| ChannelError::InvalidApiUrl(raw.to_owned()))?;
        if cfg.poll_timeout_secs > MAX_POLL_TIMEOUT_SECS {
            return Err(ChannelError::InvalidSetting(format!(
                "poll_timeout_secs must be at most {MAX_POLL_TIMEOUT_SECS}"
            )));
        }
        // The HTTP timeout must outlast a long poll.
        let client = teloxide::net::default_reqwest_settings()
            .timeout(Duration::from_secs(u64::from(cfg.poll_timeout_secs) + 10))
            .build()
            .map_err(|e| ChannelError::InvalidSetting(format!("HTTP client: {e}")))?;
        let bot = Bot::with_client(cfg.token.expose_secret(), client).set_api_url(url);
        Ok(Self {
            inner: Arc::new(Inner {
                bot,
                store,
                allowed: cfg.allowed_users.iter().copied().collect(),
                groups: cfg.groups,
                poll_timeout_secs: cfg.poll_timeout_secs,
                draft_interval: cfg.draft_interval,
                pairing_ttl: cfg.pairing_ttl,
                backoff: cfg.backoff,
            }),
        })
    }

    /// Whether `user` may talk to the agent: configured or paired. A store
    /// failure counts as no (deny by default) and is logged.
    async fn is_allowed(&self, user: u64) -> bool {
        if self.inner.allowed.contains(&user) {
            return true;
        }
        match self
            .inner
            .store
            .is_paired(TELEGRAM, &user.to_string())
            .await
        {
            Ok(paired) => paired,
            Err(e) => {
                tracing::warn!(error = %e, user, "telegram: cannot read pairings; refusing");
                false
            }
        }
    }

    /// Tells an unknown user their id and pairing code, once per code.
    async fn refuse(&self, user: u64, chat: ChatId) {
        let code = format!("{:06}", rand::rng().random_range(0..1_000_000u32));
        let res = self
            .inner
            .store
            .request_pairing(
                TELEGRAM,
                &user.to_string(),
                &chat.0.to_string(),
                &code,
                self.inner.pairing_ttl,
            )
            .await;
        match res {
            Ok((pending, true)) => {
                tracing::info!(
                    user,
                    "telegram: refused an unknown user; pairing code issued"
                );
                let text = format!(
                    "Sorry, I only talk to people my owner has approved. Your Telegram id is {user}; pairing code {code}. The owner can approve you with: openpista telegram pair {code}",
                    code = pending.code
                );
                self.replier().send_logged(chat, &text).await;
            }
            Ok((_, false)) => {
                tracing::debug!(
                    user,
                    "telegram: unknown user again; already told their code"
                );
            }
            Err(e) => tracing::warn!(error = %e, user, "telegram: cannot store a pairing code"),
        }
    }

    async fn handle_message(&self, msg: Message, handler: Arc<dyn InboundHandler>) {
        let Some(user) = msg.from.as_ref().map(|u| u.id.0) else {
            tracing::info!(
                chat = msg.chat.id.0,
                "telegram: ignored a message without a sender"
            );
            return;
        };
        let chat = msg.chat.id;
        let session_key = if msg.chat.is_private() {
            chat.0.to_string()
        } else if (msg.chat.is_group() || msg.chat.is_supergroup()) && self.inner.groups {
            format!("{}-{user}", chat.0)
        } else {
            tracing::info!(
                chat = chat.0,
                user,
                "telegram: ignored a message from a group or channel (groups are off)"
            );
            return;
        };
        if !self.is_allowed(user).await {
            self.refuse(user, chat).await;
            return;
        }
        let replier = self.replier();
        let Some(text) = msg.text() else {
            replier.send_logged(chat, NOT_SUPPORTED).await;
            return;
        };
        if text.chars().count() > MAX_INBOUND_CHARS {
            tracing::info!(user, "telegram: refused an oversized message");
            replier.send_logged(chat, TOO_LONG).await;
            return;
        }
        let kind = match command(text) {
            Some("start") | Some("help") => {
                replier.send_logged(chat, HELLO).await;
                return;
            }
            Some("new") => InboundKind::NewSession,
            Some("cancel") => InboundKind::Cancel,
            Some("status") => InboundKind::Status,
            Some(_) => {
                replier.send_logged(chat, UNKNOWN_COMMAND).await;
                return;
            }
            None => InboundKind::Text(text.to_owned()),
        };
        let inbound = Inbound {
            channel: TELEGRAM.to_owned(),
            conversation: chat.0.to_string(),
            session_key,
            user: user.to_string(),
            kind,
        };
        if !matches!(inbound.kind, InboundKind::Text(_)) {
            let answer = handler.handle(inbound, Draft::none()).await;
            replier.send_logged(chat, &answer).await;
            return;
        }
        let stop = CancellationToken::new();
        tokio::spawn(keep_typing(self.inner.bot.clone(), chat, stop.clone()));
        let (tx, rx) = watch::channel(String::new());
        let drafting = tokio::spawn(run_draft(
            replier.clone(),
            chat,
            rx,
            self.inner.draft_interval,
            stop.clone(),
        ));
        // Approval requests of this turn, shown with buttons as they come.
        let (prompts, asked) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(show_prompts(replier.clone(), chat, asked));
        let answer = {
            let _stop = stop.clone().drop_guard();
            handler.handle(inbound, Draft::new(tx, Some(prompts))).await
        };
        let shown = drafting.await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "telegram: the draft task failed");
            None
        });
        replier.finish(chat, shown, &answer).await;
    }

    /// A pressed approval button: only an allowed user's press reaches the
    /// handler, which checks that this user and chat own the request. The
    /// press is answered with the outcome; an accepted one removes the
    /// buttons.
    async fn handle_button(
        &self,
        q: teloxide::types::CallbackQuery,
        choice: ApprovalChoice,
        id: String,
        handler: Arc<dyn InboundHandler>,
    ) {
        let user = q.from.id.0;
        let target = q.message.as_ref().map(|m| (m.chat().clone(), m.id()));
        let answer = match &target {
            Some((chat, _)) if self.is_allowed(user).await => {
                let session_key = if chat.is_private() {
                    chat.id.0.to_string()
                } else {
                    format!("{}-{user}", chat.id.0)
                };
                let inbound = Inbound {
                    channel: TELEGRAM.to_owned(),
                    conversation: chat.id.0.to_string(),
                    session_key,
                    user: user.to_string(),
                    kind: InboundKind::Approval { id, choice },
                };
                handler.handle(inbound, Draft::none()).await
            }
            _ => APPROVAL_REFUSED.to_owned(),
        };
        tracing::info!(
            user,
            accepted = answer != APPROVAL_REFUSED,
            "telegram: approval button"
        );
        if let Err(e) = self
            .inner
            .bot
            .answer_callback_query(q.id.clone())
            .text(answer.clone())
            .await
        {
            tracing::debug!(error = %e, "telegram: answerCallbackQuery failed");
        }
        if answer != APPROVAL_REFUSED
            && let Some((chat, message)) = target
            && let Err(e) = self
                .inner
                .bot
                .edit_message_reply_markup(chat.id, message)
                .await
        {
            tracing::debug!(error = %e, "telegram: removing the approval buttons failed");
        }
    }

    /// Answers (or ignores) an update that is not a new message.
    async fn handle_other(&self, kind: UpdateKind, handler: Arc<dyn InboundHandler>) {
        match kind {
            UpdateKind::CallbackQuery(q) if q.data.as_deref().and_then(parse_button).is_some() => {
                if let Some((choice, id)) = q.data.as_deref().and_then(parse_button) {
                    self.handle_button(q, choice, id, handler).await;
                }
            }
            UpdateKind::EditedMessage(m) => tracing::info!(
                chat = m.chat.id.0,
                "telegram: ignored an edited message (send a new one instead)"
            ),
            UpdateKind::CallbackQuery(q) => {
                tracing::info!(
                    user = q.from.id.0,
                    data = ?q.data.as_deref().map(|d| d.chars().take(64).collect::<String>()),
                    "telegram: answered an unknown button press"
                );
                let res = self
                    .inner
                    .bot
                    .answer_callback_query(q.id)
                    .text(UNKNOWN_BUTTON)
                    .await;
                if let Err(e) = res {
                    tracing::debug!(error = %e, "telegram: answerCallbackQuery failed");
                }
            }
            UpdateKind::Error(raw) => tracing::info!(
                update = %raw.to_string().chars().take(200).collect::<String>(),
                "telegram: ignored an update teloxide could not parse"
            ),
            other => tracing::info!(
                kind = ?std::mem::discriminant(&other),
                "telegram: ignored an update of an unhandled kind"
            ),
        }
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
                    failures = failures.saturating_add(1);
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
        let mut order = ChatOrder::default();
        if self.wait_for_bot(&shutdown).await {
            let mut offset = 0i32;
            let mut failures = 0u32;
            loop {
                let poll = self
                    .inner
                    .bot
                    .get_updates()
                    .offset(offset)
                    .timeout(self.inner.poll_timeout_secs);
                let res = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = poll => r,
                };
                match res {
                    Ok(updates) => {
                        failures = 0;
                        for update in updates {
                            offset = update.id.as_offset();
                            let this = self.clone();
                            match update.kind {
                                UpdateKind::Message(msg) => {
                                    let after = order.next(&msg);
                                    let handler = handler.clone();
                                    tracker.spawn(async move {
                                        let (_done, previous) = after;
                                        if let Some(previous) = previous {
                                            // Closed when the previous message of this
                                            // chat is handled: turns start in order.
                                            let _ = previous.await;
                                        }
                                        this.handle_message_owned(msg, handler).await;
                                    });
                                }
                                other => {
                                    let handler = handler.clone();
                                    tracker.spawn(async move {
                                        this.handle_other(other, handler).await
                                    });
                                }
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
            self.send_part(chat, part).await?;
        }
        Ok(())
    }

    async fn send_part(&self, chat: ChatId, part: String) -> Result<MessageId, ChannelError> {
        let msg = self
            .retrying("sendMessage", || {
                self.bot
                    .send_message(chat, part.clone())
                    .parse_mode(ParseMode::Html)
                    .into_future()
            })
            .await?;
        Ok(msg.id)
    }

    async fn send_logged(&self, chat: ChatId, text: &str) {
        if let Err(e) = self.send_text(chat, text).await {
            tracing::warn!(error = %e, "telegram: reply dropped");
        }
    }

    /// Delivers the final `text`: into the draft (if one was shown), then
    /// the rest as new messages, in order.
    async fn finish(&self, chat: ChatId, draft: Option<(MessageId, String)>, text: &str) {
        let mut parts = split_escaped(text, MAX_MESSAGE_CHARS).into_iter();
        if let Some((id, shown)) = draft {
            let Some(first) = parts.next() else {
                return;
            };
            if first != shown {
                let res = self
                    .retrying("editMessageText", || {
                        self.bot
                            .edit_message_text(chat, id, first.clone())
                            .parse_mode(ParseMode::Html)
                            .into_future()
                    })
                    .await;
                if let Err(e) = res {
                    tracing::warn!(error = %e, "telegram: cannot edit the draft; sending anew");
                    if let Err(e) = self.send_part(chat, first).await {
                        tracing::warn!(error = %e, "telegram: reply dropped");
                        return;
                    }
                }
            }
        }
        for part in parts {
            if let Err(e) = self.send_part(chat, part).await {
                tracing::warn!(error = %e, "telegram: reply dropped");
                return;
            }
        }
    }

    /// Runs `request` until it succeeds, fails for good, or
    /// [`SEND_ATTEMPTS`] are used up, waiting out 429s and backing off.
    async fn retrying<T, F, Fut>(&self, what: &str, mut request: F) -> Result<T, ChannelError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RequestError>>,
    {
        let mut failures = 0u32;
        loop {
            match request().await {
                Ok(v) => return Ok(v),
                Err(e) if retryable(&e) && failures + 1 < SEND_ATTEMPTS => {
                    failures += 1;
                    let wait = retry_delay(&e, self.backoff, failures);
                    tracing::warn!(error = %e, ?wait, "telegram: {what} failed; retrying");
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
}

/// Sends each approval request of a turn as a message with Approve / Deny /
/// Always buttons (plain text: nothing to escape).
async fn show_prompts(
    replier: TelegramReplier,
    chat: ChatId,
    mut prompts: tokio::sync::mpsc::UnboundedReceiver<ApprovalPrompt>,
) {
    use teloxide::types::{InlineKeyboardButton, InlineKeyboardMarkup};
    while let Some(prompt) = prompts.recv().await {
        let buttons = APPROVAL_BUTTONS.map(|(label, code)| {
            InlineKeyboardButton::callback(label, format!("ap:{code}:{}", prompt.id))
        });
        let text: String = prompt.text.chars().take(MAX_MESSAGE_CHARS).collect();
        let res = replier
            .bot
            .send_message(chat, text)
            .reply_markup(InlineKeyboardMarkup::new([buttons]))
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "telegram: cannot show an approval request; it will time out");
        }
    }
}

/// The choice and approval id of an approval button's data.
fn parse_button(data: &str) -> Option<(ApprovalChoice, String)> {
    let rest = data.strip_prefix("ap:")?;
    let (code, id) = rest.split_once(':')?;
    let choice = match code {
        "y" => ApprovalChoice::Approve,
        "n" => ApprovalChoice::Deny,
        "a" => ApprovalChoice::Always,
        _ => return None,
    };
    let valid = id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    valid.then(|| (choice, id.to_owned()))
}

/// Shows the reply so far as a draft message: first once the turn has run
/// for `interval`, then edited at most once per `interval`, until `stop`.
/// Returns the draft's id and the (escaped) text it shows. Draft updates are
/// best effort: a failed one is skipped, not retried.
async fn run_draft(
    replier: TelegramReplier,
    chat: ChatId,
    mut text: watch::Receiver<String>,
    interval: Duration,
    stop: CancellationToken,
) -> Option<(MessageId, String)> {
    let mut shown: Option<(MessageId, String)> = None;
    let mut next_at = Instant::now() + interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = text.changed() => if changed.is_err() { break },
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next_at) => {}
        }
        let so_far = text.borrow_and_update().clone();
        let Some(preview) = split_escaped(&so_far, MAX_MESSAGE_CHARS).into_iter().next() else {
            continue;
        };
        let res = match &shown {
            None => replier
                .bot
                .send_message(chat, preview.clone())
                .parse_mode(ParseMode::Html)
                .await
                .map(|m| Some(m.id)),
            Some((_, prev)) if *prev == preview => Ok(None),
            Some((id, _)) => replier
                .bot
                .edit_message_text(chat, *id, preview.clone())
                .parse_mode(ParseMode::Html)
                .await
                .map(|m| Some(m.id)),
        };
        next_at = Instant::now() + interval;
        match res {
            Ok(Some(id)) => shown = Some((id, preview)),
            Ok(None) => {}
            Err(e) => {
                if let RequestError::RetryAfter(secs) = &e {
                    next_at = Instant::now() + Duration::from_secs(secs.seconds().into());
                }
                tracing::debug!(error = %e, "telegram: draft update skipped");
            }
        }
    }
    shown
}

/// The command name of `/cmd` or `/cmd@bot ...`, if `text` is a command.
/// Keeps each chat's messages in arrival order: a message's task waits until
/// the previous message of its chat was handled. `/cancel` and `/status` do
/// not wait, so they reach a running turn.
#[derive(Default)]
struct ChatOrder {
    /// Per chat, closed once its latest message is handled.
    last: std::collections::HashMap<i64, tokio::sync::oneshot::Receiver<()>>,
}

/// Held while a message is handled (dropping it releases the next one), and
/// what to wait for before starting.
type Turn = (
    Option<tokio::sync::oneshot::Sender<()>>,
    Option<tokio::sync::oneshot::Receiver<()>>,
);

impl ChatOrder {
    fn next(&mut self, msg: &Message) -> Turn {
        let immediate = msg
            .text()
            .and_then(command)
            .is_some_and(|c| c == "cancel" || c == "status");
        if immediate {
            return (None, None);
        }
        if self.last.len() > 1024 {
            // Forget chats whose messages are all handled.
            self.last.retain(|_, rx| {
                matches!(
                    rx.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                )
            });
        }
        let (done, next) = tokio::sync::oneshot::channel();
        let previous = self.last.insert(msg.chat.id.0, next);
        (Some(done), previous)
    }
}

fn command(text: &str) -> Option<&str> {
    let first = text.strip_prefix('/')?.split_whitespace().next()?;
    Some(first.split('@').next().unwrap_or(first))
}

async fn keep_typing(bot: Bot, chat: ChatId, stop: CancellationToken) {
    loop {
        let res = tokio::select! {
            _ = stop.cancelled() => return,
            r = bot.send_chat_action(chat, ChatAction::Typing) => r,
        };
        if let Err(e) = res {
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
        assert_eq!(command("/"), None);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let e = RequestError::Io(Arc::new(std::io::Error::other("x")));
        let base = Duration::from_millis(100);
        assert_eq!(retry_delay(&e, base, 1), base);
        assert_eq!(retry_delay(&e, base, 3), base * 4);
        assert_eq!(retry_delay(&e, base, 40), MAX_BACKOFF);
    }

    #[test]
    fn the_token_is_never_printed() {
        let cfg = TelegramConfig::new(SecretString::from("123:very-secret"));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }
}
