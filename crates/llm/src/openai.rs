//! Any OpenAI-compatible chat-completions API (api.openai.com, vLLM,
//! llama.cpp's server, Ollama, OpenRouter...) through `async-openai`.
//!
//! Every request streams (SSE) and uses native tool calling. Chunks become
//! [`LlmEvent`]s: text deltas, tool-call deltas (id and name once, arguments in
//! fragments) and a final `Done` with the usage the server reports.
//!
//! Failures before the first chunk is handed out (HTTP 408/409/429/5xx,
//! connection errors, timeouts) are retried with exponential backoff and
//! jitter, honouring `Retry-After`; other HTTP errors are
//! [`LlmError::Rejected`] at once. Once a chunk has been handed out nothing is
//! retried: a broken stream ends with [`LlmError::Protocol`] or
//! [`LlmError::Unavailable`].
//!
//! This module never reads the environment; the caller fills in the api key.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::Config;
use async_openai::error::{OpenAIError, WrappedError};
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls,
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestToolMessage,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionResponseStream,
    ChatCompletionStreamOptions, ChatCompletionTool, ChatCompletionToolChoiceOption,
    ChatCompletionTools, CreateChatCompletionRequest, CreateChatCompletionStreamResponse,
    FinishReason as WireFinish, FunctionCall, FunctionObject, ToolChoiceOptions,
};
use async_trait::async_trait;
use futures::StreamExt;
use openpista_proto::{ChatMessage, Role, Usage};
use rand::Rng;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::SecretString;
use serde::Deserialize;

use crate::{ChatRequest, FinishReason, LlmError, LlmEvent, LlmProvider, LlmStream, ToolChoice};

/// The official endpoint, the default `base_url`.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Highest tool-call index accepted from a server; a larger one is a broken
/// reply (and would make the assembler allocate without bound).
const MAX_TOOL_CALLS: usize = 256;

/// Longest provider error text kept in an error message, in characters.
const MAX_ERROR_TEXT: usize = 500;

/// Settings of [`OpenAiProvider`], as read from the config file.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// API root; requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer ..` when set. Required for api.openai.com;
    /// local servers usually need none. Never logged.
    pub api_key: Option<String>,
    pub model: String,
    /// Retries after the first attempt for 408/409/429/5xx, connection errors
    /// and timeouts.
    pub max_retries: u32,
    /// Backoff before the first retry; doubles per retry, with jitter.
    pub initial_backoff_ms: u64,
    /// Upper bound of one backoff, `Retry-After` included.
    pub max_backoff_ms: u64,
    /// Longest wait for the first chunk of a reply, and for each later read.
    pub request_timeout_secs: u64,
    /// The model's context window in tokens, when known.
    pub context_window: Option<usize>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: OPENAI_BASE_URL.to_owned(),
            api_key: None,
            model: "gpt-4o-mini".to_owned(),
            max_retries: 4,
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
            request_timeout_secs: 120,
            context_window: None,
        }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("max_retries", &self.max_retries)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("context_window", &self.context_window)
            .finish()
    }
}

