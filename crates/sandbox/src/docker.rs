//! Docker mode: one ephemeral container per task, driven through the Docker
//! Engine API with `bollard` (never the docker CLI).
//!
//! [`DockerSandbox::run`] goes create -> start -> stream output -> wait ->
//! inspect (for `OOMKilled`) -> remove. The container is removed on every
//! path: normal exit, timeout, cancel, error, and when the future is dropped
//! (a guard spawns the removal). Before start, a fresh per-task token is
//! written into a private temporary folder (mode `0400` file in a `0700`
//! folder) and bind-mounted read-only at [`TASK_TOKEN_PATH`]; it is never put
//! in the environment, the arguments or the logs. (The root filesystem is
//! read-only, and Docker refuses archive uploads into such a container, hence
//! the bind mount.)
//!
//! Every container gets, from the operator's [`DockerPolicy`] and never from
//! model arguments: a memory cap (swap disabled; an OOM kill is reported in
//! [`ContainerOutput::oom_killed`]), a CPU quota, a pids limit, no network
//! unless allowed, a read-only root filesystem, `cap_drop ALL`,
//! `no-new-privileges`, a `tmpfs` at `/tmp`, the workspace bind-mounted
//! read-only at [`WORKSPACE_DIR`], the host user's uid:gid, and the image the
//! operator (or the skill's `SKILL.md`) names. Containers carry the labels
//! [`LABEL_MANAGED`] and [`LABEL_TASK`] plus any the caller adds.
//!
//! This module only runs what it is given; deciding the argv, the image and
//! the policy is the caller's job.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions, WaitContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::{RunOutput, count_chars, trim_incomplete_tail};

/// Where the per-task token file appears inside the container.
pub const TASK_TOKEN_PATH: &str = "/run/secrets/task_token";
/// Where the workspace is mounted (read-only) inside the container.
pub const WORKSPACE_DIR: &str = "/workspace";
/// Label put on every container this module creates.
pub const LABEL_MANAGED: &str = "openpista.managed";
/// Label holding the task id (not the token) of a container.
pub const LABEL_TASK: &str = "openpista.task";
/// The socket used when the configuration names none.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// `PATH` inside containers.
pub const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// API version spoken to the daemon: 1.41 (Docker 20.10) has everything used
/// here and newer daemons still accept it, so no negotiation round trip.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// Seconds bollard waits on one request before giving up.
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// How long to keep reading output after the container exited.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What to do when the daemon cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Fail with an error naming the socket.
    #[default]
    None,
    /// Run the task as a plain subprocess (rlimits only) instead.
    Subprocess,
}

/// The operator's `[sandbox.docker]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Registers `container.run` and lets `system.run`/docker skills use Docker.
    pub enabled: bool,
    /// The daemon: `unix:///path/to/docker.sock` (or `http://127.0.0.1:2375`).
    pub host: String,
    /// Image for `container.run` and `system.run`, and for skills naming none.
    pub image: String,
    /// Memory cap in MiB (swap disabled).
    pub memory_mb: u64,
    /// CPU quota in CPUs (0.5 = half a core).
    pub cpus: f64,
    /// Largest number of processes in the container.
    pub pids_limit: u64,
    /// Gives containers the default bridge network. Off: no network at all.
    pub network: bool,
    /// Size of the `tmpfs` at `/tmp`, in MiB.
    pub tmpfs_mb: u64,
    /// Default timeout per container, in seconds.
    pub timeout_secs: u64,
    /// Largest timeout a call may ask for, in seconds.
    pub max_timeout_secs: u64,
    /// Characters of output returned to the model.
    pub output_limit: usize,
    /// `"none"` (an error when the daemon is down) or `"subprocess"`.
    pub fallback: Fallback,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: DEFAULT_HOST.to_owned(),
            image: "openpista-sandbox:latest".to_owned(),
            memory_mb: 256,
            cpus: 1.0,
            pids_limit: 64,
            network: false,
            tmpfs_mb: 64,
            timeout_secs: 30,
            max_timeout_secs: 300,
            output_limit: 10_000,
            fallback: Fallback::None,
        }
    }
}

