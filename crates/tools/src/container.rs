//! `container.run`: an ad-hoc command in a fresh, locked-down Docker
//! container, and the [`DockerRunner`] shared by every tool that runs in
//! Docker (`container.run`, `system.run` with `sandbox = "docker"`, docker
//! skills).
//!
//! The model gives only the argv (passed to the container as is: no shell is
//! added) and a working directory inside the workspace. The image, network,
//! mounts, limits and timeout come from the operator's `[sandbox.docker]`
//! configuration; the schema has `additionalProperties: false`, so arguments
//! that try to set them are refused before anything runs.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use openpista_proto::{ToolDefinition, ToolOutcome};
use openpista_sandbox::docker::{
    ContainerOutput, ContainerTask, DockerConfig, DockerError, DockerSandbox, Fallback,
    WORKSPACE_DIR,
};
use openpista_sandbox::{CommandSpec, ResourceLimits};
use serde::Deserialize;
use serde_json::json;

use crate::files::confine;
use crate::system_run::{DEFAULT_PATH, render, resolve_program, run_to_output};
use crate::{Tool, ToolContext, ToolError, ToolOutput};

/// Runs tasks in Docker under the operator's configuration.
#[derive(Debug, Clone)]
pub struct DockerRunner {
    sandbox: DockerSandbox,
    config: DockerConfig,
    labels: Vec<(String, String)>,
}

impl DockerRunner {
    /// A runner for `config.host` (the daemon is contacted at the first run).
    pub fn new(config: DockerConfig) -> Result<Self, ToolError> {
        let sandbox =
            DockerSandbox::connect(&config.host).map_err(|e| ToolError::Failed(e.to_string()))?;
        Ok(Self {
            sandbox,
            config,
            labels: Vec::new(),
        })
    }

    /// Adds labels to every container (e.g. `openpista.test=1`).
    pub fn with_labels(mut self, labels: Vec<(String, String)>) -> Self {
        self.labels = labels;
        self
    }

    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    pub fn sandbox(&self) -> &DockerSandbox {
        &self.sandbox
    }

    /// A task running `argv` in `workdir` under the operator's policy, with
    /// `workspace` mounted read-only, the default timeout and output cap.
    pub fn task(&self, argv: Vec<String>, workspace: &Path, workdir: String) -> ContainerTask {
        let mut task = ContainerTask::new(argv, self.config.policy(), workspace);
        task.workdir = workdir;
        task.timeout = self.config.timeout(None);
        // Bytes per stream: enough for `output_limit` characters of any text.
        task.output_limit = self.config.output_limit.saturating_mul(4);
        task.labels = self.labels.clone();
        task
    }

    /// Runs `task` and turns the result into a tool result. When the daemon
    /// is unreachable and the operator chose `fallback = "subprocess"`, runs
    /// `fallback` instead; otherwise the error names the socket.
    pub async fn run<F, Fut>(
        &self,
        task: ContainerTask,
        ctx: &ToolContext,
        fallback: F,
    ) -> Result<ToolOutput, ToolError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<ToolOutput, ToolError>>,
    {
        let timeout = task.timeout;
        let memory = task.policy.memory_bytes;
        match self.sandbox.run(task, ctx.cancel.clone()).await {
            Ok(out) => self.output(out, timeout, memory),
            Err(e @ DockerError::Unreachable { .. }) => match self.config.fallback {
                Fallback::Subprocess => {
                    tracing::warn!(error = %e, "Docker unreachable; running as a subprocess");
                    fallback().await
                }
                Fallback::None => Err(ToolError::Failed(e.to_string())),
            },
            Err(e @ DockerError::InvalidTask(_)) => Err(ToolError::Denied(e.to_string())),
            Err(e) => Err(ToolError::Failed(e.to_string())),
        }
    }

    fn output(
        &self,
        out: ContainerOutput,
        timeout: std::time::Duration,
        memory: u64,
    ) -> Result<ToolOutput, ToolError> {
        if out.run.cancelled {
            return Err(ToolError::Cancelled);
        }
        if out.run.timed_out {
            return Err(ToolError::Timeout(timeout));
        }
        let mut content = render(&out.run, self.config.output_limit);
        if out.oom_killed {
            content.push_str(&format!(
                "\nkilled: out of memory (the container's limit is {} MiB)",
                memory >> 20
            ));
        }
        Ok(ToolOutput {
            content,
            exit_code: out.run.exit_code,
            outcome: if out.run.exit_code == Some(0) && !out.oom_killed {
                ToolOutcome::Ok
            } else {
                ToolOutcome::Error
            },
            images: Vec::new(),
        })
    }

