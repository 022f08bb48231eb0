//! The wire side of the OpenAI provider: our history and tools as a
//! chat-completions request, and streamed chunks as [`LlmEvent`]s.

use std::collections::VecDeque;
use std::path::Path;

use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls,
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestToolMessage,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionResponseStream,
    ChatCompletionStreamOptions, ChatCompletionTool, ChatCompletionToolChoiceOption,
    ChatCompletionTools, CreateChatCompletionRequest, CreateChatCompletionStreamResponse,
    FinishReason as WireFinish, FunctionCall, FunctionObject, ToolChoiceOptions,
};
use async_openai::types::chat::{
    ChatCompletionRequestMessageContentPartImage, ChatCompletionRequestMessageContentPartText,
    ChatCompletionRequestUserMessageContentPart, ImageUrl,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use openpista_proto::{ChatMessage, Role, Usage};

use super::{describe, provider_error, truncate};
use crate::{ChatRequest, FinishReason, LlmError, LlmEvent, LlmStream, ToolChoice};

/// Highest tool-call index accepted from a server; a larger one is a broken
/// reply (and would make the assembler allocate without bound).
const MAX_TOOL_CALLS: usize = 256;

/// The request body for `request`.
// `seed` is deprecated by OpenAI but still honoured by vLLM, llama.cpp and others.
#[allow(deprecated)]
pub(super) fn build_request(
    model: &str,
    request: &ChatRequest,
    images: bool,
) -> CreateChatCompletionRequest {
    let mut messages = Vec::with_capacity(request.messages.len());
    for m in &request.messages {
        messages.push(wire_message(m));
        // OpenAI tool messages hold text only, so the images a tool produced
        // follow as a user message of image parts.
        if images && m.role == Role::Tool && !m.images.is_empty() {
            messages.push(image_message(&m.images));
        }
    }
    let (tools, tool_choice) = if request.tools.is_empty() {
        // OpenAI rejects `tool_choice` without `tools`.
        (None, None)
    } else {
        let tools = request
            .tools
            .iter()
            .map(|t| {
                ChatCompletionTools::Function(ChatCompletionTool {
                    function: FunctionObject {
                        name: t.name.clone(),
                        description: Some(t.description.clone()).filter(|d| !d.is_empty()),
                        parameters: Some(t.parameters.clone()),
                        strict: None,
                    },
                })
            })
            .collect();
        let mode = match request.tool_choice {
            ToolChoice::Auto => ToolChoiceOptions::Auto,
            ToolChoice::Required => ToolChoiceOptions::Required,
            ToolChoice::None => ToolChoiceOptions::None,
        };
        (
            Some(tools),
            Some(ChatCompletionToolChoiceOption::Mode(mode)),
        )
    };
    let sampling = &request.sampling;
    CreateChatCompletionRequest {
        model: model.to_owned(),
        messages,
        tools,
        tool_choice,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        seed: sampling.seed.map(i64::from),
        max_completion_tokens: sampling.max_tokens,
        stream: Some(true),
        stream_options: Some(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        }),
        ..Default::default()
    }
}

/// One history message on the wire. Tool-call arguments go out verbatim,
/// valid JSON or not, so the history replays exactly.
fn wire_message(m: &ChatMessage) -> ChatCompletionRequestMessage {
    match m.role {
        Role::System => ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
            content: ChatCompletionRequestSystemMessageContent::Text(m.content.clone()),
            name: None,
        }),
        Role::User => ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
            content: ChatCompletionRequestUserMessageContent::Text(m.content.clone()),
            name: None,
        }),
        Role::Assistant => {
            let tool_calls: Vec<_> = m
                .tool_calls
                .iter()
                .map(|c| {
                    ChatCompletionMessageToolCalls::Function(ChatCompletionMessageToolCall {
                        id: c.id.clone(),
                        function: FunctionCall {
                            name: c.name.clone(),
                            arguments: c.arguments.clone(),
                        },
                    })
                })
                .collect();
            // A message with only tool calls has `content: null` on the wire.
            let content = if m.content.is_empty() && !tool_calls.is_empty() {
                None
            } else {
                Some(ChatCompletionRequestAssistantMessageContent::Text(
                    m.content.clone(),
                ))
            };
            ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                content,
                tool_calls: Some(tool_calls).filter(|c| !c.is_empty()),
                ..Default::default()
            })
        }
        Role::Tool => ChatCompletionRequestMessage::Tool(ChatCompletionRequestToolMessage {
            content: ChatCompletionRequestToolMessageContent::Text(m.content.clone()),
            tool_call_id: m.tool_call_id.clone().unwrap_or_default(),
        }),
    }
}

/// Largest image file sent as an image part, in bytes.
const MAX_IMAGE_BYTES: u64 = 5 * 1024 * 1024;