impl DockerConfig {
    /// The limits of one container with this configuration's image.
    pub fn policy(&self) -> DockerPolicy {
        DockerPolicy {
            image: self.image.clone(),
            memory_bytes: self.memory_mb.saturating_mul(1 << 20),
            nano_cpus: (self.cpus.max(0.0) * 1e9) as u64,
            pids_limit: self.pids_limit,
            network: self.network,
            tmpfs_bytes: self.tmpfs_mb.saturating_mul(1 << 20),
        }
    }

    /// `requested` seconds (or the default), between 1 and the maximum.
    pub fn timeout(&self, requested: Option<u64>) -> Duration {
        let max = self.max_timeout_secs.max(1);
        Duration::from_secs(requested.unwrap_or(self.timeout_secs).clamp(1, max))
    }
}

/// The limits one container runs under. Decided by the operator (and
/// `SKILL.md`), never by model arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerPolicy {
    pub image: String,
    /// Memory cap; swap is set to the same value (no swap). 0: no cap.
    pub memory_bytes: u64,
    /// CPU quota in billionths of a CPU. 0: no quota.
    pub nano_cpus: u64,
    /// Largest number of processes. 0: no limit.
    pub pids_limit: u64,
    /// `false`: network mode `none` (only a loopback interface).
    pub network: bool,
    /// Size of the `tmpfs` at `/tmp`.
    pub tmpfs_bytes: u64,
}

/// One task to run in a fresh container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerTask {
    /// The command, passed to the container as is (no shell is added).
    pub argv: Vec<String>,
    pub policy: DockerPolicy,
    /// Host folder mounted read-only at [`WORKSPACE_DIR`].
    pub workspace: PathBuf,
    /// More read-only bind mounts: (host path, container path).
    pub mounts: Vec<(PathBuf, String)>,
    /// Working directory inside the container.
    pub workdir: String,
    /// The container's environment (besides `PATH`, `HOME`, `LANG` and
    /// `OPENPISTA_TASK_TOKEN_FILE`, which are always set).
    pub env: Vec<(String, String)>,
    /// Bytes written to the container's stdin, which is then closed.
    pub stdin: Option<Vec<u8>>,
    /// Deadline, counted from start.
    pub timeout: Duration,
    /// Bytes kept per stream (stdout and stderr).
    pub output_limit: usize,
    /// Extra labels (e.g. `openpista.test=1`).
    pub labels: Vec<(String, String)>,
}

impl ContainerTask {
    /// A task running `argv` in `/workspace` with a 30 s timeout and 64 KiB per stream.
    pub fn new(argv: Vec<String>, policy: DockerPolicy, workspace: impl Into<PathBuf>) -> Self {
        Self {
            argv,
            policy,
            workspace: workspace.into(),
            mounts: Vec::new(),
            workdir: WORKSPACE_DIR.to_owned(),
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(30),
            output_limit: 64 * 1024,
            labels: Vec::new(),
        }
    }
}

/// How a container run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerOutput {
    /// Output and exit status, as for a subprocess (`signal` is `None`;
    /// a killed container reports code 128 + signal).
    pub run: RunOutput,
    /// The kernel's OOM killer ended a process of the container.
    pub oom_killed: bool,
    /// The task id (the value of the [`LABEL_TASK`] label).
    pub task_id: String,
}

