//! `system.run`: one command under the operator's [`CommandPolicy`], run by
//! `openpista-sandbox` with the environment the caller chose (the parent's
//! environment never reaches the child).
//!
//! In allowlist mode the arguments are confined to the workspace (see
//! [`CommandPolicy::check_in`]) and the program is looked up by bare name in the `PATH` of
//! that environment, skipping relative directories and directories inside the
//! workspace, so a file written into the workspace can never stand in for an
//! allowlisted program.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use openpista_proto::{ToolDefinition, ToolOutcome};
use openpista_sandbox::{CommandSpec, ResourceLimits, RunOutput};
use serde::Deserialize;
use serde_json::json;

use crate::container::{DockerRunner, container_path};
use crate::files::confine;
use crate::policy::{CommandPolicy, PolicyMode, PolicyViolation, RunSandbox};
use crate::{Tool, ToolContext, ToolError, ToolOutput};

/// `PATH` used when the given environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How long a timed-out or cancelled command gets between `SIGTERM` and `SIGKILL`.
const TERM_GRACE: Duration = Duration::from_millis(200);

/// The `system.run` tool.
#[derive(Debug, Clone)]
pub struct SystemRun {
    policy: CommandPolicy,
    env: Vec<(String, String)>,
    limits: ResourceLimits,
    docker: Option<Arc<DockerRunner>>,
}

impl SystemRun {
    /// `env` is the child's whole environment (pass a minimal, scrubbed one,
    /// e.g. `openpista_sandbox::minimal_env`).
    pub fn new(policy: CommandPolicy, env: Vec<(String, String)>) -> Self {
        Self {
            policy,
            env,
            limits: ResourceLimits::default(),
            docker: None,
        }
    }

    /// Runs allowed commands in Docker (used when the policy's `sandbox` is
    /// `"docker"`; without a runner such a policy refuses every command).
    pub fn with_docker(mut self, runner: Arc<DockerRunner>) -> Self {
        self.docker = Some(runner);
        self
    }

