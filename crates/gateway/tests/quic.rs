//! SDK <-> gateway over real QUIC on loopback, built with the production
//! server constructor.

mod common;

use std::time::Duration;

use common::{TOKEN, loopback_config, server};
use futures::StreamExt;
use openpista_client::{Client, ClientError, ClientOptions, Event, Trust};
use openpista_gateway::{GatewayConfig, GatewayError, QuicServer, TlsIdentity};
use openpista_proto::frame::{self, FrameDecoder};
use openpista_proto::wire::{ClientFrame, Decision, ServerFrame};
use openpista_proto::{AgentEvent, ErrorCode, Role, SessionId, ToolOutcome};

fn accepted_session(events: &[Event]) -> SessionId {
    match events.first() {
        Some(Event::Agent(AgentEvent::Accepted { session_id, .. })) => session_id.clone(),
        other => panic!("expected accepted first, got {other:?}"),
    }
}

fn final_text(events: &[Event]) -> String {
    match events.last() {
        Some(Event::Agent(AgentEvent::Final { text, .. })) => text.clone(),
        other => panic!("expected final last, got {other:?}"),
    }
}

fn last_error(events: &[Event]) -> ErrorCode {
    match events.last() {
        Some(Event::Agent(AgentEvent::Error { code, .. })) => *code,
        other => panic!("expected an error last, got {other:?}"),
    }
}

#[tokio::test]
async fn a_turn_with_a_tool_streams_events_and_is_in_history() {
    let script = r#"
on_exhausted = "echo"
[[reply]]
text = "Let me look."
tool_calls = [{ name = "file.read", arguments = { path = "notes.txt" } }]
[[reply]]
text = "You wrote: remember the milk."
"#;
    let s = server(script, loopback_config()).await;
    let client = s.client().await;
    let events = client
        .send(None, "what did I write?")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    let session = accepted_session(&events);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Agent(AgentEvent::TextDelta { .. })))
    );
    assert!(events.iter().any(|e| matches!(e,
        Event::Agent(AgentEvent::ToolStarted { name, .. }) if name == "file.read")));
    assert!(events.iter().any(|e| matches!(e,
        Event::Agent(AgentEvent::ToolFinished { outcome: ToolOutcome::Ok, output, .. }) if output.contains("milk"))));
    assert_eq!(final_text(&events), "You wrote: remember the milk.");

    let history = client.history(&session, None).await.unwrap();
    let roles: Vec<Role> = history.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
    assert_eq!(history[0].content, "what did I write?");

    let sessions = client.sessions(None).await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].id, session);
    assert_eq!(sessions[0].channel, "quic");

    let status = client.status().await.unwrap();
    assert_eq!(status.connections, 1);
    assert_eq!(status.live_sessions, 1);
    let err = client.approve("ap-1", Decision::Approve).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = client
        .history(&SessionId::parse("nope").unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn two_sessions_run_in_parallel_without_crossing() {
    let script = r#"
on_exhausted = "repeat_last"
[[reply]]
echo = true
chunk_chars = 2
delay_ms = 5
"#;
    let s = server(script, loopback_config()).await;
    let client = s.client().await;
    let (a, b) = tokio::join!(
        async {
            client
                .send(None, "alpha alpha")
                .await
                .unwrap()
                .collect_all()
                .await
                .unwrap()
        },
        async {
            client
                .send(None, "bravo bravo")
                .await
                .unwrap()
                .collect_all()
                .await
                .unwrap()
        },
    );
    assert_eq!(final_text(&a), "alpha alpha");
    assert_eq!(final_text(&b), "bravo bravo");
    let (sa, sb) = (accepted_session(&a), accepted_session(&b));
    assert_ne!(sa, sb);
    let ha = client.history(&sa, None).await.unwrap();
    let hb = client.history(&sb, None).await.unwrap();
    assert!(ha.iter().all(|m| !m.content.contains("bravo")), "{ha:?}");
    assert!(hb.iter().all(|m| !m.content.contains("alpha")), "{hb:?}");
}

#[tokio::test]
async fn a_turn_is_cancelled_mid_stream_and_the_session_goes_on() {
    let script = r#"
on_exhausted = "echo"
[[reply]]
text = "a very long and slow answer that will never finish in time"
chunk_chars = 1
delay_ms = 50
"#;
    let s = server(script, loopback_config()).await;
    let client = s.client().await;
    let mut events = client.send(None, "tell me a story").await.unwrap();
    let session = match events.next().await {
        Some(Ok(Event::Agent(AgentEvent::Accepted { session_id, .. }))) => session_id,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        events.next().await,
        Some(Ok(Event::Agent(AgentEvent::TextDelta { .. })))
    ));
    assert!(client.cancel(&session).await.unwrap());
    let mut rest = Vec::new();
    while let Some(ev) = events.next().await {
        rest.push(ev.unwrap());
    }
    assert_eq!(last_error(&rest), ErrorCode::Cancelled);
    assert!(!client.cancel(&session).await.unwrap());
    let next = client
        .send(Some(&session), "again")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(final_text(&next), "again");
}