/// Why a container could not be run.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The daemon did not answer (not running, wrong socket, no permission).
    /// A retry helps once dockerd runs.
    #[error(
        "cannot reach the Docker daemon at {host}: {reason}. Start dockerd (or fix \
         [sandbox.docker] host), or set [sandbox.docker] fallback = \"subprocess\""
    )]
    Unreachable { host: String, reason: String },
    /// The image is not present (nothing is pulled). Retrying cannot help until
    /// the operator builds or loads it.
    #[error("image {image} is not present on the Docker daemon; build or load it first")]
    ImageMissing { image: String },
    /// The task cannot be run as given (empty argv, NUL byte, missing
    /// workspace). Retrying the same task cannot help.
    #[error("invalid container task: {0}")]
    InvalidTask(String),
    /// The secret file could not be prepared on the host.
    #[error("cannot prepare the task token: {0}")]
    Secret(#[source] std::io::Error),
    /// The daemon refused or failed a request. The container (if any) was removed.
    #[error("docker: {0}")]
    Api(String),
}

/// A client for one Docker daemon. The daemon is contacted per request, so
/// one that starts later (or restarts) is picked up.
#[derive(Debug, Clone)]
pub struct DockerSandbox {
    host: String,
}

impl DockerSandbox {
    /// A client for `host` (`unix:///...sock`, a bare socket path, or
    /// `http://host:port`). Does not contact the daemon yet.
    pub fn connect(host: &str) -> Result<Self, DockerError> {
        if host.trim().is_empty() {
            return Err(DockerError::InvalidTask(
                "no Docker host configured".to_owned(),
            ));
        }
        Ok(Self {
            host: host.to_owned(),
        })
    }

    /// A bollard client for the daemon (for listing and housekeeping).
    pub fn client(&self) -> Result<Docker, DockerError> {
        let host = self.host.as_str();
        if host.starts_with("http://") || host.starts_with("tcp://") {
            Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, &API_VERSION)
        } else {
            let path = host.strip_prefix("unix://").unwrap_or(host);
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, &API_VERSION)
        }
        .map_err(|e| self.unreachable(&e))
    }

    /// The daemon address this client uses.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Checks that the daemon answers.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.client()?
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| self.unreachable(&e))
    }

    /// Ids of containers (running or not) that carry `label` (`key` or `key=value`).
    pub async fn containers_with_label(&self, label: &str) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
        let list = self
            .client()?
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| self.classify(e, ""))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Runs `task` in a fresh container until it exits, its deadline passes or
    /// `cancel` fires; the container is removed before this returns (or, if
    /// the future is dropped, right after).
    pub async fn run(
        &self,
        task: ContainerTask,
        cancel: CancellationToken,
    ) -> Result<ContainerOutput, DockerError> {
        validate(&task)?;
        let task_id = new_id();
        let token = new_id();
        let secret = write_secret(&token).map_err(DockerError::Secret)?;
        let body = container_body(&task, &task_id, &secret.file);
        let docker = self.client()?;

        let created = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(format!("openpista-{task_id}")),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| self.classify(e, &task.policy.image))?;
        let mut guard = RemoveGuard {
            docker: Some(docker.clone()),
            id: created.id.clone(),
        };
        let result = drive(&docker, &task, &created.id, &cancel, task_id).await;
        guard.remove().await;
        drop(secret);
        result
    }
}

