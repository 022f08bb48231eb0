//! [`QuicServer`]: the protocol of `docs/PROTOCOL.md` over quinn, on top of
//! the in-process [`Gateway`].
//!
//! One task per connection and one per request stream, all owned by a
//! [`TaskTracker`] and stopped by one [`CancellationToken`]. 0-RTT is not
//! enabled (see [`TlsIdentity::server_config`]), so every request arrives
//! after a full handshake and cannot be replayed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openpista_agent::Origin;
use openpista_channels::SecretString;
use openpista_proto::frame::{self, FrameDecoder, FrameError};
use openpista_proto::wire::{ClientFrame, ServerFrame};
use openpista_proto::{AgentEvent, ErrorCode, PROTOCOL_VERSION};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::TokenCheck;
use crate::inproc::{Gateway, SendRequest};
use crate::tls::TlsIdentity;
use crate::{GatewayConfig, GatewayError};

/// Application close code for a normal close.
pub const CLOSE_OK: u32 = 0;
/// Application close code for a protocol error; the reason is the error code
/// in snake_case (e.g. `unauthorized`).
pub const CLOSE_ERROR: u32 = 1;

/// How long a client has to send `hello` after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send its request after opening a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an error frame gets to reach the peer before the connection closes.
const LINGER: Duration = Duration::from_secs(2);
/// The server version reported in `welcome` and `status_report`.
const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A running QUIC server.
#[derive(Debug)]
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    fingerprint: String,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl QuicServer {
    /// Validates `cfg`, binds its address and starts accepting connections.
    /// Must be called inside a tokio runtime. A non-loopback address without
    /// a token is refused ([`GatewayError::TokenRequired`]).
    pub fn bind(
        gateway: Gateway,
        cfg: &GatewayConfig,
        tls: TlsIdentity,
        token: Option<SecretString>,
    ) -> Result<Self, GatewayError> {
        let addr = cfg.validate()?;
        let token = TokenCheck::new(token.as_ref());
        if !addr.ip().is_loopback() && !token.required() {
            return Err(GatewayError::TokenRequired(addr));
        }
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls.server_config()?)
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // Streams beyond the application limit are accepted by QUIC and
        // answered `limit_exceeded`; this bounds them at the transport.
        let quic_streams = cfg
            .max_streams_per_connection
            .saturating_mul(2)
            .saturating_add(1);
        transport
            .max_concurrent_bidi_streams(varint(quic_streams))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
            .datagram_receive_buffer_size(None)
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(Duration::from_secs(cfg.idle_timeout_secs))
                    .map_err(|e| GatewayError::Config(format!("gateway.idle_timeout_secs: {e}")))?,
            ));
        server.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|source| GatewayError::Bind { addr, source })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| GatewayError::Bind { addr, source })?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared {
            gateway,
            token,
            max_frame: cfg.max_frame_size,
            max_streams: cfg.max_streams_per_connection,
            messages_per_minute: cfg.messages_per_minute,
        });
        let connections = Arc::new(Semaphore::new(cfg.max_connections));
        tracker.spawn(
            accept_loop(
                endpoint.clone(),
                shared,
                connections,
                shutdown.clone(),
                tracker.clone(),
            )
            .instrument(tracing::info_span!("quic", %local_addr)),
        );
        tracing::info!(%local_addr, fingerprint = %tls.fingerprint(), "gateway listening");
        Ok(Self {
            endpoint,
            local_addr,
            fingerprint: tls.fingerprint(),
            shutdown,
            tracker,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// SHA-256 of the server certificate, for clients to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Stops accepting, closes every connection with `shutting_down` and waits
    /// for connection tasks (at most `deadline`). Running turns are not
    /// cancelled here; see [`Gateway::shutdown`].
    pub async fn shutdown(&self, deadline: Duration) {
        self.shutdown.cancel();
        self.endpoint.close(
            quinn::VarInt::from_u32(CLOSE_ERROR),
            ErrorCode::ShuttingDown.as_str().as_bytes(),
        );
        self.tracker.close();
        let _ = tokio::time::timeout(deadline, async {
            self.tracker.wait().await;
            self.endpoint.wait_idle().await;
        })
        .await;
    }
}

fn varint(n: usize) -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::try_from(n).unwrap_or(u32::MAX))
}

