//! [`ChannelRouter`]: which live [`AgentSession`] serves a channel id, and
//! how many turns wait on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use openpista_agent::AgentSession;
use openpista_proto::SessionId;

/// A live session and its queue depth.
#[derive(Debug)]
pub struct Route {
    session: Arc<AgentSession>,
    /// Turns accepted and not yet finished (the running one included).
    pending: AtomicUsize,
}

impl Route {
    /// The session.
    pub fn session(&self) -> &Arc<AgentSession> {
        &self.session
    }

    /// Turns accepted and not yet finished.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// A place in a session's bounded queue; dropping it frees the place.
#[derive(Debug)]
pub struct QueueSlot {
    route: Arc<Route>,
}

impl QueueSlot {
    /// The session this slot queues on.
    pub fn session(&self) -> &Arc<AgentSession> {
        &self.route.session
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.route.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Maps channel (session) ids to live sessions. Turns of one session run one
/// at a time (the session serializes them); at most `max_pending` wait.
#[derive(Debug)]
pub struct ChannelRouter {
    routes: DashMap<SessionId, Arc<Route>>,
    max_pending: usize,
}

impl ChannelRouter {
    /// A router allowing `max_pending` unfinished turns per session.
    pub fn new(max_pending: usize) -> Self {
        Self {
            routes: DashMap::new(),
            max_pending: max_pending.max(1),
        }
    }

    /// Registers `session` (if not yet routed) and reserves a place in its
    /// queue; `None` if the queue is full.
    pub fn enqueue(&self, session: Arc<AgentSession>) -> Option<QueueSlot> {
        let route = self
            .routes
            .entry(session.id().clone())
            .or_insert_with(|| {
                Arc::new(Route {
                    session,
                    pending: AtomicUsize::new(0),
                })
            })
            .clone();
        let reserved = route
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_pending).then_some(n + 1)
            })
            .is_ok();
        reserved.then_some(QueueSlot { route })
    }

    /// The live route for `id`, if any.
    pub fn get(&self, id: &SessionId) -> Option<Arc<Route>> {
        self.routes.get(id).map(|r| r.value().clone())
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Turns accepted and not yet finished, over all sessions.
    pub fn pending_turns(&self) -> usize {
        self.routes.iter().map(|r| r.pending()).sum()
    }

    /// Forgets sessions with no pending turn (they reopen on demand).
    pub fn evict_idle(&self) {
        self.routes.retain(|_, r| r.pending() > 0);
    }
}
