//! `skill.read` and `skill.run`: the model's way into skills.
//!
//! `skill.run` runs a subprocess skill: the entry (`run.sh` or `*.sh` under
//! `bash`, `*.py` under `python3`, anything else must be executable) is
//! resolved inside the skill folder, the arguments are validated against the
//! skill's `args` schema and written as JSON to its stdin, and the process
//! runs through `openpista-sandbox` with the caller's scrubbed environment,
//! the operator's [`SkillLimits`] and the skill folder as working directory
//! (so a script finds its own files by relative path). Limits come from the
//! operator and `SKILL.md`, never from the model's arguments.
//!
//! A `mode: docker` skill runs the same way inside a fresh container (see
//! [`crate::docker`]) when the operator enabled Docker. A `mode: wasm`
//! skill's module runs under wasmtime instead (see [`crate::wasm`]) when the
//! caller enabled WASM skills.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use openpista_proto::ToolDefinition;
use openpista_sandbox::{CommandSpec, ResourceLimits};
use openpista_tools::container::DockerRunner;
use openpista_tools::system_run::{DEFAULT_PATH, run_to_output};
use openpista_tools::{Tool, ToolContext, ToolError, ToolOutput};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::wasm::WasmSkills;
use crate::{Skill, SkillCatalog, SkillMode};

/// Characters of a skill body returned by `skill.read`.
pub const MAX_BODY: usize = 20_000;

/// How long a timed-out or cancelled skill gets between `SIGTERM` and `SIGKILL`.
const TERM_GRACE: Duration = Duration::from_millis(200);

/// The operator's limits for running skills (`[skills.limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SkillLimits {
    /// Timeout in seconds when `SKILL.md` names none.
    pub timeout_secs: u64,
    /// Largest timeout in seconds, whatever `SKILL.md` says.
    pub max_timeout_secs: u64,
    /// `RLIMIT_CPU`: CPU seconds.
    pub cpu_secs: u64,
    /// `RLIMIT_AS`: bytes of virtual address space.
    pub address_space_bytes: u64,
    /// `RLIMIT_FSIZE`: largest file a skill may write, in bytes.
    pub file_size_bytes: u64,
    /// `RLIMIT_NPROC`: processes of the user (not enforced for root).
    pub max_processes: u64,
    /// Characters of stdout and stderr (together) returned to the model.
    pub output_limit: usize,
}

impl Default for SkillLimits {
    fn default() -> Self {
        Self {
            timeout_secs: 30,
            max_timeout_secs: 300,
            cpu_secs: 30,
            address_space_bytes: 1 << 30,
            file_size_bytes: 64 << 20,
            max_processes: 64,
            output_limit: 10_000,
        }
    }
}

impl SkillLimits {
    fn resource_limits(&self) -> ResourceLimits {
        ResourceLimits {
            cpu_secs: Some(self.cpu_secs),
            address_space_bytes: Some(self.address_space_bytes),
            file_size_bytes: Some(self.file_size_bytes),
            max_processes: Some(self.max_processes),
        }
    }

    /// The deadline for `skill`: its own timeout or the default, at most the maximum.
    pub(crate) fn timeout_for(&self, skill: &Skill) -> Duration {
        let max = self.max_timeout_secs.max(1);
        Duration::from_secs(
            skill
                .meta
                .timeout
                .unwrap_or(self.timeout_secs)
                .clamp(1, max),
        )
    }
}

/// `skill.read` and `skill.run` over `catalog`; skill processes get exactly `env`.
pub fn skill_tools(
    catalog: Arc<SkillCatalog>,
    env: Vec<(String, String)>,
    limits: SkillLimits,
) -> Vec<Arc<dyn Tool>> {
    skill_tools_with_docker(catalog, env, limits, None)
}

/// As [`skill_tools`]; with `docker`, `mode: docker` skills run in containers.
pub fn skill_tools_with_docker(
    catalog: Arc<SkillCatalog>,
    env: Vec<(String, String)>,
    limits: SkillLimits,
    docker: Option<Arc<DockerRunner>>,
) -> Vec<Arc<dyn Tool>> {
    let mut run = SkillRun::new(catalog.clone(), env, limits);
    if let Some(runner) = docker {
        run = run.with_docker(runner);
    }
    vec![Arc::new(SkillRead::new(catalog)), Arc::new(run)]
}

/// The `skill.read` tool: a skill's full instructions.
#[derive(Debug, Clone)]
pub struct SkillRead {
    catalog: Arc<SkillCatalog>,
}

