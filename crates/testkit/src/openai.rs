//! A fake OpenAI chat-completions server on loopback.
//!
//! [`FakeOpenAi::start`] binds `127.0.0.1:0` and answers
//! `POST {base_path}/chat/completions` with the next scripted [`Reply`]. Text
//! and tool-call replies follow the real wire format: a `chat.completion`
//! object when the request has `"stream": false`, otherwise SSE
//! `chat.completion.chunk` events (text and arguments split over several
//! chunks, a call's id and name in its first chunk, a usage chunk when
//! `stream_options.include_usage` is set) ending with `data: [DONE]`.
//!
//! Every request is recorded (method, path, headers, JSON body). When the
//! script runs out the server answers 400 with an error naming the problem, so
//! an unexpected extra request fails the test loudly instead of hanging.
//! The server stops when the [`FakeOpenAi`] is dropped.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Unix time stamped on every generated completion.
const CREATED: u64 = 1_700_000_000;
/// Characters of assistant text per streamed chunk.
const TEXT_PIECE: usize = 5;
/// Characters of tool-call arguments per streamed chunk.
const ARGS_PIECE: usize = 6;
/// Largest request head or body accepted, in bytes.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// One scripted answer, consumed by one chat-completions request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An assistant message with this text.
    Text(String),
    /// An assistant message calling tools: `(name, arguments JSON text)` each.
    /// An empty name is left out of the wire message; the arguments are sent
    /// verbatim, valid JSON or not.
    ToolCalls(Vec<(String, String)>),
    /// Text followed by tool calls in the same assistant message.
    TextAndToolCalls(String, Vec<(String, String)>),
    /// An HTTP error: this status, this body (JSON), and an optional
    /// `Retry-After` header in seconds.
    Status {
        code: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// Exactly this status, content type and body, whatever the request asked.
    Raw {
        code: u16,
        content_type: String,
        body: String,
    },
    /// Read the request and never answer (for timeout tests).
    Hang,
}

impl Reply {
    /// A plain text reply.
    pub fn text(text: impl Into<String>) -> Self {
        Reply::Text(text.into())
    }

    /// A reply calling these tools: `(name, arguments JSON text)` pairs.
    pub fn tool_calls<N, A>(calls: impl IntoIterator<Item = (N, A)>) -> Self
    where
        N: Into<String>,
        A: Into<String>,
    {
        Reply::ToolCalls(
            calls
                .into_iter()
                .map(|(n, a)| (n.into(), a.into()))
                .collect(),
        )
    }

    /// An HTTP error with an OpenAI-style body
    /// `{"error":{"message":..,"type":..,"param":null,"code":..}}`.
    pub fn error(code: u16, message: &str) -> Self {
        let kind = match code {
            401 => "invalid_request_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        let error_code = match code {
            401 => Value::from("invalid_api_key"),
            429 => Value::from("rate_limit_exceeded"),
            _ => Value::Null,
        };
        let body = json!({
            "error": {"message": message, "type": kind, "param": null, "code": error_code}
        });
        Reply::Status {
            code,
            body: body.to_string(),
            retry_after: None,
        }
    }

    /// A 429 rate-limit error, with a `Retry-After` header when given.
    pub fn rate_limited(retry_after: Option<u64>) -> Self {
        match Reply::error(429, "Rate limit reached for requests") {
            Reply::Status { code, body, .. } => Reply::Status {
                code,
                body,
                retry_after,
            },
            other => other,
        }
    }

    /// A 200 SSE body made of exactly these `data:` payloads, in order (add
    /// `"[DONE]"` yourself if the stream should end properly).
    pub fn sse<S: Into<String>>(events: impl IntoIterator<Item = S>) -> Self {
        let body = events
            .into_iter()
            .map(|e| format!("data: {}\n\n", e.into()))
            .collect();
        Reply::Raw {
            code: 200,
            content_type: "text/event-stream".to_owned(),
            body,
        }
    }
}

/// A request as the fake server received it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON; `Value::Null` when empty or not JSON.
    pub body: Value,
    /// The body as text (lossy UTF-8).
    pub raw_body: String,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer_token(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("Bearer ")
    }
}

/// A running fake OpenAI server. Stops when dropped.
#[derive(Debug)]
pub struct FakeOpenAi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    base_path: String,
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<RecordedRequest>>,
}

