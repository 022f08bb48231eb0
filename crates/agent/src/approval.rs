//! Human approval of tool calls.
//!
//! The operator's `[approvals]` config gives each tool (and, for
//! `system.run`, each program) a [`ApprovalPolicy`]: `allow`, `ask` or
//! `deny`. Mutating tools (`file.write`, `system.run`, `container.run`,
//! `skill.run`, `input.control`) default to `default_mutating` (`ask`);
//! the others run. In `[tools.system_run] mode = "allowlist"` a command the
//! allowlist accepts runs, and one whose only fault is a program off the
//! allowlist asks (approved, it runs under every other rule of the policy);
//! a command the policy refuses for another reason (shell syntax, a wrapper,
//! a path outside the workspace) is refused without asking. In `full` mode
//! every command asks.
//!
//! An `ask` call is bound to the exact tool and canonical arguments (for
//! `system.run` the command line and working directory) by a SHA-256
//! digest, and to the session, channel and user whose turn asked. The
//! [`ApprovalBroker`] hands out an unguessable id, the turn emits
//! `approval_required` and waits (cancellable) for a decision until the
//! timeout, which means deny. A decision from another channel, user or
//! session, an unknown (forged) id, a reused id or one for a finished turn
//! is refused and audited. `always` remembers the digest for the session
//! (at most [`MAX_ALWAYS`] entries), so a changed command asks again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use openpista_memory::{AuditEntry, Store, sha256_hex};
use openpista_proto::SessionId;
use openpista_proto::wire::Decision;
use openpista_tools::policy::{CommandPolicy, PolicyMode, PolicyViolation};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Most `always` approvals remembered per session (oldest forgotten first).
pub const MAX_ALWAYS: usize = 64;
/// Most spent approval ids remembered to tell a replay from a forgery.
const MAX_SPENT: usize = 4096;
/// Tools that change something and so default to `default_mutating`.
pub const MUTATING_TOOLS: &[&str] = &[
    "file.write",
    "system.run",
    "container.run",
    "skill.run",
    "input.control",
];

/// What to do with a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalPolicy {
    /// Run it.
    Allow,
    /// Ask a human on the session's channel first.
    Ask,
    /// Refuse it.
    Deny,
}

/// `[approvals]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalConfig {
    /// Policy of mutating tools with no entry in `tools`.
    pub default_mutating: ApprovalPolicy,
    /// Seconds a call waits for a decision; no answer means deny.
    pub timeout_secs: u64,
    /// Policy per tool name (`"system.run" = "ask"`).
    pub tools: BTreeMap<String, ApprovalPolicy>,
    /// Policy per `system.run` program (the command's first word), which
    /// wins over `tools`.
    pub commands: BTreeMap<String, ApprovalPolicy>,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        Self {
            default_mutating: ApprovalPolicy::Ask,
            timeout_secs: 120,
            tools: BTreeMap::new(),
            commands: BTreeMap::new(),
        }
    }
}

/// The operator's approval rules, resolved for one agent.
#[derive(Debug, Clone)]
pub struct Approvals {
    config: ApprovalConfig,
    /// The `system.run` command policy, when `system.run` is registered.
    system_run: Option<CommandPolicy>,
}

impl Approvals {
    /// Rules from `config`, for an agent whose `system.run` (if any) applies
    /// `system_run`.
    pub fn new(config: ApprovalConfig, system_run: Option<CommandPolicy>) -> Self {
        Self { config, system_run }
    }

    /// Every call allowed (the library default when no rules are given).
    pub fn allow_all() -> Self {
        Self::new(
            ApprovalConfig {
                default_mutating: ApprovalPolicy::Allow,
                ..ApprovalConfig::default()
            },
            None,
        )
    }

    /// How long a call waits for a decision.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_secs.max(1))
    }

    /// The policy for calling `tool` with `args` (raw JSON).
    pub fn policy_for(&self, tool: &str, args: &str) -> ApprovalPolicy {
        if tool == "system.run"
            && let Some(program) = command_of(args).and_then(|c| {
                c.split_whitespace()
                    .next()
                    .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
            })
            && let Some(p) = self.config.commands.get(&program)
        {
            return *p;
        }
        if let Some(p) = self.config.tools.get(tool) {
            return *p;
        }
        if tool == "system.run"
            && let Some(policy) = &self.system_run
        {
            return match policy.mode {
                // Refused by the tool anyway: nothing to ask.
                PolicyMode::Deny => ApprovalPolicy::Allow,
                PolicyMode::Full => self.config.default_mutating,
                PolicyMode::Allowlist => {
                    let command = command_of(args).unwrap_or_default();
                    match policy.check(&command) {
                        // Only the program is off the allowlist: ask.
                        Err(PolicyViolation::NotAllowed { program, .. })
                            if policy.allowing(&program).check(&command).is_ok() =>
                        {
                            self.config.default_mutating
                        }
                        // Vetted, or refused by the tool with its reason.
                        _ => ApprovalPolicy::Allow,
                    }
                }
            };
        }
        if MUTATING_TOOLS.contains(&tool) {
            self.config.default_mutating
        } else {
            ApprovalPolicy::Allow
        }
    }
}

