//! The ReAct loop: an [`AgentSession`] turns one user message into a reply by
//! alternating model calls and tool calls until the model answers in text.
//!
//! A turn: store the user message (acknowledged as `Accepted`), build the
//! prompt (system prompt + skill context + the recent history trimmed to the
//! model's window, never separating a tool call from its result), call the
//! model, run the tools it asked for (several per round), feed their results
//! back, and repeat up to `max_tool_rounds`. Every message and tool invocation
//! is persisted.
//!
//! Each turn start and end and each tool call is also appended to the store's
//! tamper-evident audit trail (actor `agent`; actions `turn_started`,
//! `tool_call`, `turn_finished`). Tool-call rows hold a SHA-256 of the
//! arguments, never the arguments themselves, so a secret a model pastes into
//! a call does not land in the audit trail; neither does message text. Turns of one session run one at a time; a running turn can be
//! cancelled.
//!
//! This crate does not know about channels, QUIC or the CLI.

pub mod approval;
mod context;
pub mod quota;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures::StreamExt;
use openpista_llm::{
    Assembler, ChatRequest, LlmError, LlmEvent, LlmProvider, Sampling, ToolChoice,
};
use openpista_memory::{
    Appended, AuditEntry, AuditFn, HistoryVersion, MemoryError, Store, ToolInvocation, sha256_hex,
};
use openpista_proto::wire::Decision;
use openpista_proto::{
    AgentEvent, ChatMessage, ErrorCode, MessageId, SessionId, ToolDefinition, ToolOutcome, Usage,
};
use openpista_tools::{ToolContext, ToolRegistry};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use approval::{
    ApprovalBroker, ApprovalConfig, ApprovalPolicy, ApprovalRefusal, Approvals, Origin,
};
pub use context::{fit_to_window, repair_history};
pub use quota::{QuotaConfig, QuotaExceeded};

/// The default system prompt.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are openpista, a helpful assistant running on the user's own machine. \
Answer briefly and accurately. Use a tool only when the question needs one.";

/// `[agent]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Most model->tools rounds in one turn before it stops.
    pub max_tool_rounds: u32,
    /// Most stored messages loaded as history for a turn.
    pub history_limit: u32,
    /// The system prompt (skill context is appended to it).
    pub system_prompt: String,
    /// Tokens kept free in the context window for the reply.
    pub reply_reserve_tokens: u32,
    /// Context window assumed when the provider does not know its own.
    pub default_context_window: u32,
    /// Per-session quotas (the config file's top-level `[quotas]`).
    #[serde(skip)]
    pub quotas: QuotaConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            max_tool_rounds: 10,
            history_limit: 50,
            system_prompt: DEFAULT_SYSTEM_PROMPT.to_owned(),
            reply_reserve_tokens: 512,
            default_context_window: 8192,
            quotas: QuotaConfig::default(),
        }
    }
}

/// Errors that end a turn.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Storage failed; the message may not be persisted. Retrying may help if the database was busy.
    #[error(transparent)]
    Storage(#[from] MemoryError),
    /// The model provider failed (after its own retries).
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The turn was cancelled. Its messages so far are stored.
    #[error("the turn was cancelled")]
    Cancelled,
    /// The model kept calling tools past the limit. Raise `max_tool_rounds` or rephrase.
    #[error("stopped after {0} tool rounds without a final answer")]
    MaxRounds(u32),
    /// The session does not exist.
    #[error("no session {0}")]
    NotFound(SessionId),
    /// Even the newest message does not fit the model's context window.
    #[error(
        "the message does not fit the model's context window ({needed} tokens needed, {window} available)"
    )]
    ContextOverflow { needed: usize, window: usize },
    /// A `[quotas]` limit was reached (see the message for which and when it resets).
    #[error("quota exceeded: {0}")]
    Quota(#[from] QuotaExceeded),
    /// The session is suspended; an operator lifts it with `openpista sessions resume`.
    #[error(
        "this session is suspended ({reason}); the operator can resume it with `openpista sessions resume <id>`"
    )]
    Suspended { reason: String },
}

