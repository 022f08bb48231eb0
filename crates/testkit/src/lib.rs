//! Test fakes shared by the workspace's tests.
//!
//! Each fake is a real network peer on loopback that speaks the wire format of
//! the service it stands in for, so tests exercise the production clients
//! (HTTP stacks, parsers, retries) end to end without leaving the machine:
//!
//! - [`FakeOpenAi`]: an OpenAI chat-completions server serving scripted
//!   [`Reply`]s, plain JSON or SSE, and recording every request.
//! - [`FakeTelegram`]: a Telegram Bot API (getMe, getUpdates, sendMessage, ...)
//!   handing out scripted updates once and recording every request.
//!
//! This crate is for tests only (`publish = false`); nothing in it is tuned for
//! speed or hardened against hostile peers.

pub mod openai;
pub mod telegram;

pub use openai::{FakeOpenAi, RecordedRequest, Reply};
pub use telegram::{FakeTelegram, TgRequest};