#[derive(Debug)]
struct Shared {
    gateway: Gateway,
    token: TokenCheck,
    max_frame: usize,
    max_streams: usize,
    messages_per_minute: u32,
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "connection limit reached");
            incoming.refuse();
            continue;
        };
        let remote = incoming.remote_address();
        let shared = shared.clone();
        let shutdown = shutdown.child_token();
        tracker.spawn(
            async move {
                let _permit = permit;
                match incoming.await {
                    Ok(conn) => serve_connection(conn, shared, shutdown).await,
                    Err(e) => tracing::info!(error = %e, "handshake failed"),
                }
            }
            .instrument(tracing::info_span!("conn", %remote)),
        );
    }
}

/// Closes `conn` after giving `send` (holding an error frame) time to deliver.
async fn refuse(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    code: ErrorCode,
    message: String,
) {
    tracing::info!(code = code.as_str(), %message, "refusing connection");
    let frame = ServerFrame::Error { code, message };
    if let Ok(bytes) = frame::encode(&frame, frame::DEFAULT_MAX_FRAME)
        && send.write_all(&bytes).await.is_ok()
        && send.finish().is_ok()
    {
        let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    }
    conn.close(
        quinn::VarInt::from_u32(CLOSE_ERROR),
        code.as_str().as_bytes(),
    );
}

