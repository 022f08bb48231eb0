//! Per-session quotas (`[quotas]`) and the session's control state.
//!
//! Tool rounds per turn are `[agent] max_tool_rounds`. The rest:
//! - `tokens_per_turn`: model tokens (prompt + completion) one turn may spend;
//!   once spent, the turn stops before running more tools (`limit_exceeded`).
//! - `tokens_per_day`: model tokens a session may spend per UTC day, counted
//!   in SQLite so a restart does not reset them; a session over it refuses
//!   turns until the next day (`limit_exceeded`).
//! - `tool_calls_per_minute`: more calls in a sliding minute are refused
//!   (the model reads the refusal as the call's result).
//! - `failure_burst` failed tool calls within `failure_window_secs` suspend
//!   the session (persisted; `openpista sessions resume` lifts it) and end
//!   the turn with `session_suspended`, which tells the user why.
//!
//! `0` turns a limit off.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openpista_memory::AuditEntry;
use openpista_proto::SessionId;
use serde::Deserialize;

use crate::{Agent, AgentError};

/// `[quotas]` settings, the same for every session.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Model tokens (prompt + completion) one turn may spend; 0: no limit.
    pub tokens_per_turn: u64,
    /// Model tokens a session may spend per UTC day; 0: no limit.
    pub tokens_per_day: u64,
    /// Tool calls a session may start in any 60 seconds; 0: no limit.
    pub tool_calls_per_minute: u32,
    /// Failed tool calls (error or timeout) within `failure_window_secs` that
    /// suspend the session; 0: never.
    pub failure_burst: u32,
    /// The window of `failure_burst`, in seconds.
    pub failure_window_secs: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            tokens_per_turn: 0,
            tokens_per_day: 0,
            tool_calls_per_minute: 60,
            failure_burst: 10,
            failure_window_secs: 60,
        }
    }
}

/// A quota that stopped something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    /// The turn spent its tokens. Ask again (a new turn has a fresh budget).
    #[error(
        "this turn used {used} model tokens, over the limit of {limit} per turn ([quotas] tokens_per_turn)"
    )]
    TokensPerTurn { used: u64, limit: u64 },
    /// The session spent today's tokens. Retrying helps after midnight UTC.
    #[error(
        "this session used {used} model tokens today, over the limit of {limit} per day ([quotas] tokens_per_day); it resets at midnight UTC"
    )]
    TokensPerDay { used: u64, limit: u64 },
    /// Too many tool calls in the last minute.
    #[error(
        "more than {limit} tool calls in a minute ([quotas] tool_calls_per_minute); wait before calling tools again"
    )]
    ToolCallsPerMinute { limit: u32 },
}

/// Operator control of sessions (`openpista sessions kill|suspend|resume`).
/// Each is audited with actor `operator`.
impl Agent {
    /// Cancels the session's running turn, if any: its tool processes are
    /// killed (process group) and its containers removed. Returns whether a
    /// turn was running.
    pub async fn kill_session(&self, id: &SessionId) -> Result<bool, AgentError> {
        self.require(id).await?;
        let was_running = self.cancel_live(id);
        self.operator_audit(
            id,
            "session_killed",
            serde_json::json!({ "was_running": was_running }),
        )
        .await?;
        Ok(was_running)
    }

    /// Suspends the session (persisted): it refuses turns until
    /// [`Agent::resume_session`]. A running turn is cancelled. Returns whether
    /// a turn was running.
    pub async fn suspend_session(&self, id: &SessionId, reason: &str) -> Result<bool, AgentError> {
        self.require(id).await?;
        self.store().suspend_session(id, reason).await?;
        let was_running = self.cancel_live(id);
        self.operator_audit(
            id,
            "session_suspended",
            serde_json::json!({ "reason": reason, "was_running": was_running }),
        )
        .await?;
        Ok(was_running)
    }

    /// Lets a suspended session take turns again; returns whether it was
    /// suspended.
    pub async fn resume_session(&self, id: &SessionId) -> Result<bool, AgentError> {
        self.require(id).await?;
        let was = self.store().resume_session(id).await?;
        self.operator_audit(
            id,
            "session_resumed",
            serde_json::json!({ "was_suspended": was }),
        )
        .await?;
        Ok(was)
    }

    /// Why the session is suspended, if it is; `NotFound` if there is no
    /// such session.
    pub async fn suspension(&self, id: &SessionId) -> Result<Option<String>, AgentError> {
        self.store()
            .suspension(id)
            .await?
            .ok_or_else(|| AgentError::NotFound(id.clone()))
    }

    /// Whether a turn of session `id` is running in this process.
    pub fn is_running(&self, id: &SessionId) -> bool {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        live.is_some_and(|s| {
            s.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        })
    }

    async fn require(&self, id: &SessionId) -> Result<(), AgentError> {
        match self.store().suspension(id).await? {
            Some(_) => Ok(()),
            None => Err(AgentError::NotFound(id.clone())),
        }
    }

    fn cancel_live(&self, id: &SessionId) -> bool {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        live.is_some_and(|s| s.cancel())
    }

