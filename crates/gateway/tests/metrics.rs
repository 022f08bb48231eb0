//! The metrics and health endpoint over real loopback TCP, scraped by a
//! plain client after real turns.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use openpista_gateway::{GatewayConfig, GatewayError, MetricsConfig, MetricsServer, SendRequest};
use openpista_proto::AgentEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes, returns (status, body).
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server answers and closes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line in {head:?}"));
    assert!(head.contains("connection: close"), "{head}");
    (status, body.to_owned())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
    .await
}

fn line_value(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .parse()
        .unwrap()
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn turns_and_tools_show_up_in_metrics_and_readiness_flips_on_shutdown() {
    let script = r#"
on_exhausted = "repeat_last"
[[reply]]
text = "Let me look."
tool_calls = [{ name = "file.read", arguments = { path = "notes.txt" } }]
[[reply]]
text = "ok"
"#;
    let h = common::harness(script, &GatewayConfig::default()).await;
    let server = MetricsServer::bind(local(), h.gateway.clone()).unwrap();
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback());

    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("openpista_turns_total{outcome=\"final\"} 0\n"),
        "{body}"
    );

    let events = h
        .gateway
        .send(SendRequest {
            session_id: None,
            text: "what did I write?".into(),
            idempotency_key: None,
            channel: "cli".into(),
            create_missing: false,
        })
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        matches!(events.last(), Some(AgentEvent::Final { text, .. }) if text == "ok"),
        "{events:?}"
    );

    let (status, body) = get(addr, "/metrics?x=1").await;
    assert_eq!(status, 200);
    assert_eq!(line_value(&body, "openpista_turns_started_total"), 1);
    assert_eq!(
        line_value(&body, "openpista_turns_total{outcome=\"final\"}"),
        1
    );
    assert_eq!(
        line_value(&body, "openpista_turns_total{outcome=\"error\"}"),
        0
    );
    assert_eq!(
        line_value(&body, "openpista_tool_calls_total{outcome=\"ok\"}"),
        1
    );
    // Two model rounds: after acceptance and after the tool result.
    assert_eq!(line_value(&body, "openpista_llm_latency_seconds_count"), 2);
    assert_eq!(
        line_value(&body, "openpista_llm_latency_seconds_bucket{le=\"+Inf\"}"),
        2
    );
    assert_eq!(
        line_value(&body, "openpista_turn_duration_seconds_count"),
        1
    );
    assert_eq!(line_value(&body, "openpista_turns_pending"), 0);
    assert_eq!(line_value(&body, "openpista_live_sessions"), 1);
    assert_eq!(line_value(&body, "openpista_quic_connections"), 0);
    assert!(
        body.contains("# TYPE openpista_turns_total counter\n"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE openpista_llm_latency_seconds histogram\n"),
        "{body}"
    );
    assert_eq!(
        h.gateway
            .metrics()
            .counter("openpista_turns_total", Some("final")),
        1
    );

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(get(addr, "/nope").await.0, 404);
    let (status, _) = raw(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status, 405);

    assert!(h.gateway.shutdown(Duration::from_secs(5)).await);
    assert_eq!(get(addr, "/readyz").await, (503, "draining\n".into()));
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(line_value(&body, "openpista_ready"), 0);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn garbage_is_refused_and_the_server_stays_up() {
    let h = common::harness("on_exhausted = \"echo\"", &GatewayConfig::default()).await;
    let server = MetricsServer::bind(local(), h.gateway.clone()).unwrap();
    let addr = server.local_addr();
    let garbage: [&[u8]; 5] = [
        b"\x00\x01\xff garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics SPDY/3 extra\r\n\r\n",
        b"GET /metrics",
    ];
    for g in garbage {
        // The last one ends the stream inside the head.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(g).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400 "), "{g:?}: {text}");
    }
    // An endless head is cut off at the limit.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(openpista_gateway::MAX_REQUEST_HEAD)
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A client that connects and says nothing does not block others.
    let _idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_non_loopback_bind_is_refused() {
    let h = common::harness("on_exhausted = \"echo\"", &GatewayConfig::default()).await;
    let err = MetricsServer::bind("0.0.0.0:0".parse().unwrap(), h.gateway.clone()).unwrap_err();
    assert!(matches!(err, GatewayError::Config(_)), "{err}");
    assert!(err.to_string().contains("loopback"), "{err}");
    let cfg = MetricsConfig {
        bind: Some("0.0.0.0:9464".into()),
    };
    assert!(cfg.validate().is_err());
}

#[tokio::test]
async fn quic_connections_and_frame_errors_are_counted() {
    let s = common::server("on_exhausted = \"echo\"", common::loopback_config()).await;
    let client = s.client().await;
    let events = client
        .send(None, "hi")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert!(!events.is_empty());
    let m = s.h.gateway.metrics();
    assert_eq!(m.counter("openpista_quic_connections_total", None), 1);
    assert_eq!(m.counter("openpista_turns_total", Some("final")), 1);
    assert_eq!(
        m.counter("openpista_frame_errors_total", Some("invalid_frame")),
        0
    );
    let server = MetricsServer::bind(local(), s.h.gateway.clone()).unwrap();
    let (_, body) = get(server.local_addr(), "/metrics").await;
    assert_eq!(line_value(&body, "openpista_quic_connections"), 1);
    assert_eq!(line_value(&body, "openpista_quic_connections_total"), 1);
}