async fn serve_connection(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    // The handshake: the first bidirectional stream carries `hello`.
    let first = tokio::select! {
        () = shutdown.cancelled() => None,
        r = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()) => match r {
            Ok(Ok(streams)) => Some(streams),
            Ok(Err(_)) | Err(_) => None,
        },
    };
    let Some((send, mut recv)) = first else {
        conn.close(
            quinn::VarInt::from_u32(CLOSE_ERROR),
            ErrorCode::BadRequest.as_str().as_bytes(),
        );
        return;
    };
    let hello =
        tokio::time::timeout(HELLO_TIMEOUT, read_request(&mut recv, shared.max_frame)).await;
    let hello = match hello {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => {
            shared.gateway.metrics().frame_error(e.code);
            return refuse(&conn, send, e.code, e.message).await;
        }
        Err(_) => {
            return refuse(
                &conn,
                send,
                ErrorCode::BadRequest,
                "no hello in time".into(),
            )
            .await;
        }
    };
    let (version, token, client_name) = match hello {
        ClientFrame::Hello {
            protocol_version,
            token,
            client_name,
        } => (protocol_version, token, client_name),
        ClientFrame::SendMessage { .. }
        | ClientFrame::ListSessions { .. }
        | ClientFrame::GetHistory { .. }
        | ClientFrame::Cancel { .. }
        | ClientFrame::Approve { .. }
        | ClientFrame::ControlSession { .. }
        | ClientFrame::Status {} => {
            let msg = "the first frame must be hello".to_owned();
            return refuse(&conn, send, ErrorCode::BadRequest, msg).await;
        }
    };
    if version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
        );
        return refuse(&conn, send, ErrorCode::UnsupportedVersion, msg).await;
    }
    if !shared.token.allows(token.as_deref()) {
        let msg = if token.is_some() {
            "wrong token"
        } else {
            "a token is required"
        };
        return refuse(&conn, send, ErrorCode::Unauthorized, msg.into()).await;
    }
    let welcome = ServerFrame::Welcome {
        server_version: SERVER_VERSION.into(),
        protocol_version: PROTOCOL_VERSION,
        max_frame_size: shared.max_frame as u64,
    };
    let mut send = send;
    if write_frame(&mut send, &welcome, shared.max_frame)
        .await
        .is_err()
    {
        return;
    }
    let _ = send.finish();
    let client_name: String = client_name.chars().take(64).collect();
    tracing::info!(client = %client_name, "client authenticated");
    let _counted = shared.gateway.connection_opened();
    shared.gateway.metrics().quic_connection_accepted();

    // The approval "user" of this connection's turns: only the connection
    // that started a turn can answer its approval requests (every client
    // holds the same token, so the token cannot tell them apart).
    let peer: Arc<str> = format!("connection-{}", conn.stable_id()).into();
    let streams = Arc::new(Semaphore::new(shared.max_streams));
    let rate = Arc::new(Mutex::new(RateLimit::new(shared.messages_per_minute)));
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => {
                conn.close(quinn::VarInt::from_u32(CLOSE_ERROR), ErrorCode::ShuttingDown.as_str().as_bytes());
                break;
            }
            accepted = conn.accept_bi() => accepted,
        };
        let (mut send, recv) = match accepted {
            Ok(streams) => streams,
            Err(e) => {
                tracing::info!(reason = %e, "connection ended");
                break;
            }
        };
        let Ok(permit) = streams.clone().try_acquire_owned() else {
            tasks.spawn(async move {
                let frame = ServerFrame::Error {
                    code: ErrorCode::LimitExceeded,
                    message: "too many requests in flight on this connection".into(),
                };
                let _ = write_frame(&mut send, &frame, frame::DEFAULT_MAX_FRAME).await;
                let _ = send.finish();
                let mut recv = recv;
                let _ = recv.stop(quinn::VarInt::from_u32(CLOSE_ERROR));
            });
            continue;
        };
        let shared = shared.clone();
        let rate = rate.clone();
        let peer = peer.clone();
        tasks.spawn(async move {
            let _permit = permit;
            serve_stream(send, recv, &shared, &rate, &peer).await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
    rate: &Mutex<RateLimit>,
    peer: &str,
) {
    let request = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        read_request(&mut recv, shared.max_frame),
    )
    .await
    {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => {
            shared.gateway.metrics().frame_error(e.code);
            let _ = recv.stop(quinn::VarInt::from_u32(CLOSE_ERROR));
            return reply_error(&mut send, e.code, e.message).await;
        }
        Err(_) => {
            let _ = recv.stop(quinn::VarInt::from_u32(CLOSE_ERROR));
            return reply_error(
                &mut send,
                ErrorCode::BadRequest,
                "no request in time".into(),
            )
            .await;
        }
    };
    let gateway = &shared.gateway;
    let max = shared.max_frame;
    let reply = match request {
        ClientFrame::Hello { .. } => {
            Err((ErrorCode::BadRequest, "already authenticated".to_owned()))
        }
        ClientFrame::SendMessage {
            session_id,
            text,
            idempotency_key,
        } => {
            let allowed = rate.lock().unwrap_or_else(|p| p.into_inner()).try_take();
            if !allowed {
                return reply_error(
                    &mut send,
                    ErrorCode::RateLimited,
                    "too many messages; slow down".into(),
                )
                .await;
            }
            let req = SendRequest {
                session_id,
                text,
                idempotency_key: Some(idempotency_key),
                channel: "quic".into(),
                create_missing: false,
            };
            match gateway.send_from(req, Some(peer.to_owned())).await {
                Ok(mut events) => {
                    while let Some(ev) = events.recv().await {
                        let frame = match ev {
                            AgentEvent::ApprovalRequired { id, tool, args } => {
                                ServerFrame::ApprovalRequired { id, tool, args }
                            }
                            ev => ServerFrame::Event(ev),
                        };
                        match frame::encode(&frame, max) {
                            Ok(bytes) => {
                                if send.write_all(&bytes).await.is_err() {
                                    // The client went away; the turn still runs and is stored.
                                    return;
                                }
                            }
                            Err(e) => {
                                return reply_error(
                                    &mut send,
                                    ErrorCode::LimitExceeded,
                                    e.to_string(),
                                )
                                .await;
                            }
                        }
                    }
                    let _ = send.finish();
                    return;
                }
                Err(e) => Err((e.code(), e.to_string())),
            }
        }
        ClientFrame::ListSessions { limit } => gateway
            .list_sessions(limit)
            .await
            .map(|sessions| ServerFrame::Sessions { sessions })
            .map_err(|e| (e.code(), e.to_string())),
        ClientFrame::GetHistory { session_id, limit } => gateway
            .history(&session_id, limit)
            .await
            .map(|messages| ServerFrame::History {
                session_id,
                messages,
            })
            .map_err(|e| (e.code(), e.to_string())),
        ClientFrame::Cancel { session_id } => Ok(ServerFrame::Cancelled {
            was_running: gateway.cancel(&session_id),
        }),
        ClientFrame::Approve { id, decision } => gateway
            .approve(
                &id,
                decision,
                &Origin {
                    channel: "quic".into(),
                    user: Some(peer.to_owned()),
                },
                None,
            )
            .await
            .map(|()| ServerFrame::Approved { id })
            .map_err(|e| (e.code(), e.to_string())),
        ClientFrame::ControlSession { session_id, action } => gateway
            .control_session(&session_id, action)
            .await
            .map(|(state, was_running)| ServerFrame::SessionControlled {
                session_id,
                state,
                was_running,
            })
            .map_err(|e| (e.code(), e.to_string())),
        ClientFrame::Status {} => {
            let s = gateway.status();
            Ok(ServerFrame::StatusReport {
                server_version: SERVER_VERSION.into(),
                uptime_secs: s.uptime_secs,
                live_sessions: s.live_sessions,
                running_turns: s.running_turns,
                connections: s.connections,
            })
        }
    };
    match reply {
        Ok(frame) => match write_frame(&mut send, &frame, max).await {
            Ok(()) => {
                let _ = send.finish();
            }
            Err(WriteFailure::Encode(e)) => {
                reply_error(&mut send, ErrorCode::LimitExceeded, e.to_string()).await;
            }
            Err(WriteFailure::Stream) => {}
        },
        Err((code, message)) => reply_error(&mut send, code, message).await,
    }
}

