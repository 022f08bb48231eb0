//! `[gateway]` settings.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::GatewayError;

/// `[gateway]` settings. Every limit must be at least 1.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the QUIC server listens on. A non-loopback address requires a token.
    pub bind: String,
    /// Largest frame body accepted or sent, in bytes.
    pub max_frame_size: usize,
    /// Most simultaneous connections; more are refused.
    pub max_connections: usize,
    /// Most requests in flight on one connection; more are answered `limit_exceeded`.
    pub max_streams_per_connection: usize,
    /// A connection silent for this long is closed.
    pub idle_timeout_secs: u64,
    /// `send_message` requests allowed per connection per minute (token bucket).
    pub messages_per_minute: u32,
    /// Turns that may wait behind a session's running turn; more are refused.
    pub max_queued_turns: usize,
    /// Operator-supplied certificate chain (PEM); replaces the generated one.
    pub cert_path: Option<PathBuf>,
    /// Operator-supplied private key (PEM); required with `cert_path`.
    pub key_path: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C, how long the daemon lets running turns finish
    /// before cancelling them (their messages so far are stored either way).
    pub drain_timeout_secs: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:4433".into(),
            max_frame_size: openpista_proto::frame::DEFAULT_MAX_FRAME,
            max_connections: 64,
            max_streams_per_connection: 16,
            idle_timeout_secs: 60,
            messages_per_minute: 120,
            max_queued_turns: 8,
            cert_path: None,
            key_path: None,
            drain_timeout_secs: 10,
        }
    }
}

impl GatewayConfig {
    /// Checks the limits and parses `bind`.
    pub fn validate(&self) -> Result<SocketAddr, GatewayError> {
        let bad = |what: &str| {
            Err(GatewayError::Config(format!(
                "gateway.{what} must be at least 1"
            )))
        };
        if self.max_frame_size < 64 {
            return Err(GatewayError::Config(
                "gateway.max_frame_size must be at least 64".into(),
            ));
        }
        if u32::try_from(self.max_frame_size).is_err() {
            return Err(GatewayError::Config(
                "gateway.max_frame_size must fit in 32 bits".into(),
            ));
        }
        if self.max_connections == 0 {
            return bad("max_connections");
        }
        if self.max_streams_per_connection == 0 {
            return bad("max_streams_per_connection");
        }
        if self.idle_timeout_secs == 0 {
            return bad("idle_timeout_secs");
        }
        if self.messages_per_minute == 0 {
            return bad("messages_per_minute");
        }
        if self.max_queued_turns == 0 {
            return bad("max_queued_turns");
        }
        if self.cert_path.is_some() != self.key_path.is_some() {
            return Err(GatewayError::Config(
                "gateway.cert_path and gateway.key_path go together".into(),
            ));
        }
        self.bind.parse().map_err(|e| {
            GatewayError::Config(format!(
                "gateway.bind {:?} is not an address: {e}",
                self.bind
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_bounded() {
        let cfg = GatewayConfig::default();
        let addr = cfg.validate().unwrap();
        assert!(addr.ip().is_loopback());
        assert_eq!(addr.port(), 4433);
        assert_eq!(cfg.max_frame_size, 1024 * 1024);
    }

    #[test]
    fn unknown_keys_and_zero_limits_are_refused() {
        let r: Result<GatewayConfig, _> = serde_json::from_str(r#"{"bnd": "x"}"#);
        assert!(r.is_err());
        let cfg = GatewayConfig {
            max_streams_per_connection: 0,
            ..GatewayConfig::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = GatewayConfig {
            bind: "localhost".into(),
            ..GatewayConfig::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = GatewayConfig {
            cert_path: Some("c.pem".into()),
            ..GatewayConfig::default()
        };
        assert!(cfg.validate().is_err());
    }
}
