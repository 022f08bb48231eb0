//! The gateway's one error type.

use std::path::PathBuf;

use openpista_agent::AgentError;
use openpista_memory::MemoryError;
use openpista_proto::ErrorCode;

/// Why a gateway operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A `[gateway]` setting is invalid. Fix the configuration; retrying will not help.
    #[error("config: {0}")]
    Config(String),
    /// The bind address is not loopback and no token is configured. Set a token.
    #[error("refusing to listen on {0} without a token: set one, or bind to a loopback address")]
    TokenRequired(std::net::SocketAddr),
    /// The UDP socket could not be bound (address in use, permission). Retrying may help.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// Reading or writing the certificate, key or token failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate or key is unusable (bad PEM, mismatched key, rustls refused it).
    #[error("tls: {0}")]
    Tls(String),
    /// A secret file is readable by others; fix its mode to 0600.
    #[error("{} is readable by other users (mode {mode:o}); chmod 600 it", path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    /// A turn could not start or a session could not be opened.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The store failed. Retrying may help if the database was busy.
    #[error("storage: {0}")]
    Storage(#[from] MemoryError),
    /// No such session or approval.
    #[error("not found: {0}")]
    NotFound(String),
    /// A queue or limit is full. Retry later.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// Another daemon holds the PID file. Stop it first; retrying will not help.
    #[error("openpista is already running (pid {pid}, {})", path.display())]
    AlreadyRunning { pid: u32, path: PathBuf },
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl GatewayError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            GatewayError::Agent(e) => e.code(),
            GatewayError::Storage(_) => ErrorCode::StorageError,
            GatewayError::NotFound(_) => ErrorCode::NotFound,
            GatewayError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            GatewayError::ShuttingDown => ErrorCode::ShuttingDown,
            GatewayError::Config(_)
            | GatewayError::TokenRequired(_)
            | GatewayError::Bind { .. }
            | GatewayError::Io { .. }
            | GatewayError::AlreadyRunning { .. }
            | GatewayError::Tls(_)
            | GatewayError::InsecurePermissions { .. } => ErrorCode::Internal,
        }
    }
}
