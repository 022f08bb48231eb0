//! `[quotas]` through the real turn loop: the scripted provider, real SQLite
//! (a file, reopened to show what survives a restart) and small test tools.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use openpista_agent::{Agent, AgentConfig, AgentError, AgentParts, QuotaConfig};
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::Store;
use openpista_proto::{AgentEvent, ErrorCode, SessionId, ToolDefinition, ToolOutcome};
use openpista_tools::{Tool, ToolContext, ToolError, ToolOutput, ToolRegistry};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Echo;
#[async_trait]
impl Tool for Echo {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "test.echo".into(),
            description: "Echoes its argument.".into(),
            parameters: json!({"type": "object", "properties": {"a": {"type": "integer"}}}),
        }
    }
    async fn call(&self, args: Value, _ctx: &ToolContext) -> Result<ToolOutput, ToolError> {
        Ok(ToolOutput::ok(format!("echo {}", args["a"])))
    }
}

struct Fail;
#[async_trait]
impl Tool for Fail {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "test.fail".into(),
            description: "Always fails.".into(),
            parameters: json!({"type": "object"}),
        }
    }
    async fn call(&self, _args: Value, _ctx: &ToolContext) -> Result<ToolOutput, ToolError> {
        Err(ToolError::Failed("the disk is on fire".into()))
    }
}

/// An agent over the database at `db` with `quotas`.
async fn agent(db: &Path, script: &str, quotas: QuotaConfig) -> Agent {
    let store = Store::open(db).await.unwrap();
    let llm = Arc::new(ScriptedProvider::new(Script::from_toml(script).unwrap()));
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(Echo)).unwrap();
    tools.register(Arc::new(Fail)).unwrap();
    let workspace = db.parent().unwrap().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    Agent::new(AgentParts {
        llm,
        tools: Arc::new(tools),
        store,
        config: AgentConfig {
            system_prompt: "s".into(),
            // Only the newest message is history, so each turn's first model
            // call costs about the same.
            history_limit: 1,
            quotas,
            ..AgentConfig::default()
        },
        workspace,
        skills_context: String::new(),
    })
}

/// Runs one turn of `id`; returns its events and result.
async fn turn(
    agent: &Agent,
    id: &SessionId,
    text: &str,
) -> (
    Vec<AgentEvent>,
    Result<openpista_agent::TurnOutcome, AgentError>,
) {
    let session = agent.session_for(id, "test").await.unwrap();
    let (tx, mut rx) = mpsc::channel(256);
    let result = session.run_turn(text, tx, CancellationToken::new()).await;
    let mut events = Vec::new();
    while let Some(ev) = rx.recv().await {
        events.push(ev);
    }
    (events, result)
}

fn tools_finished(events: &[AgentEvent]) -> Vec<(ToolOutcome, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::ToolFinished {
                outcome, output, ..
            } => Some((*outcome, output.clone())),
            _ => None,
        })
        .collect()
}

fn last_error(events: &[AgentEvent]) -> (ErrorCode, String) {
    match events.last() {
        Some(AgentEvent::Error { code, message }) => (*code, message.clone()),
        other => panic!("the turn did not end with an error: {other:?}"),
    }
}

/// Every reply: 400 characters of text (100 scripted tokens) and one call.
fn chatty_tool_script() -> String {
    format!(
        "on_exhausted = \"repeat_last\"\n[[reply]]\ntext = \"{}\"\ntool_calls = [{{ name = \"test.echo\", arguments = {{ a = 1 }} }}]\n",
        "x".repeat(400)
    )
}