fn command_of(args: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(args).ok()?;
    v.get("command")?.as_str().map(str::to_owned)
}

/// The digest an approval is bound to: the tool and its canonical arguments
/// (keys sorted, no whitespace; for `system.run` and `container.run` a
/// missing `cwd` is the workspace, `"."`). Unparsable arguments are hashed
/// as given.
pub fn call_digest(tool: &str, args: &str) -> String {
    let canonical = match serde_json::from_str::<serde_json::Value>(args) {
        Ok(serde_json::Value::Object(mut map)) => {
            if matches!(tool, "system.run" | "container.run") {
                map.entry("cwd")
                    .or_insert_with(|| serde_json::Value::String(".".into()));
            }
            // serde_json's map is ordered by key: this is canonical.
            serde_json::Value::Object(map).to_string()
        }
        Ok(other) => other.to_string(),
        Err(_) => args.to_owned(),
    };
    sha256_hex(format!("{tool}\0{canonical}").as_bytes())
}

/// Who answers (or asked for) an approval: the channel and, where the
/// channel has users, the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `quic`, `cli`, `telegram`, ...
    pub channel: String,
    /// The platform user id (Telegram), if the channel has users.
    pub user: Option<String>,
}

impl Origin {
    /// An origin on `channel` with no user.
    pub fn channel(channel: impl Into<String>) -> Self {
        Self {
            channel: channel.into(),
            user: None,
        }
    }
}

/// Why a decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalRefusal {
    /// No approval with this id was ever pending here: forged or mistyped.
    #[error("no pending approval with this id")]
    Unknown,
    /// The id was already answered, or its turn finished or timed out.
    #[error("this approval was already answered or its turn has finished")]
    Spent,
    /// The decision came from another channel, user or session than the
    /// turn that asked; only they can answer.
    #[error("this approval belongs to another channel, user or session")]
    NotYours,
}

struct Pending {
    session: SessionId,
    origin: Origin,
    tool: String,
    tx: oneshot::Sender<Decision>,
}

/// Pending approvals of every session of one agent.
pub struct ApprovalBroker {
    store: Store,
    pending: Mutex<HashMap<String, Pending>>,
    spent: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl std::fmt::Debug for ApprovalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalBroker").finish_non_exhaustive()
    }
}

