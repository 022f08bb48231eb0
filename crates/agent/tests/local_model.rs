//! The loop on the real SmolLM2-135M GGUF with the real built-in tools: the
//! model's grammar-constrained call is well formed, names a registered tool,
//! passes its schema, and the loop runs it.

use std::path::PathBuf;
use std::sync::Arc;

use openpista_agent::{Agent, AgentConfig, AgentParts};
use openpista_llm::local::{LocalConfig, LocalProvider};
use openpista_memory::Store;
use openpista_proto::{AgentEvent, Role, ToolOutcome};
use openpista_tools::files::FileLimits;
use openpista_tools::policy::CommandPolicy;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn model_path() -> PathBuf {
    openpista_testkit::real_model_path()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_model_calls_a_registered_tool_and_the_loop_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join("notes.txt"), "buy milk\n").unwrap();
    let env = openpista_sandbox::minimal_env("/usr/local/bin:/usr/bin:/bin", &workspace);
    let tools = Arc::new(
        openpista_tools::builtin_registry(CommandPolicy::default(), FileLimits::default(), env)
            .unwrap(),
    );
    let path = model_path();
    let llm = tokio::task::spawn_blocking(move || {
        LocalProvider::load(
            &path,
            LocalConfig {
                threads: 2,
                context_size: 4096,
                temperature: 0.0,
                max_tokens: 96,
                ..LocalConfig::default()
            },
            |_| true,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    let agent = Agent::new(AgentParts {
        llm: Arc::new(llm),
        tools: tools.clone(),
        store: store.clone(),
        config: AgentConfig {
            max_tool_rounds: 2,
            ..AgentConfig::default()
        },
        workspace,
        skills_context: String::new(),
    });
    let session = agent.create_session("test").await.unwrap();
    let (tx, mut rx) = mpsc::channel(256);
    let s = session.clone();
    let turn = tokio::spawn(async move {
        s.run_turn(
            "List the files in the current directory.",
            tx,
            CancellationToken::new(),
        )
        .await
    });
    let mut events = Vec::new();
    while let Some(ev) = rx.recv().await {
        events.push(ev);
    }
    // Whatever the turn's end (a 135M model may loop on tools), the calls were well formed.
    let _ = turn.await.unwrap();
    let started: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::ToolStarted { name, args, .. } => Some((name.clone(), args.clone())),
            _ => None,
        })
        .collect();
    assert!(!started.is_empty(), "the model called no tool: {events:?}");
    for (name, args) in &started {
        assert!(tools.contains(name), "unregistered tool {name:?}");
        let parsed: serde_json::Value = serde_json::from_str(args).expect("arguments parse");
        tools
            .validate(name, args)
            .unwrap_or_else(|e| panic!("{name} {parsed}: {e}"));
    }
    // The loop ran the first call and fed its result back.
    let finished = events
        .iter()
        .find_map(|e| match e {
            AgentEvent::ToolFinished {
                outcome, output, ..
            } => Some((*outcome, output.clone())),
            _ => None,
        })
        .expect("a tool finished");
    assert_ne!(finished.0, ToolOutcome::Cancelled);
    let stored = store.recent_messages(session.id(), 50).await.unwrap();
    assert!(stored.iter().any(|m| m.message.role == Role::Tool));
    println!("calls: {started:?}\nfirst result: {finished:?}");
}