impl AgentError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::Storage(_) => ErrorCode::StorageError,
            AgentError::Llm(_) => ErrorCode::LlmError,
            AgentError::Cancelled => ErrorCode::Cancelled,
            AgentError::MaxRounds(_) => ErrorCode::MaxRounds,
            AgentError::NotFound(_) => ErrorCode::NotFound,
            AgentError::ContextOverflow { .. } => ErrorCode::LimitExceeded,
            AgentError::Quota(_) => ErrorCode::LimitExceeded,
            AgentError::Suspended { .. } => ErrorCode::SessionSuspended,
        }
    }
}

/// What a finished turn produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    pub session_id: SessionId,
    pub user_message_id: MessageId,
    pub text: String,
    pub usage: Usage,
    /// Model calls made.
    pub llm_calls: u32,
    /// Tool calls run.
    pub tool_calls: u32,
}

struct Shared {
    llm: Arc<dyn LlmProvider>,
    tools: Arc<ToolRegistry>,
    store: Store,
    config: AgentConfig,
    workspace: PathBuf,
    skills_context: String,
    approvals: Approvals,
    broker: Arc<ApprovalBroker>,
    /// The tools' definitions, offered to the model in every round: built
    /// once (the registry does not change), shared by every request.
    tool_defs: Arc<[ToolDefinition]>,
    /// What those definitions cost in the model's tokens, counted once.
    tool_tokens: OnceLock<usize>,
}

/// Builds and caches sessions. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
    live: Arc<Mutex<HashMap<SessionId, Arc<AgentSession>>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("llm", &self.shared.llm.name())
            .field("tools", &self.shared.tools)
            .finish()
    }
}

/// Everything an [`Agent`] needs.
pub struct AgentParts {
    pub llm: Arc<dyn LlmProvider>,
    pub tools: Arc<ToolRegistry>,
    pub store: Store,
    pub config: AgentConfig,
    /// The directory tools are confined to.
    pub workspace: PathBuf,
    /// Skill names and descriptions for the system prompt (already budgeted).
    pub skills_context: String,
}

impl Agent {
    /// An agent that runs every tool call without asking (see
    /// [`Agent::with_approvals`]).
    pub fn new(parts: AgentParts) -> Self {
        Self::with_approvals(parts, Approvals::allow_all())
    }

    /// An agent applying the operator's approval rules.
    pub fn with_approvals(parts: AgentParts, approvals: Approvals) -> Self {
        let broker = Arc::new(ApprovalBroker::new(parts.store.clone()));
        Self {
            shared: Arc::new(Shared {
                approvals,
                broker,
                tool_defs: parts.tools.definitions().into(),
                tool_tokens: OnceLock::new(),
                llm: parts.llm,
                tools: parts.tools,
                store: parts.store,
                config: parts.config,
                workspace: parts.workspace,
                skills_context: parts.skills_context,
            }),
            live: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The store sessions persist to.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Where approval decisions are routed to the turns that wait for them.
    pub fn approvals(&self) -> &Arc<ApprovalBroker> {
        &self.shared.broker
    }

    /// Whether a turn of session `id` waits for a human to approve a tool
    /// call (`waiting-approval` in `sessions list`).
    pub fn is_waiting_approval(&self, id: &SessionId) -> bool {
        self.shared.broker.is_waiting(id)
    }

    /// The tools sessions may call.
    pub fn tools(&self) -> &Arc<ToolRegistry> {
        &self.shared.tools
    }

    /// Starts a new session on `channel`.
    pub async fn create_session(&self, channel: &str) -> Result<Arc<AgentSession>, AgentError> {
        let id = SessionId::generate();
        self.shared.store.create_session(&id, channel, None).await?;
        Ok(self.attach(id))
    }

    /// Opens an existing session; `NotFound` if it does not exist.
    pub async fn open_session(&self, id: &SessionId) -> Result<Arc<AgentSession>, AgentError> {
        // A live session exists (sessions are not deleted under a running
        // agent), so the store is asked only for the first use of an id.
        if let Some(live) = self.live.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(live.clone());
        }
        if self.shared.store.get_session(id).await?.is_none() {
            return Err(AgentError::NotFound(id.clone()));
        }
        Ok(self.attach(id.clone()))
    }

    /// Opens `id`, creating it on `channel` if it does not exist (channels with
    /// stable ids, e.g. one per chat).
    pub async fn session_for(
        &self,
        id: &SessionId,
        channel: &str,
    ) -> Result<Arc<AgentSession>, AgentError> {
        self.shared.store.ensure_session(id, channel).await?;
        Ok(self.attach(id.clone()))
    }

    /// The live session object for `id`: one per id, so that turns serialize.
    fn attach(&self, id: SessionId) -> Arc<AgentSession> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.entry(id.clone())
            .or_insert_with(|| {
                Arc::new(AgentSession {
                    id,
                    shared: self.shared.clone(),
                    turn_lock: tokio::sync::Mutex::new(()),
                    running: Mutex::new(None),
                    titled: AtomicBool::new(false),
                    history: Mutex::new(None),
                    quota: quota::SessionQuota::default(),
                    always: approval::AlwaysSet::default(),
                    origin: Mutex::new(Origin::channel("local")),
                })
            })
            .clone()
    }
}

