//! The in-process gateway: the one path from any front end (QUIC, CLI,
//! tests) through sessions. [`crate::QuicServer`] is a thin wire adapter on
//! top of it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use openpista_agent::{Agent, ApprovalRefusal, Origin};
use openpista_proto::wire::{Decision, SessionAction, SessionInfo, SessionState};
use openpista_proto::{AgentEvent, ChatMessage, SessionId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::router::ChannelRouter;
use crate::{GatewayConfig, GatewayError};

/// Idempotency keys remembered (oldest forgotten first).
const IDEMPOTENCY_CAPACITY: usize = 4096;
/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Default and largest `list_sessions` limit.
pub const DEFAULT_SESSIONS_LIMIT: u32 = 50;
/// Default `get_history` limit.
pub const DEFAULT_HISTORY_LIMIT: u32 = 200;
/// Largest `list_sessions` / `get_history` limit.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// One `send_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    /// The session; `None` starts a new one on `channel`.
    pub session_id: Option<SessionId>,
    /// What the user said.
    pub text: String,
    /// A retried request with the same key runs once and replays its events.
    pub idempotency_key: Option<String>,
    /// The channel a new session is recorded under (`quic`, `cli`, ...).
    pub channel: String,
    /// Create `session_id` if it does not exist (channels with stable ids);
    /// otherwise an unknown id is `not_found`.
    pub create_missing: bool,
}

/// What `status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayStatus {
    pub uptime_secs: u64,
    pub live_sessions: u64,
    pub running_turns: u64,
    pub connections: u64,
}

