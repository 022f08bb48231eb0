//! A screen capture reaches an image-capable model as an image part: the
//! model's first reply calls the real `screen.capture` under a private Xvfb,
//! and the second request to the (fake) OpenAI server carries the PNG as a
//! `data:` URL in an `image_url` part, never as base64 text.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use openpista_agent::{Agent, AgentConfig, AgentParts};
use openpista_llm::openai::{OpenAiConfig, OpenAiProvider};
use openpista_memory::Store;
use openpista_proto::Role;
use openpista_testkit::openai::{FakeOpenAi, Reply};
use openpista_testkit::xvfb::Xvfb;
use openpista_tools::ToolRegistry;
use openpista_tools::desktop::{DesktopConfig, DesktopEnv, desktop_tools};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Runs one turn whose first model reply calls `screen.capture`; returns the
/// recorded requests, the PNG's bytes and the store.
async fn capture_turn(images: bool) -> (Vec<Value>, Vec<u8>, Store, tempfile::TempDir) {
    let xvfb = Xvfb::start(&[]);
    let fake = FakeOpenAi::start([
        Reply::tool_calls([("screen.capture", r#"{"path":"shot.png"}"#)]),
        Reply::text("I see a black screen."),
    ])
    .await
    .unwrap();
    let llm = OpenAiProvider::new(OpenAiConfig {
        base_url: fake.base_url(),
        model: "vision-model".into(),
        max_retries: 0,
        images,
        ..OpenAiConfig::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    let workspace = dir.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let mut tools = ToolRegistry::new();
    let env = DesktopEnv {
        display: Some(xvfb.display().to_owned()),
        wayland_display: None,
    };
    let cfg = DesktopConfig {
        screen_capture: true,
        ..DesktopConfig::default()
    };
    for tool in desktop_tools(cfg, env) {
        tools.register(tool).unwrap();
    }
    let agent = Agent::new(AgentParts {
        llm: Arc::new(llm),
        tools: Arc::new(tools),
        store: store.clone(),
        config: AgentConfig::default(),
        workspace: workspace.clone(),
        skills_context: String::new(),
    });
    let session = agent.create_session("test").await.unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let outcome = session
        .run_turn("what is on my screen?", tx, CancellationToken::new())
        .await
        .unwrap();
    drain.await.unwrap();
    assert_eq!(outcome.text, "I see a black screen.");
    let png = std::fs::read(workspace.join("shot.png")).expect("the capture was saved");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");

    // The stored tool message keeps the capture's absolute path.
    let history = store.recent_messages(session.id(), 50).await.unwrap();
    let tool_msg = history
        .iter()
        .find(|m| m.message.role == Role::Tool)
        .expect("a tool message");
    assert_eq!(tool_msg.message.images.len(), 1);
    let stored = std::path::Path::new(&tool_msg.message.images[0]);
    assert!(stored.is_absolute(), "{stored:?}");
    assert_eq!(std::fs::read(stored).unwrap(), png);

    let bodies = fake.requests().into_iter().map(|r| r.body).collect();
    (bodies, png, store, dir)
}

/// Every text a message carries: a string content, or its text parts.
fn texts(message: &Value) -> Vec<String> {
    match &message["content"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn image_urls(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|p| p["type"] == "image_url")
        .map(|p| p["image_url"]["url"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_goes_to_an_image_model_as_an_image_part() {
    let (bodies, png, _store, _dir) = capture_turn(true).await;
    assert_eq!(bodies.len(), 2);
    let messages = bodies[1]["messages"].as_array().unwrap().clone();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
    let urls = image_urls(&messages);
    assert_eq!(urls.len(), 1, "{messages:#?}");
    let data = urls[0]
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    assert_eq!(BASE64.decode(data).unwrap(), png);
    assert_eq!(texts(&messages[4]), ["Image produced by the call above:"]);
    // The bytes are never in any text the model reads.
    let b64 = BASE64.encode(&png);
    for m in &messages {
        for t in texts(m) {
            assert!(!t.contains(&b64[..64]), "base64 of the PNG in text: {m}");
        }
    }
    assert!(texts(&messages[3])[0].contains("shot.png"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_images_the_model_gets_only_the_text() {
    let (bodies, png, _store, _dir) = capture_turn(false).await;
    assert_eq!(bodies.len(), 2);
    let messages = bodies[1]["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool"]);
    assert!(image_urls(messages).is_empty());
    let raw = bodies[1].to_string();
    assert!(!raw.contains("image_url"), "{raw}");
    assert!(!raw.contains(&BASE64.encode(&png)[..64]));
}
