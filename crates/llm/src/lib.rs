//! Language-model providers behind one small trait.
//!
//! [`LlmProvider::stream`] is the one required method: it turns a
//! [`ChatRequest`] into a stream of [`LlmEvent`]s (text deltas, tool-call
//! deltas, then `Done`). [`LlmProvider::complete`] is built on it.
//!
//! Providers: [`local`] (llama.cpp through `llama-cpp-2`, with tool calls
//! constrained by a GBNF grammar built from the tools' JSON schemas),
//! [`openai`] (any OpenAI-compatible HTTP API through `async-openai`) and
//! [`scripted`] (deterministic replies from a file, for tests and benchmarks).
//! [`catalog`] lists GGUF models on disk.
//!
//! This crate knows nothing of sessions, storage or tool execution.

pub mod catalog;
pub mod grammar;
pub mod local;
pub mod openai;
pub mod scripted;

use std::pin::Pin;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use openpista_proto::{ChatMessage, ToolCall, ToolDefinition, Usage};
use serde::{Deserialize, Serialize};

/// Whether and how the model may call tools in this request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model picks: free text or a tool call.
    #[default]
    Auto,
    /// The model must call a tool.
    Required,
    /// The model must not call a tool.
    None,
}

/// Per-request sampling overrides; `None` means the provider's configured value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u32>,
    pub max_tokens: Option<u32>,
}

/// One call to a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Shared, not copied: an agent offers the same tools in every round.
    pub tools: std::sync::Arc<[ToolDefinition]>,
    pub tool_choice: ToolChoice,
    pub sampling: Sampling,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    #[default]
    Stop,
    ToolCalls,
    Length,
}

/// One piece of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    /// More assistant text.
    TextDelta(String),
    /// A piece of tool call number `index`: the id and name usually arrive
    /// once, the arguments in fragments that concatenate to JSON text.
    ToolCallDelta {
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    /// The reply is complete.
    Done { usage: Usage, finish: FinishReason },
}

/// A stream of reply pieces. Dropping it cancels generation.
pub type LlmStream = Pin<Box<dyn Stream<Item = Result<LlmEvent, LlmError>> + Send>>;

/// A whole reply, as assembled from a stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    pub finish: FinishReason,
}

/// Errors from a provider.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The configuration is unusable (missing key, bad value). Fix the config; retrying cannot help.
    #[error("llm configuration: {0}")]
    Config(String),
    /// The model file is missing; the message says how to get it. Retrying cannot help.
    #[error("{0}")]
    ModelMissing(String),
    /// The model file could not be loaded (corrupt or unsupported GGUF). Retrying cannot help.
    #[error("could not load model {path}: {reason}")]
    ModelLoad { path: String, reason: String },
    /// The prompt does not fit in the context window. Shorten the history.
    #[error("prompt of {tokens} tokens does not fit the context window of {window}")]
    ContextOverflow { tokens: usize, window: usize },
    /// The provider rejected the request (HTTP 400/401/403/404...). Not retried.
    #[error("provider rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// The provider kept failing (429/5xx/timeouts) until retries ran out.
    #[error("provider unavailable after {attempts} attempts: {message}")]
    Unavailable { attempts: u32, message: String },
    /// The reply could not be understood (bad JSON, broken stream).
    #[error("malformed provider reply: {0}")]
    Protocol(String),
    /// llama.cpp failed during inference.
    #[error("local inference failed: {0}")]
    Inference(String),
    /// The scripted provider ran out of replies.
    #[error("scripted provider: {0}")]
    Script(String),
}

/// A chat model.
#[async_trait]
pub trait LlmProvider: Send + Sync {
    /// Starts generating a reply. Required.
    async fn stream(&self, request: ChatRequest) -> Result<LlmStream, LlmError>;

    /// Generates a whole reply.
    async fn complete(&self, request: ChatRequest) -> Result<Completion, LlmError> {
        let mut stream = self.stream(request).await?;
        let mut assembler = Assembler::default();
        while let Some(event) = stream.next().await {
            assembler.push(event?);
        }
        Ok(assembler.finish())
    }

    /// Short name for logs and `status`.
    fn name(&self) -> String {
        "llm".to_owned()
    }

    /// The context window in tokens, when known.
    fn context_window(&self) -> Option<usize> {
        None
    }

    /// Estimated token count of `text` (used to trim history). Providers with
    /// a tokenizer return the exact count.
    fn count_tokens(&self, text: &str) -> usize {
        text.len().div_ceil(4) + 1
    }
}

/// Builds a [`Completion`] from streamed events.
#[derive(Debug, Default)]
pub struct Assembler {
    text: String,
    calls: Vec<ToolCall>,
    usage: Usage,
    finish: FinishReason,
}

impl Assembler {
    /// Adds one event.
    pub fn push(&mut self, event: LlmEvent) {
        match event {
            LlmEvent::TextDelta(t) => self.text.push_str(&t),
            LlmEvent::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            } => {
                while self.calls.len() <= index {
                    self.calls.push(ToolCall {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                    });
                }
                let call = &mut self.calls[index];
                if let Some(id) = id {
                    call.id = id;
                }
                if let Some(name) = name {
                    call.name.push_str(&name);
                }
                call.arguments.push_str(&arguments);
            }
            LlmEvent::Done { usage, finish } => {
                self.usage = usage;
                self.finish = finish;
            }
        }
    }

    /// The assembled reply. Calls without an id get a generated one.
    pub fn finish(mut self) -> Completion {
        for (i, call) in self.calls.iter_mut().enumerate() {
            if call.id.is_empty() {
                call.id = format!("call_{i}");
            }
        }
        if !self.calls.is_empty() {
            self.finish = FinishReason::ToolCalls;
        }
        Completion {
            text: self.text,
            tool_calls: self.calls,
            usage: self.usage,
            finish: self.finish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembler_joins_fragments_per_index() {
        let mut a = Assembler::default();
        a.push(LlmEvent::TextDelta("Let me ".into()));
        a.push(LlmEvent::TextDelta("check.".into()));
        a.push(LlmEvent::ToolCallDelta {
            index: 1,
            id: Some("b".into()),
            name: Some("file.read".into()),
            arguments: "{\"pa".into(),
        });
        a.push(LlmEvent::ToolCallDelta {
            index: 0,
            id: None,
            name: Some("system.run".into()),
            arguments: "{}".into(),
        });
        a.push(LlmEvent::ToolCallDelta {
            index: 1,
            id: None,
            name: None,
            arguments: "th\":\"x\"}".into(),
        });
        let c = a.finish();
        assert_eq!(c.text, "Let me check.");
        assert_eq!(c.tool_calls.len(), 2);
        assert_eq!(c.tool_calls[0].id, "call_0");
        assert_eq!(c.tool_calls[1].arguments, "{\"path\":\"x\"}");
        assert_eq!(c.finish, FinishReason::ToolCalls);
    }
}