/// A chat model behind an OpenAI-compatible HTTP API.
pub struct OpenAiProvider {
    client: Client<Endpoint>,
    model: String,
    base_url: String,
    api_key: Option<String>,
    retry: RetryPolicy,
    request_timeout: Duration,
    context_window: Option<usize>,
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl OpenAiProvider {
    /// Checks `cfg` and builds the HTTP client. No request is made.
    pub fn new(cfg: OpenAiConfig) -> Result<Self, LlmError> {
        let base_url = cfg.base_url.trim().trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base_url)
            .map_err(|e| LlmError::Config(format!("base_url {base_url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(LlmError::Config(format!(
                "base_url {base_url:?} must start with http:// or https://"
            )));
        }
        if cfg.model.trim().is_empty() {
            return Err(LlmError::Config("model is empty".to_owned()));
        }
        let api_key = cfg.api_key.filter(|k| !k.trim().is_empty());
        if api_key.is_none() && url.host_str() == Some("api.openai.com") {
            return Err(LlmError::Config(
                "api.openai.com needs an api key (config `api_key`, or OPENPISTA_API_KEY / OPENAI_API_KEY)"
                    .to_owned(),
            ));
        }
        let mut headers = HeaderMap::new();
        if let Some(key) = &api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim())).map_err(|_| {
                LlmError::Config("api key contains characters not allowed in an HTTP header".to_owned())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }

        let request_timeout = Duration::from_secs(cfg.request_timeout_secs.max(1));
        let http = reqwest::Client::builder()
            .connect_timeout(request_timeout)
            .read_timeout(request_timeout)
            .build()
            .map_err(|e| LlmError::Config(format!("cannot build the HTTP client: {e}")))?;

        let endpoint = Endpoint {
            api_base: base_url.clone(),
            api_key: SecretString::from(api_key.clone().unwrap_or_default()),
            headers,
        };
        // async-openai's default executor wraps every request in its own retry
        // layer (3 retries of 429/5xx, 100ms..8s, no jitter, no cap we control)
        // and turns error responses into `ApiError`, dropping `Retry-After`.
        // Installing our own tower service replaces that layer, so the loop in
        // `open` is the only retry loop, and lets non-2xx answers come back as
        // an `HttpFailure` (status, Retry-After, provider message) through
        // `OpenAIError::Boxed`. async-openai still builds the request, parses
        // the SSE stream and (de)serializes the wire types.
        let transport = {
            let http = http.clone();
            tower::service_fn(move |factory| send(http.clone(), factory))
        };
        let client = Client::build(http, endpoint).with_http_service(transport);

        Ok(Self {
            client,
            model: cfg.model.trim().to_owned(),
            base_url,
            api_key,
            retry: RetryPolicy {
                max_retries: cfg.max_retries,
                initial: Duration::from_millis(cfg.initial_backoff_ms),
                max: Duration::from_millis(cfg.max_backoff_ms),
            },
            request_timeout,
            context_window: cfg.context_window,
        })
    }

    /// The model name sent with every request.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Sends `body` until a first chunk arrives, retrying transient failures.
    async fn open(&self, body: CreateChatCompletionRequest) -> Result<Opened, LlmError> {
        let allowed = self.retry.max_retries.saturating_add(1);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let result = tokio::time::timeout(self.request_timeout, self.attempt(body.clone())).await;
            let (message, retry_after) = match result {
                Ok(Ok((first, rest))) => {
                    return Ok(Opened {
                        first,
                        rest,
                        attempts: attempt,
                    });
                }
                Ok(Err(err)) => match classify(err) {
                    Failure::Fatal(e) => return Err(self.redact_error(e)),
                    Failure::Retryable {
                        message,
                        retry_after,
                    } => (message, retry_after),
                },
                Err(_elapsed) => (
                    format!("no reply within {}s", self.request_timeout.as_secs()),
                    None,
                ),
            };
            let message = self.redact(message);
            if attempt >= allowed {
                return Err(LlmError::Unavailable {
                    attempts: attempt,
                    message,
                });
            }
            let delay = self.retry.delay(attempt, retry_after);
            tracing::warn!(
                attempt,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %message,
                "llm request failed, retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One request: the response head, then the first stream item, so that a
    /// connection dropped before any chunk is still retried.
    async fn attempt(&self, body: CreateChatCompletionRequest) -> Result<Peeked, OpenAIError> {
        let mut stream = self.client.chat().create_stream(body).await?;
        match stream.next().await {
            Some(Err(e)) if is_transport(&e) => Err(e),
            first => Ok((first, stream)),
        }
    }

    fn redact(&self, message: String) -> String {
        match &self.api_key {
            Some(key) if message.contains(key.as_str()) => message.replace(key.as_str(), "<redacted>"),
            _ => message,
        }
    }

    fn redact_error(&self, err: LlmError) -> LlmError {
        match err {
            LlmError::Rejected { status, message } => LlmError::Rejected {
                status,
                message: self.redact(message),
            },
            other => other,
        }
    }
}

#[async_trait]
impl LlmProvider for OpenAiProvider {
    async fn stream(&self, request: ChatRequest) -> Result<LlmStream, LlmError> {
        let body = build_request(&self.model, &request);
        let opened = self.open(body).await?;
        Ok(events(opened))
    }

    fn name(&self) -> String {
        format!("openai:{}", self.model)
    }

    fn context_window(&self) -> Option<usize> {
        self.context_window
    }
}

/// The request body for `request`.
fn build_request(model: &str, request: &ChatRequest) -> CreateChatCompletionRequest {
    let messages = request.messages.iter().map(wire_message).collect();
    let (tools, tool_choice) = if request.tools.is_empty() {
        // OpenAI rejects `tool_choice` without `tools`.
        (None, None)
    } else {
        let tools = request
            .tools
            .iter()
            .map(|t| {
                ChatCompletionTools::Function(ChatCompletionTool {
                    function: FunctionObject {
                        name: t.name.clone(),
                        description: Some(t.description.clone()).filter(|d| !d.is_empty()),
                        parameters: Some(t.parameters.clone()),
                        strict: None,
                    },
                })
            })
            .collect();
        let mode = match request.tool_choice {
            ToolChoice::Auto => ToolChoiceOptions::Auto,
            ToolChoice::Required => ToolChoiceOptions::Required,
            ToolChoice::None => ToolChoiceOptions::None,
        };
        (Some(tools), Some(ChatCompletionToolChoiceOption::Mode(mode)))
    };
    let sampling = &request.sampling;
    CreateChatCompletionRequest {
        model: model.to_owned(),
        messages,
        tools,
        tool_choice,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        seed: sampling.seed.map(i64::from),
        max_completion_tokens: sampling.max_tokens,
        stream: Some(true),
        stream_options: Some(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        }),
        ..Default::default()
    }
}

