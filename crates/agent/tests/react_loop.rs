//! The ReAct loop driven by the scripted provider, with real SQLite and real
//! tools (plus small test tools for failures and slow calls).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use openpista_agent::{Agent, AgentConfig, AgentError, AgentParts};
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::Store;
use openpista_proto::{AgentEvent, ErrorCode, Role, ToolDefinition, ToolOutcome};
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
            parameters: json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false}),
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

/// Waits until cancelled; counts how many run at once.
struct Slow {
    running: Arc<AtomicUsize>,
    max_seen: Arc<AtomicUsize>,
}
#[async_trait]
impl Tool for Slow {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "test.slow".into(),
            description: "Takes a while.".into(),
            parameters: json!({"type": "object", "properties": {"ms": {"type": "integer"}}}),
        }
    }
    async fn call(&self, args: Value, ctx: &ToolContext) -> Result<ToolOutput, ToolError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_seen.fetch_max(now, Ordering::SeqCst);
        let ms = args["ms"].as_u64().unwrap_or(60_000);
        let r = tokio::select! {
            () = ctx.cancel.cancelled() => Err(ToolError::Cancelled),
            () = tokio::time::sleep(Duration::from_millis(ms)) => Ok(ToolOutput::ok("slept")),
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

struct Harness {
    agent: Agent,
    llm: Arc<ScriptedProvider>,
    store: Store,
    max_seen: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

async fn harness(script: &str, config: AgentConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    let llm = Arc::new(ScriptedProvider::new(Script::from_toml(script).unwrap()));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(Echo)).unwrap();
    tools.register(Arc::new(Fail)).unwrap();
    tools
        .register(Arc::new(Slow {
            running: Arc::new(AtomicUsize::new(0)),
            max_seen: max_seen.clone(),
        }))
        .unwrap();
    let workspace = dir.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let agent = Agent::new(AgentParts {
        llm: llm.clone(),
        tools: Arc::new(tools),
        store: store.clone(),
        config,
        workspace,
        skills_context: "Skills you can use:\n- weather: Tells the weather.".into(),
    });
    Harness {
        agent,
        llm,
        store,
        max_seen,
        _dir: dir,
    }
}

async fn collect(mut rx: mpsc::Receiver<AgentEvent>) -> Vec<AgentEvent> {
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        out.push(ev);
    }
    out
}

fn kinds(events: &[AgentEvent]) -> Vec<&'static str> {
    let mut k: Vec<&'static str> = events
        .iter()
        .map(|e| match e {
            AgentEvent::Accepted { .. } => "accepted",
            AgentEvent::TextDelta { .. } => "text",
            AgentEvent::ToolStarted { .. } => "tool_started",
            AgentEvent::ToolFinished { .. } => "tool_finished",
            AgentEvent::ApprovalRequired { .. } => "approval_required",
            AgentEvent::Final { .. } => "final",
            AgentEvent::Error { .. } => "error",
        })
        .collect();
    k.dedup_by(|a, b| *a == "text" && *b == "text");
    k
}

