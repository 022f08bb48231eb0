//! Session control through the SDK over real QUIC: `list_sessions` shows
//! each session's state (a turn waiting for an approval is
//! `waiting_approval`), `control_session` kills, suspends and resumes, and a
//! suspended session refuses turns with `session_suspended`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openpista_agent::{Agent, AgentConfig, AgentParts, ApprovalConfig, Approvals};
use openpista_client::{Client, Event, EventStream, Trust};
use openpista_gateway::{Gateway, GatewayConfig, QuicServer, TlsIdentity};
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::Store;
use openpista_proto::wire::{SessionAction, SessionState};
use openpista_proto::{AgentEvent, ErrorCode, SessionId};
use openpista_tools::builtin_registry;
use openpista_tools::policy::CommandPolicy;

const TOKEN: &str = "session control token";
/// A "did not hang" bound, never a timing assertion.
const HANG: Duration = Duration::from_secs(40);

/// Every turn asks to write a file (which needs an approval), then answers.
const SCRIPT: &str = r#"
[[reply]]
text = "Writing."
tool_calls = [{ name = "file.write", arguments = { path = "a.txt", content = "x" } }]

[[reply]]
text = "Done."
"#;

async fn next(events: &mut EventStream) -> Event {
    tokio::time::timeout(HANG, events.next())
        .await
        .expect("the turn did not hang")
        .expect("an event before the end")
        .expect("no stream error")
}

async fn state_of(client: &Client, id: &SessionId) -> SessionState {
    client
        .sessions(None)
        .await
        .unwrap()
        .into_iter()
        .find(|s| &s.id == id)
        .map(|s| s.state)
        .expect("listed")
}

#[tokio::test]
async fn states_kill_suspend_and_resume_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    let llm = Arc::new(ScriptedProvider::new(Script::from_toml(SCRIPT).unwrap()));
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
        Approvals::new(ApprovalConfig::default(), Some(CommandPolicy::default())),
    );
    let cfg = GatewayConfig {
        bind: "127.0.0.1:0".into(),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(agent, &cfg);
    let tls = TlsIdentity::load_or_generate(&dir.path().join("tls")).unwrap();
    let server = QuicServer::bind(gateway.clone(), &cfg, tls, Some(TOKEN.into())).unwrap();
    let client = Client::connect(
        server.local_addr(),
        Some(TOKEN.into()),
        Trust::Fingerprint(server.fingerprint().to_owned()),
    )
    .await
    .unwrap();

    // A turn waiting for an approval.
    let mut events = client.send(None, "write it").await.unwrap();
    let id = match next(&mut events).await {
        Event::Agent(AgentEvent::Accepted { session_id, .. }) => session_id,
        other => panic!("expected accepted, got {other:?}"),
    };
    loop {
        if let Event::ApprovalRequired { .. } = next(&mut events).await {
            break;
        }
    }
    assert_eq!(state_of(&client, &id).await, SessionState::WaitingApproval);

    // Kill: the waiting turn ends cancelled, the session is idle.
    assert!(
        client.kill_session(&id).await.unwrap(),
        "a turn was running"
    );
    let tail = tokio::time::timeout(HANG, events.collect_all())
        .await
        .unwrap()
        .unwrap();
    match tail.last() {
        Some(Event::Agent(AgentEvent::Error { code, .. })) => {
            assert_eq!(*code, ErrorCode::Cancelled)
        }
        other => panic!("expected a cancelled turn: {other:?}"),
    }
    assert!(!workspace.join("a.txt").exists(), "nothing was written");
    assert_eq!(state_of(&client, &id).await, SessionState::Idle);
    assert!(!client.kill_session(&id).await.unwrap(), "nothing runs now");

    // Suspend: listed as suspended, turns refused with a clear code.
    assert!(!client.suspend_session(&id).await.unwrap());
    let listed = client.sessions(None).await.unwrap();
    let row = listed.iter().find(|s| s.id == id).unwrap();
    assert_eq!(row.state, SessionState::Suspended);
    assert_eq!(
        row.suspended_reason.as_deref(),
        Some("suspended by the operator")
    );
    let refused = client
        .send(Some(&id), "again")
        .await
        .unwrap()
        .collect_all()
        .await;
    let last = match refused {
        Ok(events) => events.last().cloned(),
        Err(e) => panic!("{e}"),
    };
    match last {
        Some(Event::Agent(AgentEvent::Error { code, message })) => {
            assert_eq!(code, ErrorCode::SessionSuspended);
            assert!(message.contains("sessions resume"), "{message}");
        }
        other => panic!("expected session_suspended: {other:?}"),
    }

    // Resume: it takes turns again.
    assert_eq!(
        client.resume_session(&id).await.unwrap(),
        SessionState::Idle
    );

    // An unknown session is `not_found`.
    let ghost = SessionId::parse("ghost").unwrap();
    for action in [
        SessionAction::Kill,
        SessionAction::Suspend,
        SessionAction::Resume,
    ] {
        let err = client.control_session(&ghost, action).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotFound), "{action:?}: {err}");
    }
    let actions: Vec<String> = store
        .audit(1000, Some(&id))
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.actor == "operator")
        .map(|r| r.action)
        .collect();
    assert_eq!(
        actions,
        [
            "session_killed",
            "session_killed",
            "session_suspended",
            "session_resumed"
        ]
    );
}
