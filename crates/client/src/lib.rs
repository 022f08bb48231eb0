//! The QUIC client SDK for a running openpista gateway (see
//! `docs/PROTOCOL.md`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), openpista_client::ClientError> {
//! use futures::StreamExt;
//! use openpista_client::{Client, Event, Trust};
//!
//! let client = Client::connect(
//!     "127.0.0.1:4433".parse().expect("an address"),
//!     Some("my-token".into()),
//!     Trust::Fingerprint("ab:cd:…".into()),
//! )
//! .await?;
//! let mut events = client.send(None, "What is the capital of France?").await?;
//! while let Some(event) = events.next().await {
//!     println!("{:?}", event?);
//! }
//! # Ok(()) }
//! ```
//!
//! It depends on `openpista-proto` only (plus quinn, rustls and tokio); it
//! knows nothing of agents or the server's internals. Each request opens its
//! own bidirectional stream, so requests on one [`Client`] run in parallel.

mod tls;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use openpista_proto::frame::{self, FrameDecoder, FrameError};
use openpista_proto::wire::{
    ClientFrame, Decision, ServerFrame, SessionAction, SessionInfo, SessionState,
};
use openpista_proto::{AgentEvent, ChatMessage, ErrorCode, PROTOCOL_VERSION, SessionId};

pub use tls::{Trust, parse_fingerprint};

/// Application close code for a normal close (`0`).
pub const CLOSE_OK: u32 = 0;
/// Application close code for a protocol error; the reason is the
/// [`ErrorCode`] in snake_case (e.g. `unauthorized`).
pub const CLOSE_ERROR: u32 = 1;

/// Everything that can go wrong talking to a gateway.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The trust setting is unusable (bad fingerprint text, unreadable CA file). Fix the input.
    #[error("trust: {0}")]
    Trust(String),
    /// rustls refused the configuration or a certificate. Not retryable as is.
    #[error("tls: {0}")]
    Tls(rustls::Error),
    /// The local UDP endpoint could not be created. Retrying may help.
    #[error("endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    /// The connection attempt could not start (bad address or config).
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (including TLS failures such as a
    /// fingerprint mismatch). Reconnecting may help if the server restarted.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The server refused the request or the handshake with this code.
    #[error("{code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The server sent bytes that are not a valid frame.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    /// A stream failed while writing.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// A stream failed while reading.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream ended before its terminal frame.
    #[error("the server closed the stream early")]
    Closed,
    /// The server answered with a frame that does not fit the request.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The protocol error code behind this error, if the server named one
    /// (in an error frame or as the reason of a connection close).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            ClientError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
                code_from_reason(&close.reason)
            }
            ClientError::Frame(e) => Some(e.code()),
            _ => None,
        }
    }
}

fn code_from_reason(reason: &[u8]) -> Option<ErrorCode> {
    let text = std::str::from_utf8(reason).ok()?;
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

/// An event of a running turn, as streamed by [`Client::send`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `accepted`, `text_delta`, `tool_started`, `tool_finished`, `final` or `error`.
    Agent(AgentEvent),
    /// A tool call waits for [`Client::approve`].
    ApprovalRequired {
        id: String,
        tool: String,
        args: String,
    },
}

/// The server's `status_report`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub server_version: String,
    pub uptime_secs: u64,
    pub live_sessions: u64,
    pub running_turns: u64,
    pub connections: u64,
}

/// Connection settings beyond address, token and trust.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent in `hello`.
    pub client_name: String,
    /// The TLS server name (must be in the certificate when trusting a CA).
    pub server_name: String,
    /// How long to wait for the QUIC + openpista handshake.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_name: "openpista-client".into(),
            server_name: "localhost".into(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection to a gateway, authenticated by the `hello` handshake.
/// Cheap to clone; dropping the last clone does not close it, [`Client::close`] does.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    max_frame: usize,
    server_version: String,
}

impl Client {
    /// Connects to `addr`, checks the server against `trust` and authenticates with `token`.
    pub async fn connect(
        addr: SocketAddr,
        token: Option<String>,
        trust: Trust,
    ) -> Result<Self, ClientError> {
        Self::connect_with(addr, token, trust, ClientOptions::default()).await
    }

    /// [`Client::connect`] with explicit options.
    pub async fn connect_with(
        addr: SocketAddr,
        token: Option<String>,
        trust: Trust,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let tls = trust.rustls_config()?;
        Self::connect_with_tls(addr, token, tls, options).await
    }

