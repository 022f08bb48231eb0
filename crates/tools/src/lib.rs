//! Tools the agent can call, and the policy they run under.
//!
//! A [`Tool`] has a definition (name, description, JSON schema) and one
//! required method, [`Tool::call`]. The [`ToolRegistry`] is the single path
//! every call takes, whether it comes from the model or from
//! `openpista tools call`: unknown names and arguments that fail the schema
//! are answered with an error result, and a failing tool never aborts a turn.
//!
//! Built-in tools: [`system_run::SystemRun`] (`system.run`, a command under an
//! operator policy: `deny`, `allowlist` or `full`) and the workspace-confined
//! file tools in [`files`] (`file.read`, `file.write`, `file.list`).
//! [`container::ContainerRun`] (`container.run`, a command in a fresh Docker
//! container under the operator's `[sandbox.docker]` limits) is registered
//! by the caller when Docker is enabled. The desktop tools in [`desktop`]
//! (`screen.capture`, `input.control`) are registered by the caller when
//! `[tools.desktop]` enables them.
//!
//! This crate knows nothing of models or sessions.

pub mod container;
pub mod desktop;
pub mod files;
pub mod policy;
pub mod system_run;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use openpista_proto::{SessionId, ToolDefinition, ToolOutcome};
use tokio_util::sync::CancellationToken;

/// What a tool needs to know about the call it is serving.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The directory file tools and commands are confined to.
    pub workspace: PathBuf,
    /// Cancelled when the turn is cancelled; long tools must stop.
    pub cancel: CancellationToken,
    /// The session the call belongs to, when there is one.
    pub session_id: Option<SessionId>,
    /// A human approved exactly this call (tool and arguments). `system.run`
    /// in allowlist mode then also runs a program that is not on the
    /// allowlist; every other rule still holds (no shell, no wrappers or
    /// interpreters, no dangerous options, arguments inside the workspace).
    pub approved: bool,
}

/// A successful (or at least completed) tool run.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// Text fed back to the model (already capped).
    pub content: String,
    /// Exit code, for tools that run a process.
    pub exit_code: Option<i32>,
    /// How it ended. `Ok` unless the tool ran and reported failure
    /// (e.g. a non-zero exit), which is `Error`.
    pub outcome: ToolOutcome,
    /// Absolute paths of images the tool produced (e.g. a screen capture).
    /// Their bytes never go into `content`; a provider that accepts images
    /// may send them as image parts.
    pub images: Vec<PathBuf>,
}

impl ToolOutput {
    pub fn ok(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            exit_code: None,
            outcome: ToolOutcome::Ok,
            images: Vec::new(),
        }
    }

    /// This output, with `images` attached.
    pub fn with_images(mut self, images: Vec<PathBuf>) -> Self {
        self.images = images;
        self
    }
}

/// Why a tool call did not produce output.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// No tool of that name is registered. The model may retry with a listed name.
    #[error("unknown tool {name:?}; available tools: {available}")]
    UnknownTool { name: String, available: String },
    /// The arguments are not valid JSON or fail the tool's schema. The model may retry with fixed arguments.
    #[error("invalid arguments for {tool}: {reason}")]
    InvalidArguments { tool: String, reason: String },
    /// The operator's policy refuses this call. Retrying the same call cannot help.
    #[error("denied by policy: {0}")]
    Denied(String),
    /// The tool hit its deadline and was stopped.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The turn was cancelled while the tool ran.
    #[error("cancelled")]
    Cancelled,
    /// The tool ran into an error (I/O, spawn failure, ...).
    #[error("{0}")]
    Failed(String),
}

impl ToolError {
    /// The outcome recorded for this error.
    pub fn outcome(&self) -> ToolOutcome {
        match self {
            ToolError::Denied(_) => ToolOutcome::Denied,
            ToolError::Timeout(_) => ToolOutcome::Timeout,
            ToolError::Cancelled => ToolOutcome::Cancelled,
            ToolError::UnknownTool { .. }
            | ToolError::InvalidArguments { .. }
            | ToolError::Failed(_) => ToolOutcome::Error,
        }
    }
}

/// The built-in tools: `system.run` under `policy` (children get exactly
/// `env`), and `file.read`, `file.write`, `file.list` under `files`.
pub fn builtin_registry(
    policy: policy::CommandPolicy,
    files: files::FileLimits,
    env: Vec<(String, String)>,
) -> Result<ToolRegistry, ToolError> {
    let mut registry = ToolRegistry::new();
    registry.register(Arc::new(system_run::SystemRun::new(policy, env)))?;
    for tool in files::file_tools(files) {
        registry.register(tool)?;
    }
    Ok(registry)
}

/// A capability the model can invoke.
#[async_trait]
pub trait Tool: Send + Sync {
    /// Name, description and argument schema (a JSON-schema object).
    fn definition(&self) -> ToolDefinition;

    /// Runs the tool. `args` already passed the schema. Required.
    async fn call(
        &self,
        args: serde_json::Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError>;
}

/// The result of one call through the registry: always produced, never a panic.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub outcome: ToolOutcome,
    /// Text for the model: the output, or a clear error message.
    pub content: String,
    pub exit_code: Option<i32>,
    pub duration: Duration,
    /// Absolute paths of images the tool produced (see [`ToolOutput::images`]).
    pub images: Vec<PathBuf>,
}