async fn drive(
    docker: &Docker,
    task: &ContainerTask,
    id: &str,
    cancel: &CancellationToken,
    task_id: String,
) -> Result<ContainerOutput, DockerError> {
    let api = |e: BollardError| DockerError::Api(e.to_string());
    let attached = docker
        .attach_container(
            id,
            Some(AttachContainerOptions {
                stdin: task.stdin.is_some(),
                stdout: true,
                stderr: true,
                stream: true,
                logs: true,
                detach_keys: None,
            }),
        )
        .await
        .map_err(api)?;
    docker
        .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
        .await
        .map_err(api)?;
    let started = Instant::now();

    let mut input = attached.input;
    let stdin_task = task.stdin.clone().map(|data| {
        tokio::spawn(async move {
            // The container may exit without reading everything.
            let _ = input.write_all(&data).await;
            let _ = input.shutdown().await;
        })
    });
    let limit = task.output_limit;
    let mut output = attached.output;
    let reader = tokio::spawn(async move {
        let mut out = Capped::new(limit);
        let mut err = Capped::new(limit);
        while let Some(item) = output.next().await {
            match item {
                Ok(bollard::container::LogOutput::StdOut { message })
                | Ok(bollard::container::LogOutput::Console { message }) => out.push(&message),
                Ok(bollard::container::LogOutput::StdErr { message }) => err.push(&message),
                Ok(bollard::container::LogOutput::StdIn { .. }) => {}
                Err(_) => break,
            }
        }
        (out, err)
    });
    let mut reader = AbortOnDrop(Some(reader));

    let mut wait = docker.wait_container(
        id,
        Some(WaitContainerOptions {
            condition: "not-running".to_owned(),
        }),
    );
    let deadline = tokio::time::Instant::from_std(started + task.timeout);
    let ended = tokio::select! {
        r = wait.next() => match r {
            Some(Ok(resp)) => Ended::Exited(resp.status_code),
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ended::Exited(code),
            Some(Err(e)) => return Err(api(e)),
            None => return Err(DockerError::Api("the wait stream ended early".to_owned())),
        },
        () = tokio::time::sleep_until(deadline) => Ended::TimedOut,
        () = cancel.cancelled() => Ended::Cancelled,
    };
    if let Some(h) = stdin_task {
        h.abort();
    }
    let (exit_code, timed_out, cancelled) = match ended {
        Ended::Exited(code) => (i32::try_from(code).ok(), false, false),
        Ended::TimedOut => {
            tracing::debug!(task = %task_id, "container timed out; removing it");
            (None, true, false)
        }
        Ended::Cancelled => (None, false, true),
    };
    let oom_killed = if exit_code.is_some() {
        docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    } else {
        false
    };
    let (out, err) = if exit_code.is_some() {
        match tokio::time::timeout(DRAIN_GRACE, reader.join()).await {
            Ok(Some(pair)) => pair,
            _ => (Capped::new(0), Capped::new(0)),
        }
    } else {
        // Killed: whatever was read so far is lost with the reader; the
        // caller reports the timeout or cancel.
        (Capped::new(0), Capped::new(0))
    };
    let (stdout, dropped_stdout) = out.finish();
    let (stderr, dropped_stderr) = err.finish();
    Ok(ContainerOutput {
        run: RunOutput {
            truncated: dropped_stdout > 0 || dropped_stderr > 0,
            stdout,
            stderr,
            exit_code,
            signal: None,
            timed_out,
            cancelled,
            dropped_stdout,
            dropped_stderr,
            duration: started.elapsed(),
        },
        oom_killed,
        task_id,
    })
}

impl DockerSandbox {
    fn unreachable(&self, e: &BollardError) -> DockerError {
        DockerError::Unreachable {
            host: self.host.clone(),
            reason: e.to_string(),
        }
    }

    /// Maps the error of a first request: the daemon's own answers are API
    /// errors (404 on create: the image is missing), anything else means it
    /// could not be reached.
    fn classify(&self, e: BollardError, image: &str) -> DockerError {
        match e {
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } if !image.is_empty() && message.contains("image") => DockerError::ImageMissing {
                image: image.to_owned(),
            },
            BollardError::DockerResponseServerError { .. }
            | BollardError::JsonDataError { .. }
            | BollardError::JsonSerdeError { .. } => DockerError::Api(e.to_string()),
            other => self.unreachable(&other),
        }
    }
}

enum Ended {
    Exited(i64),
    TimedOut,
    Cancelled,
}