/// A user message with one `image_url` part per image (a `data:` URL), and a
/// text note in place of an image that is missing, unreadable or too large.
fn image_message(paths: &[String]) -> ChatCompletionRequestMessage {
    let mut parts = vec![text_part("Image produced by the call above:".to_owned())];
    for path in paths {
        match read_image(Path::new(path)) {
            Ok(bytes) => parts.push(ChatCompletionRequestUserMessageContentPart::ImageUrl(
                ChatCompletionRequestMessageContentPartImage {
                    image_url: ImageUrl {
                        url: format!("data:{};base64,{}", mime_of(path), BASE64.encode(bytes)),
                        detail: None,
                    },
                    prompt_cache_breakpoint: None,
                },
            )),
            Err(reason) => parts.push(text_part(format!("(image {path} not sent: {reason})"))),
        }
    }
    ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
        content: ChatCompletionRequestUserMessageContent::Array(parts),
        name: None,
    })
}

fn text_part(text: String) -> ChatCompletionRequestUserMessageContentPart {
    ChatCompletionRequestUserMessageContentPart::Text(ChatCompletionRequestMessageContentPartText {
        text,
        prompt_cache_breakpoint: None,
    })
}

/// The image's bytes, or why they are not sent.
fn read_image(path: &Path) -> Result<Vec<u8>, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > MAX_IMAGE_BYTES {
        return Err(format!("{len} bytes, more than the {MAX_IMAGE_BYTES} sent"));
    }
    std::fs::read(path).map_err(|e| e.to_string())
}

/// The media type for a `data:` URL, from the file name.
fn mime_of(path: &str) -> &'static str {
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".jpg") || lower.ends_with(".jpeg") {
        "image/jpeg"
    } else if lower.ends_with(".gif") {
        "image/gif"
    } else if lower.ends_with(".webp") {
        "image/webp"
    } else {
        "image/png"
    }
}

/// An error met after the stream was handed out: not retried.
pub(super) fn stream_error(err: OpenAIError, attempts: u32) -> LlmError {
    match err {
        OpenAIError::JSONDeserialize(e, content) => {
            // Some servers report failures mid-stream as `data: {"error":..}`.
            match provider_error(content.as_bytes()) {
                Some(message) => LlmError::Unavailable {
                    attempts,
                    message: format!("error in stream: {message}"),
                },
                None => LlmError::Protocol(format!("bad chunk ({e}): {}", truncate(&content))),
            }
        }
        OpenAIError::StreamError(e) => LlmError::Unavailable {
            attempts,
            message: format!("stream interrupted: {e}"),
        },
        OpenAIError::Reqwest(e) => LlmError::Unavailable {
            attempts,
            message: format!("stream interrupted: {}", describe(&e)),
        },
        other => LlmError::Protocol(other.to_string()),
    }
}

pub(super) type Peeked = (
    Option<Result<CreateChatCompletionStreamResponse, OpenAIError>>,
    ChatCompletionResponseStream,
);

/// A stream that produced its first item.
pub(super) struct Opened {
    pub(super) first: Option<Result<CreateChatCompletionStreamResponse, OpenAIError>>,
    pub(super) rest: ChatCompletionResponseStream,
    pub(super) attempts: u32,
}

/// Turns the chunk stream into [`LlmEvent`]s.
pub(super) fn events(opened: Opened) -> LlmStream {
    let upstream = futures::stream::iter(opened.first).chain(opened.rest);
    let decoder = Decoder::new(opened.attempts);
    Box::pin(futures::stream::unfold(
        (upstream, decoder),
        |(mut upstream, mut decoder)| async move {
            loop {
                if let Some(item) = decoder.pending.pop_front() {
                    return Some((item, (upstream, decoder)));
                }
                if decoder.finished {
                    return None;
                }
                match upstream.next().await {
                    Some(Ok(chunk)) => decoder.chunk(chunk),
                    Some(Err(e)) => decoder.fail(stream_error(e, decoder.attempts)),
                    None => decoder.end(),
                }
            }
        },
    ))
}

/// Chunk-to-event state: what is queued, what the reply said so far.
struct Decoder {
    pending: VecDeque<Result<LlmEvent, LlmError>>,
    attempts: u32,
    usage: Usage,
    finish: Option<FinishReason>,
    /// Last name sent per tool-call index, to drop names a server repeats in
    /// every chunk (the assembler would concatenate them).
    names: Vec<Option<String>>,
    finished: bool,
}

impl Decoder {
    fn new(attempts: u32) -> Self {
        Self {
            pending: VecDeque::new(),
            attempts,
            usage: Usage::default(),
            finish: None,
            names: Vec::new(),
            finished: false,
        }
    }

