//! The gateway: everything between a front end and the agent's sessions.
//!
//! - [`Gateway`]: the in-process gateway (send, list sessions, history,
//!   cancel, approve, status), used directly by the CLI and tests and by
//! - [`QuicServer`]: the QUIC server (quinn + rustls, ALPN `openpista/1`)
//!   speaking `docs/PROTOCOL.md`: token auth, frame and stream limits, a
//!   per-connection message rate, no 0-RTT.
//! - [`ChannelRouter`]: live sessions by channel id, one turn at a time with
//!   a bounded queue.
//! - [`TlsIdentity`]: the generated-once (or operator-supplied) certificate
//!   and its fingerprint; [`load_or_create_token`] for the shared secret.
//!
//! Not here: the daemon command, PID files, signals and metrics (the CLI's),
//! and the client side (`openpista-client`).

mod auth;
mod config;
mod error;
mod inproc;
mod quic;
mod router;
mod tls;

pub use auth::load_or_create_token;
pub use config::GatewayConfig;
pub use error::GatewayError;
pub use inproc::{
    DEFAULT_HISTORY_LIMIT, DEFAULT_SESSIONS_LIMIT, Gateway, GatewayStatus, MAX_IDEMPOTENCY_KEY_LEN,
    MAX_LIST_LIMIT, SendRequest, TurnEvents,
};
pub use quic::{CLOSE_ERROR, CLOSE_OK, QuicServer};
pub use router::{ChannelRouter, QueueSlot, Route};
pub use tls::{CERT_FILE, KEY_FILE, TlsIdentity};
