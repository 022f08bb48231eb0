//! A deterministic provider that plays back replies from a script.
//!
//! Selected with `provider = "scripted"` and `[llm.scripted] file = "..."`, it
//! lets tests, benchmarks and black-box checks drive the real binary without a
//! model. Each call to the provider consumes the next `[[reply]]`:
//!
//! ```toml
//! [[reply]]
//! text = "Let me look."                 # streamed in small deltas
//! tool_calls = [
//!   { name = "system.run", arguments = { command = "ls" } },
//!   { name = "file.read", arguments_raw = "{not json" },   # malformed on purpose
//! ]
//!
//! [[reply]]
//! echo = true                           # repeats the last user message
//! delay_ms = 50                         # wait before each delta (cancel tests)
//!
//! [[reply]]
//! error = "simulated outage"            # the call fails
//! ```
//!
//! When the script runs out, `on_exhausted` decides: `"error"` (default),
//! `"repeat_last"` or `"echo"`.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use openpista_proto::{Role, Usage};
use serde::Deserialize;

use crate::{ChatRequest, FinishReason, LlmError, LlmEvent, LlmProvider, LlmStream};

/// A parsed script.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    #[serde(default, rename = "reply")]
    pub replies: Vec<ScriptedReply>,
    #[serde(default)]
    pub on_exhausted: Exhausted,
    /// Characters per text delta (default 8).
    #[serde(default)]
    pub chunk_chars: Option<usize>,
}

/// What happens after the last reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exhausted {
    #[default]
    Error,
    RepeatLast,
    Echo,
}

/// One scripted model reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedReply {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
    /// Reply with the last user message's text (after `text`).
    #[serde(default)]
    pub echo: bool,
    /// Pause before each streamed piece.
    #[serde(default)]
    pub delay_ms: u64,
    /// Fail this call with this message.
    #[serde(default)]
    pub error: Option<String>,
    /// Characters per text delta for this reply (overrides the script's).
    #[serde(default)]
    pub chunk_chars: Option<usize>,
}

/// One scripted tool call.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedCall {
    pub name: String,
    /// Arguments as a TOML/JSON value (serialized to JSON text).
    #[serde(default)]
    pub arguments: Option<serde_json::Value>,
    /// Arguments as raw text, sent verbatim (may be invalid JSON).
    #[serde(default)]
    pub arguments_raw: Option<String>,
}

impl Script {
    /// Parses a TOML script. Errors name the line and key.
    pub fn from_toml(text: &str) -> Result<Self, LlmError> {
        toml::from_str(text).map_err(|e| LlmError::Config(format!("scripted replies: {e}")))
    }

    /// Reads and parses a script file.
    pub fn from_file(path: &Path) -> Result<Self, LlmError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            LlmError::Config(format!("reading scripted replies {}: {e}", path.display()))
        })?;
        toml::from_str(&text)
            .map_err(|e| LlmError::Config(format!("scripted replies {}: {e}", path.display())))
    }
}

/// Plays a [`Script`] back, one reply per call.
#[derive(Debug)]
pub struct ScriptedProvider {
    script: Script,
    next: Mutex<usize>,
    calls: Mutex<Vec<ChatRequest>>,
}

impl ScriptedProvider {
    pub fn new(script: Script) -> Self {
        Self {
            script,
            next: Mutex::new(0),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Every request received so far (for assertions).
    pub fn requests(&self) -> Vec<ChatRequest> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn take_reply(&self) -> Result<ScriptedReply, LlmError> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let idx = *next;
        *next += 1;
        if let Some(r) = self.script.replies.get(idx) {
            return Ok(r.clone());
        }
        match self.script.on_exhausted {
            Exhausted::Error => Err(LlmError::Script(format!(
                "no reply left (the script has {} replies)",
                self.script.replies.len()
            ))),
            Exhausted::RepeatLast => self
                .script
                .replies
                .last()
                .cloned()
                .ok_or_else(|| LlmError::Script("the script is empty".into())),
            Exhausted::Echo => Ok(ScriptedReply {
                echo: true,
                ..ScriptedReply::default()
            }),
        }
    }
}

#[async_trait]
impl LlmProvider for ScriptedProvider {
    async fn stream(&self, request: ChatRequest) -> Result<LlmStream, LlmError> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(request.clone());
        }
        let reply = self.take_reply()?;
        if let Some(message) = reply.error {
            return Err(LlmError::Unavailable {
                attempts: 1,
                message,
            });
        }
        let mut text = reply.text.clone();
        if reply.echo {
            let last_user = request
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.as_str())
                .unwrap_or_default();
            text.push_str(last_user);
        }
        let chunk = reply
            .chunk_chars
            .or(self.script.chunk_chars)
            .unwrap_or(8)
            .max(1);
        let mut events: Vec<LlmEvent> = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(chunk) {
            events.push(LlmEvent::TextDelta(piece.iter().collect()));
        }
        for (index, call) in reply.tool_calls.iter().enumerate() {
            let arguments = match (&call.arguments_raw, &call.arguments) {
                (Some(raw), _) => raw.clone(),
                (None, Some(v)) => v.to_string(),
                (None, None) => "{}".to_owned(),
            };
            events.push(LlmEvent::ToolCallDelta {
                index,
                id: Some(format!("call_{index}")),
                name: Some(call.name.clone()),
                arguments,
            });
        }
        let prompt_chars: usize = request.messages.iter().map(|m| m.content.len()).sum();
        events.push(LlmEvent::Done {
            usage: Usage {
                prompt_tokens: prompt_chars.div_ceil(4) as u64,
                completion_tokens: text.len().div_ceil(4) as u64,
            },
            finish: if reply.tool_calls.is_empty() {
                FinishReason::Stop
            } else {
                FinishReason::ToolCalls
            },
        });
        let delay = Duration::from_millis(reply.delay_ms);
        let stream = futures::stream::iter(events).then(move |ev| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(ev)
        });
        Ok(Box::pin(stream))
    }

    fn name(&self) -> String {
        "scripted".to_owned()
    }
}

use futures::StreamExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use openpista_proto::ChatMessage;

    #[tokio::test]
    async fn plays_replies_in_order_then_errors() {
        let script = Script::from_toml(
            r#"
            [[reply]]
            text = "hello world, this is long"
            tool_calls = [{ name = "t", arguments = { a = 1 } }, { name = "u", arguments_raw = "{bad" }]
            [[reply]]
            echo = true
            "#,
        )
        .unwrap();
        let p = ScriptedProvider::new(script);
        let req = ChatRequest {
            messages: vec![ChatMessage::user("ping")],
            ..ChatRequest::default()
        };
        let c = p.complete(req.clone()).await.unwrap();
        assert_eq!(c.text, "hello world, this is long");
        assert_eq!(c.tool_calls[0].arguments, "{\"a\":1}");
        assert_eq!(c.tool_calls[1].arguments, "{bad");
        assert_eq!(p.complete(req.clone()).await.unwrap().text, "ping");
        assert!(matches!(p.complete(req).await, Err(LlmError::Script(_))));
    }

    #[test]
    fn bad_script_names_the_key() {
        let err = Script::from_toml("[[reply]]\ntxt = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("txt"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }
}