    fn chunk(&mut self, chunk: CreateChatCompletionStreamResponse) {
        if let Some(u) = chunk.usage {
            self.usage = Usage {
                prompt_tokens: u64::from(u.prompt_tokens),
                completion_tokens: u64::from(u.completion_tokens),
            };
        }
        // We never ask for n > 1; other choices are ignored.
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let delta = choice.delta;
            for text in [delta.content, delta.refusal].into_iter().flatten() {
                if !text.is_empty() {
                    self.pending.push_back(Ok(LlmEvent::TextDelta(text)));
                }
            }
            for call in delta.tool_calls.unwrap_or_default() {
                let index = usize::try_from(call.index).unwrap_or(usize::MAX);
                if index >= MAX_TOOL_CALLS {
                    return self.fail(LlmError::Protocol(format!(
                        "tool call index {} out of range",
                        call.index
                    )));
                }
                let (name, arguments) = match call.function {
                    Some(f) => (f.name, f.arguments.unwrap_or_default()),
                    None => (None, String::new()),
                };
                let id = call.id.filter(|id| !id.is_empty());
                let name = name.filter(|n| !n.is_empty() && !self.repeats_name(index, n));
                if id.is_none() && name.is_none() && arguments.is_empty() {
                    continue;
                }
                self.pending.push_back(Ok(LlmEvent::ToolCallDelta {
                    index,
                    id,
                    name,
                    arguments,
                }));
            }
            if let Some(reason) = choice.finish_reason {
                self.finish = Some(match reason {
                    WireFinish::Stop | WireFinish::ContentFilter => FinishReason::Stop,
                    WireFinish::Length => FinishReason::Length,
                    WireFinish::ToolCalls | WireFinish::FunctionCall => FinishReason::ToolCalls,
                });
            }
        }
    }

    /// True if `name` is what index `index` was already called; records it otherwise.
    fn repeats_name(&mut self, index: usize, name: &str) -> bool {
        if self.names.len() <= index {
            self.names.resize(index + 1, None);
        }
        if self.names[index].as_deref() == Some(name) {
            return true;
        }
        self.names[index] = Some(name.to_owned());
        false
    }

    fn end(&mut self) {
        match self.finish {
            Some(finish) => self.pending.push_back(Ok(LlmEvent::Done {
                usage: self.usage,
                finish,
            })),
            None => self.pending.push_back(Err(LlmError::Protocol(
                "stream ended before the reply was complete (no finish_reason)".to_owned(),
            ))),
        }
        self.finished = true;
    }

    fn fail(&mut self, err: LlmError) {
        self.pending.push_back(Err(err));
        self.finished = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openpista_proto::{ToolCall, ToolDefinition};

    #[test]
    fn history_maps_to_wire_roles() {
        let request = ChatRequest {
            messages: vec![
                ChatMessage::system("be brief"),
                ChatMessage::user("list files"),
                ChatMessage::assistant(
                    "",
                    vec![ToolCall {
                        id: "c1".into(),
                        name: "system.run".into(),
                        arguments: "{\"cmd\":".into(),
                    }],
                ),
                ChatMessage::tool_result("c1", "system.run", "error: bad arguments"),
            ],
            tools: std::sync::Arc::from([ToolDefinition {
                name: "system.run".into(),
                description: "run".into(),
                parameters: serde_json::json!({"type": "object"}),
            }]),
            tool_choice: ToolChoice::Required,
            ..Default::default()
        };
        let wire = serde_json::to_value(build_request("m", &request, false)).unwrap();
        let roles: Vec<_> = wire["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert!(wire["messages"][2].get("content").is_none());
        assert_eq!(wire["messages"][2]["tool_calls"][0]["type"], "function");
        assert_eq!(
            wire["messages"][2]["tool_calls"][0]["function"]["arguments"],
            "{\"cmd\":"
        );
        assert_eq!(wire["messages"][3]["tool_call_id"], "c1");
        assert_eq!(wire["tools"][0]["type"], "function");
        assert_eq!(wire["tools"][0]["function"]["name"], "system.run");
        assert_eq!(wire["tool_choice"], "required");
        assert_eq!(wire["stream"], true);
        assert_eq!(wire["stream_options"]["include_usage"], true);
    }

    #[test]
    fn no_tools_means_no_tool_choice() {
        let request = ChatRequest {
            messages: vec![ChatMessage::user("hi")],
            tool_choice: ToolChoice::Required,
            ..Default::default()
        };
        let wire = serde_json::to_value(build_request("m", &request, false)).unwrap();
        assert!(wire.get("tools").is_none());
        assert!(wire.get("tool_choice").is_none());
    }

    #[test]
    fn decoder_drops_repeated_names_and_rejects_absurd_indexes() {
        let chunk = |v: serde_json::Value| -> CreateChatCompletionStreamResponse {
            serde_json::from_value(serde_json::json!({
                "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": v, "finish_reason": null}]
            }))
            .unwrap()
        };
        let mut d = Decoder::new(1);
        let call = |args: &str| serde_json::json!({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": args}}]});
        d.chunk(chunk(call("{")));
        d.chunk(chunk(call("}")));
        let names: Vec<_> = d
            .pending
            .drain(..)
            .map(|e| match e {
                Ok(LlmEvent::ToolCallDelta { name, .. }) => name,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, [Some("f".to_owned()), None]);

        d.chunk(chunk(serde_json::json!({"tool_calls": [{"index": 4000000000u32, "function": {"arguments": "x"}}]})));
        assert!(matches!(
            d.pending.pop_front(),
            Some(Err(LlmError::Protocol(_)))
        ));
        assert!(d.finished);
    }
}