    /// Sets `setrlimit` limits for every command.
    pub fn with_limits(mut self, limits: ResourceLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn policy(&self) -> &CommandPolicy {
        &self.policy
    }

    fn description(&self) -> String {
        let limit = self.policy.output_limit;
        match self.policy.mode {
            PolicyMode::Deny => {
                "Run a command. Disabled by the operator: every command is refused.".to_owned()
            }
            PolicyMode::Allowlist => format!(
                "Run one program in the workspace, without a shell. Allowed programs: {}. \
                 Arguments use shell quoting, but there are no pipes, redirections, `;`, `&&`, \
                 `$(...)`, globs or variable expansion.{paths} Returns stdout, stderr and the \
                 exit code (output capped at {limit} characters).",
                self.policy.allowlist.join(", "),
                paths = if self.policy.allow_paths_outside_workspace {
                    ""
                } else {
                    " Paths in arguments must stay inside the workspace: relative, without `..` \
                     (absolute paths outside it, `~` and symlinks leading out are refused)."
                }
            ),
            PolicyMode::Full => format!(
                "Run a shell command with /bin/sh -c in the workspace. Returns stdout, stderr and \
                 the exit code (output capped at {limit} characters)."
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    command: String,
    cwd: Option<String>,
    timeout_secs: Option<u64>,
}

#[async_trait]
impl Tool for SystemRun {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "system.run".to_owned(),
            description: self.description(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "minLength": 1, "description": "The command line."},
                    "cwd": {"type": "string", "minLength": 1, "description": "Working directory relative to the workspace (default: the workspace)."},
                    "timeout_secs": {
                        "type": "integer",
                        "minimum": 1,
                        "description": format!(
                            "Timeout in seconds (default {}, at most {}).",
                            self.policy.timeout_secs, self.policy.max_timeout_secs
                        )
                    }
                },
                "required": ["command"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(
        &self,
        args: serde_json::Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let args: RunArgs = crate::parse_args("system.run", args)?;
        let cwd = confine(&ctx.workspace, args.cwd.as_deref().unwrap_or("."))?;
        let argv = match self.policy.check_in(&args.command, &cwd.root, &cwd.path) {
            // A human approved this exact call: a program off the allowlist
            // may run, under every other rule.
            Err(PolicyViolation::NotAllowed { program, .. }) if ctx.approved => self
                .policy
                .allowing(&program)
                .check_in(&args.command, &cwd.root, &cwd.path),
            checked => checked,
        }
        .map_err(|v| ToolError::Denied(v.to_string()))?;
        if !cwd.path.is_dir() {
            return Err(ToolError::Failed(format!(
                "cwd {} is not an existing directory",
                cwd.display()
            )));
        }
        let max = self.policy.max_timeout_secs.max(1);
        let timeout = Duration::from_secs(
            args.timeout_secs
                .unwrap_or(self.policy.timeout_secs)
                .clamp(1, max),
        );
        tracing::debug!(command = %args.command, ?timeout, "system.run");
        match self.policy.sandbox {
            RunSandbox::Subprocess => {
                self.run_on_host(argv, &cwd.root, cwd.path, timeout, ctx)
                    .await
            }
            RunSandbox::Docker => {
                self.run_in_docker(argv, &cwd.root, cwd.path, timeout, ctx)
                    .await
            }
        }
    }
}

impl SystemRun {
    /// The allowed `argv` as a subprocess in `cwd`.
    async fn run_on_host(
        &self,
        argv: Vec<String>,
        root: &Path,
        cwd: PathBuf,
        timeout: Duration,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let Some((program, rest)) = argv.split_first() else {
            return Err(ToolError::Denied("empty command".to_owned()));
        };
        let program = if program.contains('/') {
            // Only the full-mode shell, decided by the policy, is a path.
            PathBuf::from(program)
        } else {
            let path_var = self
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
            resolve_program(program, path_var, root)?
        };
        let mut spec = CommandSpec::new(program, cwd);
        spec.args = rest.to_vec();
        spec.env = self.env.clone();
        spec.timeout = timeout;
        // Bytes per stream: enough for `output_limit` characters of any text.
        spec.output_limit = self.policy.output_limit.saturating_mul(4);
        spec.term_grace = TERM_GRACE;
        spec.limits = self.limits;
        run_to_output(spec, ctx, self.policy.output_limit).await
    }

    /// The allowed `argv` in a fresh container under `[sandbox.docker]`
    /// (the workspace is read-only there); the subprocess fallback, if the
    /// operator enabled it, is [`Self::run_on_host`].
    async fn run_in_docker(
        &self,
        argv: Vec<String>,
        root: &Path,
        cwd: PathBuf,
        timeout: Duration,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let Some(runner) = &self.docker else {
            return Err(ToolError::Denied(
                "system.run is configured with sandbox = \"docker\" but [sandbox.docker] is not \
                 enabled"
                    .to_owned(),
            ));
        };
        let mut task = runner.task(argv.clone(), root, container_path(root, &cwd));
        task.timeout = timeout;
        task.output_limit = self.policy.output_limit.saturating_mul(4);
        runner
            .run(task, ctx, || {
                self.run_on_host(argv, root, cwd, timeout, ctx)
            })
            .await
    }
}

/// Runs `spec` in the sandbox and turns the result into a tool result: a
/// cancel or timeout is an error, a non-zero exit an `Error` outcome with its
/// code, and the output is rendered with at most `output_limit` characters.
/// Shared by every tool that runs a process.
pub async fn run_to_output(
    spec: CommandSpec,
    ctx: &ToolContext,
    output_limit: usize,
) -> Result<ToolOutput, ToolError> {
    let timeout = spec.timeout;
    let out = openpista_sandbox::run(spec, ctx.cancel.clone())
        .await
        .map_err(|e| ToolError::Failed(e.to_string()))?;
    if out.cancelled {
        return Err(ToolError::Cancelled);
    }
    if out.timed_out {
        return Err(ToolError::Timeout(timeout));
    }
    Ok(ToolOutput {
        content: render(&out, output_limit),
        exit_code: out.exit_code,
        outcome: if out.exit_code == Some(0) {
            ToolOutcome::Ok
        } else {
            ToolOutcome::Error
        },
        images: Vec::new(),
    })
}

/// Finds `name` in the absolute directories of `path_var` that are not inside
/// `workspace`.
pub(crate) fn resolve_program(
    name: &str,
    path_var: &str,
    workspace: &Path,
) -> Result<PathBuf, ToolError> {
    use std::os::unix::fs::PermissionsExt;
    for dir in path_var.split(':').map(Path::new) {
        if !dir.is_absolute() {
            continue;
        }
        if std::fs::canonicalize(dir).is_ok_and(|d| d.starts_with(workspace)) {
            continue;
        }
        let candidate = dir.join(name);
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err(ToolError::Failed(format!(
        "{name:?} is allowed but was not found on PATH ({path_var})"
    )))
}

/// Stdout, stderr and the exit status as text for the model. Together the
/// two streams show at most `limit` characters; each cut stream ends with a
/// marker saying how much was left out.
pub fn render(out: &RunOutput, limit: usize) -> String {
    let out_len = out.stdout.chars().count();
    let err_len = out.stderr.chars().count();
    let half = limit / 2;
    let (out_budget, err_budget) = if out_len + err_len <= limit {
        (out_len, err_len)
    } else if out_len <= half {
        (out_len, limit - out_len)
    } else if err_len <= half {
        (limit - err_len, err_len)
    } else {
        (limit - half, half)
    };
    let mut content = String::new();
    let mut section = |label: &str, text: &str, len: usize, budget: usize, dropped: u64| {
        if len == 0 && dropped == 0 {
            return;
        }
        content.push_str(&format!("[{label}]\n"));
        let shown: String = text.chars().take(budget).collect();
        content.push_str(&shown);
        let more = (len - budget.min(len)) as u64 + dropped;
        if more > 0 {
            content.push_str(&format!(
                "\n[... {label} truncated: {more} more characters not shown ...]"
            ));
        }
        if !content.ends_with('\n') {
            content.push('\n');
        }
    };
    section(
        "stdout",
        &out.stdout,
        out_len,
        out_budget,
        out.dropped_stdout,
    );
    section(
        "stderr",
        &out.stderr,
        err_len,
        err_budget,
        out.dropped_stderr,
    );
    if content.is_empty() {
        content.push_str("[no output]\n");
    }
    match (out.exit_code, out.signal) {
        (Some(code), _) => content.push_str(&format!("[exit code: {code}]")),
        (None, Some(signal)) => content.push_str(&format!("[killed by signal {signal}]")),
        (None, None) => content.push_str("[exit status unknown]"),
    }
    content
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stdout: &str, stderr: &str) -> RunOutput {
        RunOutput {
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            cancelled: false,
            truncated: false,
            dropped_stdout: 0,
            dropped_stderr: 0,
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn renders_both_streams_and_the_exit_code() {
        let text = render(&output("a\n", "b"), 100);
        assert_eq!(text, "[stdout]\na\n[stderr]\nb\n[exit code: 0]");
        assert_eq!(render(&output("", ""), 100), "[no output]\n[exit code: 0]");
    }

    #[test]
    fn long_stdout_leaves_room_for_stderr() {
        let text = render(&output(&"x".repeat(100), "error!"), 20);
        assert!(
            text.contains(&format!(
                "[stdout]\n{}\n[... stdout truncated: 86 more",
                "x".repeat(14)
            )),
            "{text}"
        );
        assert!(text.contains("[stderr]\nerror!\n"), "{text}");
    }

    #[test]
    fn dropped_characters_are_counted_in_the_marker() {
        let mut out = output("abc", "");
        out.dropped_stdout = 1000;
        let text = render(&out, 10);
        assert!(text.contains("1000 more characters not shown"), "{text}");
    }

    #[test]
    fn signals_are_shown() {
        let mut out = output("", "");
        out.exit_code = None;
        out.signal = Some(9);
        assert!(render(&out, 10).ends_with("[killed by signal 9]"));
    }

    #[test]
    fn programs_inside_the_workspace_are_never_resolved() {
        use std::os::unix::fs::PermissionsExt;
        let ws = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(ws.path()).unwrap();
        let fake = root.join("ls");
        std::fs::write(&fake, "#!/bin/sh\necho pwned\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:.:/usr/bin:/bin", root.display());
        let found = resolve_program("ls", &path, &root).unwrap();
        assert!(!found.starts_with(&root), "{}", found.display());
        assert!(resolve_program("ls", &root.display().to_string(), &root).is_err());
    }
}