fn validate(task: &ContainerTask) -> Result<(), DockerError> {
    if task.argv.first().is_none_or(|p| p.is_empty()) {
        return Err(DockerError::InvalidTask("empty command".to_owned()));
    }
    let has_nul = task.argv.iter().any(|a| a.contains('\0'))
        || task
            .env
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'));
    if has_nul {
        return Err(DockerError::InvalidTask(
            "a NUL byte in an argument or the environment, or an invalid variable name".to_owned(),
        ));
    }
    if task.policy.image.trim().is_empty() {
        return Err(DockerError::InvalidTask("no image configured".to_owned()));
    }
    for dir in std::iter::once(&task.workspace).chain(task.mounts.iter().map(|(p, _)| p)) {
        if !dir.is_absolute() || !dir.exists() {
            return Err(DockerError::InvalidTask(format!(
                "{} is not an existing absolute path",
                dir.display()
            )));
        }
    }
    if !task.workdir.starts_with('/') {
        return Err(DockerError::InvalidTask(format!(
            "working directory {:?} is not absolute",
            task.workdir
        )));
    }
    Ok(())
}

/// The create request: image, argv, environment and every limit.
fn container_body(task: &ContainerTask, task_id: &str, secret: &Path) -> ContainerCreateBody {
    let p = &task.policy;
    let mut env = vec![
        format!("PATH={CONTAINER_PATH}"),
        "HOME=/tmp".to_owned(),
        "LANG=C.UTF-8".to_owned(),
        format!("OPENPISTA_TASK_TOKEN_FILE={TASK_TOKEN_PATH}"),
    ];
    env.extend(task.env.iter().map(|(k, v)| format!("{k}={v}")));
    let mut labels: HashMap<String, String> = task.labels.iter().cloned().collect();
    labels.insert(LABEL_MANAGED.to_owned(), "1".to_owned());
    labels.insert(LABEL_TASK.to_owned(), task_id.to_owned());
    let bind = |source: &Path, target: &str| Mount {
        target: Some(target.to_owned()),
        source: Some(source.to_string_lossy().into_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(true),
        ..Default::default()
    };
    let mut mounts = vec![
        bind(&task.workspace, WORKSPACE_DIR),
        bind(secret, TASK_TOKEN_PATH),
    ];
    mounts.extend(task.mounts.iter().map(|(s, t)| bind(s, t)));
    let positive = |v: u64| (v > 0).then(|| i64::try_from(v).unwrap_or(i64::MAX));
    // SAFETY: getuid and getgid cannot fail and touch no memory of ours.
    let user = format!("{}:{}", unsafe { libc::getuid() }, unsafe {
        libc::getgid()
    });
    let stdin = task.stdin.is_some();
    ContainerCreateBody {
        image: Some(p.image.clone()),
        cmd: Some(task.argv.clone()),
        // The image's entrypoint would wrap the argv; the caller decides it.
        entrypoint: Some(Vec::new()),
        env: Some(env),
        working_dir: Some(task.workdir.clone()),
        user: Some(user),
        labels: Some(labels),
        attach_stdin: Some(stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(stdin),
        stdin_once: Some(stdin),
        tty: Some(false),
        network_disabled: Some(!p.network),
        host_config: Some(HostConfig {
            memory: positive(p.memory_bytes),
            memory_swap: positive(p.memory_bytes),
            nano_cpus: positive(p.nano_cpus),
            pids_limit: positive(p.pids_limit),
            network_mode: Some(if p.network { "bridge" } else { "none" }.to_owned()),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,nosuid,nodev,size={}", p.tmpfs_bytes.max(1 << 20)),
            )])),
            mounts: Some(mounts),
            auto_remove: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A random 128-bit id as 32 hex digits.
fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The host side of the secret mount: removed with the folder when dropped.
struct Secret {
    _dir: tempfile::TempDir,
    file: PathBuf,
}

fn write_secret(token: &str) -> std::io::Result<Secret> {
    let dir = tempfile::Builder::new()
        .prefix("openpista-task-")
        .tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    let file = dir.path().join("task_token");
    std::fs::write(&file, token)?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400))?;
    Ok(Secret { _dir: dir, file })
}

/// Force-removes the container: awaited on every normal path, spawned from
/// `Drop` when the run's future is dropped.
struct RemoveGuard {
    docker: Option<Docker>,
    id: String,
}