/// One history message on the wire. Tool-call arguments go out verbatim,
/// valid JSON or not, so the history replays exactly.
fn wire_message(m: &ChatMessage) -> ChatCompletionRequestMessage {
    match m.role {
        Role::System => ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
            content: ChatCompletionRequestSystemMessageContent::Text(m.content.clone()),
            name: None,
        }),
        Role::User => ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
            content: ChatCompletionRequestUserMessageContent::Text(m.content.clone()),
            name: None,
        }),
        Role::Assistant => {
            let tool_calls: Vec<_> = m
                .tool_calls
                .iter()
                .map(|c| {
                    ChatCompletionMessageToolCalls::Function(ChatCompletionMessageToolCall {
                        id: c.id.clone(),
                        function: FunctionCall {
                            name: c.name.clone(),
                            arguments: c.arguments.clone(),
                        },
                    })
                })
                .collect();
            // A message with only tool calls has `content: null` on the wire.
            let content = if m.content.is_empty() && !tool_calls.is_empty() {
                None
            } else {
                Some(ChatCompletionRequestAssistantMessageContent::Text(m.content.clone()))
            };
            ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                content,
                tool_calls: Some(tool_calls).filter(|c| !c.is_empty()),
                ..Default::default()
            })
        }
        Role::Tool => ChatCompletionRequestMessage::Tool(ChatCompletionRequestToolMessage {
            content: ChatCompletionRequestToolMessageContent::Text(m.content.clone()),
            tool_call_id: m.tool_call_id.clone().unwrap_or_default(),
        }),
    }
}

/// The wire format, without the `OpenAIConfig` of async-openai: that one reads
/// `OPENAI_API_KEY`, `OPENAI_BASE_URL` and `OPENAI_ORG_ID` from the
/// environment and always sends a bearer header, even an empty one.
struct Endpoint {
    api_base: String,
    api_key: SecretString,
    headers: HeaderMap,
}

impl Config for Endpoint {
    fn headers(&self) -> HeaderMap {
        self.headers.clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_base)
    }

    fn query(&self) -> Vec<(&str, &str)> {
        Vec::new()
    }

    fn api_base(&self) -> &str {
        &self.api_base
    }

    fn api_key(&self) -> &SecretString {
        &self.api_key
    }
}

/// Sends one request; a non-2xx answer becomes an [`HttpFailure`] error.
async fn send(
    http: reqwest::Client,
    factory: HttpRequestFactory,
) -> Result<reqwest::Response, OpenAIError> {
    let request = factory.build().await?;
    let response = http.execute(request).await?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(OpenAIError::Boxed(Box::new(HttpFailure::read(response).await)))
    }
}

/// A non-2xx HTTP answer, carried out of async-openai's client inside
/// `OpenAIError::Boxed`.
#[derive(Debug)]
struct HttpFailure {
    status: u16,
    retry_after: Option<Duration>,
    message: String,
}