#[tokio::test]
async fn tokens_per_turn_stop_the_turn_and_each_turn_gets_a_fresh_budget() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = QuotaConfig {
        tokens_per_turn: 150,
        ..QuotaConfig::default()
    };
    let agent = agent(&dir.path().join("db"), &chatty_tool_script(), quotas).await;
    let id = SessionId::parse("turny").unwrap();
    for n in 1..=2 {
        let (events, result) = turn(&agent, &id, "go").await;
        assert!(matches!(result, Err(AgentError::Quota(_))), "{result:?}");
        // The first call (about 100 tokens) fits, so one tool runs; the
        // second call passes 150 and the turn stops before running more.
        assert_eq!(tools_finished(&events).len(), 1, "turn {n}: {events:#?}");
        let (code, message) = last_error(&events);
        assert_eq!(code, ErrorCode::LimitExceeded);
        assert!(message.contains("tokens_per_turn"), "{message}");
    }
    let audit = agent.store().audit(100, Some(&id)).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|r| r.action == "quota_exceeded")
            .count(),
        2
    );
}

#[tokio::test]
async fn tokens_per_day_survive_a_restart_and_only_today_counts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let quotas = QuotaConfig {
        tokens_per_day: 150,
        ..QuotaConfig::default()
    };
    let id = SessionId::parse("daily").unwrap();
    let first = agent(&db, &chatty_tool_script(), quotas.clone()).await;
    // Yesterday's spending does not count today.
    first.store().ensure_session(&id, "test").await.unwrap();
    first
        .store()
        .add_token_usage(&id, "2000-01-01", 1_000_000)
        .await
        .unwrap();
    let (events, result) = turn(&first, &id, "go").await;
    assert!(matches!(result, Err(AgentError::Quota(_))), "{result:?}");
    assert_eq!(tools_finished(&events).len(), 1, "{events:#?}");
    assert!(last_error(&events).1.contains("tokens_per_day"));

    // The next turn is refused before it starts: no `accepted`.
    let (events, result) = turn(&first, &id, "again").await;
    assert!(matches!(result, Err(AgentError::Quota(_))), "{result:?}");
    assert_eq!(events.len(), 1, "{events:#?}");
    let (code, message) = last_error(&events);
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("midnight UTC"), "{message}");
    first.store().close().await;
    drop(first);

    // A restarted agent over the same database still refuses.
    let second = agent(&db, &chatty_tool_script(), quotas).await;
    let (events, result) = turn(&second, &id, "after restart").await;
    assert!(matches!(result, Err(AgentError::Quota(_))), "{result:?}");
    assert_eq!(events.len(), 1, "{events:#?}");
    // Another session has its own budget.
    let other = SessionId::parse("other").unwrap();
    let (events, _) = turn(&second, &other, "go").await;
    assert_eq!(tools_finished(&events).len(), 1, "{events:#?}");
    let audit = second.store().audit(100, Some(&id)).await.unwrap();
    assert_eq!(
        audit.iter().filter(|r| r.action == "turn_refused").count(),
        2
    );
}

#[tokio::test]
async fn tool_calls_over_the_minute_limit_are_refused_to_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
[[reply]]
tool_calls = [
  { name = "test.echo", arguments = { a = 1 } },
  { name = "test.echo", arguments = { a = 2 } },
  { name = "test.echo", arguments = { a = 3 } },
]
[[reply]]
text = "done"
"#;
    let quotas = QuotaConfig {
        tool_calls_per_minute: 2,
        ..QuotaConfig::default()
    };
    let agent = agent(&dir.path().join("db"), script, quotas).await;
    let id = SessionId::parse("busy").unwrap();
    let (events, result) = turn(&agent, &id, "go").await;
    assert_eq!(result.unwrap().text, "done");
    let done = tools_finished(&events);
    assert_eq!(done[0], (ToolOutcome::Ok, "echo 1".to_owned()));
    assert_eq!(done[1], (ToolOutcome::Ok, "echo 2".to_owned()));
    assert_eq!(done[2].0, ToolOutcome::Denied);
    assert!(done[2].1.contains("tool_calls_per_minute"), "{done:?}");
}