impl FakeOpenAi {
    /// Starts a server under base path `/v1` serving `replies` in order.
    pub async fn start(replies: impl IntoIterator<Item = Reply>) -> io::Result<Self> {
        Self::start_at("/v1", replies).await
    }

    /// Starts a server whose API lives under `base_path` (e.g. `/openai/v1`;
    /// `""` for the root).
    pub async fn start_at(
        base_path: &str,
        replies: impl IntoIterator<Item = Reply>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            base_path: base_path.trim_end_matches('/').to_owned(),
            replies: Mutex::new(replies.into_iter().collect()),
            requests: Mutex::new(Vec::new()),
        });
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    /// The URL to configure a client with, e.g. `http://127.0.0.1:41234/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.addr, self.shared.base_path)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Appends a reply to the script.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.replies).push_back(reply);
    }

    /// How many scripted replies are still unused.
    pub fn remaining(&self) -> usize {
        lock(&self.shared.replies).len()
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task.
        self.server.abort();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                connections.spawn(serve_connection(stream, Arc::clone(&shared)));
            }
            Err(_) => tokio::task::yield_now().await,
        }
    }
}

/// A parsed HTTP/1.1 request.
pub(crate) struct Incoming {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) close: bool,
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    // Keep-alive: serve requests until the peer closes or something breaks.
    while let Ok(Some(req)) = read_request(&mut stream, &mut buf).await {
        let close = req.close;
        if respond(&mut stream, &shared, req).await.is_err() || close {
            return;
        }
    }
}

pub(crate) async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Incoming>> {
    let head_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_REQUEST || !fill(stream, buf).await? {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_owned();
    let target = request_line.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if length > MAX_REQUEST || header("transfer-encoding").is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fake server only reads Content-Length bodies",
        ));
    }
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let body_start = head_end + 4;
    while buf.len() < body_start + length {
        if !fill(stream, buf).await? {
            return Ok(None);
        }
    }
    let body = buf[body_start..body_start + length].to_vec();
    buf.drain(..body_start + length);
    Ok(Some(Incoming {
        method,
        path,
        headers,
        body,
        close,
    }))
}

/// Reads more bytes into `buf`; false at end of stream.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn respond(stream: &mut TcpStream, shared: &Shared, req: Incoming) -> io::Result<()> {
    let raw_body = String::from_utf8_lossy(&req.body).into_owned();
    let body: Value = serde_json::from_str(&raw_body).unwrap_or(Value::Null);
    let seq = {
        let mut requests = lock(&shared.requests);
        requests.push(RecordedRequest {
            method: req.method.clone(),
            path: req.path.clone(),
            headers: req.headers,
            body: body.clone(),
            raw_body: raw_body.clone(),
        });
        requests.len()
    };

    let endpoint = format!("{}/chat/completions", shared.base_path);
    if req.method != "POST" || req.path != endpoint {
        let msg = format!("Unknown request URL: {} {}", req.method, req.path);
        return write_status(stream, 404, &error_body(&msg), None).await;
    }
    let Some(reply) = lock(&shared.replies).pop_front() else {
        let msg = format!("FakeOpenAi: no scripted reply left for request #{seq}");
        return write_status(stream, 400, &error_body(&msg), None).await;
    };

    let streaming = body["stream"].as_bool().unwrap_or(false);
    let exchange = Exchange {
        id: format!("chatcmpl-fake{seq}"),
        seq,
        model: body["model"].as_str().unwrap_or("fake-model").to_owned(),
        prompt_tokens: (raw_body.len() / 4) as u64,
        include_usage: body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false),
    };
    let (text, calls) = match reply {
        Reply::Text(text) => (Some(text), Vec::new()),
        Reply::ToolCalls(calls) => (None, calls),
        Reply::TextAndToolCalls(text, calls) => (Some(text), calls),
        Reply::Status {
            code,
            body,
            retry_after,
        } => return write_status(stream, code, &body, retry_after).await,
        Reply::Raw {
            code,
            content_type,
            body,
        } => return write_full(stream, code, &content_type, &[], body.as_bytes()).await,
        Reply::Hang => std::future::pending().await,
    };
    if streaming {
        let events = exchange.chunks(text.as_deref(), &calls);
        write_sse(stream, &events).await
    } else {
        let completion = exchange.completion(text.as_deref(), &calls);
        let bytes = completion.to_string();
        write_full(stream, 200, "application/json", &[], bytes.as_bytes()).await
    }
}

fn error_body(message: &str) -> String {
    json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})
        .to_string()
}