impl HttpFailure {
    async fn read(response: reqwest::Response) -> Self {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let message = match response.bytes().await {
            Ok(body) => error_text(&body),
            Err(e) => format!("(error body unreadable: {e})"),
        };
        let message = if message.is_empty() {
            status.canonical_reason().unwrap_or("no details").to_owned()
        } else {
            message
        };
        Self {
            status: status.as_u16(),
            retry_after,
            message,
        }
    }
}

impl fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.message)
    }
}

impl std::error::Error for HttpFailure {}

/// `Retry-After` as seconds (`retry-after-ms`, sent by OpenAI, wins). An
/// HTTP-date is ignored: the backoff applies instead.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (value.is_finite() && value >= 0.0).then_some(value)
    };
    let seconds = number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number(RETRY_AFTER.as_str()))?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// The provider's explanation from an error body: OpenAI's
/// `{"error":{"message":..}}`, a few common variants, or the raw text.
fn error_text(body: &[u8]) -> String {
    if let Ok(wrapped) = serde_json::from_slice::<WrappedError>(body) {
        return truncate(&wrapped.error.to_string());
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let text = value["error"]
            .as_str()
            .or_else(|| value["message"].as_str())
            .or_else(|| value["detail"].as_str());
        if let Some(text) = text {
            return truncate(text);
        }
    }
    truncate(String::from_utf8_lossy(body).trim())
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_ERROR_TEXT {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(MAX_ERROR_TEXT).collect();
        short.push('…');
        short
    }
}

/// What to do about a failed attempt.
enum Failure {
    /// Another attempt may succeed.
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Give up now.
    Fatal(LlmError),
}

fn classify(err: OpenAIError) -> Failure {
    let by_status = |status: u16, message: String, retry_after| {
        if matches!(status, 408 | 409 | 429 | 500..=599) {
            Failure::Retryable {
                message: format!("HTTP {status}: {message}"),
                retry_after,
            }
        } else {
            Failure::Fatal(LlmError::Rejected { status, message })
        }
    };
    match err {
        OpenAIError::Boxed(boxed) => match boxed.downcast::<HttpFailure>() {
            Ok(f) => by_status(f.status, f.message, f.retry_after),
            Err(other) => Failure::Fatal(LlmError::Protocol(other.to_string())),
        },
        OpenAIError::ApiError(e) => by_status(e.status_code.as_u16(), e.api_error.to_string(), None),
        OpenAIError::Reqwest(e) if e.is_builder() => Failure::Fatal(LlmError::Config(e.to_string())),
        OpenAIError::Reqwest(e) => Failure::Retryable {
            message: describe(&e),
            retry_after: None,
        },
        OpenAIError::StreamError(e) => Failure::Retryable {
            message: format!("stream failed: {e}"),
            retry_after: None,
        },
        OpenAIError::InvalidArgument(m) => Failure::Fatal(LlmError::Config(m)),
        other => Failure::Fatal(stream_error(other, 1)),
    }
}

/// Whether `err` means the connection failed (worth another attempt).
fn is_transport(err: &OpenAIError) -> bool {
    matches!(err, OpenAIError::Reqwest(_) | OpenAIError::StreamError(_))
}

/// A reqwest error with its causes ("error sending request: connection refused").
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// An error met after the stream was handed out: not retried.
fn stream_error(err: OpenAIError, attempts: u32) -> LlmError {
    match err {
        OpenAIError::JSONDeserialize(e, content) => {
            // Some servers report failures mid-stream as `data: {"error":..}`.
            match serde_json::from_str::<WrappedError>(&content) {
                Ok(wrapped) => LlmError::Unavailable {
                    attempts,
                    message: format!("error in stream: {}", truncate(&wrapped.error.to_string())),
                },
                Err(_) => LlmError::Protocol(format!("bad chunk ({e}): {}", truncate(&content))),
            }
        }
        OpenAIError::StreamError(e) => LlmError::Unavailable {
            attempts,
            message: format!("stream interrupted: {e}"),
        },
        OpenAIError::Reqwest(e) => LlmError::Unavailable {
            attempts,
            message: format!("stream interrupted: {}", describe(&e)),
        },
        other => LlmError::Protocol(other.to_string()),
    }
}