/// What the approval gate decided for one call.
enum Gate {
    /// Run it; `approved` when a human approved this exact call.
    Run { approved: bool },
    /// Do not run it; this is its result.
    Refused(openpista_tools::ToolResult),
}

/// Which of a turn's audit rows are written.
#[derive(Debug, Default)]
struct TurnAudit {
    started: bool,
    finished: bool,
}

/// The detail of a `turn_finished` audit row.
fn turn_finished_detail(
    outcome: &str,
    llm_calls: Option<u32>,
    tool_calls: Option<u32>,
) -> serde_json::Value {
    serde_json::json!({
        "outcome": outcome,
        "llm_calls": llm_calls,
        "tool_calls": tool_calls,
    })
}

/// A session's recent history kept in memory, so that a turn does not read
/// back what this process just wrote. `version` is the store's
/// [`HistoryVersion`] these messages are; an append that returns any other
/// version than the expected one drops the copy (see [`AgentSession::append`]).
#[derive(Debug)]
struct CachedHistory {
    version: HistoryVersion,
    messages: VecDeque<ChatMessage>,
}

/// One conversation. Turns run one at a time.
pub struct AgentSession {
    id: SessionId,
    shared: Arc<Shared>,
    turn_lock: tokio::sync::Mutex<()>,
    running: Mutex<Option<CancellationToken>>,
    /// Whether this process already made sure the session has a title.
    titled: AtomicBool,
    /// The newest `history_limit` messages, as this process last read or
    /// appended them; `None` until read, or once someone else wrote.
    history: Mutex<Option<CachedHistory>>,
    /// Tool-call and failure windows for `[quotas]`.
    quota: quota::SessionQuota,
    /// Calls approved with `always` in this session.
    always: approval::AlwaysSet,
    /// Who the running turn came from (who may approve its calls).
    origin: Mutex<Origin>,
}

impl std::fmt::Debug for AgentSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSession")
            .field("id", &self.id)
            .finish()
    }
}