/// The in-process gateway. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    agent: Agent,
    router: ChannelRouter,
    idempotency: Mutex<IdempotencyCache>,
    started: Instant,
    connections: AtomicU64,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Gateway {
    /// A gateway over `agent` (its store, tools and model).
    pub fn new(agent: Agent, cfg: &GatewayConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                agent,
                router: ChannelRouter::new(cfg.max_queued_turns),
                idempotency: Mutex::new(IdempotencyCache::default()),
                started: Instant::now(),
                connections: AtomicU64::new(0),
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                metrics: Arc::new(Metrics::new()),
            }),
        }
    }

    /// The agent behind this gateway.
    pub fn agent(&self) -> &Agent {
        &self.inner.agent
    }

    /// The router of live sessions.
    pub fn router(&self) -> &ChannelRouter {
        &self.inner.router
    }

    /// The gateway's counters (rendered by [`crate::MetricsServer`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Whether new turns are accepted (false once [`Gateway::shutdown`] began).
    pub fn is_accepting(&self) -> bool {
        !self.inner.shutdown.is_cancelled()
    }

    /// Starts (or, for a known idempotency key, rejoins) a turn and returns
    /// its events, ending with `final` or `error`. The turn runs to its end
    /// even if the events are dropped; its results are stored.
    pub async fn send(&self, req: SendRequest) -> Result<TurnEvents, GatewayError> {
        self.send_from(req, None).await
    }

    /// [`Gateway::send`] for a message from `user` of `req.channel`: only
    /// that channel and user can answer the turn's approval requests.
    pub async fn send_from(
        &self,
        req: SendRequest,
        user: Option<String>,
    ) -> Result<TurnEvents, GatewayError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(GatewayError::ShuttingDown);
        }
        if let Some(key) = &req.idempotency_key
            && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN)
        {
            return Err(GatewayError::LimitExceeded(format!(
                "an idempotency key has 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes"
            )));
        }
        let log = Arc::new(TurnLog::new());
        if let Some(key) = &req.idempotency_key {
            let mut cache = self.lock_idempotency();
            if let Some(existing) = cache.get(key) {
                return Ok(TurnEvents::follow(existing));
            }
            cache.insert(key.clone(), log.clone());
        }
        let origin = Origin {
            channel: req.channel.clone(),
            user,
        };
        match self.start_turn(&req, origin, log.clone()).await {
            Ok(()) => Ok(TurnEvents::follow(log)),
            Err(e) => {
                // Nothing ran: a retry with the same key may try again.
                if let Some(key) = &req.idempotency_key {
                    self.lock_idempotency().remove(key);
                }
                log.close();
                Err(e)
            }
        }
    }

    async fn start_turn(
        &self,
        req: &SendRequest,
        origin: Origin,
        log: Arc<TurnLog>,
    ) -> Result<(), GatewayError> {
        let agent = &self.inner.agent;
        let session = match (&req.session_id, req.create_missing) {
            (None, _) => agent.create_session(&req.channel).await?,
            (Some(id), false) => agent.open_session(id).await?,
            (Some(id), true) => agent.session_for(id, &req.channel).await?,
        };
        if self.inner.router.len() > IDEMPOTENCY_CAPACITY {
            self.inner.router.evict_idle();
        }
        let slot = self.inner.router.enqueue(session).ok_or_else(|| {
            GatewayError::LimitExceeded("too many turns are waiting on this session".into())
        })?;
        let text = req.text.clone();
        let cancel = self.inner.shutdown.child_token();
        let span = tracing::info_span!("turn", session = %slot.session().id());
        let mut observer = self.inner.metrics.turn_started();
        let task = async move {
            let _closed = CloseOnDrop(log.clone());
            let (tx, mut rx) = mpsc::channel::<AgentEvent>(64);
            let session = slot.session().clone();
            let turn = async move {
                let _ = session.run_turn_from(&text, tx, cancel, origin).await;
            };
            let forward = async {
                while let Some(ev) = rx.recv().await {
                    observer.observe(&ev);
                    log.push(ev);
                }
                drop(observer);
            };
            tokio::join!(turn, forward);
            drop(slot);
        };
        self.inner
            .tracker
            .spawn(tracing::Instrument::instrument(task, span));
        Ok(())
    }

    /// Sessions, newest first (`limit` defaults to 50, at most 1000).
    pub async fn list_sessions(
        &self,
        limit: Option<u32>,
    ) -> Result<Vec<SessionInfo>, GatewayError> {
        let limit = limit.unwrap_or(DEFAULT_SESSIONS_LIMIT).min(MAX_LIST_LIMIT) as usize;
        let rows = self.inner.agent.store().list_sessions(limit).await?;
        Ok(rows
            .into_iter()
            .map(|s| SessionInfo {
                channel: s.channel,
                title: s.title,
                created_at: s.created_at.to_rfc3339(),
                updated_at: s.updated_at.to_rfc3339(),
                message_count: s.message_count,
                state: self.session_state(&s.id, s.suspended_reason.is_some()),
                suspended_reason: s.suspended_reason,
                id: s.id,
            })
            .collect())
    }

    /// A session's newest messages, oldest first (`limit` defaults to 200, at most 1000).
    pub async fn history(
        &self,
        session_id: &SessionId,
        limit: Option<u32>,
    ) -> Result<Vec<ChatMessage>, GatewayError> {
        let store = self.inner.agent.store();
        if store.get_session(session_id).await?.is_none() {
            return Err(GatewayError::NotFound(format!("no session {session_id}")));
        }
        let limit = limit.unwrap_or(DEFAULT_HISTORY_LIMIT).min(MAX_LIST_LIMIT) as usize;
        let rows = store.recent_messages(session_id, limit).await?;
        Ok(rows.into_iter().map(|m| m.message).collect())
    }

    /// Cancels the session's running turn; returns whether one was running.
    pub fn cancel(&self, session_id: &SessionId) -> bool {
        self.inner
            .router
            .get(session_id)
            .is_some_and(|route| route.session().cancel())
    }

    /// Answers approval request `id` from `by` (and, when the channel knows
    /// it, `session`). Only the channel, user and session whose turn asked
    /// can answer; an unknown, reused or finished id, or one from someone
    /// else, is `not_found` (and audited), so ids cannot be probed.
    pub async fn approve(
        &self,
        id: &str,
        decision: Decision,
        by: &Origin,
        session: Option<&SessionId>,
    ) -> Result<(), GatewayError> {
        self.inner
            .agent
            .approvals()
            .decide(id, decision, by, session)
            .await
            .map_err(|refusal| {
                let why = match refusal {
                    ApprovalRefusal::Unknown | ApprovalRefusal::Spent => "is not pending",
                    ApprovalRefusal::NotYours => "was not asked of you",
                };
                GatewayError::NotFound(format!(
                    "approval {:?} {why}",
                    id.chars().take(64).collect::<String>()
                ))
            })
    }

    /// Whether a turn of session `id` waits for an approval.
    pub fn is_waiting_approval(&self, id: &SessionId) -> bool {
        self.inner.agent.is_waiting_approval(id)
    }

    /// Uptime and load.
    pub fn status(&self) -> GatewayStatus {
        GatewayStatus {
            uptime_secs: self.inner.started.elapsed().as_secs(),
            live_sessions: self.inner.router.len() as u64,
            running_turns: self.inner.router.pending_turns() as u64,
            connections: self.inner.connections.load(Ordering::SeqCst),
        }
    }

    /// What session `id` is doing (`suspended`: whether the store says so).
    pub fn session_state(&self, id: &SessionId, suspended: bool) -> SessionState {
        let agent = &self.inner.agent;
        if suspended {
            SessionState::Suspended
        } else if agent.is_waiting_approval(id) {
            SessionState::WaitingApproval
        } else if agent.is_running(id) {
            SessionState::Running
        } else {
            SessionState::Idle
        }
    }

    /// Kills (cancels the running turn, killing its processes and
    /// containers), suspends (that, and refuses turns until resumed) or
    /// resumes session `id`. Returns its state afterwards and whether a turn
    /// was running.
    pub async fn control_session(
        &self,
        id: &SessionId,
        action: SessionAction,
    ) -> Result<(SessionState, bool), GatewayError> {
        let agent = &self.inner.agent;
        let was_running = match action {
            SessionAction::Kill => agent.kill_session(id).await?,
            SessionAction::Suspend => {
                agent
                    .suspend_session(id, "suspended by the operator")
                    .await?
            }
            SessionAction::Resume => {
                agent.resume_session(id).await?;
                false
            }
        };
        let suspended = agent.suspension(id).await?.is_some();
        Ok((self.session_state(id, suspended), was_running))
    }

    /// Stops accepting turns, cancels running ones and waits for them (at
    /// most `deadline`). Returns whether every turn finished in time.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        tokio::time::timeout(deadline, self.inner.tracker.wait())
            .await
            .is_ok()
    }

    pub(crate) fn connection_opened(&self) -> ConnectionGuard {
        self.inner.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(self.clone())
    }

    fn lock_idempotency(&self) -> std::sync::MutexGuard<'_, IdempotencyCache> {
        self.inner
            .idempotency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a connection for `status` while alive.
