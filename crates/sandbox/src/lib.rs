//! Runs subprocesses under limits: a cleared environment, resource limits,
//! a deadline, a cancellation token and bounded output capture.
//!
//! This crate knows nothing of agents, tools or policies. It is given a fully
//! decided [`CommandSpec`] (which program, which arguments, which environment)
//! and guarantees how the run is contained:
//!
//! - the child's environment is **cleared**; only [`CommandSpec::env`] is set,
//!   so secrets of the parent never reach it;
//! - the child leads its own process group; at the deadline, on cancel, and
//!   when the run ends for any reason (including the [`run`] future being
//!   dropped), the **whole group** is killed, so a backgrounded grandchild
//!   (`sleep 100 &`) does not outlive the run;
//! - [`ResourceLimits`] are applied with `setrlimit` between `fork` and `exec`;
//! - stdout and stderr are read incrementally into buffers of at most
//!   [`CommandSpec::output_limit`] bytes each; the rest is read and discarded
//!   so the child never blocks on a full pipe;
//! - a grandchild that keeps a pipe open after the main child exited does not
//!   make the run hang: after a short grace the group is killed and reading
//!   stops.
//!
//! Known limit: a process that leaves the group (`setsid`) escapes the group
//! kill; callers that must contain hostile code need a container (not this
//! crate's job yet).
//!
//! [`docker`] runs a task in an ephemeral, locked-down container through the
//! Docker Engine API (bollard).
//!
//! [`wasm`] runs WASI preview 1 modules under wasmtime: a shared engine,
//! cached compiled modules, the workspace preopened read-only, memory, time
//! and output caps.

pub mod docker;
pub mod wasm;

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long to keep reading after the main child exited while a grandchild
/// still holds a pipe open, before the group is killed.
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// How long to keep reading after the group was killed (pipes of processes
/// outside the group may stay open; those are abandoned).
const AFTER_KILL_GRACE: Duration = Duration::from_millis(200);

/// Read buffer size for the output pipes.
const READ_CHUNK: usize = 8192;

/// `setrlimit` limits applied to the child (and inherited by its children).
///
/// `None` leaves the inherited limit. A requested limit above the current hard
/// limit is lowered to it. Soft and hard limits are both set, so the child
/// cannot raise them again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_CPU`: CPU seconds; the child gets `SIGXCPU`/`SIGKILL` past it.
    pub cpu_secs: Option<u64>,
    /// `RLIMIT_AS`: bytes of virtual address space.
    pub address_space_bytes: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file the child may write; it gets `SIGXFSZ` past it.
    pub file_size_bytes: Option<u64>,
    /// `RLIMIT_NPROC`: processes of the child's real user id (all of them, not
    /// only the child's). Not enforced for root.
    pub max_processes: Option<u64>,
}

/// Everything needed to run one subprocess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// The program. A bare name is looked up in the `PATH` of [`Self::env`]
    /// (or the system default path when `env` has none); prefer an absolute
    /// path decided by the caller.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Working directory of the child.
    pub cwd: PathBuf,
    /// The child's whole environment: the parent's is cleared first.
    pub env: Vec<(String, String)>,
    /// Bytes written to the child's stdin, which is then closed. `None`
    /// connects stdin to `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// Deadline, counted from spawn.
    pub timeout: Duration,
    /// Bytes kept **per stream** (stdout and stderr separately). Decoded as
    /// UTF-8 (lossily), each stream therefore has at most this many
    /// characters. Output past it is read and discarded.
    pub output_limit: usize,
    /// At the deadline or on cancel, the group first gets `SIGTERM` and this
    /// long to exit before `SIGKILL`. Zero sends `SIGKILL` at once.
    pub term_grace: Duration,
    pub limits: ResourceLimits,
}

impl CommandSpec {
    /// A spec with no arguments, an empty environment, no stdin, a 30 s
    /// timeout, 64 KiB of output per stream, no `SIGTERM` grace and no limits.
    pub fn new(program: impl Into<PathBuf>, cwd: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            cwd: cwd.into(),
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(30),
            output_limit: 64 * 1024,
            term_grace: Duration::ZERO,
            limits: ResourceLimits::default(),
        }
    }
}

