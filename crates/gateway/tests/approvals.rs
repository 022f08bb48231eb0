//! Human approval of tool calls through the production gateway: the SDK over
//! real QUIC answers `approval_required` with `approve`; decisions from
//! another channel, user or session, forged ids, replays and late answers
//! are refused and audited. The scripted model makes the tool calls.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openpista_agent::{
    Agent, AgentConfig, AgentParts, ApprovalConfig, ApprovalPolicy, Approvals, Origin,
};
use openpista_client::{Client, Event, EventStream, Trust};
use openpista_gateway::{Gateway, GatewayConfig, QuicServer, SendRequest, TlsIdentity, TurnEvents};
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::Store;
use openpista_proto::wire::{Decision, SessionState};
use openpista_proto::{AgentEvent, ErrorCode, SessionId, ToolOutcome};
use openpista_tools::builtin_registry;
use openpista_tools::policy::CommandPolicy;

const TOKEN: &str = "approval test token";
/// A "did not hang" bound, never a timing assertion.
const HANG: Duration = Duration::from_secs(40);

struct Setup {
    gateway: Gateway,
    server: QuicServer,
    store: Store,
    workspace: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(script: &str, approvals: ApprovalConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        let llm = Arc::new(ScriptedProvider::new(Script::from_toml(script).unwrap()));
        let workspace = dir.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        let tools = builtin_registry(Default::default(), Default::default(), Vec::new()).unwrap();
        let agent = Agent::with_approvals(
            AgentParts {
                llm,
                tools: Arc::new(tools),
                store: store.clone(),
                config: AgentConfig::default(),
                workspace: workspace.clone(),
                skills_context: String::new(),
            },
            // The built-in policy is in allowlist mode: system.run is vetted.
            Approvals::new(approvals, Some(CommandPolicy::default())),
        );
        let cfg = GatewayConfig {
            bind: "127.0.0.1:0".into(),
            ..GatewayConfig::default()
        };
        let gateway = Gateway::new(agent, &cfg);
        let tls = TlsIdentity::load_or_generate(&dir.path().join("tls")).unwrap();
        let server = QuicServer::bind(gateway.clone(), &cfg, tls, Some(TOKEN.into())).unwrap();
        Self {
            gateway,
            server,
            store,
            workspace,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(
            self.server.local_addr(),
            Some(TOKEN.into()),
            Trust::Fingerprint(self.server.fingerprint().to_owned()),
        )
        .await
        .unwrap()
    }

    /// Audit rows with `action`.
    async fn audited(&self, action: &str) -> Vec<serde_json::Value> {
        self.store
            .audit(10_000, None)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.action == action)
            .map(|r| r.detail)
            .collect()
    }
}

fn write_call(path: &str, content: &str) -> String {
    format!(
        "[[reply]]\ntext = \"Writing.\"\ntool_calls = [{{ name = \"file.write\", arguments = {{ path = \"{path}\", content = \"{content}\" }} }}]\n"
    )
}

fn run_call(command: &str) -> String {
    format!(
        "[[reply]]\ntext = \"Running.\"\ntool_calls = [{{ name = \"system.run\", arguments = {{ command = \"{command}\" }} }}]\n"
    )
}

const DONE: &str = "[[reply]]\ntext = \"Done.\"\n";

/// The next event of a QUIC turn (within the hang bound).
async fn next(events: &mut EventStream) -> Event {
    tokio::time::timeout(HANG, events.next())
        .await
        .expect("the turn did not hang")
        .expect("an event before the end")
        .expect("no stream error")
}

/// Reads events up to the next approval request, returning its id and tool.
async fn until_approval(events: &mut EventStream) -> (String, String, String) {
    loop {
        match next(events).await {
            Event::ApprovalRequired { id, tool, args } => return (id, tool, args),
            Event::Agent(AgentEvent::Final { text, .. }) => {
                panic!("the turn ended ({text}) without asking")
            }
            _ => {}
        }
    }
}

/// Reads the rest of a QUIC turn.
async fn rest(events: EventStream) -> Vec<Event> {
    tokio::time::timeout(HANG, events.collect_all())
        .await
        .expect("the turn did not hang")
        .expect("no stream error")
}