#[tokio::test]
async fn a_client_reconnects_and_continues_its_session() {
    let s = server("on_exhausted = \"echo\"", loopback_config()).await;
    let first = s.client().await;
    let events = first
        .send(None, "one")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    let session = accepted_session(&events);
    first.close().await;

    let second = s.client().await;
    let events = second
        .send(Some(&session), "two")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(accepted_session(&events), session);
    let history = second.history(&session, None).await.unwrap();
    let texts: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, ["one", "one", "two", "two"]);
    let err = second
        .send(Some(&SessionId::parse("missing").unwrap()), "x")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(last_error(&err), ErrorCode::NotFound);
}

#[tokio::test]
async fn an_idempotent_resend_runs_once() {
    let s = server("on_exhausted = \"echo\"", loopback_config()).await;
    let client = s.client().await;
    let a = client
        .send_with_key(None, "pay the bill", "key-1")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    // The retry comes over a new connection, as after a network failure.
    let other = s.client().await;
    let b = other
        .send_with_key(None, "pay the bill", "key-1")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(s.h.llm.requests().len(), 1);
    let history = client.history(&accepted_session(&a), None).await.unwrap();
    assert_eq!(history.len(), 2);
    let c = client
        .send_with_key(None, "pay the bill", "key-2")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_ne!(accepted_session(&a), accepted_session(&c));
    assert_eq!(s.h.llm.requests().len(), 2);
}

async fn assert_serves_next(s: &common::Server) {
    let client = s.client().await;
    assert!(client.status().await.is_ok());
    client.close().await;
}

/// A QUIC connection with the client's real TLS settings, before `hello`.
async fn raw_connection(s: &common::Server) -> (quinn::Endpoint, quinn::Connection) {
    let tls = s.trust().rustls_config().unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let conn = endpoint
        .connect(s.addr(), "localhost")
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

/// Writes `bytes` on a new stream (finishing it if asked) and reads one frame back.
async fn exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> ServerFrame {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let mut decoder = FrameDecoder::new(frame::DEFAULT_MAX_FRAME);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = decoder.next::<ServerFrame>().unwrap() {
            return f;
        }
        let n = recv
            .read(&mut buf)
            .await
            .unwrap()
            .expect("a reply before the end");
        decoder.push(&buf[..n]);
    }
}