/// How a run ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// Captured stdout (lossy UTF-8), at most `output_limit` bytes of it.
    pub stdout: String,
    /// Captured stderr (lossy UTF-8), at most `output_limit` bytes of it.
    pub stderr: String,
    /// Exit code, when the child exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended the child, when it was killed.
    pub signal: Option<i32>,
    /// The deadline passed and the group was killed.
    pub timed_out: bool,
    /// The cancellation token fired and the group was killed.
    pub cancelled: bool,
    /// Some output was discarded (see the `dropped_*` counts).
    pub truncated: bool,
    /// Characters of stdout read but not kept (UTF-8 lead bytes counted).
    pub dropped_stdout: u64,
    /// Characters of stderr read but not kept (UTF-8 lead bytes counted).
    pub dropped_stderr: u64,
    /// Wall time from spawn to the end of the run.
    pub duration: Duration,
}

impl RunOutput {
    /// Exited normally with code 0 (not timed out, not cancelled).
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.cancelled
    }
}

/// Why a subprocess could not be run.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec cannot be run as given (empty program, a NUL byte, a missing
    /// working directory). Retrying the same spec cannot help.
    #[error("invalid command: {0}")]
    InvalidSpec(String),
    /// The program could not be started (not found, not executable, out of
    /// processes). Retrying helps only for transient causes such as `EAGAIN`.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// Waiting for the child failed. The group has been killed. Not expected
    /// in practice; a retry may help.
    #[error("waiting for the child failed: {0}")]
    Wait(#[source] io::Error),
}

/// A minimal environment for children: `PATH`, `HOME` and `LANG=C.UTF-8`.
pub fn minimal_env(path: &str, home: &Path) -> Vec<(String, String)> {
    vec![
        ("PATH".to_owned(), path.to_owned()),
        ("HOME".to_owned(), home.to_string_lossy().into_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]
}

/// Runs `spec` to completion, until its deadline, or until `cancel` fires.
///
/// Returns `Ok` for every run that started, whatever its exit status; check
/// [`RunOutput::timed_out`], [`RunOutput::cancelled`] and the exit fields.
/// When this returns (or its future is dropped) every process still in the
/// child's process group has been sent `SIGKILL`.
pub async fn run(spec: CommandSpec, cancel: CancellationToken) -> Result<RunOutput, SandboxError> {
    validate(&spec)?;
    let mut cmd = build_command(&spec);
    let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn {
        program: spec.program.to_string_lossy().into_owned(),
        source,
    })?;
    let started = Instant::now();
    // The child leads its group, so its pid is the group id.
    let mut group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(GroupGuard::new);

    let stop_reading = CancellationToken::new();
    let mut tasks = Tasks {
        stdin: None,
        stdout: None,
        stderr: None,
        stdout_closed: CancellationToken::new(),
        stderr_closed: CancellationToken::new(),
    };
    if let (Some(data), Some(mut pipe)) = (spec.stdin.clone(), child.stdin.take()) {
        tasks.stdin = Some(tokio::spawn(async move {
            // EPIPE when the child does not read everything is expected.
            let _ = pipe.write_all(&data).await;
            let _ = pipe.shutdown().await;
        }));
    }
    let limit = spec.output_limit;
    tasks.stdout = match child.stdout.take() {
        Some(p) => Some(tokio::spawn(capture(
            p,
            limit,
            stop_reading.clone(),
            tasks.stdout_closed.clone(),
        ))),
        None => {
            tasks.stdout_closed.cancel();
            None
        }
    };
    tasks.stderr = match child.stderr.take() {
        Some(p) => Some(tokio::spawn(capture(
            p,
            limit,
            stop_reading.clone(),
            tasks.stderr_closed.clone(),
        ))),
        None => {
            tasks.stderr_closed.cancel();
            None
        }
    };

    let deadline = tokio::time::Instant::from_std(started + spec.timeout);
    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status),
        () = tokio::time::sleep_until(deadline) => Ended::TimedOut,
        () = cancel.cancelled() => Ended::Cancelled,
    };
    let (status, timed_out, cancelled) = match ended {
        Ended::Exited(status) => (status, false, false),
        Ended::TimedOut | Ended::Cancelled => {
            let timed_out = matches!(ended, Ended::TimedOut);
            tracing::debug!(
                program = %spec.program.display(),
                timed_out,
                "stopping the process group"
            );
            if let Some(g) = group.as_mut() {
                stop_group(g, &mut child, spec.term_grace).await;
            }
            (child.wait().await, timed_out, !timed_out)
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            if let Some(g) = group.as_mut() {
                g.kill();
            }
            return Err(SandboxError::Wait(e));
        }
    };

    // The main child is gone; give stragglers holding the pipes a moment,
    // then kill the group and stop reading.
    if !timed_out && !cancelled {
        let _ = tokio::time::timeout(DRAIN_GRACE, tasks.outputs_closed()).await;
    }
    if let Some(g) = group.as_mut() {
        g.kill();
    }
    let _ = tokio::time::timeout(AFTER_KILL_GRACE, tasks.outputs_closed()).await;
    stop_reading.cancel();
    let (out, err) = tasks.finish().await;

    Ok(RunOutput {
        truncated: out.dropped > 0 || err.dropped > 0,
        stdout: out.text,
        stderr: err.text,
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        cancelled,
        dropped_stdout: out.dropped,
        dropped_stderr: err.dropped,
        duration: started.elapsed(),
    })
}