#[tokio::test]
async fn several_rounds_with_several_calls_per_round() {
    let h = harness(
        r#"
        [[reply]]
        text = "Let me look."
        tool_calls = [{ name = "test.echo", arguments = { a = 1 } }, { name = "test.echo", arguments = { a = 2 } }]
        [[reply]]
        tool_calls = [{ name = "test.echo", arguments = { a = 3 } }]
        [[reply]]
        text = "All done: 1, 2, 3."
        "#,
        AgentConfig::default(),
    )
    .await;
    let session = h.agent.create_session("test").await.unwrap();
    let (tx, rx) = mpsc::channel(64);
    let outcome = session
        .run_turn("count to three", tx, CancellationToken::new())
        .await
        .unwrap();
    let events = collect(rx).await;
    assert_eq!(outcome.text, "All done: 1, 2, 3.");
    assert_eq!(outcome.llm_calls, 3);
    assert_eq!(outcome.tool_calls, 3);
    assert_eq!(
        kinds(&events),
        [
            "accepted",
            "text",
            "tool_started",
            "tool_finished",
            "tool_started",
            "tool_finished",
            "tool_started",
            "tool_finished",
            "text",
            "final"
        ]
    );

    // The second request carried the first round: the assistant's text kept
    // next to its calls, and each result answering its call.
    let requests = h.llm.requests();
    assert_eq!(requests.len(), 3);
    let second = &requests[1].messages;
    assert_eq!(second[0].role, Role::System);
    assert!(second[0].content.contains("weather: Tells the weather."));
    let asst = second.iter().find(|m| m.role == Role::Assistant).unwrap();
    assert_eq!(asst.content, "Let me look.");
    assert_eq!(asst.tool_calls.len(), 2);
    let results: Vec<_> = second.iter().filter(|m| m.role == Role::Tool).collect();
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0].tool_call_id.as_deref(),
        Some(asst.tool_calls[0].id.as_str())
    );
    assert_eq!(results[1].content, "echo 2");
    assert_eq!(requests[0].tools.len(), 3);

    // Everything is persisted, in order.
    let stored = h.store.recent_messages(session.id(), 100).await.unwrap();
    let roles: Vec<Role> = stored.iter().map(|m| m.message.role).collect();
    assert_eq!(
        roles,
        [
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Tool,
            Role::Assistant,
            Role::Tool,
            Role::Assistant
        ]
    );
    let rec = h.store.get_session(session.id()).await.unwrap().unwrap();
    assert_eq!(rec.title.as_deref(), Some("count to three"));
    let inv = h.store.tool_invocations(session.id(), 10).await.unwrap();
    assert_eq!(inv.len(), 3);
    assert!(inv.iter().all(|i| i.outcome == ToolOutcome::Ok));
    assert_eq!(inv[2].result, "echo 3");

    // The audit trail holds the turn's start, each call and its end, chained.
    let audit = h.store.audit(100, Some(session.id())).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "turn_started",
            "tool_call",
            "tool_call",
            "tool_call",
            "turn_finished"
        ]
    );
    assert!(audit.iter().all(|r| r.actor == "agent"));
    let call = &audit[1].detail;
    assert_eq!(call["tool"], "test.echo");
    assert_eq!(call["call_id"], inv[0].call_id.as_str());
    assert_eq!(call["outcome"], "ok");
    assert_eq!(
        call["args_sha256"],
        openpista_memory::sha256_hex(inv[0].args.as_bytes()).as_str()
    );
    // The arguments themselves are not in the audit trail.
    assert!(call.get("args").is_none(), "{call}");
    assert_eq!(audit[4].detail["outcome"], "ok");
    assert_eq!(audit[4].detail["tool_calls"], 3);
    assert!(h.store.verify_audit().await.unwrap().is_intact());
}

#[tokio::test]
async fn stops_at_the_round_limit() {
    let h = harness(
        r#"
        on_exhausted = "repeat_last"
        [[reply]]
        text = "again"
        tool_calls = [{ name = "test.echo", arguments = { a = 1 } }]
        "#,
        AgentConfig {
            max_tool_rounds: 2,
            ..AgentConfig::default()
        },
    )
    .await;
    let session = h.agent.create_session("test").await.unwrap();
    let (tx, rx) = mpsc::channel(64);
    let err = session
        .run_turn("loop forever", tx, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::MaxRounds(2)), "{err}");
    let events = collect(rx).await;
    assert!(matches!(
        events.last(),
        Some(AgentEvent::Error {
            code: ErrorCode::MaxRounds,
            ..
        })
    ));
    // Two rounds of tools ran; the third model call was the last.
    assert_eq!(h.llm.requests().len(), 3);
    assert_eq!(
        h.store
            .tool_invocations(session.id(), 10)
            .await
            .unwrap()
            .len(),
        2
    );
    // The session stays usable: the next turn runs (and stops the same way).
    let (tx, _rx) = mpsc::channel(64);
    let again = session.run_turn("hi", tx, CancellationToken::new()).await;
    assert!(matches!(again, Err(AgentError::MaxRounds(2))));
    assert_eq!(h.llm.requests().len(), 6);
}