    /// [`Client::connect_with`] with a prepared rustls configuration (e.g.
    /// from [`Trust::rustls_config`], adjusted). The configuration is used as given.
    pub async fn connect_with_tls(
        addr: SocketAddr,
        token: Option<String>,
        tls: rustls::ClientConfig,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Trust(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(15)));
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(config);
        let handshake = async {
            let connection = endpoint.connect(addr, &options.server_name)?.await?;
            let hello = ClientFrame::Hello {
                protocol_version: PROTOCOL_VERSION,
                token,
                client_name: options.client_name.clone(),
            };
            let reply = request_one(&connection, &hello, frame::DEFAULT_MAX_FRAME).await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) => return Err(prefer_close_reason(&connection, e).await),
            };
            match reply {
                ServerFrame::Welcome {
                    server_version,
                    max_frame_size,
                    ..
                } => Ok((connection, server_version, max_frame_size)),
                ServerFrame::Error { code, message } => Err(ClientError::Server { code, message }),
                other => Err(ClientError::Unexpected(frame_type(&other))),
            }
        };
        let (connection, server_version, max_frame_size) =
            match tokio::time::timeout(options.connect_timeout, handshake).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(ClientError::Connection(quinn::ConnectionError::TimedOut));
                }
            };
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                connection,
                max_frame: usize::try_from(max_frame_size).unwrap_or(frame::DEFAULT_MAX_FRAME),
                server_version,
            }),
        })
    }

    /// The server's version from `welcome`.
    pub fn server_version(&self) -> &str {
        &self.inner.server_version
    }

    /// The underlying QUIC connection (for diagnostics and custom streams).
    pub fn connection(&self) -> &quinn::Connection {
        &self.inner.connection
    }

    /// Sends `text` to a session (a new one when `session_id` is `None`) and
    /// streams the turn's events. A fresh idempotency key is generated; use
    /// [`Client::send_with_key`] to retry safely.
    pub async fn send(
        &self,
        session_id: Option<&SessionId>,
        text: &str,
    ) -> Result<EventStream, ClientError> {
        let key = SessionId::generate().to_string();
        self.send_with_key(session_id, text, &key).await
    }

    /// Like [`Client::send`] with an explicit idempotency key: a retried send
    /// with the same key runs once (the retry replays the turn's events).
    pub async fn send_with_key(
        &self,
        session_id: Option<&SessionId>,
        text: &str,
        idempotency_key: &str,
    ) -> Result<EventStream, ClientError> {
        let request = ClientFrame::SendMessage {
            session_id: session_id.cloned(),
            text: text.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
        };
        let (mut send, recv) = self.inner.connection.open_bi().await?;
        let bytes = frame::encode(&request, self.inner.max_frame)?;
        send.write_all(&bytes).await?;
        let _ = send.finish();
        Ok(EventStream::new(recv, self.inner.max_frame))
    }

    /// The newest sessions first (at most `limit`).
    pub async fn sessions(&self, limit: Option<u32>) -> Result<Vec<SessionInfo>, ClientError> {
        match self.request(&ClientFrame::ListSessions { limit }).await? {
            ServerFrame::Sessions { sessions } => Ok(sessions),
            other => Err(unexpected(other)),
        }
    }

    /// A session's newest messages (at most `limit`), oldest first.
    pub async fn history(
        &self,
        session_id: &SessionId,
        limit: Option<u32>,
    ) -> Result<Vec<ChatMessage>, ClientError> {
        let request = ClientFrame::GetHistory {
            session_id: session_id.clone(),
            limit,
        };
        match self.request(&request).await? {
            ServerFrame::History { messages, .. } => Ok(messages),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels the session's running turn; returns whether one was running.
    pub async fn cancel(&self, session_id: &SessionId) -> Result<bool, ClientError> {
        let request = ClientFrame::Cancel {
            session_id: session_id.clone(),
        };
        match self.request(&request).await? {
            ServerFrame::Cancelled { was_running } => Ok(was_running),
            other => Err(unexpected(other)),
        }
    }

    /// Answers an approval request.
    pub async fn approve(&self, id: &str, decision: Decision) -> Result<(), ClientError> {
        let request = ClientFrame::Approve {
            id: id.to_owned(),
            decision,
        };
        match self.request(&request).await? {
            ServerFrame::Approved { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels the session's running turn; the daemon kills its tool
    /// processes and containers. Returns whether a turn was running.
    pub async fn kill_session(&self, session_id: &SessionId) -> Result<bool, ClientError> {
        Ok(self
            .control_session(session_id, SessionAction::Kill)
            .await?
            .1)
    }

    /// Suspends the session (a running turn is cancelled; new turns are
    /// refused with `session_suspended` until resumed, across restarts).
    pub async fn suspend_session(&self, session_id: &SessionId) -> Result<bool, ClientError> {
        Ok(self
            .control_session(session_id, SessionAction::Suspend)
            .await?
            .1)
    }

    /// Lets a suspended session take turns again.
    pub async fn resume_session(
        &self,
        session_id: &SessionId,
    ) -> Result<SessionState, ClientError> {
        Ok(self
            .control_session(session_id, SessionAction::Resume)
            .await?
            .0)
    }

    /// Applies `action` to the session; returns its state afterwards and
    /// whether a turn was running.
    pub async fn control_session(
        &self,
        session_id: &SessionId,
        action: SessionAction,
    ) -> Result<(SessionState, bool), ClientError> {
        let request = ClientFrame::ControlSession {
            session_id: session_id.clone(),
            action,
        };
        match self.request(&request).await? {
            ServerFrame::SessionControlled {
                state, was_running, ..
            } => Ok((state, was_running)),
            other => Err(unexpected(other)),
        }
    }

    /// The server's status.
    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.request(&ClientFrame::Status {}).await? {
            ServerFrame::StatusReport {
                server_version,
                uptime_secs,
                live_sessions,
                running_turns,
                connections,
            } => Ok(Status {
                server_version,
                uptime_secs,
                live_sessions,
                running_turns,
                connections,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the connection and waits (briefly) for the server to learn of it.
    pub async fn close(&self) {
        self.inner
            .connection
            .close(quinn::VarInt::from_u32(CLOSE_OK), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
    }

    async fn request(&self, request: &ClientFrame) -> Result<ServerFrame, ClientError> {
        let reply = request_one(&self.inner.connection, request, self.inner.max_frame).await;
        match reply {
            Ok(ServerFrame::Error { code, message }) => Err(ClientError::Server { code, message }),
            Ok(frame) => Ok(frame),
            Err(e) => Err(prefer_close_reason(&self.inner.connection, e).await),
        }
    }
}

/// Sends one frame on a new stream and reads one reply frame.
async fn request_one(
    connection: &quinn::Connection,
    request: &ClientFrame,
    max_frame: usize,
) -> Result<ServerFrame, ClientError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&frame::encode(request, max_frame)?).await?;
    let _ = send.finish();
    let mut decoder = FrameDecoder::new(max_frame);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(frame) = decoder.next::<ServerFrame>()? {
            return Ok(frame);
        }
        match recv.read(&mut buf).await? {
            Some(n) => decoder.push(buf.get(..n).unwrap_or_default()),
            None => {
                decoder.finish()?;
                return Err(ClientError::Closed);
            }
        }
    }
}

/// If the connection was closed with a reason, that explains a stream error better.
async fn prefer_close_reason(connection: &quinn::Connection, err: ClientError) -> ClientError {
    let closed = tokio::time::timeout(Duration::from_millis(500), connection.closed()).await;
    match closed {
        Ok(reason @ quinn::ConnectionError::ApplicationClosed(_)) => {
            ClientError::Connection(reason)
        }
        _ => err,
    }
}

fn frame_type(frame: &ServerFrame) -> String {
    serde_json::to_value(frame)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn unexpected(frame: ServerFrame) -> ClientError {
    ClientError::Unexpected(frame_type(&frame))
}

type BoxedEvents = Pin<Box<dyn Stream<Item = Result<Event, ClientError>> + Send>>;

/// The events of one turn; ends after `final` or `error` (both yielded as
/// [`Event::Agent`]; a server error frame is yielded as `AgentEvent::Error`).
pub struct EventStream {
    inner: BoxedEvents,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

struct ReadState {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    done: bool,
}

impl EventStream {
    fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        let state = ReadState {
            recv,
            decoder: FrameDecoder::new(max_frame),
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let item = next_event(&mut st).await;
            match &item {
                Ok(Event::Agent(AgentEvent::Final { .. } | AgentEvent::Error { .. })) | Err(_) => {
                    st.done = true;
                }
                Ok(_) => {}
            }
            Some((item, st))
        });
        Self {
            inner: Box::pin(stream),
        }
    }

    /// Drains the stream and returns every event (the last is `final` or `error`).
    pub async fn collect_all(mut self) -> Result<Vec<Event>, ClientError> {
        use futures::StreamExt;
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            out.push(ev?);
        }
        Ok(out)
    }
}

async fn next_event(st: &mut ReadState) -> Result<Event, ClientError> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(frame) = st.decoder.next::<ServerFrame>()? {
            return match frame {
                ServerFrame::Event(ev) => Ok(Event::Agent(ev)),
                ServerFrame::ApprovalRequired { id, tool, args } => {
                    Ok(Event::ApprovalRequired { id, tool, args })
                }
                ServerFrame::Error { code, message } => {
                    Ok(Event::Agent(AgentEvent::Error { code, message }))
                }
                other => Err(unexpected(other)),
            };
        }
        match st.recv.read(&mut buf).await? {
            Some(n) => st.decoder.push(buf.get(..n).unwrap_or_default()),
            None => {
                st.decoder.finish()?;
                return Err(ClientError::Closed);
            }
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Event, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_map_to_codes() {
        assert_eq!(
            code_from_reason(b"unauthorized"),
            Some(ErrorCode::Unauthorized)
        );
        assert_eq!(
            code_from_reason(b"frame_too_large"),
            Some(ErrorCode::FrameTooLarge)
        );
        assert_eq!(code_from_reason(b"nope"), None);
        assert_eq!(code_from_reason(&[0xff]), None);
    }
}