    /// `setrlimit` limits approximating the container's, for the subprocess fallback.
    pub fn fallback_limits(&self) -> ResourceLimits {
        let p = self.config.policy();
        ResourceLimits {
            cpu_secs: Some(self.config.timeout(None).as_secs()),
            address_space_bytes: (p.memory_bytes > 0).then_some(p.memory_bytes),
            file_size_bytes: Some(p.tmpfs_bytes.max(1 << 20)),
            max_processes: (p.pids_limit > 0).then_some(p.pids_limit),
        }
    }
}

/// The container path of `host`, a path inside the canonical `root`.
pub fn container_path(root: &Path, host: &Path) -> String {
    match host.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => WORKSPACE_DIR.to_owned(),
        Ok(rel) => format!("{WORKSPACE_DIR}/{}", rel.to_string_lossy()),
        Err(_) => WORKSPACE_DIR.to_owned(),
    }
}

/// The `container.run` tool.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    runner: Arc<DockerRunner>,
    env: Vec<(String, String)>,
}

impl ContainerRun {
    /// `env` is the environment of the subprocess fallback (the container
    /// gets only `PATH`, `HOME`, `LANG` and the token file's path).
    pub fn new(runner: Arc<DockerRunner>, env: Vec<(String, String)>) -> Self {
        Self { runner, env }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    argv: Vec<String>,
    cwd: Option<String>,
}

#[async_trait]
impl Tool for ContainerRun {
    fn definition(&self) -> ToolDefinition {
        let c = self.runner.config();
        ToolDefinition {
            name: "container.run".to_owned(),
            description: format!(
                "Run a command in a fresh, isolated container (image {image}, {net}, \
                 {mem} MiB memory, {cpus} CPUs, at most {pids} processes, {timeout} s). The \
                 root filesystem is read-only; the workspace is mounted read-only at \
                 {WORKSPACE_DIR}; /tmp is writable scratch space that is discarded. `argv` is \
                 executed as is, without a shell (use [\"sh\", \"-c\", \"...\"] for shell \
                 syntax). Returns stdout, stderr and the exit code (output capped at \
                 {limit} characters).",
                image = c.image,
                net = if c.network {
                    "with network"
                } else {
                    "no network"
                },
                mem = c.memory_mb,
                cpus = c.cpus,
                pids = c.pids_limit,
                timeout = c.timeout_secs,
                limit = c.output_limit,
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "argv": {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "description": "Program and arguments, e.g. [\"ls\", \"-la\"]."
                    },
                    "cwd": {"type": "string", "minLength": 1, "description": "Working directory relative to the workspace (default: the workspace)."}
                },
                "required": ["argv"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(
        &self,
        args: serde_json::Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let args: RunArgs = crate::parse_args("container.run", args)?;
        if args.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(ToolError::InvalidArguments {
                tool: "container.run".to_owned(),
                reason: "argv must start with a program".to_owned(),
            });
        }
        let cwd = confine(&ctx.workspace, args.cwd.as_deref().unwrap_or("."))?;
        if !cwd.path.is_dir() {
            return Err(ToolError::Failed(format!(
                "cwd {} is not an existing directory",
                cwd.display()
            )));
        }
        let workdir = container_path(&cwd.root, &cwd.path);
        let task = self
            .runner
            .task(args.argv.clone(), &cwd.root, workdir.clone());
        tracing::debug!(argv = ?args.argv, %workdir, "container.run");
        self.runner
            .run(task, ctx, || {
                fallback_subprocess(&self.runner, args.argv, cwd.root, cwd.path, &self.env, ctx)
            })
            .await
    }
}

/// Runs `argv` as a plain subprocess (rlimits only): the operator's fallback.
pub async fn fallback_subprocess(
    runner: &DockerRunner,
    argv: Vec<String>,
    root: PathBuf,
    cwd: PathBuf,
    env: &[(String, String)],
    ctx: &ToolContext,
) -> Result<ToolOutput, ToolError> {
    let Some((program, rest)) = argv.split_first() else {
        return Err(ToolError::Denied("empty command".to_owned()));
    };
    let program = if program.contains('/') {
        PathBuf::from(program)
    } else {
        let path_var = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        resolve_program(program, path_var, &root)?
    };
    let mut spec = CommandSpec::new(program, cwd);
    spec.args = rest.to_vec();
    spec.env = env.to_vec();
    spec.timeout = runner.config().timeout(None);
    spec.output_limit = runner.config().output_limit.saturating_mul(4);
    spec.limits = runner.fallback_limits();
    run_to_output(spec, ctx, runner.config().output_limit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_map_into_the_workspace_mount() {
        let root = Path::new("/w");
        assert_eq!(container_path(root, Path::new("/w")), "/workspace");
        assert_eq!(container_path(root, Path::new("/w/a/b")), "/workspace/a/b");
    }
}