enum Ended {
    Exited(io::Result<std::process::ExitStatus>),
    TimedOut,
    Cancelled,
}

fn validate(spec: &CommandSpec) -> Result<(), SandboxError> {
    let program = spec.program.as_os_str().as_encoded_bytes();
    if program.is_empty() {
        return Err(SandboxError::InvalidSpec("empty program".to_owned()));
    }
    let has_nul = program.contains(&0)
        || spec.args.iter().any(|a| a.contains('\0'))
        || spec
            .env
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0') || k.contains('=') || k.is_empty());
    if has_nul {
        return Err(SandboxError::InvalidSpec(
            "a NUL byte in the program, an argument or the environment, or an invalid variable name"
                .to_owned(),
        ));
    }
    if !spec.cwd.is_dir() {
        return Err(SandboxError::InvalidSpec(format!(
            "working directory {} is not a directory",
            spec.cwd.display()
        )));
    }
    Ok(())
}

fn build_command(spec: &CommandSpec) -> Command {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let limits = spec.limits;
    // SAFETY: the closure runs between fork and exec; it only calls
    // getrlimit/setrlimit (async-signal-safe syscalls) on stack values and
    // builds an `io::Error` from an errno, which does not allocate.
    unsafe {
        cmd.pre_exec(move || apply_limits(&limits));
    }
    cmd
}

/// Applies `limits` to the calling process. Async-signal-safe: no allocation.
fn apply_limits(limits: &ResourceLimits) -> io::Result<()> {
    let pairs = [
        (libc::RLIMIT_CPU, limits.cpu_secs),
        (libc::RLIMIT_AS, limits.address_space_bytes),
        (libc::RLIMIT_FSIZE, limits.file_size_bytes),
        (libc::RLIMIT_NPROC, limits.max_processes),
    ];
    for (resource, value) in pairs {
        let Some(value) = value else { continue };
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `current` is a valid, writable rlimit.
        if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let wanted = libc::rlim_t::try_from(value).unwrap_or(libc::RLIM_INFINITY);
        let value = if current.rlim_max == libc::RLIM_INFINITY {
            wanted
        } else {
            wanted.min(current.rlim_max)
        };
        let new = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `new` is a valid rlimit.
        if unsafe { libc::setrlimit(resource, &new) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends `SIGTERM` to the group, waits up to `grace` for the main child,
/// then `SIGKILL`s the group.
async fn stop_group(group: &mut GroupGuard, child: &mut tokio::process::Child, grace: Duration) {
    if !grace.is_zero() {
        group.signal(Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            group.kill();
            return;
        }
    }
    group.kill();
}

/// Kills the child's process group when dropped (and on demand).
///
/// The group id stays reserved by the kernel while any member lives, so the
/// kill cannot hit an unrelated group unless the whole group is already gone
/// and the number was reused in between, a window of microseconds.
struct GroupGuard {
    pgid: i32,
}

impl GroupGuard {
    fn new(pgid: i32) -> Self {
        Self { pgid }
    }

    fn signal(&self, signal: Signal) {
        if self.pgid <= 1 {
            return;
        }
        match killpg(Pid::from_raw(self.pgid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = self.pgid, %e, "cannot signal process group"),
        }
    }

    fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Output of one stream.
#[derive(Debug, Default)]
struct Captured {
    text: String,
    dropped: u64,
}

/// The helper tasks of one run; aborted when dropped.
struct Tasks {
    stdin: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<Captured>>,
    stderr: Option<JoinHandle<Captured>>,
    /// Cancelled by the stdout reader when it finishes.
    stdout_closed: CancellationToken,
    /// Cancelled by the stderr reader when it finishes.
    stderr_closed: CancellationToken,
}

impl Tasks {
    /// Resolves when both output readers have finished (EOF or stopped).
    async fn outputs_closed(&self) {
        self.stdout_closed.cancelled().await;
        self.stderr_closed.cancelled().await;
    }

    async fn finish(&mut self) -> (Captured, Captured) {
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
        let out = match self.stdout.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => Captured::default(),
        };
        let err = match self.stderr.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => Captured::default(),
        };
        (out, err)
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        if let Some(h) = &self.stdin {
            h.abort();
        }
        if let Some(h) = &self.stdout {
            h.abort();
        }
        if let Some(h) = &self.stderr {
            h.abort();
        }
    }
}

/// Reads `pipe` to EOF (or until `stop`), keeping at most `limit` bytes;
/// cancels `closed` when done.
async fn capture<R: AsyncRead + Unpin>(
    mut pipe: R,
    limit: usize,
    stop: CancellationToken,
    closed: CancellationToken,
) -> Captured {
    let _closed = closed.drop_guard();
    let mut kept: Vec<u8> = Vec::with_capacity(limit.min(READ_CHUNK));
    let mut dropped = 0u64;
    let mut buf = [0u8; READ_CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = pipe.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            },
        };
        let chunk = &buf[..n];
        let room = limit.saturating_sub(kept.len());
        let (keep, rest) = chunk.split_at(room.min(n));
        kept.extend_from_slice(keep);
        dropped += count_chars(rest);
    }
    if dropped > 0 {
        // The cut may have split a character: drop its incomplete start.
        trim_incomplete_tail(&mut kept, &mut dropped);
    }
    Captured {
        text: String::from_utf8_lossy(&kept).into_owned(),
        dropped,
    }
}