fn finished(events: &[Event]) -> Vec<(ToolOutcome, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Agent(AgentEvent::ToolFinished {
                outcome, output, ..
            }) => Some((*outcome, output.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_quic_client_approves_a_write_and_a_replayed_or_forged_id_is_refused_and_audited() {
    let script = format!("{}{DONE}", write_call("note.txt", "hello"));
    let s = Setup::start(&script, ApprovalConfig::default()).await;
    let client = s.client().await;
    let mut events = client.send(None, "write a note").await.unwrap();
    let session = match next(&mut events).await {
        Event::Agent(AgentEvent::Accepted { session_id, .. }) => session_id,
        other => panic!("expected accepted, got {other:?}"),
    };
    let (id, tool, args) = until_approval(&mut events).await;
    assert_eq!(tool, "file.write");
    assert!(args.contains("note.txt"), "{args}");
    assert_eq!(id.len(), 35, "ap- and 128 random bits: {id}");
    assert!(
        s.gateway.is_waiting_approval(&session),
        "the session shows waiting-approval"
    );
    let listed = client.sessions(None).await.unwrap();
    assert_eq!(listed[0].id, session);
    assert_eq!(listed[0].state, SessionState::WaitingApproval);
    assert_eq!(listed[0].state.as_str(), "waiting-approval");
    assert!(
        !s.workspace.join("note.txt").exists(),
        "nothing runs before the approval"
    );
    client.approve(&id, Decision::Approve).await.unwrap();
    let tail = rest(events).await;
    assert_eq!(finished(&tail)[0].0, ToolOutcome::Ok, "{tail:?}");
    assert_eq!(
        std::fs::read_to_string(s.workspace.join("note.txt")).unwrap(),
        "hello"
    );
    assert!(!s.gateway.is_waiting_approval(&session));
    let listed = client.sessions(None).await.unwrap();
    assert_eq!(listed[0].state, SessionState::Idle);

    // The same id again, and an id nobody issued: refused, audited.
    let replay = client.approve(&id, Decision::Approve).await.unwrap_err();
    assert_eq!(replay.code(), Some(ErrorCode::NotFound));
    let forged = format!("ap-{}", "0".repeat(32));
    let forged_err = client
        .approve(&forged, Decision::Approve)
        .await
        .unwrap_err();
    assert_eq!(forged_err.code(), Some(ErrorCode::NotFound));
    let refused = s.audited("approval_refused").await;
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("already answered")
    );
    assert!(
        refused[1]["reason"]
            .as_str()
            .unwrap()
            .contains("no pending")
    );
    assert!(
        refused.iter().all(|r| r["channel"] == "quic"),
        "{refused:?}"
    );
    let requested = s.audited("approval_requested").await;
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0]["tool"], "file.write");
    let decided = s.audited("approval_decided").await;
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0]["decision"], "approve");
    // The id itself never lands in the audit trail.
    let all = s.store.audit(10_000, None).await.unwrap();
    assert!(all.iter().all(|r| !r.detail.to_string().contains(&id)));
}

#[tokio::test]
async fn a_denied_write_does_not_run_and_the_model_is_told() {
    let script = format!("{}{DONE}", write_call("secret.txt", "x"));
    let s = Setup::start(&script, ApprovalConfig::default()).await;
    let client = s.client().await;
    let mut events = client.send(None, "write").await.unwrap();
    let (id, _, _) = until_approval(&mut events).await;
    client.approve(&id, Decision::Deny).await.unwrap();
    let tail = rest(events).await;
    let done = finished(&tail);
    assert_eq!(done[0].0, ToolOutcome::Denied, "{tail:?}");
    assert!(done[0].1.contains("denied"), "{done:?}");
    assert!(!s.workspace.join("secret.txt").exists());
    assert_eq!(s.audited("approval_decided").await[0]["decision"], "deny");
}

#[tokio::test]
async fn only_the_quic_connection_that_started_the_turn_can_answer() {
    let script = format!("{}{DONE}", write_call("mine.txt", "x"));
    let s = Setup::start(&script, ApprovalConfig::default()).await;
    let owner = s.client().await;
    // Another client with the same token (every client has it).
    let other = s.client().await;
    let mut events = owner.send(None, "write").await.unwrap();
    let (id, _, _) = until_approval(&mut events).await;
    let err = other.approve(&id, Decision::Approve).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert!(!s.workspace.join("mine.txt").exists());
    // The refusal did not spend the id: its owner still answers it.
    owner.approve(&id, Decision::Approve).await.unwrap();
    let tail = rest(events).await;
    assert_eq!(finished(&tail)[0].0, ToolOutcome::Ok, "{tail:?}");
    assert!(s.workspace.join("mine.txt").exists());
    assert_eq!(s.audited("approval_refused").await.len(), 1);
}

