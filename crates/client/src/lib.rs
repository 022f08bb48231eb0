//! The QUIC client SDK for talking to a running openpista daemon. Depends on
//! `openpista-proto` only.
//!
//! Status: arrives with the gateway milestone (see ROADMAP.md); nothing here
//! is usable yet.