    async fn operator_audit(
        &self,
        id: &SessionId,
        action: &str,
        detail: serde_json::Value,
    ) -> Result<(), AgentError> {
        self.store()
            .append_audit(&AuditEntry {
                session_id: Some(id.clone()),
                actor: "operator".to_owned(),
                action: action.to_owned(),
                detail,
            })
            .await?;
        Ok(())
    }
}

/// The UTC day `YYYY-MM-DD` token usage is counted under.
pub(crate) fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// A session's sliding windows (in memory; suspension and daily tokens are
/// in the store).
#[derive(Debug, Default)]
pub(crate) struct SessionQuota {
    tool_calls: Mutex<VecDeque<Instant>>,
    failures: Mutex<VecDeque<Instant>>,
}

impl SessionQuota {
    /// Takes one tool call from the per-minute budget at `now`.
    pub(crate) fn take_tool_call(
        &self,
        cfg: &QuotaConfig,
        now: Instant,
    ) -> Result<(), QuotaExceeded> {
        if cfg.tool_calls_per_minute == 0 {
            return Ok(());
        }
        let mut calls = self.tool_calls.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut calls, now, Duration::from_secs(60));
        if calls.len() >= cfg.tool_calls_per_minute as usize {
            return Err(QuotaExceeded::ToolCallsPerMinute {
                limit: cfg.tool_calls_per_minute,
            });
        }
        calls.push_back(now);
        Ok(())
    }

    /// Records a failed tool call at `now`; returns how many failed within
    /// the window when that reaches the burst (the session is to be
    /// suspended), and forgets them.
    pub(crate) fn record_failure(&self, cfg: &QuotaConfig, now: Instant) -> Option<usize> {
        if cfg.failure_burst == 0 {
            return None;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        prune(
            &mut failures,
            now,
            Duration::from_secs(cfg.failure_window_secs),
        );
        failures.push_back(now);
        if failures.len() >= cfg.failure_burst as usize {
            let n = failures.len();
            failures.clear();
            return Some(n);
        }
        None
    }
}

/// Drops the instants older than `window` before `now`.
fn prune(q: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while q
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        q.pop_front();
    }
}

/// Checks a turn's tokens so far and the session's for today.
pub(crate) fn check_tokens(cfg: &QuotaConfig, turn: u64, day: u64) -> Result<(), QuotaExceeded> {
    if cfg.tokens_per_turn > 0 && turn >= cfg.tokens_per_turn {
        return Err(QuotaExceeded::TokensPerTurn {
            used: turn,
            limit: cfg.tokens_per_turn,
        });
    }
    if cfg.tokens_per_day > 0 && day >= cfg.tokens_per_day {
        return Err(QuotaExceeded::TokensPerDay {
            used: day,
            limit: cfg.tokens_per_day,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_per_minute_trip_and_slide() {
        let cfg = QuotaConfig {
            tool_calls_per_minute: 2,
            ..QuotaConfig::default()
        };
        let q = SessionQuota::default();
        let t0 = Instant::now();
        assert!(q.take_tool_call(&cfg, t0).is_ok());
        assert!(q.take_tool_call(&cfg, t0 + Duration::from_secs(10)).is_ok());
        assert_eq!(
            q.take_tool_call(&cfg, t0 + Duration::from_secs(59)),
            Err(QuotaExceeded::ToolCallsPerMinute { limit: 2 })
        );
        // A minute after the first call, one place is free again.
        assert!(q.take_tool_call(&cfg, t0 + Duration::from_secs(60)).is_ok());
        assert!(
            q.take_tool_call(&cfg, t0 + Duration::from_secs(61))
                .is_err()
        );
        let off = QuotaConfig {
            tool_calls_per_minute: 0,
            ..cfg
        };
        for _ in 0..1000 {
            assert!(q.take_tool_call(&off, t0).is_ok());
        }
    }

    #[test]
    fn failure_burst_counts_within_the_window() {
        let cfg = QuotaConfig {
            failure_burst: 3,
            failure_window_secs: 10,
            ..QuotaConfig::default()
        };
        let q = SessionQuota::default();
        let t0 = Instant::now();
        assert_eq!(q.record_failure(&cfg, t0), None);
        assert_eq!(q.record_failure(&cfg, t0 + Duration::from_secs(1)), None);
        // The first failure has left the window: still two.
        assert_eq!(q.record_failure(&cfg, t0 + Duration::from_secs(10)), None);
        assert_eq!(
            q.record_failure(&cfg, t0 + Duration::from_millis(10_500)),
            Some(3)
        );
        // Counting starts over after a suspension.
        assert_eq!(q.record_failure(&cfg, t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn token_limits() {
        let cfg = QuotaConfig {
            tokens_per_turn: 100,
            tokens_per_day: 1000,
            ..QuotaConfig::default()
        };
        assert!(check_tokens(&cfg, 99, 999).is_ok());
        assert!(matches!(
            check_tokens(&cfg, 100, 0),
            Err(QuotaExceeded::TokensPerTurn { .. })
        ));
        assert!(matches!(
            check_tokens(&cfg, 0, 1000),
            Err(QuotaExceeded::TokensPerDay { .. })
        ));
        assert!(check_tokens(&QuotaConfig::default(), u64::MAX, u64::MAX).is_ok());
    }
}
