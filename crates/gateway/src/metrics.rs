//! Metrics and health: a [`Metrics`] registry of cheap atomics, always
//! present in a [`Gateway`], and a [`MetricsServer`] answering plain
//! HTTP/1.1 on a loopback port:
//!
//! - `GET /metrics`: Prometheus text exposition (format 0.0.4): turns,
//!   tool calls by outcome, model latency and tokens, QUIC connections,
//!   frame errors, queue depths;
//! - `GET /healthz`: `200 ok` while the process answers;
//! - `GET /readyz`: `200 ready` while the gateway accepts turns, `503
//!   draining` once its shutdown has begun.
//!
//! The port has no authentication, so it binds loopback only: a
//! non-loopback [`MetricsConfig::bind`] is refused, not merely warned about.
//! Reach it from elsewhere through an authenticated proxy or SSH tunnel.
//!
//! Not here: a general HTTP server. One request per connection, `GET` only,
//! a bounded request head and a read deadline; anything else is answered
//! with an error status and the connection is closed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openpista_proto::{AgentEvent, ErrorCode, ToolOutcome};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{Gateway, GatewayError};

/// Largest request head (request line + headers) read, in bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a response gets to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most HTTP connections served at once; more wait in the accept backlog.
const MAX_HTTP_CONNECTIONS: usize = 16;

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` is implied.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// `[metrics]` settings, for the CLI to read and pass to [`MetricsServer::bind`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Loopback address of the HTTP endpoint (e.g. `127.0.0.1:9464`);
    /// `None` (the default) serves no metrics. Non-loopback is refused.
    pub bind: Option<String>,
}

impl MetricsConfig {
    /// The address to serve on, `None` when disabled. Refuses an address
    /// that does not parse or is not loopback.
    pub fn validate(&self) -> Result<Option<SocketAddr>, GatewayError> {
        let Some(bind) = &self.bind else {
            return Ok(None);
        };
        let addr: SocketAddr = bind.parse().map_err(|e| {
            GatewayError::Config(format!("metrics.bind {bind:?} is not an address: {e}"))
        })?;
        check_loopback(addr)?;
        Ok(Some(addr))
    }
}

fn check_loopback(addr: SocketAddr) -> Result<(), GatewayError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(GatewayError::Config(format!(
            "metrics.bind {addr} is not loopback: the metrics port has no authentication, \
             so it only listens on 127.0.0.1 or ::1"
        )))
    }
}

/// The gateway's counters, gauges and histograms. Cheap to update (atomics;
/// a short lock for labelled counters); rendered on scrape.
#[derive(Debug)]
pub struct Metrics {
    turns_started: AtomicU64,
    turns: Labelled,
    tool_calls: Labelled,
    tokens: Labelled,
    turn_duration: Histogram,
    llm_latency: Histogram,
    quic_connections: AtomicU64,
    frame_errors: Labelled,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every counter at zero.
    pub fn new() -> Self {
        Self {
            turns_started: AtomicU64::new(0),
            turns: Labelled::new(&["final", "error", "cancelled", "aborted"]),
            tool_calls: Labelled::new(&["ok", "error", "denied", "timeout", "cancelled"]),
            tokens: Labelled::new(&["prompt", "completion"]),
            turn_duration: Histogram::default(),
            llm_latency: Histogram::default(),
            quic_connections: AtomicU64::new(0),
            frame_errors: Labelled::new(&[]),
        }
    }

    /// A QUIC connection was authenticated.
    pub fn quic_connection_accepted(&self) {
        self.quic_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A request stream carried bytes that were not a valid request frame.
    pub fn frame_error(&self, code: ErrorCode) {
        self.frame_errors.inc(code.as_str(), 1);
    }

    /// A counter's value by metric and label value (`None` for unlabelled
    /// counters), for tests and the status command.
    pub fn counter(&self, name: &str, label: Option<&str>) -> u64 {
        let labelled = match name {
            "openpista_turns_started_total" => {
                return self.turns_started.load(Ordering::Relaxed);
            }
            "openpista_quic_connections_total" => {
                return self.quic_connections.load(Ordering::Relaxed);
            }
            "openpista_turns_total" => &self.turns,
            "openpista_tool_calls_total" => &self.tool_calls,
            "openpista_llm_tokens_total" => &self.tokens,
            "openpista_frame_errors_total" => &self.frame_errors,
            _ => return 0,
        };
        label.map_or(0, |l| labelled.get(l))
    }

    /// Starts following one turn's events.
    pub(crate) fn turn_started(self: &Arc<Self>) -> TurnObserver {
        self.turns_started.fetch_add(1, Ordering::Relaxed);
        TurnObserver {
            metrics: self.clone(),
            started: Instant::now(),
            awaiting_model: None,
            outcome: None,
        }
    }

    /// The Prometheus text exposition, with the gateway's live gauges.
    pub fn render(&self, gateway: &Gateway) -> String {
        let status = gateway.status();
        let mut out = String::with_capacity(4096);
        counter(
            &mut out,
            "openpista_turns_started_total",
            "Turns started.",
            self.turns_started.load(Ordering::Relaxed),
        );
        self.turns.render(
            &mut out,
            "openpista_turns_total",
            "Turns ended, by outcome (aborted: ended without a final or error event).",
            "outcome",
        );
        self.tool_calls.render(
            &mut out,
            "openpista_tool_calls_total",
            "Tool calls ended, by outcome.",
            "outcome",
        );
        self.tokens.render(
            &mut out,
            "openpista_llm_tokens_total",
            "Model tokens reported in turn usage, by kind.",
            "kind",
        );
        self.llm_latency.render(
            &mut out,
            "openpista_llm_latency_seconds",
            "Time from a turn's acceptance, or from a tool result, to the model's next output.",
        );
        self.turn_duration.render(
            &mut out,
            "openpista_turn_duration_seconds",
            "Time from a turn's start (including its wait in the session queue) to its last event.",
        );
        counter(
            &mut out,
            "openpista_quic_connections_total",
            "QUIC connections authenticated.",
            self.quic_connections.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "openpista_quic_connections",
            "QUIC connections open now.",
            status.connections,
        );
        self.frame_errors.render(
            &mut out,
            "openpista_frame_errors_total",
            "Request streams refused for bytes that were not a valid request, by error code.",
            "code",
        );
        gauge(
            &mut out,
            "openpista_turns_pending",
            "Turns running or queued behind a session's running turn.",
            status.running_turns,
        );
        gauge(
            &mut out,
            "openpista_live_sessions",
            "Sessions held in memory by the router.",
            status.live_sessions,
        );
        gauge(
            &mut out,
            "openpista_ready",
            "1 while the gateway accepts turns, 0 while it drains.",
            u64::from(gateway.is_accepting()),
        );
        gauge(
            &mut out,
            "openpista_uptime_seconds",
            "Seconds since the gateway started.",
            status.uptime_secs,
        );
        out
    }
}

/// Follows one turn's events into [`Metrics`]; records the outcome on drop.
#[derive(Debug)]
pub(crate) struct TurnObserver {
    metrics: Arc<Metrics>,
    started: Instant,
    /// Set while the model is expected to produce output next.
    awaiting_model: Option<Instant>,
    outcome: Option<&'static str>,
}

impl TurnObserver {
    pub(crate) fn observe(&mut self, ev: &AgentEvent) {
        let m = self.metrics.clone();
        match ev {
            AgentEvent::Accepted { .. } => self.awaiting_model = Some(Instant::now()),
            AgentEvent::TextDelta { .. } | AgentEvent::ToolStarted { .. } => {
                self.model_answered();
            }
            AgentEvent::ApprovalRequired { .. } => {}
            AgentEvent::ToolFinished { outcome, .. } => {
                m.tool_calls.inc(tool_outcome(*outcome), 1);
                self.awaiting_model = Some(Instant::now());
            }
            AgentEvent::Final { usage, .. } => {
                self.model_answered();
                m.tokens.inc("prompt", usage.prompt_tokens);
                m.tokens.inc("completion", usage.completion_tokens);
                self.outcome = Some("final");
            }
            AgentEvent::Error { code, .. } => {
                self.awaiting_model = None;
                self.outcome = Some(match code {
                    ErrorCode::Cancelled => "cancelled",
                    _ => "error",
                });
            }
        }
    }

    fn model_answered(&mut self) {
        if let Some(since) = self.awaiting_model.take() {
            self.metrics.llm_latency.observe(since.elapsed());
        }
    }
}

impl Drop for TurnObserver {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or("aborted");
        self.metrics.turns.inc(outcome, 1);
        self.metrics.turn_duration.observe(self.started.elapsed());
    }
}

fn tool_outcome(o: ToolOutcome) -> &'static str {
    match o {
        ToolOutcome::Ok => "ok",
        ToolOutcome::Error => "error",
        ToolOutcome::Denied => "denied",
        ToolOutcome::Timeout => "timeout",
        ToolOutcome::Cancelled => "cancelled",
    }
}

/// A counter with one label; known label values are shown from zero.
#[derive(Debug)]
struct Labelled(Mutex<BTreeMap<&'static str, u64>>);

impl Labelled {
    fn new(known: &[&'static str]) -> Self {
        Self(Mutex::new(known.iter().map(|l| (*l, 0)).collect()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn inc(&self, label: &'static str, by: u64) {
        let mut map = self.lock();
        let v = map.entry(label).or_insert(0);
        *v = v.saturating_add(by);
    }

    fn get(&self, label: &str) -> u64 {
        self.lock().get(label).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        header(out, name, help, "counter");
        for (value, n) in self.lock().iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape(value));
        }
    }
}

/// A latency histogram over [`BUCKETS`], in seconds.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        if let Some(b) = self.buckets.get(idx) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            match BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        // Concurrent observations may land between the loads; the count is
        // the +Inf bucket so that the two always agree.
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}

/// Escapes a label value (`\`, `"`, newline) per the text format.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A running metrics and health endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl MetricsServer {
    /// Binds `addr` (loopback only; anything else is refused) and serves the
    /// gateway's metrics and health. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr, gateway: Gateway) -> Result<Self, GatewayError> {
        check_loopback(addr)?;
        let bind_err = |source| GatewayError::Bind { addr, source };
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(std_listener).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(
            accept_loop(listener, gateway, shutdown.clone(), tracker.clone())
                .instrument(tracing::info_span!("metrics", %local_addr)),
        );
        tracing::info!(%local_addr, "metrics listening");
        Ok(Self {
            local_addr,
            shutdown,
            tracker,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for open requests (at most `deadline`).
    pub async fn shutdown(&self, deadline: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(deadline, self.tracker.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gateway = gateway.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = serve(stream, &gateway) => {}
            }
        });
    }
}