impl ToolResult {
    /// A result that never ran a tool (refused, cancelled, malformed call).
    pub fn not_run(outcome: ToolOutcome, content: impl Into<String>) -> Self {
        Self {
            outcome,
            content: content.into(),
            exit_code: None,
            duration: Duration::ZERO,
            images: Vec::new(),
        }
    }
}

/// Deserializes a tool's (already schema-checked) arguments into `T`; a
/// mismatch is [`ToolError::InvalidArguments`] naming `tool`.
pub fn parse_args<T: serde::de::DeserializeOwned>(
    tool: &str,
    args: serde_json::Value,
) -> Result<T, ToolError> {
    serde_json::from_value(args).map_err(|e| ToolError::InvalidArguments {
        tool: tool.to_owned(),
        reason: e.to_string(),
    })
}

/// Compiles an argument schema into a validator. A schema that does not name
/// its dialect with `$schema` is read as JSON Schema draft 7, which has every
/// keyword tool arguments use. The schema is first checked against its
/// dialect's meta-schema, whose validator the library builds once and keeps:
/// about 180 KiB for draft 7 with jsonschema 0.61, 550 KiB for 2020-12 (the
/// library's default); jsonschema 0.33 kept 4.8 MB for draft 7, most of an
/// idle daemon's heap.
pub fn compile_schema(schema: &serde_json::Value) -> Result<jsonschema::Validator, String> {
    let named = schema.get("$schema").is_some();
    let compiled = if named {
        jsonschema::validator_for(schema)
    } else {
        jsonschema::draft7::new(schema)
    };
    compiled.map_err(|e| e.to_string())
}

struct Registered {
    tool: Arc<dyn Tool>,
    definition: ToolDefinition,
    validator: jsonschema::Validator,
}

/// The set of tools available to a session.
#[derive(Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Registered>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.keys()).finish()
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool. Fails if its schema is not a valid JSON schema or the name is taken.
    pub fn register(&mut self, tool: Arc<dyn Tool>) -> Result<(), ToolError> {
        let definition = tool.definition();
        let validator =
            compile_schema(&definition.parameters).map_err(|e| ToolError::InvalidArguments {
                tool: definition.name.clone(),
                reason: format!("the tool's own schema is invalid: {e}"),
            })?;
        if self.tools.contains_key(&definition.name) {
            return Err(ToolError::Failed(format!(
                "tool {} is registered twice",
                definition.name
            )));
        }
        self.tools.insert(
            definition.name.clone(),
            Registered {
                tool,
                definition,
                validator,
            },
        );
        Ok(())
    }

    /// Definitions of every registered tool, sorted by name.
    pub fn definitions(&self) -> Vec<ToolDefinition> {
        self.tools.values().map(|r| r.definition.clone()).collect()
    }

    /// Whether a tool of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Parses and validates `raw_args` (JSON text) for `name`.
    pub fn validate(&self, name: &str, raw_args: &str) -> Result<serde_json::Value, ToolError> {
        let reg = self.tools.get(name).ok_or_else(|| ToolError::UnknownTool {
            name: name.chars().take(100).collect(),
            available: self.tools.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let raw = if raw_args.trim().is_empty() {
            "{}"
        } else {
            raw_args
        };
        let args: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| ToolError::InvalidArguments {
                tool: name.to_owned(),
                reason: format!("not valid JSON ({e})"),
            })?;
        let errors: Vec<String> = reg
            .validator
            .iter_errors(&args)
            .take(5)
            .map(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() {
                    e.to_string()
                } else {
                    format!("{path}: {e}")
                }
            })
            .collect();
        if !errors.is_empty() {
            return Err(ToolError::InvalidArguments {
                tool: name.to_owned(),
                reason: errors.join("; "),
            });
        }
        Ok(args)
    }

    /// Runs one call: validates, runs, and turns every failure into a result
    /// the model can read.
    pub async fn call(&self, name: &str, raw_args: &str, ctx: &ToolContext) -> ToolResult {
        let started = Instant::now();
        let outcome = match self.validate(name, raw_args) {
            Ok(args) => {
                let tool = match self.tools.get(name) {
                    Some(reg) => reg.tool.clone(),
                    None => {
                        return ToolResult {
                            outcome: ToolOutcome::Error,
                            content: format!("error: unknown tool {name:?}"),
                            exit_code: None,
                            duration: started.elapsed(),
                            images: Vec::new(),
                        };
                    }
                };
                tokio::select! {
                    biased;
                    () = ctx.cancel.cancelled() => Err(ToolError::Cancelled),
                    r = tool.call(args, ctx) => r,
                }
            }
            Err(e) => Err(e),
        };
        let duration = started.elapsed();
        match outcome {
            Ok(out) => ToolResult {
                outcome: out.outcome,
                content: out.content,
                exit_code: out.exit_code,
                duration,
                images: out.images,
            },
            Err(e) => ToolResult {
                outcome: e.outcome(),
                content: format!("error: {e}"),
                exit_code: None,
                duration,
                images: Vec::new(),
            },
        }
    }
}
