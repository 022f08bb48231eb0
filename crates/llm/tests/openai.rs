//! The OpenAI-compatible provider against a fake server on loopback, through
//! the real async-openai / reqwest stack.

use std::time::{Duration, Instant};

use futures::StreamExt;
use openpista_llm::openai::{OpenAiConfig, OpenAiProvider};
use openpista_llm::{ChatRequest, FinishReason, LlmError, LlmEvent, LlmProvider, ToolChoice};
use openpista_proto::{ChatMessage, ToolCall, ToolDefinition};
use openpista_testkit::{FakeOpenAi, Reply};
use serde_json::json;

const KEY: &str = "sk-test-0123456789-secret";

fn config(base_url: String) -> OpenAiConfig {
    OpenAiConfig {
        base_url,
        api_key: Some(KEY.into()),
        model: "test-model".to_owned(),
        max_retries: 2,
        initial_backoff_ms: 1,
        max_backoff_ms: 5,
        request_timeout_secs: 5,
        context_window: None,
        images: false,
    }
}

fn provider(fake: &FakeOpenAi) -> OpenAiProvider {
    OpenAiProvider::new(config(fake.base_url())).unwrap()
}

fn ask(text: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::system("You are terse."),
            ChatMessage::user(text),
        ],
        ..Default::default()
    }
}

fn tool(name: &str) -> ToolDefinition {
    ToolDefinition {
        name: name.to_owned(),
        description: format!("the {name} tool"),
        parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
    }
}

async fn events(p: &OpenAiProvider, request: ChatRequest) -> Vec<Result<LlmEvent, LlmError>> {
    p.stream(request).await.unwrap().collect().await
}

/// A streamed chunk carrying `delta`, as api.openai.com sends it.
fn chunk(delta: serde_json::Value, finish: Option<&str>) -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    })
    .to_string()
}

#[tokio::test]
async fn plain_completion() {
    let fake = FakeOpenAi::start([Reply::text("Hello! How can I help you today?")])
        .await
        .unwrap();
    let c = provider(&fake).complete(ask("hi")).await.unwrap();

    assert_eq!(c.text, "Hello! How can I help you today?");
    assert!(c.tool_calls.is_empty());
    assert_eq!(c.finish, FinishReason::Stop);
    assert!(c.usage.prompt_tokens > 0 && c.usage.completion_tokens > 0);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(r.body["model"], "test-model");
    assert_eq!(r.body["stream"], true);
    assert_eq!(r.body["stream_options"]["include_usage"], true);
    assert_eq!(
        r.body["messages"][0],
        json!({"role": "system", "content": "You are terse."})
    );
    assert_eq!(
        r.body["messages"][1],
        json!({"role": "user", "content": "hi"})
    );
    assert!(r.body.get("tools").is_none());
}

#[tokio::test]
async fn streaming_yields_several_text_deltas() {
    let text = "The quick brown fox jumps over the lazy dog.";
    let fake = FakeOpenAi::start([Reply::text(text)]).await.unwrap();
    let events = events(&provider(&fake), ask("tell me")).await;

    let deltas: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Ok(LlmEvent::TextDelta(t)) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert!(deltas.len() > 1, "{deltas:?}");
    assert_eq!(deltas.concat(), text);
    match events.last() {
        Some(Ok(LlmEvent::Done { usage, finish })) => {
            assert_eq!(*finish, FinishReason::Stop);
            assert!(usage.completion_tokens > 0);
        }
        other => panic!("expected Done last, got {other:?}"),
    }
    assert!(events.iter().all(Result::is_ok));
}