impl RemoveGuard {
    async fn remove(&mut self) {
        if let Some(docker) = self.docker.take() {
            remove(&docker, &self.id).await;
        }
    }
}

impl Drop for RemoveGuard {
    fn drop(&mut self) {
        let Some(docker) = self.docker.take() else {
            return;
        };
        let id = std::mem::take(&mut self.id);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { remove(&docker, &id).await });
            }
            Err(_) => tracing::warn!(container = %id, "no runtime to remove the container"),
        }
    }
}

async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    if let Err(e) = docker.remove_container(id, Some(options)).await {
        match e {
            BollardError::DockerResponseServerError {
                status_code: 404, ..
            } => {}
            e => tracing::warn!(container = %id, %e, "cannot remove the container"),
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    async fn join(&mut self) -> Option<T> {
        match self.0.as_mut() {
            Some(h) => {
                let r = h.await.ok();
                self.0 = None;
                r
            }
            None => None,
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// One output stream, keeping at most `limit` bytes.
struct Capped {
    kept: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl Capped {
    fn new(limit: usize) -> Self {
        Self {
            kept: Vec::new(),
            limit,
            dropped: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.kept.len());
        let (keep, rest) = chunk.split_at(room.min(chunk.len()));
        self.kept.extend_from_slice(keep);
        self.dropped += count_chars(rest);
    }

    fn finish(mut self) -> (String, u64) {
        if self.dropped > 0 {
            trim_incomplete_tail(&mut self.kept, &mut self.dropped);
        }
        (
            String::from_utf8_lossy(&self.kept).into_owned(),
            self.dropped,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> ContainerTask {
        ContainerTask::new(
            vec!["echo".to_owned(), "hi".to_owned()],
            DockerConfig::default().policy(),
            "/",
        )
    }

    #[test]
    fn the_create_body_carries_every_limit() {
        let body = container_body(&task(), "abc", Path::new("/tmp/x"));
        let hc = body.host_config.unwrap();
        assert_eq!(hc.memory, Some(256 << 20));
        assert_eq!(hc.memory_swap, Some(256 << 20));
        assert_eq!(hc.nano_cpus, Some(1_000_000_000));
        assert_eq!(hc.pids_limit, Some(64));
        assert_eq!(hc.network_mode.as_deref(), Some("none"));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        let mounts = hc.mounts.unwrap();
        assert!(mounts.iter().all(|m| m.read_only == Some(true)));
        assert_eq!(mounts[0].target.as_deref(), Some(WORKSPACE_DIR));
        assert_eq!(mounts[1].target.as_deref(), Some(TASK_TOKEN_PATH));
        let labels = body.labels.unwrap();
        assert_eq!(labels.get(LABEL_TASK).map(String::as_str), Some("abc"));
        assert!(body.env.unwrap().iter().all(|e| !e.contains("abc")));
    }

    #[test]
    fn bad_tasks_are_refused() {
        let mut t = task();
        t.argv.clear();
        assert!(matches!(validate(&t), Err(DockerError::InvalidTask(_))));
        let mut t = task();
        t.argv.push("a\0b".to_owned());
        assert!(matches!(validate(&t), Err(DockerError::InvalidTask(_))));
        let mut t = task();
        t.workspace = PathBuf::from("relative");
        assert!(matches!(validate(&t), Err(DockerError::InvalidTask(_))));
    }

    #[test]
    fn capped_keeps_the_limit() {
        let mut c = Capped::new(4);
        c.push(b"0123");
        c.push(b"456");
        assert_eq!(c.finish(), ("0123".to_owned(), 3));
    }

    #[test]
    fn ids_are_random_hex() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn timeouts_are_clamped() {
        let c = DockerConfig::default();
        assert_eq!(c.timeout(None), Duration::from_secs(30));
        assert_eq!(c.timeout(Some(0)), Duration::from_secs(1));
        assert_eq!(c.timeout(Some(10_000)), Duration::from_secs(300));
    }
}