impl ApprovalBroker {
    pub(crate) fn new(store: Store) -> Self {
        Self {
            store,
            pending: Mutex::new(HashMap::new()),
            spent: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// Registers a request; the receiver gets the decision.
    pub(crate) fn register(
        &self,
        session: &SessionId,
        origin: &Origin,
        tool: &str,
    ) -> (String, oneshot::Receiver<Decision>) {
        let id = openpista_proto::new_approval_id();
        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(
            id.clone(),
            Pending {
                session: session.clone(),
                origin: origin.clone(),
                tool: tool.to_owned(),
                tx,
            },
        );
        (id, rx)
    }

    /// Forgets a request (answered, timed out or its turn ended); a later
    /// decision for it is refused as spent.
    pub(crate) fn retire(&self, id: &str) {
        self.lock_pending().remove(id);
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        if spent.0.insert(id.to_owned()) {
            spent.1.push_back(id.to_owned());
            while spent.1.len() > MAX_SPENT {
                if let Some(old) = spent.1.pop_front() {
                    spent.0.remove(&old);
                }
            }
        }
    }

    /// Whether `session` has a request waiting.
    pub fn is_waiting(&self, session: &SessionId) -> bool {
        self.lock_pending().values().any(|p| &p.session == session)
    }

    /// Answers approval `id` from `by`. `session`, when the answering
    /// channel knows it (Telegram's chat), must be the session that asked.
    /// Every refusal is audited (`approval_refused`).
    pub async fn decide(
        &self,
        id: &str,
        decision: Decision,
        by: &Origin,
        session: Option<&SessionId>,
    ) -> Result<(), ApprovalRefusal> {
        let outcome = {
            let mut pending = self.lock_pending();
            match pending.get(id) {
                Some(p)
                    if p.origin.channel == by.channel
                        && (p.origin.user.is_none() || p.origin.user == by.user)
                        && session.is_none_or(|s| s == &p.session) =>
                {
                    let p = pending.remove(id).ok_or(ApprovalRefusal::Unknown)?;
                    let _ = p.tx.send(decision);
                    Ok((p.session, p.tool))
                }
                Some(p) => Err((ApprovalRefusal::NotYours, Some(p.session.clone()))),
                None => {
                    let spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
                    if spent.0.contains(id) {
                        Err((ApprovalRefusal::Spent, None))
                    } else {
                        Err((ApprovalRefusal::Unknown, None))
                    }
                }
            }
        };
        match outcome {
            Ok(_) => {
                self.retire(id);
                Ok(())
            }
            Err((refusal, asked_by)) => {
                let entry = AuditEntry {
                    session_id: asked_by.or_else(|| session.cloned()),
                    actor: by.channel.clone(),
                    action: "approval_refused".to_owned(),
                    detail: serde_json::json!({
                        "approval_sha256": sha256_hex(id.as_bytes()),
                        "decision": decision_str(decision),
                        "reason": refusal.to_string(),
                        "channel": by.channel,
                        "user": by.user,
                    }),
                };
                if let Err(e) = self.store.append_audit(&entry).await {
                    tracing::error!(error = %e, "cannot audit a refused approval");
                }
                tracing::warn!(channel = %by.channel, reason = %refusal, "approval refused");
                Err(refusal)
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The wire name of a decision.
pub fn decision_str(d: Decision) -> &'static str {
    match d {
        Decision::Approve => "approve",
        Decision::Deny => "deny",
        Decision::Always => "always",
    }
}

/// The `always` approvals of one session: call digests, bounded.
#[derive(Debug, Default)]
pub(crate) struct AlwaysSet(Mutex<VecDeque<String>>);

impl AlwaysSet {
    pub(crate) fn contains(&self, digest: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|d| d == digest)
    }

    pub(crate) fn insert(&self, digest: String) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !set.contains(&digest) {
            set.push_back(digest);
            while set.len() > MAX_ALWAYS {
                set.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutating_tools_ask_and_read_only_tools_run() {
        let a = Approvals::new(ApprovalConfig::default(), None);
        assert_eq!(a.policy_for("file.write", "{}"), ApprovalPolicy::Ask);
        assert_eq!(a.policy_for("skill.run", "{}"), ApprovalPolicy::Ask);
        assert_eq!(a.policy_for("container.run", "{}"), ApprovalPolicy::Ask);
        assert_eq!(a.policy_for("input.control", "{}"), ApprovalPolicy::Ask);
        assert_eq!(a.policy_for("screen.capture", "{}"), ApprovalPolicy::Allow);
        assert_eq!(
            a.policy_for("system.run", r#"{"command":"ls"}"#),
            ApprovalPolicy::Ask
        );
        assert_eq!(a.policy_for("file.read", "{}"), ApprovalPolicy::Allow);
        let vetted = Approvals::new(ApprovalConfig::default(), Some(CommandPolicy::default()));
        let run = |c: &str| {
            vetted.policy_for(
                "system.run",
                &serde_json::json!({ "command": c }).to_string(),
            )
        };
        assert_eq!(run("ls -la"), ApprovalPolicy::Allow);
        // Off the allowlist: ask; refused for another reason: no point asking.
        assert_eq!(run("printf hi"), ApprovalPolicy::Ask);
        assert_eq!(run("python3 -c 1"), ApprovalPolicy::Allow);
        assert_eq!(run("printf hi; ls"), ApprovalPolicy::Allow);
        let full = Approvals::new(
            ApprovalConfig::default(),
            Some(CommandPolicy {
                mode: PolicyMode::Full,
                ..CommandPolicy::default()
            }),
        );
        assert_eq!(
            full.policy_for("system.run", r#"{"command":"ls"}"#),
            ApprovalPolicy::Ask
        );
    }

    #[test]
    fn commands_win_over_tools() {
        let cfg: ApprovalConfig = toml_like(
            r#"{"tools": {"system.run": "allow"}, "commands": {"rm": "deny", "git": "ask"}}"#,
        );
        let a = Approvals::new(cfg, Some(CommandPolicy::default()));
        assert_eq!(
            a.policy_for("system.run", r#"{"command":"rm -rf x"}"#),
            ApprovalPolicy::Deny
        );
        assert_eq!(
            a.policy_for("system.run", r#"{"command":"/usr/bin/git push"}"#),
            ApprovalPolicy::Ask
        );
        assert_eq!(
            a.policy_for("system.run", r#"{"command":"ls"}"#),
            ApprovalPolicy::Allow
        );
    }

    fn toml_like(json: &str) -> ApprovalConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_digest_binds_argv_and_cwd_not_key_order() {
        let a = call_digest("system.run", r#"{"command":"ls","cwd":"."}"#);
        assert_eq!(
            a,
            call_digest("system.run", r#"{"cwd":".", "command":"ls"}"#)
        );
        assert_eq!(a, call_digest("system.run", r#"{"command":"ls"}"#));
        assert_ne!(a, call_digest("system.run", r#"{"command":"ls -a"}"#));
        assert_ne!(
            a,
            call_digest("system.run", r#"{"command":"ls","cwd":"sub"}"#)
        );
        assert_ne!(a, call_digest("container.run", r#"{"command":"ls"}"#));
    }

    #[test]
    fn ids_are_long_and_distinct() {
        let a = openpista_proto::new_approval_id();
        let b = openpista_proto::new_approval_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 32, "{a}");
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[test]
    fn always_is_bounded() {
        let s = AlwaysSet::default();
        for i in 0..(MAX_ALWAYS + 5) {
            s.insert(format!("d{i}"));
        }
        assert!(!s.contains("d0"));
        assert!(s.contains(&format!("d{}", MAX_ALWAYS + 4)));
    }
}