impl SkillRead {
    pub fn new(catalog: Arc<SkillCatalog>) -> Self {
        Self { catalog }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    name: String,
}

#[async_trait]
impl Tool for SkillRead {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "skill.read".to_owned(),
            description: format!(
                "Read a skill's full instructions (its SKILL.md body, at most {MAX_BODY} \
                 characters). Use a name from the skills list."
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "description": "The skill's name."}
                },
                "required": ["name"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(&self, args: Value, _ctx: &ToolContext) -> Result<ToolOutput, ToolError> {
        let args: ReadArgs = openpista_tools::parse_args("skill.read", args)?;
        let set = self.catalog.current();
        let skill = find(&set, "skill.read", &args.name)?;
        let meta = &skill.meta;
        let mut content = format!("# skill {}\n{}\n", meta.name, meta.description);
        if let Some(schema) = &meta.args {
            content.push_str(&format!("args schema: {schema}\n"));
        }
        content.push('\n');
        let len = skill.body.chars().count();
        content.extend(skill.body.chars().take(MAX_BODY));
        if len > MAX_BODY {
            content.push_str(&format!(
                "\n[... body truncated: {} more characters not shown ...]",
                len - MAX_BODY
            ));
        }
        Ok(ToolOutput::ok(content))
    }
}

/// The `skill.run` tool: runs a subprocess skill with JSON arguments on stdin.
#[derive(Debug, Clone)]
pub struct SkillRun {
    catalog: Arc<SkillCatalog>,
    env: Vec<(String, String)>,
    limits: SkillLimits,
    docker: Option<Arc<DockerRunner>>,
    wasm: Option<WasmSkills>,
}

impl SkillRun {
    /// `env` is the child's whole environment (pass the same scrubbed one as `system.run`).
    pub fn new(
        catalog: Arc<SkillCatalog>,
        env: Vec<(String, String)>,
        limits: SkillLimits,
    ) -> Self {
        Self {
            catalog,
            env,
            limits,
            docker: None,
            wasm: None,
        }
    }

    /// Lets `mode: wasm` skills run, with `wasm`'s runtime and limits.
    pub fn with_wasm(mut self, wasm: WasmSkills) -> Self {
        self.wasm = Some(wasm);
        self
    }

    /// Lets `mode: docker` skills run, in containers made by `runner`.
    pub fn with_docker(mut self, runner: Arc<DockerRunner>) -> Self {
        self.docker = Some(runner);
        self
    }