impl AgentSession {
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Cancels the running turn, if any. Returns whether one was running.
    pub fn cancel(&self) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.as_ref() {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether the running turn waits for a human to approve a tool call.
    pub fn is_waiting_approval(&self) -> bool {
        self.shared.broker.is_waiting(&self.id)
    }

    /// Runs one turn for `text`. Events go to `events` (a closed receiver does
    /// not stop the turn: its results are still stored). `cancel` stops it.
    /// Approvals it asks for can be answered from the `local` channel only.
    ///
    /// The final `Final` or `Error` event is always sent.
    pub async fn run_turn(
        &self,
        text: &str,
        events: mpsc::Sender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<TurnOutcome, AgentError> {
        self.run_turn_from(text, events, cancel, Origin::channel("local"))
            .await
    }

    /// [`AgentSession::run_turn`] for a message from `origin`: only `origin`
    /// can answer the approvals this turn asks for.
    pub async fn run_turn_from(
        &self,
        text: &str,
        events: mpsc::Sender<AgentEvent>,
        cancel: CancellationToken,
        origin: Origin,
    ) -> Result<TurnOutcome, AgentError> {
        let _turn = self.turn_lock.lock().await;
        *self.origin.lock().unwrap_or_else(|p| p.into_inner()) = origin;
        let cancel = cancel.child_token();
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(cancel.clone());
        let mut audited = TurnAudit::default();
        let mut result = self.turn(text, &events, &cancel, &mut audited).await;
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if audited.started && !audited.finished {
            let (outcome, llm_calls, tool_calls) = match &result {
                Ok(o) => ("ok", Some(o.llm_calls), Some(o.tool_calls)),
                Err(e) => (e.code().as_str(), None, None),
            };
            let finished = self
                .audit(
                    "turn_finished",
                    turn_finished_detail(outcome, llm_calls, tool_calls),
                )
                .await;
            // A turn whose end cannot be audited is reported as failed.
            if let Err(e) = finished {
                tracing::error!(session = %self.id, error = %e, "cannot audit the end of a turn");
                if result.is_ok() {
                    result = Err(e.into());
                }
            }
        }
        let last = match &result {
            Ok(outcome) => AgentEvent::Final {
                text: outcome.text.clone(),
                usage: outcome.usage,
            },
            Err(e) => AgentEvent::Error {
                code: e.code(),
                message: e.to_string(),
            },
        };
        let _ = events.send(last).await;
        result
    }

    async fn turn(
        &self,
        text: &str,
        events: &mpsc::Sender<AgentEvent>,
        cancel: &CancellationToken,
        audited: &mut TurnAudit,
    ) -> Result<TurnOutcome, AgentError> {
        let sh = &self.shared;
        self.admit().await?;
        // The message and its `turn_started` audit row are one write.
        let session = self.id.clone();
        // A suspended session is refused by this same write (nothing stored).
        let started = self
            .append_checked(
                &[(&ChatMessage::user(text), None)],
                Some(Box::new(move |ids| AuditEntry {
                    session_id: Some(session),
                    actor: "agent".to_owned(),
                    action: "turn_started".to_owned(),
                    detail: serde_json::json!({ "user_message_id": ids.first().map(|m| m.0) }),
                })),
                true,
            )
            .await;
        let ids = match started {
            Ok(Appended { ids, .. }) => ids,
            Err(MemoryError::SessionSuspended { reason, .. }) => {
                return Err(self.refuse(AgentError::Suspended { reason }).await?);
            }
            Err(MemoryError::SessionNotFound(id)) => return Err(AgentError::NotFound(id)),
            Err(e) => return Err(e.into()),
        };
        let user_message_id = ids
            .first()
            .copied()
            .ok_or_else(|| MemoryError::SessionNotFound(self.id.clone()))?;
        audited.started = true;
        let _ = events
            .send(AgentEvent::Accepted {
                session_id: self.id.clone(),
                message_id: user_message_id,
            })
            .await;
        tracing::info!(session = %self.id, message = %user_message_id, "turn started");
        // A session is titled by its first message, for `sessions list`: one
        // conditional write per session and process.
        if !self.titled.load(Ordering::Relaxed) {
            let title: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let title: String = title.chars().take(60).collect();
            sh.store.set_title_if_unset(&self.id, &title).await?;
            self.titled.store(true, Ordering::Relaxed);
        }

        let mut usage = Usage::default();
        let mut tool_calls = 0u32;
        let tool_defs = &sh.tool_defs;
        let tool_tokens = *sh.tool_tokens.get_or_init(|| {
            tool_defs
                .iter()
                .map(|t| {
                    sh.llm.count_tokens(&t.parameters.to_string())
                        + sh.llm.count_tokens(&t.description)
                })
                .sum()
        });
        let system = self.system_prompt();
        let window = sh
            .llm
            .context_window()
            .unwrap_or(sh.config.default_context_window as usize);

        for round in 0..=sh.config.max_tool_rounds {
            if cancel.is_cancelled() {
                return Err(AgentError::Cancelled);
            }
            let history = repair_history(self.recent_history().await?);
            let budget = window
                .saturating_sub(sh.config.reply_reserve_tokens as usize)
                .saturating_sub(sh.llm.count_tokens(&system))
                .saturating_sub(tool_tokens);
            let history = fit_to_window(history, budget, |m| {
                sh.llm.count_tokens(&m.content)
                    + m.tool_calls
                        .iter()
                        .map(|c| sh.llm.count_tokens(&c.arguments) + 8)
                        .sum::<usize>()
                    + 4
            })
            .map_err(|needed| AgentError::ContextOverflow {
                needed,
                window: budget,
            })?;
            let mut messages = Vec::with_capacity(history.len() + 1);
            messages.push(ChatMessage::system(system.clone()));
            messages.extend(history);
            let last_round = round == sh.config.max_tool_rounds;
            let request = ChatRequest {
                messages,
                tools: tool_defs.clone(),
                tool_choice: if tool_defs.is_empty() {
                    ToolChoice::None
                } else {
                    ToolChoice::Auto
                },
                sampling: Sampling::default(),
            };

            let started = Instant::now();
            let llm_calls = round + 1;
            let completion = {
                let mut stream = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Err(AgentError::Cancelled),
                    s = sh.llm.stream(request) => s?,
                };
                let mut assembler = Assembler::default();
                let mut streamed = String::new();
                loop {
                    let next = tokio::select! {
                        biased;
                        () = cancel.cancelled() => None,
                        ev = stream.next() => Some(ev),
                    };
                    let Some(ev) = next else {
                        // Cancelled mid-generation: keep what was said.
                        drop(stream);
                        if !streamed.is_empty() {
                            let partial = ChatMessage::assistant(
                                format!("{streamed} [cancelled]"),
                                Vec::new(),
                            );
                            self.append(&[(&partial, None)], None).await?;
                        }
                        return Err(AgentError::Cancelled);
                    };
                    match ev {
                        None => break,
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(event)) => {
                            if let LlmEvent::TextDelta(t) = &event {
                                streamed.push_str(t);
                                let _ =
                                    events.send(AgentEvent::TextDelta { text: t.clone() }).await;
                            }
                            assembler.push(event);
                        }
                    }
                }
                assembler.finish()
            };
            usage.add(completion.usage);
            let day_tokens = self.charge(completion.usage).await?;
            tracing::debug!(
                round,
                ms = started.elapsed().as_millis() as u64,
                calls = completion.tool_calls.len(),
                "model replied"
            );

            if completion.tool_calls.is_empty() {
                // The reply and its `turn_finished` audit row are one write.
                let reply = ChatMessage::assistant(completion.text.clone(), Vec::new());
                let session = self.id.clone();
                self.append(
                    &[(&reply, Some(completion.usage))],
                    Some(Box::new(move |_| AuditEntry {
                        session_id: Some(session),
                        actor: "agent".to_owned(),
                        action: "turn_finished".to_owned(),
                        detail: turn_finished_detail("ok", Some(llm_calls), Some(tool_calls)),
                    })),
                )
                .await?;
                audited.finished = true;
                return Ok(TurnOutcome {
                    session_id: self.id.clone(),
                    user_message_id,
                    text: completion.text,
                    usage,
                    llm_calls,
                    tool_calls,
                });
            }
            if let Err(exceeded) = quota::check_tokens(
                &sh.config.quotas,
                usage.prompt_tokens + usage.completion_tokens,
                day_tokens,
            ) {
                // Keep the text the model produced, but run no more tools.
                let note = ChatMessage::assistant(
                    format!("{}[stopped: {exceeded}]", completion.text),
                    Vec::new(),
                );
                self.append(&[(&note, None)], None).await?;
                self.audit(
                    "quota_exceeded",
                    serde_json::json!({ "message": exceeded.to_string() }),
                )
                .await?;
                return Err(exceeded.into());
            }
            if last_round {
                // Keep the text the model produced, but run no more tools.
                let note = ChatMessage::assistant(
                    if completion.text.is_empty() {
                        format!(
                            "[stopped: the tool-round limit of {} was reached]",
                            sh.config.max_tool_rounds
                        )
                    } else {
                        completion.text.clone()
                    },
                    Vec::new(),
                );
                self.append(&[(&note, None)], None).await?;
                return Err(AgentError::MaxRounds(sh.config.max_tool_rounds));
            }

            // Run the calls of this round, then store the assistant message and
            // its results together.
            let assistant =
                ChatMessage::assistant(completion.text.clone(), completion.tool_calls.clone());
            let mut batch = vec![assistant];
            let mut invocations = Vec::new();
            let mut was_cancelled = false;
            // Set when a burst of failed calls suspends the session.
            let mut suspended_for: Option<String> = None;
            for call in &completion.tool_calls {
                tool_calls += 1;
                let _ = events
                    .send(AgentEvent::ToolStarted {
                        call_id: call.id.clone(),
                        name: call.name.clone(),
                        args: call.arguments.clone(),
                    })
                    .await;
                let started_at = chrono::Utc::now();
                let result = if let Some(reason) = &suspended_for {
                    openpista_tools::ToolResult::not_run(
                        ToolOutcome::Denied,
                        format!("error: not run: the session was suspended ({reason})"),
                    )
                } else if was_cancelled {
                    openpista_tools::ToolResult::not_run(
                        ToolOutcome::Cancelled,
                        "error: cancelled".to_owned(),
                    )
                } else if let Err(exceeded) =
                    self.quota.take_tool_call(&sh.config.quotas, Instant::now())
                {
                    self.audit(
                        "quota_exceeded",
                        serde_json::json!({ "tool": call.name, "message": exceeded.to_string() }),
                    )
                    .await?;
                    openpista_tools::ToolResult::not_run(
                        ToolOutcome::Denied,
                        format!("error: not run: {exceeded}"),
                    )
                } else if call.name.trim().is_empty() {
                    openpista_tools::ToolResult::not_run(
                        ToolOutcome::Error,
                        format!(
                            "error: the tool call was malformed or cut off (no tool name could be read); \
                             send one complete call. Available tools: {}",
                            tool_defs
                                .iter()
                                .map(|t| t.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                } else {
                    match self
                        .gate(&call.name, &call.arguments, events, cancel)
                        .await?
                    {
                        Gate::Refused(refused) => refused,
                        Gate::Run { approved } => {
                            let ctx = ToolContext {
                                workspace: sh.workspace.clone(),
                                cancel: cancel.clone(),
                                session_id: Some(self.id.clone()),
                                approved,
                            };
                            sh.tools.call(&call.name, &call.arguments, &ctx).await
                        }
                    }
                };
                if result.outcome == ToolOutcome::Cancelled {
                    was_cancelled = true;
                }
                if matches!(result.outcome, ToolOutcome::Error | ToolOutcome::Timeout)
                    && let Some(n) = self.quota.record_failure(&sh.config.quotas, Instant::now())
                {
                    suspended_for = Some(format!(
                        "{n} tool calls failed within {}s, [quotas] failure_burst",
                        sh.config.quotas.failure_window_secs
                    ));
                }
                tracing::info!(
                    tool = %call.name,
                    outcome = result.outcome.as_str(),
                    ms = result.duration.as_millis() as u64,
                    "tool call"
                );
                let _ = events
                    .send(AgentEvent::ToolFinished {
                        call_id: call.id.clone(),
                        name: call.name.clone(),
                        outcome: result.outcome,
                        duration_ms: result.duration.as_millis() as u64,
                        output: result.content.clone(),
                    })
                    .await;
                invocations.push(ToolInvocation {
                    session_id: self.id.clone(),
                    message_id: None,
                    call_id: call.id.clone(),
                    tool_name: call.name.clone(),
                    args: call.arguments.clone(),
                    result: result.content.clone(),
                    exit_code: result.exit_code,
                    duration_ms: result.duration.as_millis() as u64,
                    outcome: result.outcome,
                    created_at: started_at,
                });
                let mut message = ChatMessage::tool_result(&call.id, &call.name, result.content);
                message.images = result
                    .images
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                batch.push(message);
            }
            let Appended { ids, .. } = self
                .append(
                    &batch
                        .iter()
                        .enumerate()
                        .map(|(i, m)| (m, (i == 0).then_some(completion.usage)))
                        .collect::<Vec<_>>(),
                    None,
                )
                .await?;
            for mut inv in invocations {
                inv.message_id = ids.first().copied();
                sh.store.record_tool_invocation(&inv).await?;
                self.audit(
                    "tool_call",
                    serde_json::json!({
                        "tool": inv.tool_name,
                        "call_id": inv.call_id,
                        "outcome": inv.outcome.as_str(),
                        "exit_code": inv.exit_code,
                        "duration_ms": inv.duration_ms,
                        "args_sha256": sha256_hex(inv.args.as_bytes()),
                    }),
                )
                .await?;
            }
            if let Some(reason) = suspended_for {
                sh.store.suspend_session(&self.id, &reason).await?;
                self.audit(
                    "session_suspended",
                    serde_json::json!({ "reason": reason, "by": "quota" }),
                )
                .await?;
                tracing::warn!(session = %self.id, %reason, "session suspended");
                return Err(AgentError::Suspended { reason });
            }
            if was_cancelled || cancel.is_cancelled() {
                return Err(AgentError::Cancelled);
            }
        }
        Err(AgentError::MaxRounds(sh.config.max_tool_rounds))
    }

    /// Applies the approval policy to one call: `None` when it may run,
    /// otherwise the result fed back to the model (denied, or cancelled).
    async fn gate(
        &self,
        tool: &str,
        args: &str,
        events: &mpsc::Sender<AgentEvent>,
        cancel: &CancellationToken,
    ) -> Result<Gate, AgentError> {
        let sh = &self.shared;
        let refused = openpista_tools::ToolResult::not_run;
        let digest = approval::call_digest(tool, args);
        match sh.approvals.policy_for(tool, args) {
            ApprovalPolicy::Allow => return Ok(Gate::Run { approved: false }),
            ApprovalPolicy::Deny => {
                self.audit(
                    "approval_policy_denied",
                    serde_json::json!({ "tool": tool, "call_sha256": digest }),
                )
                .await?;
                return Ok(Gate::Refused(refused(
                    ToolOutcome::Denied,
                    format!("error: the operator's approval policy denies {tool} here"),
                )));
            }
            ApprovalPolicy::Ask => {}
        }
        if self.always.contains(&digest) {
            self.audit(
                "approval_decided",
                serde_json::json!({
                    "tool": tool, "call_sha256": digest, "decision": "always",
                    "remembered": true,
                }),
            )
            .await?;
            return Ok(Gate::Run { approved: true });
        }
        let origin = self
            .origin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (id, rx) = sh.broker.register(&self.id, &origin, tool);
        let id_sha = sha256_hex(id.as_bytes());
        let requested = self
            .audit(
                "approval_requested",
                serde_json::json!({
                    "tool": tool, "call_sha256": digest, "approval_sha256": id_sha,
                    "channel": origin.channel, "user": origin.user,
                }),
            )
            .await;
        if let Err(e) = requested {
            sh.broker.retire(&id);
            return Err(e.into());
        }
        tracing::info!(session = %self.id, %tool, "waiting for approval");
        let _ = events
            .send(AgentEvent::ApprovalRequired {
                id: id.clone(),
                tool: tool.to_owned(),
                args: args.to_owned(),
            })
            .await;
        let timeout = sh.approvals.timeout();
        let decision = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            d = tokio::time::timeout(timeout, rx) => Some(d),
        };
        sh.broker.retire(&id);
        let (outcome, result) = match decision {
            None => (
                "cancelled",
                Some(refused(
                    ToolOutcome::Cancelled,
                    "error: cancelled".to_owned(),
                )),
            ),
            Some(Err(_elapsed)) => (
                "timeout",
                Some(refused(
                    ToolOutcome::Denied,
                    format!(
                        "error: {tool} needs a human's approval and none came within {}s; it was not run",
                        timeout.as_secs()
                    ),
                )),
            ),
            // The broker went away: nobody can answer.
            Some(Ok(Err(_))) => (
                "deny",
                Some(refused(
                    ToolOutcome::Denied,
                    format!("error: {tool} was not approved; it was not run"),
                )),
            ),
            Some(Ok(Ok(d))) => match d {
                Decision::Approve => ("approve", None),
                Decision::Always => {
                    self.always.insert(digest.clone());
                    ("always", None)
                }
                Decision::Deny => (
                    "deny",
                    Some(refused(
                        ToolOutcome::Denied,
                        format!("error: the user denied this {tool} call; it was not run"),
                    )),
                ),
            },
        };
        self.audit(
            "approval_decided",
            serde_json::json!({
                "tool": tool, "call_sha256": digest, "approval_sha256": id_sha,
                "decision": outcome, "channel": origin.channel, "user": origin.user,
            }),
        )
        .await?;
        Ok(result.map_or(Gate::Run { approved: true }, Gate::Refused))
    }

    /// With `[quotas] tokens_per_day` on, refuses a turn of a suspended
    /// session or of one over its daily tokens (audited as `turn_refused`).
    /// Otherwise there is nothing to read: the write that stores the user
    /// message refuses a suspended session itself.
    async fn admit(&self) -> Result<(), AgentError> {
        let sh = &self.shared;
        if sh.config.quotas.tokens_per_day == 0 {
            return Ok(());
        }
        let refusal: AgentError = match sh.store.suspension(&self.id).await? {
            None => return Err(AgentError::NotFound(self.id.clone())),
            Some(Some(reason)) => AgentError::Suspended { reason },
            Some(None) => {
                let used = sh.store.token_usage(&self.id, &quota::today()).await?;
                match quota::check_tokens(&sh.config.quotas, 0, used) {
                    Ok(()) => return Ok(()),
                    Err(exceeded) => exceeded.into(),
                }
            }
        };
        Err(self.refuse(refusal).await?)
    }

    /// Audits `refusal` as this turn's `turn_refused` and hands it back.
    async fn refuse(&self, refusal: AgentError) -> Result<AgentError, MemoryError> {
        self.audit(
            "turn_refused",
            serde_json::json!({ "code": refusal.code().as_str(), "message": refusal.to_string() }),
        )
        .await?;
        Ok(refusal)
    }

    /// Counts a model call's tokens toward today's (when `[quotas]
    /// tokens_per_day` is on); returns today's total so far (0 when off).
    async fn charge(&self, usage: Usage) -> Result<u64, AgentError> {
        if self.shared.config.quotas.tokens_per_day == 0 {
            return Ok(0);
        }
        let tokens = usage.prompt_tokens + usage.completion_tokens;
        Ok(self
            .shared
            .store
            .add_token_usage(&self.id, &quota::today(), tokens)
            .await?)
    }

    /// Appends `messages` (and the audit row `audit` makes, in the same
    /// write) to this session, and keeps the in-memory history in step: the
    /// copy grows by exactly these messages when the store says nobody else
    /// appended since (the returned version is the cached one advanced by
    /// `messages.len()`); otherwise it is dropped and read anew next round.
    async fn append(
        &self,
        messages: &[(&ChatMessage, Option<Usage>)],
        audit: Option<AuditFn>,
    ) -> Result<Appended, MemoryError> {
        self.append_checked(messages, audit, false).await
    }

    /// [`AgentSession::append`], refused with
    /// [`MemoryError::SessionSuspended`] if `unless_suspended` and the
    /// session is suspended.
    async fn append_checked(
        &self,
        messages: &[(&ChatMessage, Option<Usage>)],
        audit: Option<AuditFn>,
        unless_suspended: bool,
    ) -> Result<Appended, MemoryError> {
        let store = &self.shared.store;
        let done = if unless_suspended {
            store
                .append_turn_unless_suspended(&self.id, messages, audit)
                .await?
        } else {
            store.append_turn(&self.id, messages, audit).await?
        };
        let limit = self.shared.config.history_limit as usize;
        let mut cache = self.history.lock().unwrap_or_else(|p| p.into_inner());
        match cache.as_mut() {
            Some(c) if c.version.advanced_by(messages.len()) == done.version => {
                c.version = done.version;
                c.messages
                    .extend(messages.iter().map(|(m, _)| (*m).clone()));
                while c.messages.len() > limit {
                    c.messages.pop_front();
                }
            }
            _ => *cache = None,
        }
        Ok(done)
    }

    /// The newest `history_limit` messages, oldest first: the in-memory copy
    /// when it is known to be whole, else read from the store (and kept).
    async fn recent_history(&self) -> Result<Vec<ChatMessage>, AgentError> {
        if let Some(c) = self
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(c.messages.iter().cloned().collect());
        }
        let limit = self.shared.config.history_limit as usize;
        let Some((version, stored)) = self.shared.store.history(&self.id, limit).await? else {
            return Err(AgentError::NotFound(self.id.clone()));
        };
        let messages: Vec<ChatMessage> = stored.into_iter().map(|m| m.message).collect();
        *self.history.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedHistory {
            version,
            messages: messages.iter().cloned().collect(),
        });
        Ok(messages)
    }

    /// Appends an audit row for this session, acted by the agent.
    async fn audit(&self, action: &str, detail: serde_json::Value) -> Result<i64, MemoryError> {
        self.shared
            .store
            .append_audit(&AuditEntry {
                session_id: Some(self.id.clone()),
                actor: "agent".to_owned(),
                action: action.to_owned(),
                detail,
            })
            .await
    }

    fn system_prompt(&self) -> String {
        let sh = &self.shared;
        let mut s = sh.config.system_prompt.clone();
        if !sh.skills_context.is_empty() {
            s.push_str("\n\n");
            s.push_str(&sh.skills_context);
        }
        s
    }
}