/// Exponential backoff with "equal jitter": half the step is fixed, half random.
#[derive(Debug, Clone, Copy)]
struct RetryPolicy {
    max_retries: u32,
    initial: Duration,
    max: Duration,
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based). A server's
    /// `Retry-After` is honoured as is, capped at `max`.
    fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.max);
        }
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        let step = self.initial.saturating_mul(factor).min(self.max);
        let half = step / 2;
        let jitter_ms = rand::rng().random_range(0..=u64::try_from(half.as_millis()).unwrap_or(u64::MAX));
        half + Duration::from_millis(jitter_ms)
    }
}

type Peeked = (
    Option<Result<CreateChatCompletionStreamResponse, OpenAIError>>,
    ChatCompletionResponseStream,
);

/// A stream that produced its first item.
struct Opened {
    first: Option<Result<CreateChatCompletionStreamResponse, OpenAIError>>,
    rest: ChatCompletionResponseStream,
    attempts: u32,
}

/// Turns the chunk stream into [`LlmEvent`]s.
fn events(opened: Opened) -> LlmStream {
    let upstream = futures::stream::iter(opened.first).chain(opened.rest);
    let decoder = Decoder::new(opened.attempts);
    Box::pin(futures::stream::unfold(
        (upstream, decoder),
        |(mut upstream, mut decoder)| async move {
            loop {
                if let Some(item) = decoder.pending.pop_front() {
                    return Some((item, (upstream, decoder)));
                }
                if decoder.finished {
                    return None;
                }
                match upstream.next().await {
                    Some(Ok(chunk)) => decoder.chunk(chunk),
                    Some(Err(e)) => decoder.fail(stream_error(e, decoder.attempts)),
                    None => decoder.end(),
                }
            }
        },
    ))
}

/// Chunk-to-event state: what is queued, what the reply said so far.
struct Decoder {
    pending: VecDeque<Result<LlmEvent, LlmError>>,
    attempts: u32,
    usage: Usage,
    finish: Option<FinishReason>,
    /// Last name sent per tool-call index, to drop names a server repeats in
    /// every chunk (the assembler would concatenate them).
    names: Vec<Option<String>>,
    finished: bool,
}

impl Decoder {
    fn new(attempts: u32) -> Self {
        Self {
            pending: VecDeque::new(),
            attempts,
            usage: Usage::default(),
            finish: None,
            names: Vec::new(),
            finished: false,
        }
    }