/// Characters in `bytes`, counting every byte that is not a UTF-8
/// continuation byte (exact for valid UTF-8).
pub(crate) fn count_chars(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count() as u64
}

/// Removes a trailing, incomplete UTF-8 sequence (cut by the limit).
pub(crate) fn trim_incomplete_tail(kept: &mut Vec<u8>, dropped: &mut u64) {
    if let Err(e) = std::str::from_utf8(kept)
        && e.error_len().is_none()
    {
        let valid = e.valid_up_to();
        kept.truncate(valid);
        *dropped += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_env_has_only_three_keys() {
        let env = minimal_env("/usr/bin:/bin", Path::new("/home/x"));
        let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["PATH", "HOME", "LANG"]);
        assert_eq!(env[1].1, "/home/x");
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert_eq!(count_chars("héllo".as_bytes()), 5);
        assert_eq!(count_chars(b""), 0);
    }

    #[test]
    fn trims_a_split_character() {
        let mut kept = "aé".as_bytes()[..2].to_vec();
        let mut dropped = 0;
        trim_incomplete_tail(&mut kept, &mut dropped);
        assert_eq!(kept, b"a");
        assert_eq!(dropped, 1);
        let mut whole = b"ab".to_vec();
        trim_incomplete_tail(&mut whole, &mut dropped);
        assert_eq!(whole, b"ab");
        assert_eq!(dropped, 1);
    }

    #[tokio::test]
    async fn capture_keeps_the_limit_and_counts_the_rest() {
        let data: &[u8] = b"0123456789";
        let closed = CancellationToken::new();
        let out = capture(data, 4, CancellationToken::new(), closed.clone()).await;
        assert!(closed.is_cancelled());
        assert_eq!(out.text, "0123");
        assert_eq!(out.dropped, 6);
    }

    #[test]
    fn empty_program_is_invalid() {
        let spec = CommandSpec::new("", "/");
        assert!(matches!(validate(&spec), Err(SandboxError::InvalidSpec(_))));
        let mut spec = CommandSpec::new("ls", "/");
        spec.args.push("a\0b".to_owned());
        assert!(matches!(validate(&spec), Err(SandboxError::InvalidSpec(_))));
        let spec = CommandSpec::new("ls", "/definitely/not/here");
        assert!(matches!(validate(&spec), Err(SandboxError::InvalidSpec(_))));
    }
}
