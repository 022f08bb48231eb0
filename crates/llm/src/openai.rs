//! Any OpenAI-compatible chat-completions API (api.openai.com, vLLM,
//! llama.cpp's server, Ollama, OpenRouter...) through `async-openai`.
//!
//! Every request streams (SSE) and uses native tool calling. Chunks become
//! [`LlmEvent`](crate::LlmEvent)s: text deltas, tool-call deltas (id and name once, arguments in
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

mod wire;

use std::fmt;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::Config;
use async_openai::error::{OpenAIError, WrappedError};
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::CreateChatCompletionRequest;
use async_trait::async_trait;
use futures::StreamExt;
use rand::Rng;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{ChatRequest, LlmError, LlmProvider, LlmStream};
use wire::{Opened, Peeked, build_request, events, stream_error};

/// The official endpoint, the default `base_url`.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Longest provider error text kept in an error message, in characters.
const MAX_ERROR_TEXT: usize = 500;

/// Settings of [`OpenAiProvider`], as read from the config file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// API root; requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer ..` when set. Required for api.openai.com;
    /// local servers usually need none. Held as a secret: never logged, and
    /// `Debug` shows `<redacted>`.
    #[serde(deserialize_with = "secret_opt")]
    pub api_key: Option<SecretString>,
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
    /// The model accepts images: a tool message that carries images (e.g. a
    /// screen capture) is followed by a user message with one `image_url`
    /// part per image (a PNG as a `data:` URL; files over 5 MB are skipped
    /// with a note). Off: only the tool's text goes out.
    pub images: bool,
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
            images: false,
        }
    }
}

/// Reads an optional string straight into a [`SecretString`].
fn secret_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(SecretString::from))
}

impl PartialEq for OpenAiConfig {
    fn eq(&self, other: &Self) -> bool {
        let key = |c: &Self| c.api_key.as_ref().map(|k| k.expose_secret().to_owned());
        self.base_url == other.base_url
            && key(self) == key(other)
            && self.model == other.model
            && self.max_retries == other.max_retries
            && self.initial_backoff_ms == other.initial_backoff_ms
            && self.max_backoff_ms == other.max_backoff_ms
            && self.request_timeout_secs == other.request_timeout_secs
            && self.context_window == other.context_window
            && self.images == other.images
    }
}

impl Eq for OpenAiConfig {}

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
            .field("images", &self.images)
            .finish()
    }
}

/// A chat model behind an OpenAI-compatible HTTP API.
pub struct OpenAiProvider {
    client: Client<Endpoint>,
    model: String,
    base_url: String,
    api_key: Option<SecretString>,
    retry: RetryPolicy,
    request_timeout: Duration,
    context_window: Option<usize>,
    images: bool,
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
        let api_key = cfg.api_key.filter(|k| !k.expose_secret().trim().is_empty());
        if api_key.is_none() && url.host_str() == Some("api.openai.com") {
            return Err(LlmError::Config(
                "api.openai.com needs an api key (config `api_key`, or OPENPISTA_API_KEY / OPENAI_API_KEY)"
                    .to_owned(),
            ));
        }
        let mut headers = HeaderMap::new();
        if let Some(key) = &api_key {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", key.expose_secret().trim())).map_err(
                    |_| {
                        LlmError::Config(
                            "api key contains characters not allowed in an HTTP header".to_owned(),
                        )
                    },
                )?;
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
            api_key: api_key.clone().unwrap_or_else(|| SecretString::from("")),
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
            images: cfg.images,
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
            let result =
                tokio::time::timeout(self.request_timeout, self.attempt(body.clone())).await;
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
                    format!(
                        "timed out: no reply within {}s",
                        self.request_timeout.as_secs()
                    ),
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
            Some(key) if message.contains(key.expose_secret()) => {
                message.replace(key.expose_secret(), "<redacted>")
            }
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
        let body = build_request(&self.model, &request, self.images);
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
        Err(OpenAIError::Boxed(Box::new(
            HttpFailure::read(response).await,
        )))
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
    provider_error(body).unwrap_or_else(|| truncate(String::from_utf8_lossy(body).trim()))
}

/// The message of an error object (`{"error":{"message":..}}` and variants),
/// if `body` is one.
fn provider_error(body: &[u8]) -> Option<String> {
    if let Ok(wrapped) = serde_json::from_slice::<WrappedError>(body) {
        return Some(truncate(&wrapped.error.to_string()));
    }
    // Servers other than OpenAI's: numeric codes, plain strings, FastAPI's `detail`.
    let value = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let text = value["error"]["message"]
        .as_str()
        .or_else(|| value["error"].as_str())
        .or_else(|| value["message"].as_str())
        .or_else(|| value["detail"].as_str())?;
    Some(truncate(text))
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
        OpenAIError::ApiError(e) => {
            by_status(e.status_code.as_u16(), e.api_error.to_string(), None)
        }
        OpenAIError::Reqwest(e) if e.is_builder() => {
            Failure::Fatal(LlmError::Config(e.to_string()))
        }
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
        let jitter_ms =
            rand::rng().random_range(0..=u64::try_from(half.as_millis()).unwrap_or(u64::MAX));
        half + Duration::from_millis(jitter_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        let p = RetryPolicy {
            max_retries: 5,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = p.delay(3, None);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d9 = p.delay(9, None);
            assert!(
                d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000),
                "{d9:?}"
            );
        }
        assert_eq!(
            p.delay(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(60))),
            Duration::from_millis(1000)
        );
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
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_text_prefers_the_provider_message() {
        let body = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert!(error_text(body).contains("Incorrect API key provided"));
        assert_eq!(
            error_text(br#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(error_text(b"  upstream down \n"), "upstream down");
        assert!(error_text(&[b'x'; 2000]).chars().count() <= MAX_ERROR_TEXT + 1);
    }
}
