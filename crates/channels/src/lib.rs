//! Channel adapters: where messages come from and replies go back to
//! (Telegram, the CLI). Channels never depend on the agent or the gateway.
//!
//! Status: the `ChannelAdapter` trait and the Telegram adapter arrive with the
//! channels milestone (see ROADMAP.md). Until then the CLI talks to
//! `openpista-agent` directly.