#[tokio::test]
async fn tool_errors_are_fed_back_not_fatal() {
    let h = harness(
        r#"
        [[reply]]
        tool_calls = [
          { name = "test.fail" },
          { name = "no.such.tool", arguments = { x = 1 } },
          { name = "test.echo", arguments = { a = "not a number" } },
          { name = "test.echo", arguments_raw = "{broken json" },
          { name = "", arguments_raw = "{\"name\": \"test.ec" },
        ]
        [[reply]]
        text = "Sorry, that did not work."
        "#,
        AgentConfig::default(),
    )
    .await;
    let session = h.agent.create_session("test").await.unwrap();
    let (tx, rx) = mpsc::channel(64);
    let outcome = session
        .run_turn("try things", tx, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(outcome.text, "Sorry, that did not work.");
    let events = collect(rx).await;
    let finished: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::ToolFinished {
                outcome, output, ..
            } => Some((*outcome, output.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 5);
    assert!(finished.iter().all(|(o, _)| *o == ToolOutcome::Error));
    assert!(
        finished[0].1.contains("the disk is on fire"),
        "{finished:?}"
    );
    assert!(finished[1].1.contains("unknown tool"), "{finished:?}");
    assert!(
        finished[1].1.contains("test.echo"),
        "lists the available tools: {finished:?}"
    );
    assert!(finished[2].1.contains("invalid arguments"), "{finished:?}");
    assert!(finished[3].1.contains("not valid JSON"), "{finished:?}");
    assert!(
        finished[4].1.contains("malformed or cut off"),
        "{finished:?}"
    );
    let second = &h.llm.requests()[1].messages;
    let fed_back: Vec<_> = second.iter().filter(|m| m.role == Role::Tool).collect();
    assert_eq!(fed_back.len(), 5);
    assert!(fed_back.iter().all(|m| m.content.starts_with("error:")));

    // Failed calls are audited too, with their outcome.
    let audit = h.store.audit(100, Some(session.id())).await.unwrap();
    let calls: Vec<_> = audit.iter().filter(|r| r.action == "tool_call").collect();
    assert_eq!(calls.len(), 5);
    assert!(calls.iter().all(|r| r.detail["outcome"] == "error"));
    assert_eq!(calls[1].detail["tool"], "no.such.tool");
}

#[tokio::test]
async fn a_running_turn_can_be_cancelled() {
    let h = harness(
        r#"
        [[reply]]
        text = "Working on it."
        tool_calls = [{ name = "test.slow" }, { name = "test.echo", arguments = { a = 1 } }]
        [[reply]]
        text = "a very long answer that streams slowly"
        delay_ms = 200
        chunk_chars = 2
        [[reply]]
        text = "fine"
        "#,
        AgentConfig::default(),
    )
    .await;
    let session = h.agent.create_session("test").await.unwrap();

    // Cancel while a tool runs.
    let (tx, mut rx) = mpsc::channel(64);
    let s = session.clone();
    let turn = tokio::spawn(async move { s.run_turn("slow", tx, CancellationToken::new()).await });
    while let Some(ev) = rx.recv().await {
        if matches!(ev, AgentEvent::ToolStarted { .. }) {
            assert!(session.cancel());
            break;
        }
    }
    let err = turn.await.unwrap().unwrap_err();
    assert!(matches!(err, AgentError::Cancelled), "{err}");
    let rest = collect(rx).await;
    assert!(matches!(
        rest.last(),
        Some(AgentEvent::Error {
            code: ErrorCode::Cancelled,
            ..
        })
    ));
    let inv = h.store.tool_invocations(session.id(), 10).await.unwrap();
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].outcome, ToolOutcome::Cancelled);
    assert_eq!(
        inv[1].outcome,
        ToolOutcome::Cancelled,
        "later calls do not run"
    );
    assert!(!session.cancel(), "nothing is running now");
    let audit = h.store.audit(100, Some(session.id())).await.unwrap();
    let last = audit.last().unwrap();
    assert_eq!(last.action, "turn_finished");
    assert_eq!(last.detail["outcome"], "cancelled");
    assert_eq!(
        audit.iter().filter(|r| r.action == "tool_call").count(),
        2,
        "cancelled calls are audited"
    );

    // Cancel while the model streams, through the caller's token.
    let (tx, mut rx) = mpsc::channel(64);
    let token = CancellationToken::new();
    let s = session.clone();
    let t = token.clone();
    let turn = tokio::spawn(async move { s.run_turn("stream", tx, t).await });
    while let Some(ev) = rx.recv().await {
        if matches!(ev, AgentEvent::TextDelta { .. }) {
            token.cancel();
            break;
        }
    }
    assert!(matches!(turn.await.unwrap(), Err(AgentError::Cancelled)));

    // The user's messages are stored and the session goes on.
    let (tx, _rx) = mpsc::channel(64);
    let ok = session
        .run_turn("again", tx, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(ok.text, "fine");
    let stored = h.store.recent_messages(session.id(), 100).await.unwrap();
    let users: Vec<_> = stored
        .iter()
        .filter(|m| m.message.role == Role::User)
        .map(|m| m.message.content.as_str())
        .collect();
    assert_eq!(users, ["slow", "stream", "again"]);
    // The partial streamed answer was kept, marked as cancelled.
    assert!(
        stored
            .iter()
            .any(|m| m.message.content.ends_with("[cancelled]"))
    );
}

#[tokio::test]
async fn concurrent_messages_to_one_session_are_serialized() {
    let h = harness(
        r#"
        on_exhausted = "repeat_last"
        [[reply]]
        tool_calls = [{ name = "test.slow", arguments = { ms = 150 } }]
        [[reply]]
        text = "first done"
        [[reply]]
        tool_calls = [{ name = "test.slow", arguments = { ms = 150 } }]
        [[reply]]
        text = "second done"
        "#,
        AgentConfig::default(),
    )
    .await;
    let a = h.agent.create_session("test").await.unwrap();
    // A second handle to the same session, as another channel would get.
    let b = h.agent.open_session(a.id()).await.unwrap();
    let (tx1, _r1) = mpsc::channel(64);
    let (tx2, _r2) = mpsc::channel(64);
    let (r1, r2) = tokio::join!(
        a.run_turn("one", tx1, CancellationToken::new()),
        b.run_turn("two", tx2, CancellationToken::new())
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(
        h.max_seen.load(Ordering::SeqCst),
        1,
        "tools never overlapped"
    );
    let mut texts = [r1.text, r2.text];
    texts.sort();
    assert_eq!(texts, ["first done", "second done"]);
    // The turns did not interleave: user, assistant(call), tool, assistant, then the same again.
    let stored = h.store.recent_messages(a.id(), 100).await.unwrap();
    let roles: Vec<Role> = stored.iter().map(|m| m.message.role).collect();
    assert_eq!(
        roles,
        [
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Assistant,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Assistant
        ]
    );
}

#[tokio::test]
async fn history_is_trimmed_to_the_window_without_orphaning_results() {
    let h = harness(
        r#"
        on_exhausted = "echo"
        [[reply]]
        text = "x"
        tool_calls = [{ name = "test.echo", arguments = { a = 1 } }]
        "#,
        AgentConfig {
            default_context_window: 700,
            reply_reserve_tokens: 100,
            ..AgentConfig::default()
        },
    )
    .await;
    let session = h.agent.create_session("test").await.unwrap();
    for i in 0..12 {
        let (tx, _rx) = mpsc::channel(64);
        session
            .run_turn(
                &format!("message {i} {}", "padding ".repeat(40)),
                tx,
                CancellationToken::new(),
            )
            .await
            .unwrap();
    }
    let last = h.llm.requests().pop().unwrap();
    let non_system: Vec<_> = last.messages.iter().skip(1).collect();
    assert!(non_system.len() < 24, "trimmed: {}", non_system.len());
    assert_ne!(
        non_system[0].role,
        Role::Tool,
        "never starts with an orphaned result"
    );
    assert!(non_system.last().unwrap().content.starts_with("message 11"));

    // A message that cannot fit at all is a clear error, and it is still stored.
    let (tx, _rx) = mpsc::channel(64);
    let err = session
        .run_turn(&"huge ".repeat(5000), tx, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::ContextOverflow { .. }), "{err}");
    let count = h.store.message_count(session.id()).await.unwrap();
    assert_eq!(count, 12 * 2 + 2 + 1);
}

#[tokio::test]
async fn unknown_session_is_not_found() {
    let h = harness("", AgentConfig::default()).await;
    let id = openpista_proto::SessionId::parse("no-such-session").unwrap();
    assert!(matches!(
        h.agent.open_session(&id).await,
        Err(AgentError::NotFound(_))
    ));
    // Channels with stable ids create on first use.
    let s = h.agent.session_for(&id, "telegram").await.unwrap();
    assert_eq!(s.id(), &id);
}

/// Every message of a session, oldest first, as stored.
async fn stored(h: &Harness, id: &openpista_proto::SessionId) -> Vec<openpista_proto::ChatMessage> {
    h.store
        .recent_messages(id, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message)
        .collect()
}

#[tokio::test]
async fn each_request_carries_exactly_the_stored_history() {
    // The session keeps its recent history in memory between rounds and
    // turns; what it sends must be what SQLite holds at that moment.
    let h = harness(
        r#"
        [[reply]]
        text = "Looking."
        tool_calls = [{ name = "test.echo", arguments = { a = 1 } }, { name = "test.fail", arguments = {} }]
        [[reply]]
        text = "first"
        [[reply]]
        text = "second"
        [[reply]]
        tool_calls = [{ name = "test.echo", arguments = { a = 2 } }]
        [[reply]]
        text = "third"
        "#,
        AgentConfig::default(),
    )
    .await;
    let session = h.agent.create_session("test").await.unwrap();
    for text in ["one", "two", "three"] {
        let (tx, rx) = mpsc::channel(64);
        session
            .run_turn(text, tx, CancellationToken::new())
            .await
            .unwrap();
        collect(rx).await;
    }
    let all = stored(&h, session.id()).await;
    assert_eq!(all.len(), 11, "{all:#?}");
    let requests = h.llm.requests();
    assert_eq!(requests.len(), 5);
    for (i, r) in requests.iter().enumerate() {
        let history = &r.messages[1..];
        assert_eq!(history, &all[..history.len()], "request {i}");
    }
    // Each request ended where the stored history was at the time.
    let lengths: Vec<usize> = requests.iter().map(|r| r.messages.len() - 1).collect();
    assert_eq!(lengths, [1, 4, 6, 8, 10]);
}

#[tokio::test]
async fn the_window_slides_over_the_kept_history() {
    let h = harness(
        "on_exhausted = \"repeat_last\"\n[[reply]]\ntext = \"ok\"\n",
        AgentConfig {
            history_limit: 3,
            ..AgentConfig::default()
        },
    )
    .await;
    let session = h.agent.create_session("test").await.unwrap();
    for n in 0..5 {
        let (tx, rx) = mpsc::channel(64);
        session
            .run_turn(&format!("message {n}"), tx, CancellationToken::new())
            .await
            .unwrap();
        collect(rx).await;
        let all = stored(&h, session.id()).await;
        // The request of this turn: the newest 3 messages before its reply.
        let before_reply = &all[..all.len() - 1];
        let expected = &before_reply[before_reply.len().saturating_sub(3)..];
        let last = h.llm.requests().pop().unwrap();
        assert_eq!(&last.messages[1..], expected, "turn {n}");
    }
}

#[tokio::test]
async fn messages_written_by_someone_else_reach_the_model() {
    let h = harness(
        "on_exhausted = \"repeat_last\"\n[[reply]]\ntext = \"ok\"\n",
        AgentConfig::default(),
    )
    .await;
    let id = openpista_proto::SessionId::parse("telegram-42").unwrap();
    let session = h.agent.session_for(&id, "telegram").await.unwrap();
    let turn = |text: &'static str| {
        let session = session.clone();
        async move {
            let (tx, rx) = mpsc::channel(64);
            session
                .run_turn(text, tx, CancellationToken::new())
                .await
                .unwrap();
            collect(rx).await;
        }
    };
    turn("first").await;

    // Another writer (a second process on the same database, say) appends
    // between two turns: the next request must include it.
    h.store
        .append_message(
            &id,
            &openpista_proto::ChatMessage::user("written elsewhere"),
            None,
        )
        .await
        .unwrap();
    turn("second").await;
    let last = h.llm.requests().pop().unwrap();
    let history = &last.messages[1..];
    assert_eq!(history, stored(&h, &id).await[..history.len()].to_vec());
    assert!(history.iter().any(|m| m.content == "written elsewhere"));

    // The session is deleted and created again under the same id, with as
    // many messages as before: nothing of the old history may reach the model.
    assert!(h.store.delete_session(&id).await.unwrap());
    h.store.create_session(&id, "telegram", None).await.unwrap();
    for i in 0..5 {
        h.store
            .append_message(
                &id,
                &openpista_proto::ChatMessage::user(format!("new {i}")),
                None,
            )
            .await
            .unwrap();
    }
    turn("third").await;
    let last = h.llm.requests().pop().unwrap();
    let history = &last.messages[1..];
    assert_eq!(history, stored(&h, &id).await[..history.len()].to_vec());
    assert!(
        !history
            .iter()
            .any(|m| m.content == "first" || m.content == "written elsewhere"),
        "{history:#?}"
    );
}
