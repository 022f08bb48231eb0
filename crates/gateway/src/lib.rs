//! The gateway: the QUIC server (quinn + rustls), the channel router, the
//! cron scheduler and the `openpista start` daemon.
//!
//! Status: arrives with the gateway milestone (see ROADMAP.md); nothing here
//! is usable yet.
