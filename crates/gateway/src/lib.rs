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
//! - [`GatewayBridge`]: feeds channel adapters (`openpista-channels`) into the
//!   gateway, one stable session per conversation.
//! - [`run_daemon`]: the daemon loop: PID file, [`DaemonState`] file, the
//!   cron scheduler and the Telegram adapter when enabled, and a
//!   graceful stop (drain turns with a deadline, close connections) when its
//!   cancellation token fires.
//!
//! Not here: signals and the command line (the CLI's), and the client side
//! (`openpista-client`).

mod auth;
mod channels;
mod config;
mod cron;
mod daemon;
mod error;
mod inproc;
mod metrics;
mod quic;
mod router;
mod tls;

pub use auth::load_or_create_token;
pub use channels::{ALWAYS_REPLY, APPROVED_REPLY, CANCELLED_REPLY, DENIED_REPLY, GatewayBridge};
pub use config::GatewayConfig;
pub use cron::{
    CRON_CHANNEL, CronError, CronScheduler, Outbox, RELOAD_INTERVAL, RunReport, Schedule, Target,
    run_occurrence, run_occurrence_to, validate as validate_cron,
};
pub use daemon::{DaemonExit, DaemonOptions, DaemonState, run_daemon, running_pid};
pub use error::GatewayError;
pub use inproc::{
    DEFAULT_HISTORY_LIMIT, DEFAULT_SESSIONS_LIMIT, Gateway, GatewayStatus, MAX_IDEMPOTENCY_KEY_LEN,
    MAX_LIST_LIMIT, SendRequest, TurnEvents,
};
pub use metrics::{MAX_REQUEST_HEAD, Metrics, MetricsConfig, MetricsServer};
pub use quic::{CLOSE_ERROR, CLOSE_OK, QuicServer};
pub use router::{ChannelRouter, QueueSlot, Route};
pub use tls::{CERT_FILE, KEY_FILE, TlsIdentity};