#[tokio::test]
async fn a_burst_of_failed_calls_suspends_the_session_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let script = r#"
[[reply]]
tool_calls = [
  { name = "test.fail" },
  { name = "test.fail" },
  { name = "test.fail" },
  { name = "test.echo", arguments = { a = 4 } },
]
[[reply]]
text = "back"
"#;
    let quotas = QuotaConfig {
        failure_burst: 3,
        failure_window_secs: 600,
        ..QuotaConfig::default()
    };
    let id = SessionId::parse("flaky").unwrap();
    let first = agent(&db, script, quotas.clone()).await;
    let (events, result) = turn(&first, &id, "go").await;
    assert!(
        matches!(result, Err(AgentError::Suspended { .. })),
        "{result:?}"
    );
    let done = tools_finished(&events);
    assert_eq!(done.len(), 4, "{done:?}");
    assert!(done[..3].iter().all(|(o, _)| *o == ToolOutcome::Error));
    // The call after the burst is not run.
    assert_eq!(done[3].0, ToolOutcome::Denied);
    assert!(done[3].1.contains("suspended"), "{done:?}");
    // The user is told, with a code a channel can act on.
    let (code, message) = last_error(&events);
    assert_eq!(code, ErrorCode::SessionSuspended);
    assert!(message.contains("3 tool calls failed"), "{message}");
    assert!(message.contains("openpista sessions resume"), "{message}");

    let (events, result) = turn(&first, &id, "still there?").await;
    assert!(matches!(result, Err(AgentError::Suspended { .. })));
    assert_eq!(events.len(), 1, "refused before it starts: {events:#?}");
    first.store().close().await;
    drop(first);

    // Suspension is persisted: a restart does not lift it; resume does.
    let second = agent(&db, "[[reply]]\ntext = \"back\"\n", quotas).await;
    assert!(second.suspension(&id).await.unwrap().is_some());
    let (_, result) = turn(&second, &id, "after restart").await;
    assert!(matches!(result, Err(AgentError::Suspended { .. })));
    assert!(second.resume_session(&id).await.unwrap());
    let (_, result) = turn(&second, &id, "hello again").await;
    assert_eq!(result.unwrap().text, "back");
    let actions: Vec<String> = second
        .store()
        .audit(100, Some(&id))
        .await
        .unwrap()
        .into_iter()
        .map(|r| format!("{}:{}", r.actor, r.action))
        .collect();
    for want in [
        "agent:session_suspended",
        "agent:turn_refused",
        "operator:session_resumed",
    ] {
        assert!(actions.iter().any(|a| a == want), "{want} in {actions:?}");
    }
}

#[tokio::test]
async fn operator_suspend_and_kill_of_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(
        &dir.path().join("db"),
        "on_exhausted = \"echo\"\n",
        QuotaConfig::default(),
    )
    .await;
    let id = SessionId::parse("ops").unwrap();
    let missing = SessionId::parse("nobody").unwrap();
    assert!(matches!(
        agent.kill_session(&missing).await,
        Err(AgentError::NotFound(_))
    ));
    assert!(matches!(
        agent.suspend_session(&missing, "x").await,
        Err(AgentError::NotFound(_))
    ));
    let (_, result) = turn(&agent, &id, "hi").await;
    assert_eq!(result.unwrap().text, "hi");
    assert!(!agent.is_running(&id));
    assert!(!agent.kill_session(&id).await.unwrap(), "nothing ran");
    assert!(!agent.suspend_session(&id, "maintenance").await.unwrap());
    let (events, result) = turn(&agent, &id, "hi").await;
    assert!(matches!(result, Err(AgentError::Suspended { .. })));
    let (code, message) = last_error(&events);
    assert_eq!(code, ErrorCode::SessionSuspended);
    assert!(message.contains("maintenance"), "{message}");
    assert!(agent.resume_session(&id).await.unwrap());
    assert!(!agent.resume_session(&id).await.unwrap());
    let (_, result) = turn(&agent, &id, "ok").await;
    assert_eq!(result.unwrap().text, "ok");
}