fn error_code(frame: &ServerFrame) -> ErrorCode {
    match frame {
        ServerFrame::Error { code, .. } => *code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

async fn closed_reason(conn: &quinn::Connection) -> String {
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_credentials_are_refused_with_their_code() {
    let s = server("on_exhausted = \"echo\"", loopback_config()).await;

    let err = Client::connect(s.addr(), None, s.trust())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    assert_serves_next(&s).await;

    let err = Client::connect(s.addr(), Some("guess".into()), s.trust())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    assert_serves_next(&s).await;

    let (_ep, conn) = raw_connection(&s).await;
    let hello = ClientFrame::Hello {
        protocol_version: 99,
        token: Some(TOKEN.into()),
        client_name: "future".into(),
    };
    let reply = exchange(&conn, &frame::encode(&hello, 4096).unwrap(), true).await;
    assert_eq!(error_code(&reply), ErrorCode::UnsupportedVersion);
    assert_eq!(closed_reason(&conn).await, "unsupported_version");
    assert_serves_next(&s).await;

    let mut tls = s.trust().rustls_config().unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let err = Client::connect_with_tls(s.addr(), Some(TOKEN.into()), tls, ClientOptions::default())
        .await
        .unwrap_err();
    match &err {
        ClientError::Connection(quinn::ConnectionError::ConnectionClosed(close)) => {
            // TLS alert 120, no_application_protocol, as a QUIC crypto error.
            assert_eq!(u64::from(close.error_code), 0x100 + 120, "{close:?}");
        }
        other => panic!("expected a refused handshake, got {other:?}"),
    }
    assert_serves_next(&s).await;

    let wrong = Trust::Fingerprint("00".repeat(32));
    let err = Client::connect(s.addr(), Some(TOKEN.into()), wrong)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Connection(quinn::ConnectionError::TransportError(_))
        ),
        "{err:?}"
    );
    assert_serves_next(&s).await;
}

#[tokio::test]
async fn a_bad_hello_closes_the_connection_with_its_code() {
    let s = server("on_exhausted = \"echo\"", loopback_config()).await;
    let (_ep, conn) = raw_connection(&s).await;
    let reply = exchange(&conn, b"\x00\x00\x00\x05hello", true).await;
    assert_eq!(error_code(&reply), ErrorCode::InvalidFrame);
    assert_eq!(closed_reason(&conn).await, "invalid_frame");

    let (_ep, conn) = raw_connection(&s).await;
    let status = frame::encode(&ClientFrame::Status {}, 4096).unwrap();
    let reply = exchange(&conn, &status, true).await;
    assert_eq!(error_code(&reply), ErrorCode::BadRequest);
    assert_eq!(closed_reason(&conn).await, "bad_request");
    assert_serves_next(&s).await;
}

#[tokio::test]
async fn bad_bytes_close_only_their_stream() {
    let s = server("on_exhausted = \"echo\"", loopback_config()).await;
    let client = s.client().await;
    let bystander = s.client().await;
    let conn = client.connection();

    let reply = exchange(conn, &[0xff, 0xff, 0xff, 0xff], false).await;
    assert_eq!(error_code(&reply), ErrorCode::FrameTooLarge);
    let reply = exchange(conn, b"\x00\x00\x00\x10{\"type\":", true).await;
    assert_eq!(error_code(&reply), ErrorCode::InvalidFrame);
    let reply = exchange(conn, b"\x00\x00\x00\x04\xff\xfe\x00\x01", true).await;
    assert_eq!(error_code(&reply), ErrorCode::InvalidFrame);
    let reply = exchange(conn, b"\x00\x00\x00\x03{}}", true).await;
    assert_eq!(error_code(&reply), ErrorCode::InvalidFrame);
    let body = br#"{"type":"status","sudo":true}"#;
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    assert_eq!(
        error_code(&exchange(conn, &bytes, true).await),
        ErrorCode::BadRequest
    );
    let body = br#"{"type":"get_history","session_id":"../../etc"}"#;
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    assert_eq!(
        error_code(&exchange(conn, &bytes, true).await),
        ErrorCode::BadRequest
    );
    let body = br#"{"type":"rm_rf"}"#;
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    assert_eq!(
        error_code(&exchange(conn, &bytes, true).await),
        ErrorCode::BadRequest
    );
    let hello = ClientFrame::Hello {
        protocol_version: 1,
        token: Some(TOKEN.into()),
        client_name: "again".into(),
    };
    let reply = exchange(conn, &frame::encode(&hello, 4096).unwrap(), true).await;
    assert_eq!(error_code(&reply), ErrorCode::BadRequest);
    let m = s.h.gateway.metrics();
    let errors = |code| m.counter("openpista_frame_errors_total", Some(code));
    assert_eq!(errors("frame_too_large"), 1);
    assert_eq!(errors("invalid_frame"), 3);
    assert_eq!(errors("bad_request"), 3);

    // The same connection and another one still work.
    let events = client
        .send(None, "still here")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(final_text(&events), "still here");
    assert!(bystander.status().await.is_ok());
}

#[tokio::test]
async fn requests_beyond_the_stream_limit_are_refused() {
    let script = r#"
on_exhausted = "repeat_last"
[[reply]]
text = "slow slow slow"
chunk_chars = 1
delay_ms = 30
"#;
    let cfg = GatewayConfig {
        max_streams_per_connection: 2,
        ..loopback_config()
    };
    let s = server(script, cfg).await;
    let client = s.client().await;
    let mut a = client.send(None, "a").await.unwrap();
    let mut b = client.send(None, "b").await.unwrap();
    // Both requests are in flight once accepted.
    assert!(matches!(
        a.next().await,
        Some(Ok(Event::Agent(AgentEvent::Accepted { .. })))
    ));
    assert!(matches!(
        b.next().await,
        Some(Ok(Event::Agent(AgentEvent::Accepted { .. })))
    ));
    let err = client.status().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    let mut rest_a = Vec::new();
    while let Some(ev) = a.next().await {
        rest_a.push(ev.unwrap());
    }
    assert_eq!(final_text(&rest_a), "slow slow slow");
    let rest_b = b.collect_all().await.unwrap();
    assert_eq!(final_text(&rest_b), "slow slow slow");
    assert!(client.status().await.is_ok());
}

#[tokio::test]
async fn messages_beyond_the_rate_are_refused() {
    let cfg = GatewayConfig {
        messages_per_minute: 2,
        ..loopback_config()
    };
    let s = server("on_exhausted = \"echo\"", cfg).await;
    let client = s.client().await;
    for text in ["one", "two"] {
        let events = client
            .send(None, text)
            .await
            .unwrap()
            .collect_all()
            .await
            .unwrap();
        assert_eq!(final_text(&events), text);
    }
    let events = client
        .send(None, "three")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(last_error(&events), ErrorCode::RateLimited);
    // The limit is per connection.
    let other = s.client().await;
    let events = other
        .send(None, "four")
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(final_text(&events), "four");
}

#[tokio::test]
async fn a_public_bind_needs_a_token() {
    let cfg = GatewayConfig {
        bind: "0.0.0.0:0".into(),
        ..GatewayConfig::default()
    };
    let h = common::harness("", &cfg).await;
    let tls = TlsIdentity::load_or_generate(h.dir.path()).unwrap();
    let err = QuicServer::bind(h.gateway.clone(), &cfg, tls.clone(), None).unwrap_err();
    assert!(matches!(err, GatewayError::TokenRequired(_)), "{err}");
    let err = QuicServer::bind(
        h.gateway.clone(),
        &cfg,
        tls.clone(),
        Some(String::new().into()),
    )
    .unwrap_err();
    assert!(matches!(err, GatewayError::TokenRequired(_)), "{err}");
    let server =
        QuicServer::bind(h.gateway.clone(), &cfg, tls.clone(), Some(TOKEN.into())).unwrap();
    assert_ne!(server.local_addr().port(), 0);
    assert_eq!(server.fingerprint(), tls.fingerprint());
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn shutdown_closes_connections_with_its_code() {
    let s = server("on_exhausted = \"echo\"", loopback_config()).await;
    let client = s.client().await;
    s.server.shutdown(Duration::from_secs(5)).await;
    let err = client.status().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ShuttingDown), "{err:?}");
}