/// What a generated answer needs to know about its request.
struct Exchange {
    id: String,
    seq: usize,
    model: String,
    prompt_tokens: u64,
    include_usage: bool,
}

impl Exchange {
    fn call_id(&self, index: usize) -> String {
        format!("call_{}_{index}", self.seq)
    }

    fn usage(&self, text: Option<&str>, calls: &[(String, String)]) -> Value {
        let generated =
            text.map_or(0, str::len) + calls.iter().map(|(n, a)| n.len() + a.len()).sum::<usize>();
        let completion_tokens = (generated / 4 + 1) as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn finish_reason(calls: &[(String, String)]) -> &'static str {
        if calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }
    }

    /// A non-streamed `chat.completion` object.
    fn completion(&self, text: Option<&str>, calls: &[(String, String)]) -> Value {
        let mut message = json!({"role": "assistant", "content": text, "refusal": null});
        if !calls.is_empty() {
            let tool_calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (name, args))| {
                    let mut function = json!({"arguments": args});
                    if !name.is_empty() {
                        function["name"] = Value::from(name.as_str());
                    }
                    json!({"id": self.call_id(i), "type": "function", "function": function})
                })
                .collect();
            message["tool_calls"] = Value::from(tool_calls);
        }
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": null,
                "finish_reason": Self::finish_reason(calls),
            }],
            "usage": self.usage(text, calls),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> String {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
        .to_string()
    }

    /// The SSE `data:` payloads of a streamed answer, `[DONE]` included.
    fn chunks(&self, text: Option<&str>, calls: &[(String, String)]) -> Vec<String> {
        let mut events = vec![self.chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        )];
        for piece in pieces(text.unwrap_or_default(), TEXT_PIECE) {
            events.push(self.chunk(json!({"content": piece}), None));
        }
        for (index, (name, args)) in calls.iter().enumerate() {
            let mut function = json!({"arguments": ""});
            if !name.is_empty() {
                function["name"] = Value::from(name.as_str());
            }
            let head = json!({"index": index, "id": self.call_id(index), "type": "function", "function": function});
            events.push(self.chunk(json!({"tool_calls": [head]}), None));
            for piece in pieces(args, ARGS_PIECE) {
                let part = json!({"index": index, "function": {"arguments": piece}});
                events.push(self.chunk(json!({"tool_calls": [part]}), None));
            }
        }
        events.push(self.chunk(json!({}), Some(Self::finish_reason(calls))));
        if self.include_usage {
            let usage = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": self.model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": self.usage(text, calls),
            });
            events.push(usage.to_string());
        }
        events.push("[DONE]".to_owned());
        events
    }
}

/// Splits `text` into pieces of at most `size` characters.
fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

async fn write_status(
    stream: &mut TcpStream,
    code: u16,
    body: &str,
    retry_after: Option<u64>,
) -> io::Result<()> {
    let extra: Vec<(&str, String)> = retry_after
        .map(|s| ("retry-after", s.to_string()))
        .into_iter()
        .collect();
    write_full(stream, code, "application/json", &extra, body.as_bytes()).await
}

pub(crate) async fn write_full(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    extra_headers: &[(&str, String)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {code} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        reason(code),
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// Writes an SSE response, one HTTP chunk per event, flushed as it goes.
async fn write_sse(stream: &mut TcpStream, events: &[String]) -> io::Result<()> {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await?;
    for event in events {
        let data = format!("data: {event}\n\n");
        stream
            .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
            .await?;
        stream.flush().await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_on_characters() {
        assert_eq!(pieces("héllo wörld", 5), ["héllo", " wörl", "d"]);
        assert!(pieces("", 5).is_empty());
    }

    #[test]
    fn streamed_tool_calls_put_id_and_name_first() {
        let ex = Exchange {
            id: "x".into(),
            seq: 1,
            model: "m".into(),
            prompt_tokens: 3,
            include_usage: true,
        };
        let events = ex.chunks(None, &[("f".into(), "{\"a\":12345}".into())]);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let parsed: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let head = &parsed[1]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(head["id"], "call_1_0");
        assert_eq!(head["function"]["name"], "f");
        let args: String = parsed[2..]
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(args, "{\"a\":12345}");
        assert_eq!(
            parsed[parsed.len() - 2]["choices"][0]["finish_reason"],
            "tool_calls"
        );
        assert_eq!(parsed[parsed.len() - 1]["usage"]["prompt_tokens"], 3);
    }
}