/// One HTTP response: status line, content type and body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

async fn serve(mut stream: TcpStream, gateway: &Gateway) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => respond(&head, gateway),
        Ok(Ok(None)) => return,
        Ok(Err(resp)) => resp,
        Err(_) => Response::text(408, "Request Timeout", "request timeout"),
    };
    let mut bytes = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
        response.status,
        response.reason,
        response.content_type,
        response.body.len()
    );
    if response.status == 405 {
        bytes.push_str("allow: GET\r\n");
    }
    bytes.push_str("\r\n");
    bytes.push_str(&response.body);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        if stream.write_all(bytes.as_bytes()).await.is_ok() {
            let _ = stream.shutdown().await;
        }
    })
    .await;
}

/// Reads up to the end of the request head. `Ok(None)`: the peer closed
/// without sending anything. `Err`: the response for a bad request.
async fn read_head(stream: &mut TcpStream) -> Result<Option<Vec<u8>>, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() >= MAX_REQUEST_HEAD {
            return Err(Response::text(
                431,
                "Request Header Fields Too Large",
                "request head too large",
            ));
        }
        let room = (MAX_REQUEST_HEAD - buf.len()).min(chunk.len());
        let n = match stream.read(chunk.get_mut(..room).unwrap_or_default()).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Response::text(400, "Bad Request", "incomplete request")),
            Ok(n) => n,
            Err(_) => return Ok(None),
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// Where the head ends (before the blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn respond(head: &[u8], gateway: &Gateway) -> Response {
    let bad = || Response::text(400, "Bad Request", "bad request");
    let Ok(head) = std::str::from_utf8(head) else {
        return bad();
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad();
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !method_ok || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return bad();
    }
    if method != "GET" {
        return Response::text(405, "Method Not Allowed", "method not allowed");
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => Response {
            status: 200,
            reason: "OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: gateway.metrics().render(gateway),
        },
        "/healthz" => Response::text(200, "OK", "ok"),
        "/readyz" if gateway.is_accepting() => Response::text(200, "OK", "ready"),
        "/readyz" => Response::text(503, "Service Unavailable", "draining"),
        _ => Response::text(404, "Not Found", "not found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_binds_are_accepted() {
        assert_eq!(MetricsConfig::default().validate().unwrap(), None);
        for ok in ["127.0.0.1:9464", "[::1]:0"] {
            let cfg = MetricsConfig {
                bind: Some(ok.into()),
            };
            assert!(cfg.validate().unwrap().is_some(), "{ok}");
        }
        for bad in [
            "0.0.0.0:9464",
            "[::]:9464",
            "192.168.1.2:80",
            "localhost:80",
        ] {
            let cfg = MetricsConfig {
                bind: Some(bad.into()),
            };
            assert!(
                matches!(cfg.validate(), Err(GatewayError::Config(_))),
                "{bad}"
            );
        }
        let r: Result<MetricsConfig, _> = serde_json::from_str(r#"{"bnd": "x"}"#);
        assert!(r.is_err());
    }

    #[test]
    fn histograms_are_cumulative_and_counted() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("# TYPE x_seconds histogram\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.01\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.025\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 100.0205\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
    }

    #[test]
    fn labelled_counters_render_and_escape() {
        let l = Labelled::new(&["a"]);
        l.inc("b\"\n\\", 2);
        let mut out = String::new();
        l.render(&mut out, "y_total", "help", "k");
        assert_eq!(
            out,
            "# HELP y_total help\n# TYPE y_total counter\ny_total{k=\"a\"} 0\ny_total{k=\"b\\\"\\n\\\\\"} 2\n"
        );
    }

    #[test]
    fn heads_end_at_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(23));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