#[derive(Debug)]
pub(crate) struct ConnectionGuard(Gateway);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.inner.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct IdempotencyCache {
    logs: HashMap<String, Arc<TurnLog>>,
    order: VecDeque<String>,
}

impl IdempotencyCache {
    fn get(&self, key: &str) -> Option<Arc<TurnLog>> {
        self.logs.get(key).cloned()
    }

    fn insert(&mut self, key: String, log: Arc<TurnLog>) {
        while self.order.len() >= IDEMPOTENCY_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.logs.remove(&old);
            }
        }
        self.order.push_back(key.clone());
        self.logs.insert(key, log);
    }

    fn remove(&mut self, key: &str) {
        self.logs.remove(key);
        self.order.retain(|k| k != key);
    }
}

/// Every event of one turn, kept so that a retried send can replay it.
#[derive(Debug)]
struct TurnLog {
    events: Mutex<Vec<AgentEvent>>,
    /// Bumped on every push and on close.
    version: watch::Sender<(usize, bool)>,
}

impl TurnLog {
    fn new() -> Self {
        Self {
            events: Mutex::new(Vec::new()),
            version: watch::Sender::new((0, false)),
        }
    }

    fn push(&self, ev: AgentEvent) {
        let len = {
            let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
            events.push(ev);
            events.len()
        };
        self.version.send_modify(|v| v.0 = len);
    }

    fn close(&self) {
        self.version.send_modify(|v| v.1 = true);
    }

    fn get(&self, idx: usize) -> Option<AgentEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(idx)
            .cloned()
    }
}

struct CloseOnDrop(Arc<TurnLog>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The events of one turn, from its start (a rejoined turn replays what
/// already happened, then follows live).
#[derive(Debug)]
pub struct TurnEvents {
    log: Arc<TurnLog>,
    next: usize,
    watch: watch::Receiver<(usize, bool)>,
}

impl TurnEvents {
    fn follow(log: Arc<TurnLog>) -> Self {
        let watch = log.version.subscribe();
        Self {
            log,
            next: 0,
            watch,
        }
    }

    /// The next event; `None` after the last one.
    pub async fn recv(&mut self) -> Option<AgentEvent> {
        loop {
            // Mark the current version seen before looking, so a push that
            // lands after the look still wakes `changed`.
            let closed = self.watch.borrow_and_update().1;
            if let Some(ev) = self.log.get(self.next) {
                self.next += 1;
                return Some(ev);
            }
            if closed || self.watch.changed().await.is_err() {
                let ev = self.log.get(self.next)?;
                self.next += 1;
                return Some(ev);
            }
        }
    }

    /// The events as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = AgentEvent> + Send + 'static {
        futures::stream::unfold(self, |mut events| async move {
            events.recv().await.map(|ev| (ev, events))
        })
    }

    /// Waits for every event.
    pub async fn collect(mut self) -> Vec<AgentEvent> {
        let mut out = Vec::new();
        while let Some(ev) = self.recv().await {
            out.push(ev);
        }
        out
    }
}