#[tokio::test]
async fn streamed_tool_call_deltas_assemble_into_two_calls() {
    let fake = FakeOpenAi::start([Reply::TextAndToolCalls(
        "Let me look.".to_owned(),
        vec![
            (
                "file.read".to_owned(),
                r#"{"path":"/etc/hostname"}"#.to_owned(),
            ),
            (
                "system.run".to_owned(),
                r#"{"command":"uname -a"}"#.to_owned(),
            ),
        ],
    )])
    .await
    .unwrap();
    let p = provider(&fake);
    let request = ChatRequest {
        tools: vec![tool("file.read"), tool("system.run")].into(),
        ..ask("what machine is this?")
    };

    let events = events(&p, request.clone()).await;
    let call_deltas = events
        .iter()
        .filter(|e| matches!(e, Ok(LlmEvent::ToolCallDelta { .. })))
        .count();
    assert!(call_deltas > 4, "arguments should arrive in fragments");

    let mut assembler = openpista_llm::Assembler::default();
    for e in events {
        assembler.push(e.unwrap());
    }
    let c = assembler.finish();
    assert_eq!(c.text, "Let me look.");
    assert_eq!(c.finish, FinishReason::ToolCalls);
    assert_eq!(c.tool_calls.len(), 2);
    assert_eq!(c.tool_calls[0].name, "file.read");
    assert_eq!(c.tool_calls[0].arguments, r#"{"path":"/etc/hostname"}"#);
    assert_eq!(c.tool_calls[1].name, "system.run");
    assert_eq!(c.tool_calls[1].arguments, r#"{"command":"uname -a"}"#);
    assert_ne!(c.tool_calls[0].id, c.tool_calls[1].id);
    assert!(c.tool_calls[0].id.starts_with("call_"));

    let body = &fake.requests()[0].body;
    assert_eq!(body["tool_choice"], "auto");
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["name"], "file.read");
    assert_eq!(body["tools"][1]["function"]["name"], "system.run");
    assert_eq!(body["tools"][0]["function"]["parameters"]["type"], "object");
}

#[tokio::test]
async fn tool_round_history_is_sent_in_wire_form() {
    let fake = FakeOpenAi::start([Reply::text("It is host42.")])
        .await
        .unwrap();
    let request = ChatRequest {
        messages: vec![
            ChatMessage::user("hostname?"),
            ChatMessage::assistant(
                "",
                vec![ToolCall {
                    id: "call_7".into(),
                    name: "file.read".into(),
                    arguments: r#"{"path":"/etc/hostname"}"#.into(),
                }],
            ),
            ChatMessage::tool_result("call_7", "file.read", "host42"),
        ],
        tools: vec![tool("file.read")].into(),
        tool_choice: ToolChoice::None,
        ..Default::default()
    };
    let c = provider(&fake).complete(request).await.unwrap();
    assert_eq!(c.text, "It is host42.");

    let body = &fake.requests()[0].body;
    let assistant = &body["messages"][1];
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(assistant["tool_calls"][0]["id"], "call_7");
    assert_eq!(assistant["tool_calls"][0]["function"]["name"], "file.read");
    assert_eq!(
        body["messages"][2],
        json!({"role": "tool", "content": "host42", "tool_call_id": "call_7"})
    );
    assert_eq!(body["tool_choice"], "none");
}

#[tokio::test]
async fn rate_limit_waits_for_retry_after_then_succeeds() {
    let fake = FakeOpenAi::start([Reply::rate_limited(Some(1)), Reply::text("finally")])
        .await
        .unwrap();
    let cfg = OpenAiConfig {
        max_backoff_ms: 10_000,
        ..config(fake.base_url())
    };
    let p = OpenAiProvider::new(cfg).unwrap();

    let started = Instant::now();
    let c = p.complete(ask("hi")).await.unwrap();
    let waited = started.elapsed();

    assert_eq!(c.text, "finally");
    assert_eq!(fake.request_count(), 2);
    // The backoff alone would be ~1ms: only Retry-After explains a second.
    assert!(
        waited >= Duration::from_millis(900),
        "waited only {waited:?}"
    );
}

#[tokio::test]
async fn server_errors_until_retries_run_out_are_unavailable() {
    let fake = FakeOpenAi::start([
        Reply::error(500, "The server had an error"),
        Reply::error(502, "Bad gateway"),
        Reply::error(503, "The engine is currently overloaded"),
        Reply::text("too late"),
    ])
    .await
    .unwrap();
    let err = provider(&fake).complete(ask("hi")).await.unwrap_err();

    match err {
        LlmError::Unavailable { attempts, message } => {
            assert_eq!(attempts, 3, "max_retries (2) + 1");
            assert!(message.contains("503"), "{message}");
            assert!(message.contains("overloaded"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(fake.request_count(), 3);
    assert_eq!(fake.remaining(), 1);
}

#[tokio::test]
async fn unauthorized_is_rejected_after_one_request() {
    let fake = FakeOpenAi::start([
        Reply::error(401, "Incorrect API key provided: sk-te***cret."),
        Reply::text("unused"),
    ])
    .await
    .unwrap();
    let err = provider(&fake).complete(ask("hi")).await.unwrap_err();

    match &err {
        LlmError::Rejected { status, message } => {
            assert_eq!(*status, 401);
            assert!(message.contains("Incorrect API key provided"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(err.to_string().contains("401"));
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    for code in [400, 403, 404] {
        let fake = FakeOpenAi::start([
            Reply::error(code, "Invalid value for 'model'"),
            Reply::text("unused"),
        ])
        .await
        .unwrap();
        match provider(&fake).complete(ask("hi")).await {
            Err(LlmError::Rejected { status, message }) => {
                assert_eq!(status, code);
                assert!(message.contains("Invalid value for 'model'"), "{message}");
            }
            other => panic!("HTTP {code}: expected Rejected, got {other:?}"),
        }
        assert_eq!(fake.request_count(), 1, "HTTP {code} was retried");
    }
}

#[tokio::test]
async fn connection_refused_is_retried_then_unavailable() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = OpenAiConfig {
        max_retries: 1,
        ..config(format!("http://127.0.0.1:{port}/v1"))
    };
    match OpenAiProvider::new(cfg).unwrap().complete(ask("hi")).await {
        Err(LlmError::Unavailable { attempts, .. }) => assert_eq!(attempts, 2),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn silent_server_times_out() {
    let fake = FakeOpenAi::start([Reply::Hang, Reply::text("unused")])
        .await
        .unwrap();
    let cfg = OpenAiConfig {
        max_retries: 0,
        request_timeout_secs: 1,
        ..config(fake.base_url())
    };
    match OpenAiProvider::new(cfg).unwrap().complete(ask("hi")).await {
        Err(LlmError::Unavailable { attempts, message }) => {
            assert_eq!(attempts, 1);
            assert!(message.contains("timed out"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_tool_calls_pass_through() {
    let fake = FakeOpenAi::start([Reply::tool_calls([
        ("file.read", r#"{"path": "/tmp/x"#),
        ("", "{}"),
        ("system.run", "not json at all"),
    ])])
    .await
    .unwrap();
    let request = ChatRequest {
        tools: vec![tool("file.read"), tool("system.run")].into(),
        ..ask("go")
    };
    let c = provider(&fake).complete(request).await.unwrap();

    assert_eq!(c.finish, FinishReason::ToolCalls);
    assert_eq!(c.tool_calls.len(), 3);
    assert_eq!(c.tool_calls[0].name, "file.read");
    assert_eq!(c.tool_calls[0].arguments, r#"{"path": "/tmp/x"#);
    assert_eq!(
        c.tool_calls[1].name, "",
        "a call without a name stays a call"
    );
    assert_eq!(c.tool_calls[1].arguments, "{}");
    assert_eq!(c.tool_calls[2].arguments, "not json at all");
}

#[tokio::test]
async fn unparseable_chunk_is_a_protocol_error_without_retry() {
    let fake = FakeOpenAi::start([
        Reply::sse(["{\"id\": oops", "[DONE]"]),
        Reply::text("unused"),
    ])
    .await
    .unwrap();
    let events = events(&provider(&fake), ask("hi")).await;
    assert!(
        matches!(events.as_slice(), [Err(LlmError::Protocol(_))]),
        "{events:?}"
    );
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn stream_cut_before_finish_is_a_protocol_error() {
    let fake = FakeOpenAi::start([Reply::sse([chunk(json!({"content": "Hal"}), None)])])
        .await
        .unwrap();
    let events = events(&provider(&fake), ask("hi")).await;
    assert!(
        matches!(
            events.as_slice(),
            [Ok(LlmEvent::TextDelta(t)), Err(LlmError::Protocol(_))] if t == "Hal"
        ),
        "{events:?}"
    );
}

#[tokio::test]
async fn error_object_mid_stream_ends_the_stream() {
    let fake = FakeOpenAi::start([Reply::sse([
        chunk(json!({"content": "Par"}), None),
        json!({"error": {"message": "upstream overloaded", "code": 503}}).to_string(),
    ])])
    .await
    .unwrap();
    let events = events(&provider(&fake), ask("hi")).await;
    match events.as_slice() {
        [
            Ok(LlmEvent::TextDelta(_)),
            Err(LlmError::Unavailable { message, .. }),
        ] => {
            assert!(message.contains("upstream overloaded"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn api_key_is_sent_as_bearer_and_never_printed() {
    let fake = FakeOpenAi::start([Reply::text("ok")]).await.unwrap();
    let cfg = config(fake.base_url());
    let printed = format!("{cfg:?}");
    assert!(!printed.contains(KEY), "{printed}");
    assert!(printed.contains("<redacted>"));

    let p = OpenAiProvider::new(cfg).unwrap();
    assert!(!format!("{p:?}").contains(KEY));
    p.complete(ask("hi")).await.unwrap();
    assert_eq!(fake.requests()[0].bearer_token(), Some(KEY));
}

#[tokio::test]
async fn local_server_without_key_gets_no_authorization_header() {
    let fake = FakeOpenAi::start_at("/openai/v1", [Reply::text("ok")])
        .await
        .unwrap();
    let cfg = OpenAiConfig {
        api_key: None,
        // A trailing slash is tolerated.
        ..config(format!("{}/", fake.base_url()))
    };
    let c = OpenAiProvider::new(cfg)
        .unwrap()
        .complete(ask("hi"))
        .await
        .unwrap();
    assert_eq!(c.text, "ok");
    let r = &fake.requests()[0];
    assert_eq!(r.path, "/openai/v1/chat/completions");
    assert_eq!(r.header("authorization"), None);
}

#[test]
fn bad_configs_are_refused_up_front() {
    let official_without_key = OpenAiConfig::default();
    assert!(matches!(
        OpenAiProvider::new(official_without_key),
        Err(LlmError::Config(_))
    ));
    let not_http = OpenAiConfig {
        base_url: "ftp://example.com".into(),
        ..OpenAiConfig::default()
    };
    assert!(matches!(
        OpenAiProvider::new(not_http),
        Err(LlmError::Config(_))
    ));
    let bad_key = OpenAiConfig {
        api_key: Some("line\nbreak".into()),
        ..OpenAiConfig::default()
    };
    match OpenAiProvider::new(bad_key) {
        Err(LlmError::Config(m)) => assert!(!m.contains("line\nbreak")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_defaults_and_unknown_fields() {
    let cfg: OpenAiConfig = toml::from_str("model = \"gpt-4.1\"\nmax_retries = 1\n").unwrap();
    assert_eq!(cfg.model, "gpt-4.1");
    assert_eq!(cfg.max_retries, 1);
    assert_eq!(cfg.base_url, "https://api.openai.com/v1");
    assert_eq!(cfg.initial_backoff_ms, 500);
    assert_eq!(cfg.max_backoff_ms, 30_000);
    assert_eq!(cfg.request_timeout_secs, 120);
    assert!(cfg.api_key.is_none());
    assert!(toml::from_str::<OpenAiConfig>("modle = \"typo\"").is_err());
}
