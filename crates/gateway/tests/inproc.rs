//! The in-process gateway: the same path through sessions as QUIC, no sockets.

mod common;

use openpista_gateway::{GatewayConfig, GatewayError, SendRequest};
use openpista_proto::{AgentEvent, ErrorCode, Role, SessionId};

fn send(session_id: Option<SessionId>, text: &str, key: Option<&str>) -> SendRequest {
    SendRequest {
        session_id,
        text: text.into(),
        idempotency_key: key.map(str::to_owned),
        channel: "cli".into(),
        create_missing: false,
    }
}

#[tokio::test]
async fn a_turn_streams_and_is_stored() {
    let h = common::harness("on_exhausted = \"echo\"", &GatewayConfig::default()).await;
    let events = h
        .gateway
        .send(send(None, "hello there", None))
        .await
        .unwrap()
        .collect()
        .await;
    let Some(AgentEvent::Accepted { session_id, .. }) = events.first().cloned() else {
        panic!("first event: {events:?}");
    };
    assert!(matches!(events.last(), Some(AgentEvent::Final { text, .. }) if text == "hello there"));
    let history = h.gateway.history(&session_id, None).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].role, Role::User);
    let sessions = h.gateway.list_sessions(None).await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].channel, "cli");
    assert_eq!(sessions[0].message_count, 2);
}

#[tokio::test]
async fn unknown_sessions_are_not_found_unless_created_on_demand() {
    let h = common::harness("on_exhausted = \"echo\"", &GatewayConfig::default()).await;
    let id = SessionId::parse("telegram:42").unwrap();
    let err = h
        .gateway
        .send(send(Some(id.clone()), "hi", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert!(matches!(
        h.gateway.history(&id, None).await,
        Err(GatewayError::NotFound(_))
    ));
    let mut req = send(Some(id.clone()), "hi", None);
    req.create_missing = true;
    let events = h.gateway.send(req).await.unwrap().collect().await;
    assert!(
        matches!(events.last(), Some(AgentEvent::Final { .. })),
        "{events:?}"
    );
    assert_eq!(h.gateway.history(&id, None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_retried_key_runs_once_even_while_running() {
    let script = r#"
[[reply]]
text = "slow answer"
chunk_chars = 2
delay_ms = 20
"#;
    let h = common::harness(script, &GatewayConfig::default()).await;
    let first = h.gateway.send(send(None, "q", Some("k1"))).await.unwrap();
    let retry = h.gateway.send(send(None, "q", Some("k1"))).await.unwrap();
    let (a, b) = tokio::join!(first.collect(), retry.collect());
    assert_eq!(a, b);
    assert!(matches!(a.last(), Some(AgentEvent::Final { text, .. }) if text == "slow answer"));
    assert_eq!(h.llm.requests().len(), 1);
    assert_eq!(h.gateway.list_sessions(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_full_session_queue_is_refused() {
    let script = r#"
on_exhausted = "repeat_last"
[[reply]]
text = "slow answer"
chunk_chars = 1
delay_ms = 20
"#;
    let cfg = GatewayConfig {
        max_queued_turns: 1,
        ..GatewayConfig::default()
    };
    let h = common::harness(script, &cfg).await;
    let mut first = h.gateway.send(send(None, "one", None)).await.unwrap();
    let Some(AgentEvent::Accepted { session_id, .. }) = first.recv().await else {
        panic!("no accepted");
    };
    let err = h
        .gateway
        .send(send(Some(session_id.clone()), "two", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    assert!(h.gateway.cancel(&session_id));
    let rest = first.collect().await;
    assert!(
        matches!(
            rest.last(),
            Some(AgentEvent::Error {
                code: ErrorCode::Cancelled,
                ..
            })
        ),
        "{rest:?}"
    );
    assert!(h.gateway.shutdown(std::time::Duration::from_secs(5)).await);
    let err = h.gateway.send(send(None, "late", None)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ShuttingDown);
}