#[tokio::test]
async fn no_answer_before_the_timeout_means_deny_and_a_late_answer_is_refused() {
    let script = format!("{}{DONE}", write_call("late.txt", "x"));
    let cfg = ApprovalConfig {
        timeout_secs: 1,
        ..ApprovalConfig::default()
    };
    let s = Setup::start(&script, cfg).await;
    let client = s.client().await;
    let mut events = client.send(None, "write").await.unwrap();
    let (id, _, _) = until_approval(&mut events).await;
    let tail = rest(events).await;
    let done = finished(&tail);
    assert_eq!(done[0].0, ToolOutcome::Denied, "{tail:?}");
    assert!(done[0].1.contains("none came within 1s"), "{done:?}");
    assert!(!s.workspace.join("late.txt").exists());
    assert_eq!(
        s.audited("approval_decided").await[0]["decision"],
        "timeout"
    );
    // The turn is over: approving now does nothing but get refused.
    let err = client.approve(&id, Decision::Approve).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(!s.workspace.join("late.txt").exists());
    let refused = s.audited("approval_refused").await;
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("turn has finished")
    );
}

#[tokio::test]
async fn always_is_remembered_for_the_same_command_and_a_changed_argv_asks_again() {
    let script = format!(
        "{}{}{}{DONE}",
        run_call("echo one"),
        run_call("echo one"),
        run_call("echo two")
    );
    let mut cfg = ApprovalConfig::default();
    cfg.tools.insert("system.run".into(), ApprovalPolicy::Ask);
    let s = Setup::start(&script, cfg).await;
    let client = s.client().await;
    let mut events = client.send(None, "run things").await.unwrap();
    let (first, _, args) = until_approval(&mut events).await;
    assert!(args.contains("echo one"), "{args}");
    client.approve(&first, Decision::Always).await.unwrap();
    // The second `echo one` runs without asking; `echo two` asks.
    let (second, _, args) = until_approval(&mut events).await;
    assert!(args.contains("echo two"), "{args}");
    client.approve(&second, Decision::Approve).await.unwrap();
    let mut seen = vec![];
    let tail = rest(events).await;
    seen.extend(finished(&tail));
    assert!(
        tail.iter()
            .all(|e| !matches!(e, Event::ApprovalRequired { .. })),
        "{tail:?}"
    );
    assert!(seen.last().unwrap().1.contains("two\n"), "{seen:?}");
    let decided: Vec<String> = s
        .audited("approval_decided")
        .await
        .iter()
        .map(|d| d["decision"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(decided, ["always", "always", "approve"]);
    assert_eq!(s.audited("approval_requested").await.len(), 2);
}

/// An in-process turn on Telegram's channel for user `1001`, as the bridge
/// starts it.
async fn telegram_turn(g: &Gateway, session: &str, user: &str) -> TurnEvents {
    g.send_from(
        SendRequest {
            session_id: Some(SessionId::parse(session).unwrap()),
            text: "write".into(),
            idempotency_key: None,
            channel: "telegram".into(),
            create_missing: true,
        },
        Some(user.into()),
    )
    .await
    .unwrap()
}

async fn local_approval(events: &mut TurnEvents) -> String {
    loop {
        let ev = tokio::time::timeout(HANG, events.recv())
            .await
            .expect("did not hang")
            .expect("an event");
        if let AgentEvent::ApprovalRequired { id, .. } = ev {
            return id;
        }
    }
}

#[tokio::test]
async fn an_approval_from_another_channel_user_or_session_is_refused_and_audited() {
    let script = format!("{}{DONE}", write_call("owned.txt", "x"));
    let s = Setup::start(&script, ApprovalConfig::default()).await;
    let mut events = telegram_turn(&s.gateway, "telegram-1001", "1001").await;
    let id = local_approval(&mut events).await;
    let owner = Origin {
        channel: "telegram".into(),
        user: Some("1001".into()),
    };
    let other_user = Origin {
        channel: "telegram".into(),
        user: Some("2002".into()),
    };
    // Another channel (a QUIC client holding the id), another user, and the
    // right user naming another session: all refused, the turn keeps waiting.
    let client = s.client().await;
    let quic = client.approve(&id, Decision::Approve).await.unwrap_err();
    assert_eq!(quic.code(), Some(ErrorCode::NotFound));
    let err = s
        .gateway
        .approve(&id, Decision::Approve, &other_user, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not asked of you"), "{err}");
    let elsewhere = SessionId::parse("telegram-3003").unwrap();
    assert!(
        s.gateway
            .approve(&id, Decision::Approve, &owner, Some(&elsewhere))
            .await
            .is_err()
    );
    assert!(
        s.gateway
            .is_waiting_approval(&SessionId::parse("telegram-1001").unwrap())
    );
    assert!(!s.workspace.join("owned.txt").exists());
    let refused = s.audited("approval_refused").await;
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|r| r["reason"].as_str().unwrap().contains("another channel"))
    );
    assert_eq!(refused[1]["user"], "2002");

    // The owner, in the session that asked, is accepted.
    let session = SessionId::parse("telegram-1001").unwrap();
    s.gateway
        .approve(&id, Decision::Approve, &owner, Some(&session))
        .await
        .unwrap();
    let rest = tokio::time::timeout(HANG, events.collect()).await.unwrap();
    assert!(rest.iter().any(|e| matches!(
        e,
        AgentEvent::ToolFinished {
            outcome: ToolOutcome::Ok,
            ..
        }
    )));
    assert!(s.workspace.join("owned.txt").exists());
}

#[tokio::test]
async fn a_cancelled_turn_stops_waiting_and_runs_nothing() {
    let script = format!("{}{DONE}", write_call("never.txt", "x"));
    let s = Setup::start(&script, ApprovalConfig::default()).await;
    let mut events = telegram_turn(&s.gateway, "telegram-1001", "1001").await;
    let id = local_approval(&mut events).await;
    assert!(
        s.gateway
            .cancel(&SessionId::parse("telegram-1001").unwrap())
    );
    let rest = tokio::time::timeout(HANG, events.collect()).await.unwrap();
    assert!(
        matches!(
            rest.last(),
            Some(AgentEvent::Error {
                code: ErrorCode::Cancelled,
                ..
            })
        ),
        "{rest:?}"
    );
    assert!(!s.workspace.join("never.txt").exists());
    let owner = Origin {
        channel: "telegram".into(),
        user: Some("1001".into()),
    };
    assert!(
        s.gateway
            .approve(&id, Decision::Approve, &owner, None)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_deny_policy_refuses_without_asking() {
    let script = format!("{}{DONE}", run_call("echo hi"));
    let mut cfg = ApprovalConfig::default();
    cfg.commands.insert("echo".into(), ApprovalPolicy::Deny);
    let s = Setup::start(&script, cfg).await;
    let client = s.client().await;
    let events = client.send(None, "run").await.unwrap();
    let all = rest(events).await;
    assert!(
        all.iter()
            .all(|e| !matches!(e, Event::ApprovalRequired { .. }))
    );
    assert_eq!(finished(&all)[0].0, ToolOutcome::Denied, "{all:?}");
    assert_eq!(s.audited("approval_policy_denied").await.len(), 1);
}

#[tokio::test]
async fn a_program_off_the_allowlist_asks_and_runs_only_when_approved() {
    // `printf` is not on the default allowlist; `python3` is an interpreter,
    // refused by the policy without asking.
    let script = format!(
        "{}{}{}{DONE}",
        run_call("printf approved"),
        run_call("printf refused"),
        run_call("python3 -c 1")
    );
    let s = Setup::start(&script, ApprovalConfig::default()).await;
    let client = s.client().await;
    let mut events = client.send(None, "print").await.unwrap();
    let mut seen = Vec::new();
    let mut asked = Vec::new();
    loop {
        let ev = next(&mut events).await;
        match &ev {
            Event::ApprovalRequired { id, args, .. } => {
                asked.push(args.clone());
                let decision = if args.contains("approved") {
                    Decision::Approve
                } else {
                    Decision::Deny
                };
                client.approve(id, decision).await.unwrap();
            }
            Event::Agent(AgentEvent::Final { .. } | AgentEvent::Error { .. }) => {
                seen.push(ev);
                break;
            }
            _ => {}
        }
        seen.push(ev);
    }
    assert_eq!(asked.len(), 2, "{asked:?}");
    let done = finished(&seen);
    assert_eq!(done.len(), 3, "{seen:?}");
    assert_eq!(done[0].0, ToolOutcome::Ok, "{done:?}");
    assert!(done[0].1.contains("approved"), "{done:?}");
    assert_eq!(done[1].0, ToolOutcome::Denied, "{done:?}");
    assert!(done[1].1.contains("denied this system.run"), "{done:?}");
    assert_eq!(done[2].0, ToolOutcome::Denied, "{done:?}");
    assert!(done[2].1.contains("\"python3\""), "{done:?}");
}