    fn find_program(&self, name: &str) -> Result<PathBuf, ToolError> {
        let path_var = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        path_var
            .split(':')
            .map(Path::new)
            .filter(|d| d.is_absolute())
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
            .ok_or_else(|| ToolError::Failed(format!("{name} was not found on PATH ({path_var})")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[async_trait]
impl Tool for SkillRun {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "skill.run".to_owned(),
            description: format!(
                "Run a runnable skill. `args` must match the skill's args schema (see skill.read) \
                 and is passed to it as JSON. Returns stdout, stderr and the exit code (output \
                 capped at {} characters).",
                self.limits.output_limit
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "description": "The skill's name."},
                    "args": {"type": "object", "description": "The skill's arguments (default: {})."}
                },
                "required": ["name"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(&self, args: Value, ctx: &ToolContext) -> Result<ToolOutput, ToolError> {
        let args: RunArgs = openpista_tools::parse_args("skill.run", args)?;
        let set = self.catalog.current();
        let skill = find(&set, "skill.run", &args.name)?;
        let name = &skill.meta.name;
        let mode = skill.meta.mode.unwrap_or(SkillMode::Subprocess);
        match mode {
            SkillMode::Subprocess | SkillMode::Docker => {}
            SkillMode::Wasm => {
                return crate::wasm::run_skill(
                    self.wasm.as_ref(),
                    &self.limits,
                    skill,
                    args.args,
                    ctx,
                )
                .await;
            }
        }
        let docker = match (mode, &self.docker) {
            (SkillMode::Docker, Some(runner)) => Some(runner),
            (SkillMode::Docker, None) => {
                return Err(ToolError::Failed(format!(
                    "skill {name} runs in Docker, but [sandbox.docker] is not enabled"
                )));
            }
            _ => None,
        };
        let skill_args = args.args.unwrap_or_else(|| json!({}));
        check_args(skill, &skill_args)?;
        let (dir, entry) = resolve_entry(skill)?;
        if let Some(runner) = docker {
            let task =
                crate::docker::task(runner, skill, &self.limits, &dir, &entry, &skill_args, ctx)?;
            return runner
                .run(task, ctx, || {
                    self.run_subprocess(skill, dir.clone(), entry.clone(), &skill_args, ctx)
                })
                .await;
        }
        self.run_subprocess(skill, dir, entry, &skill_args, ctx)
            .await
    }
}

impl SkillRun {
    /// Runs `entry` as a subprocess in the skill folder `dir`.
    async fn run_subprocess(
        &self,
        skill: &Skill,
        dir: PathBuf,
        entry: PathBuf,
        skill_args: &Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let name = &skill.meta.name;
        let entry_name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (program, argv) = if entry_name.ends_with(".sh") {
            (self.find_program("bash")?, vec![path_arg(&entry)])
        } else if entry_name.ends_with(".py") {
            (self.find_program("python3")?, vec![path_arg(&entry)])
        } else if is_executable(&entry) {
            (entry.clone(), Vec::new())
        } else {
            return Err(ToolError::Failed(format!(
                "skill {name}: entry {entry_name} is neither *.sh, *.py nor executable"
            )));
        };
        let timeout = self.limits.timeout_for(skill);
        let stdin = serde_json::to_vec(skill_args).map_err(|e| ToolError::Failed(e.to_string()))?;

        let mut spec = CommandSpec::new(program, dir);
        spec.args = argv;
        spec.env = self.env.clone();
        spec.stdin = Some(stdin);
        spec.timeout = timeout;
        spec.output_limit = self.limits.output_limit.saturating_mul(4);
        spec.term_grace = TERM_GRACE;
        spec.limits = self.limits.resource_limits();

        tracing::debug!(skill = %name, ?timeout, "skill.run");
        run_to_output(spec, ctx, self.limits.output_limit).await
    }
}

fn invalid(tool: &str, e: impl std::fmt::Display) -> ToolError {
    ToolError::InvalidArguments {
        tool: tool.to_owned(),
        reason: e.to_string(),
    }
}

fn find<'a>(set: &'a crate::SkillSet, tool: &str, name: &str) -> Result<&'a Skill, ToolError> {
    set.get(name).ok_or_else(|| {
        let known: Vec<&str> = set.skills.iter().map(|s| s.meta.name.as_str()).collect();
        invalid(
            tool,
            format!(
                "unknown skill {:?}; available skills: {}",
                name.chars().take(100).collect::<String>(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        )
    })
}

/// Validates `args` against the skill's `args` schema, if it has one.
pub(crate) fn check_args(skill: &Skill, args: &Value) -> Result<(), ToolError> {
    let Some(schema) = &skill.meta.args else {
        return Ok(());
    };
    let validator = jsonschema::validator_for(schema).map_err(|e| {
        ToolError::Failed(format!(
            "skill {} has an invalid args schema: {e}",
            skill.meta.name
        ))
    })?;
    let errors: Vec<String> = validator
        .iter_errors(args)
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
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid(
            "skill.run",
            format!("args for skill {}: {}", skill.meta.name, errors.join("; ")),
        ))
    }
}

/// The canonical skill folder and entry file. The entry (default `run.sh`,
/// then `main.py`) must be a relative path without `..` whose real location,
/// after following symlinks, is inside the folder.
pub(crate) fn resolve_entry(skill: &Skill) -> Result<(PathBuf, PathBuf), ToolError> {
    let name = &skill.meta.name;
    let dir = std::fs::canonicalize(&skill.dir).map_err(|e| {
        ToolError::Failed(format!(
            "skill {name}: folder {} is unreadable: {e}",
            skill.dir.display()
        ))
    })?;
    let rel = match skill.meta.entry.as_deref() {
        Some(e) => e.to_owned(),
        None => ["run.sh", "main.py"]
            .into_iter()
            .find(|c| dir.join(c).is_file())
            .map(str::to_owned)
            .ok_or_else(|| {
                ToolError::Failed(format!(
                    "skill {name} has no entry (no `entry`, run.sh or main.py): it is \
                     instructions only; read it with skill.read"
                ))
            })?,
    };
    let path = Path::new(&rel);
    let plain = !rel.is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(ToolError::Denied(format!(
            "skill {name}: entry {rel:?} must be a relative path inside the skill folder, \
             without `..`"
        )));
    }
    let full = std::fs::canonicalize(dir.join(path)).map_err(|e| {
        ToolError::Failed(format!("skill {name}: entry {rel:?} cannot be opened: {e}"))
    })?;
    if !full.starts_with(&dir) {
        return Err(ToolError::Denied(format!(
            "skill {name}: entry {rel:?} leads outside the skill folder"
        )));
    }
    if !full.is_file() {
        return Err(ToolError::Failed(format!(
            "skill {name}: entry {rel:?} is not a file"
        )));
    }
    Ok((dir, full))
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