    fn chunk(&mut self, chunk: CreateChatCompletionStreamResponse) {
        if let Some(u) = chunk.usage {
            self.usage = Usage {
                prompt_tokens: u64::from(u.prompt_tokens),
                completion_tokens: u64::from(u.completion_tokens),
            };
        }
        // We never ask for n > 1; other choices are ignored.
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let delta = choice.delta;
            for text in [delta.content, delta.refusal].into_iter().flatten() {
                if !text.is_empty() {
                    self.pending.push_back(Ok(LlmEvent::TextDelta(text)));
                }
            }
            for call in delta.tool_calls.unwrap_or_default() {
                let index = usize::try_from(call.index).unwrap_or(usize::MAX);
                if index >= MAX_TOOL_CALLS {
                    return self.fail(LlmError::Protocol(format!(
                        "tool call index {} out of range",
                        call.index
                    )));
                }
                let (name, arguments) = match call.function {
                    Some(f) => (f.name, f.arguments.unwrap_or_default()),
                    None => (None, String::new()),
                };
                let id = call.id.filter(|id| !id.is_empty());
                let name = name.filter(|n| !n.is_empty() && !self.repeats_name(index, n));
                if id.is_none() && name.is_none() && arguments.is_empty() {
                    continue;
                }
                self.pending.push_back(Ok(LlmEvent::ToolCallDelta {
                    index,
                    id,
                    name,
                    arguments,
                }));
            }
            if let Some(reason) = choice.finish_reason {
                self.finish = Some(match reason {
                    WireFinish::Stop | WireFinish::ContentFilter => FinishReason::Stop,
                    WireFinish::Length => FinishReason::Length,
                    WireFinish::ToolCalls | WireFinish::FunctionCall => FinishReason::ToolCalls,
                });
            }
        }
    }

    /// True if `name` is what index `index` was already called; records it otherwise.
    fn repeats_name(&mut self, index: usize, name: &str) -> bool {
        if self.names.len() <= index {
            self.names.resize(index + 1, None);
        }
        if self.names[index].as_deref() == Some(name) {
            return true;
        }
        self.names[index] = Some(name.to_owned());
        false
    }

    fn end(&mut self) {
        match self.finish {
            Some(finish) => self.pending.push_back(Ok(LlmEvent::Done {
                usage: self.usage,
                finish,
            })),
            None => self.pending.push_back(Err(LlmError::Protocol(
                "stream ended before the reply was complete (no finish_reason)".to_owned(),
            ))),
        }
        self.finished = true;
    }

    fn fail(&mut self, err: LlmError) {
        self.pending.push_back(Err(err));
        self.finished = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openpista_proto::{ToolCall, ToolDefinition};

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        let p = RetryPolicy {
            max_retries: 5,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
            let d3 = p.delay(3, None);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400), "{d3:?}");
            let d9 = p.delay(9, None);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000), "{d9:?}");
        }
        assert_eq!(p.delay(1, Some(Duration::from_millis(700))), Duration::from_millis(700));
        assert_eq!(p.delay(1, Some(Duration::from_secs(60))), Duration::from_millis(1000));
        assert!(p.delay(u32::MAX, None) <= Duration::from_millis(1000));
    }

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.remove("retry-after-ms");
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_text_prefers_the_provider_message() {
        let body = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert!(error_text(body).contains("Incorrect API key provided"));
        assert_eq!(error_text(br#"{"error":"model not found"}"#), "model not found");
        assert_eq!(error_text(b"  upstream down \n"), "upstream down");
        assert!(error_text(&[b'x'; 2000]).chars().count() <= MAX_ERROR_TEXT + 1);
    }

    #[test]
    fn history_maps_to_wire_roles() {
        let request = ChatRequest {
            messages: vec![
                ChatMessage::system("be brief"),
                ChatMessage::user("list files"),
                ChatMessage::assistant(
                    "",
                    vec![ToolCall {
                        id: "c1".into(),
                        name: "system.run".into(),
                        arguments: "{\"cmd\":".into(),
                    }],
                ),
                ChatMessage::tool_result("c1", "system.run", "error: bad arguments"),
            ],
            tools: vec![ToolDefinition {
                name: "system.run".into(),
                description: "run".into(),
                parameters: serde_json::json!({"type": "object"}),
            }],
            tool_choice: ToolChoice::Required,
            ..Default::default()
        };
        let wire = serde_json::to_value(build_request("m", &request)).unwrap();
        let roles: Vec<_> = wire["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert!(wire["messages"][2].get("content").is_none());
        assert_eq!(wire["messages"][2]["tool_calls"][0]["type"], "function");
        assert_eq!(wire["messages"][2]["tool_calls"][0]["function"]["arguments"], "{\"cmd\":");
        assert_eq!(wire["messages"][3]["tool_call_id"], "c1");
        assert_eq!(wire["tools"][0]["type"], "function");
        assert_eq!(wire["tools"][0]["function"]["name"], "system.run");
        assert_eq!(wire["tool_choice"], "required");
        assert_eq!(wire["stream"], true);
        assert_eq!(wire["stream_options"]["include_usage"], true);
    }

    #[test]
    fn no_tools_means_no_tool_choice() {
        let request = ChatRequest {
            messages: vec![ChatMessage::user("hi")],
            tool_choice: ToolChoice::Required,
            ..Default::default()
        };
        let wire = serde_json::to_value(build_request("m", &request)).unwrap();
        assert!(wire.get("tools").is_none());
        assert!(wire.get("tool_choice").is_none());
    }

    #[test]
    fn decoder_drops_repeated_names_and_rejects_absurd_indexes() {
        let chunk = |v: serde_json::Value| -> CreateChatCompletionStreamResponse {
            serde_json::from_value(serde_json::json!({
                "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": v, "finish_reason": null}]
            }))
            .unwrap()
        };
        let mut d = Decoder::new(1);
        let call = |args: &str| serde_json::json!({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": args}}]});
        d.chunk(chunk(call("{")));
        d.chunk(chunk(call("}")));
        let names: Vec<_> = d
            .pending
            .drain(..)
            .map(|e| match e {
                Ok(LlmEvent::ToolCallDelta { name, .. }) => name,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, [Some("f".to_owned()), None]);

        d.chunk(chunk(serde_json::json!({"tool_calls": [{"index": 4000000000u32, "function": {"arguments": "x"}}]})));
        assert!(matches!(d.pending.pop_front(), Some(Err(LlmError::Protocol(_)))));
        assert!(d.finished);
    }
}