/// Why a request could not be read: a code and a message for the error frame.
#[derive(Debug)]
struct BadRequest {
    code: ErrorCode,
    message: String,
}

impl From<FrameError> for BadRequest {
    fn from(e: FrameError) -> Self {
        Self {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

/// Reads exactly one request frame from a stream. Bytes that are not a
/// frame are `invalid_frame` (or `frame_too_large`); a well-formed frame that
/// is not a known request (unknown type, unknown or missing field, invalid
/// id) is `bad_request`.
async fn read_request(
    recv: &mut quinn::RecvStream,
    max_frame: usize,
) -> Result<ClientFrame, BadRequest> {
    let mut decoder = FrameDecoder::new(max_frame);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(value) = decoder.next::<serde_json::Value>()? {
            return serde_json::from_value::<ClientFrame>(value).map_err(|e| BadRequest {
                code: ErrorCode::BadRequest,
                message: format!("bad request: {e}"),
            });
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(buf.get(..n).unwrap_or_default()),
            Ok(None) => {
                decoder.finish()?;
                return Err(BadRequest {
                    code: ErrorCode::InvalidFrame,
                    message: "the stream ended before a request".into(),
                });
            }
            Err(e) => {
                return Err(BadRequest {
                    code: ErrorCode::InvalidFrame,
                    message: format!("the request stream failed: {e}"),
                });
            }
        }
    }
}

enum WriteFailure {
    Encode(FrameError),
    Stream,
}

async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &ServerFrame,
    max: usize,
) -> Result<(), WriteFailure> {
    let bytes = frame::encode(frame, max).map_err(WriteFailure::Encode)?;
    send.write_all(&bytes)
        .await
        .map_err(|_| WriteFailure::Stream)
}

async fn reply_error(send: &mut quinn::SendStream, code: ErrorCode, message: String) {
    let frame = ServerFrame::Error { code, message };
    let _ = write_frame(send, &frame, frame::DEFAULT_MAX_FRAME).await;
    let _ = send.finish();
}

/// A token bucket: `per_minute` tokens, refilled continuously.
#[derive(Debug)]
struct RateLimit {
    capacity: f64,
    tokens: f64,
    per_sec: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_minute: u32) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Self {
            capacity,
            tokens: capacity,
            per_sec: capacity / 60.0,
            last: Instant::now(),
        }
    }

    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_empties() {
        let mut bucket = RateLimit::new(3);
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        // Refilling one token takes 20 s; this test runs far faster.
        assert!(!bucket.try_take());
    }
}
