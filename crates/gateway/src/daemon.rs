//! The daemon: the QUIC server over a [`Gateway`] for as long as the process
//! lives, with a PID file, a state file for clients, and a graceful stop.
//!
//! [`run_daemon`] takes the PID file (refusing if a live daemon holds it,
//! recovering a stale one), binds the server, writes [`DaemonState`] (the
//! bound address and certificate fingerprint), starts the cron scheduler and
//! the Telegram and terminal adapters (when given; `/quit` on the terminal
//! stops the daemon; cron answers for `telegram:` targets go
//! out through its reply handle) and waits for its shutdown token. The
//! adapter stops polling at once; the scheduler stops first (its running
//! jobs share the drain deadline). Then it lets running turns finish for the drain deadline, cancels
//! the rest (their messages so far are stored), closes every connection with
//! `shutting_down`, and removes both files. Signals are the caller's (the
//! CLI maps SIGTERM and Ctrl-C to the token).
//!
//! The PID file is held with an advisory lock (`flock`) for the daemon's
//! life, so a daemon that died without cleaning up leaves a file nobody
//! holds: the next start takes it over.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openpista_channels::{ChannelAdapter as _, SecretString, StdioAdapter, TelegramAdapter};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    CronScheduler, Gateway, GatewayBridge, GatewayConfig, GatewayError, Outbox, QuicServer,
    TlsIdentity,
};

/// How long cancelled turns get to store what they have, after the drain deadline.
const PERSIST_GRACE: Duration = Duration::from_secs(5);
/// How long connections get to close after the turns are done.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often the drain looks at the running turns.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Everything [`run_daemon`] needs.
pub struct DaemonOptions {
    /// The in-process gateway the server serves.
    pub gateway: Gateway,
    /// `[gateway]` settings (bind address, limits).
    pub config: GatewayConfig,
    /// The server certificate and key.
    pub identity: TlsIdentity,
    /// The shared secret; `None` only on a loopback address.
    pub token: Option<SecretString>,
    /// Holds the daemon's pid while it runs.
    pub pid_file: PathBuf,
    /// Holds [`DaemonState`] while it runs.
    pub state_file: PathBuf,
    /// How long running turns may finish after the shutdown token fires.
    pub drain_deadline: Duration,
    /// Cancel to stop the daemon.
    pub shutdown: CancellationToken,
    /// Run the [`crate::CronScheduler`] over the gateway's store.
    pub cron: bool,
    /// Run this Telegram adapter into the gateway.
    pub telegram: Option<TelegramAdapter>,
    /// Run this terminal adapter into the gateway (`start --stdin`); when
    /// it stops (`/quit` or the end of input, once the lines read are
    /// answered) the daemon stops too, as if `shutdown` fired.
    pub stdin: Option<StdioAdapter>,
}

impl std::fmt::Debug for DaemonOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonOptions")
            .field("config", &self.config)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("pid_file", &self.pid_file)
            .field("state_file", &self.state_file)
            .field("drain_deadline", &self.drain_deadline)
            .field("telegram", &self.telegram.is_some())
            .field("stdin", &self.stdin.is_some())
            .finish_non_exhaustive()
    }
}

/// What a running daemon publishes in its state file, for `status` and clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonState {
    /// The daemon's process id.
    pub pid: u32,
    /// The address actually bound.
    pub addr: SocketAddr,
    /// SHA-256 of the server certificate, for clients to pin.
    pub fingerprint: String,
    /// The server's version.
    pub version: String,
}

impl DaemonState {
    /// Reads a state file; `Ok(None)` if there is none.
    pub fn read(path: &Path) -> Result<Option<Self>, GatewayError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(GatewayError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| GatewayError::Config(format!("{}: {e}", path.display())))
    }

    fn write(&self, path: &Path) -> Result<(), GatewayError> {
        let io = |source| GatewayError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| GatewayError::Config(format!("{}: {e}", path.display())))?;
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, format!("{text}\n")).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// How the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonExit {
    /// Every running turn finished (or stored its partial answer) in time.
    pub drained: bool,
}

/// The pid of the live daemon holding `pid_file`, if any. A file nobody
/// holds (a daemon that died) is `None`.
pub fn running_pid(pid_file: &Path) -> Result<Option<u32>, GatewayError> {
    let file = match File::open(pid_file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(GatewayError::Io {
                path: pid_file.to_path_buf(),
                source,
            });
        }
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => Ok(Some(read_pid(pid_file).unwrap_or(0))),
        Err(TryLockError::Error(source)) => Err(GatewayError::Io {
            path: pid_file.to_path_buf(),
            source,
        }),
    }
}

/// Runs the daemon until `opts.shutdown` is cancelled, then stops it
/// gracefully. `on_ready` is called once the server listens and the state
/// file is written.
pub async fn run_daemon(
    opts: DaemonOptions,
    on_ready: impl FnOnce(&DaemonState),
) -> Result<DaemonExit, GatewayError> {
    let DaemonOptions {
        gateway,
        config,
        identity,
        token,
        pid_file,
        state_file,
        drain_deadline,
        shutdown,
        cron,
        telegram,
        stdin,
    } = opts;
    let pid = PidFile::acquire(&pid_file)?;
    let server = QuicServer::bind(gateway.clone(), &config, identity, token)?;
    let state = DaemonState {
        pid: std::process::id(),
        addr: server.local_addr(),
        fingerprint: server.fingerprint().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let _state_guard = RemoveOnDrop(state_file.clone());
    state.write(&state_file)?;
    let outbox = Outbox {
        telegram: telegram.as_ref().map(|t| t.replier()),
    };
    let telegram_task = telegram.map(|adapter| {
        let bridge = std::sync::Arc::new(GatewayBridge::new(gateway.clone()));
        let stop = shutdown.child_token();
        tokio::spawn(async move {
            if let Err(e) = adapter.run(bridge, stop).await {
                tracing::error!(error = %e, "the Telegram adapter stopped");
            }
        })
    });
    let stdin_task = stdin.map(|adapter| {
        let bridge = std::sync::Arc::new(GatewayBridge::new(gateway.clone()));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = adapter.run(bridge, stop.child_token()).await {
                tracing::error!(error = %e, "the terminal adapter stopped");
            }
            // `/quit` or the end of input stops the daemon.
            stop.cancel();
        })
    });
    let scheduler = cron.then(|| {
        CronScheduler::start_with(gateway.clone(), shutdown.child_token(), outbox.clone())
    });
    on_ready(&state);

    shutdown.cancelled().await;
    if let Some(scheduler) = &scheduler
        && !scheduler.stop(drain_deadline).await
    {
        tracing::warn!("some cron runs were still going at the drain deadline");
    }
    tracing::info!(
        running_turns = gateway.status().running_turns,
        "shutting down"
    );
    let deadline = Instant::now() + drain_deadline;
    while gateway.status().running_turns > 0 && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let drained = gateway.shutdown(PERSIST_GRACE).await;
    if let Some(task) = telegram_task
        && tokio::time::timeout(CLOSE_GRACE, task).await.is_err()
    {
        tracing::warn!("the Telegram adapter was still sending replies at shutdown");
    }
    if let Some(task) = stdin_task
        && tokio::time::timeout(CLOSE_GRACE, task).await.is_err()
    {
        tracing::warn!("the terminal adapter was still writing replies at shutdown");
    }
    if !drained {
        tracing::warn!("some turns did not finish storing in time");
    }
    server.shutdown(CLOSE_GRACE).await;
    drop(pid);
    Ok(DaemonExit { drained })
}

/// The locked PID file; removed (then unlocked) on drop.
#[derive(Debug)]
struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    fn acquire(path: &Path) -> Result<Self, GatewayError> {
        let io = |source| GatewayError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // A daemon exiting removes the file while holding the lock; if we
        // locked a file that was removed meanwhile, try again on the new one.
        for _ in 0..8 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(GatewayError::AlreadyRunning {
                        pid: read_pid(path).unwrap_or(0),
                        path: path.to_path_buf(),
                    });
                }
                Err(TryLockError::Error(source)) => return Err(io(source)),
            }
            if !same_file(&file, path) {
                continue;
            }
            if let Some(stale) = read_pid(path) {
                tracing::info!(stale, "taking over a stale PID file");
            }
            file.set_len(0).map_err(io)?;
            let mut writer = &file;
            writeln!(writer, "{}", std::process::id()).map_err(io)?;
            writer.flush().map_err(io)?;
            return Ok(Self {
                path: path.to_path_buf(),
                file,
            });
        }
        Err(GatewayError::Config(format!(
            "{}: the PID file keeps changing",
            path.display()
        )))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_is_exclusive_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/openpista.pid");
        let first = PidFile::acquire(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id()));
        assert_eq!(running_pid(&path).unwrap(), Some(std::process::id()));
        let err = PidFile::acquire(&path).unwrap_err();
        assert!(
            matches!(err, GatewayError::AlreadyRunning { pid, .. } if pid == std::process::id()),
            "{err}"
        );
        drop(first);
        assert!(!path.exists());
        assert_eq!(running_pid(&path).unwrap(), None);
    }

    #[test]
    fn a_stale_pid_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openpista.pid");
        std::fs::write(&path, "999999999\n").unwrap();
        assert_eq!(running_pid(&path).unwrap(), None);
        let pid = PidFile::acquire(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id()));
        drop(pid);
    }

    #[test]
    fn state_round_trips_and_absent_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        assert_eq!(DaemonState::read(&path).unwrap(), None);
        let state = DaemonState {
            pid: 7,
            addr: "127.0.0.1:4433".parse().unwrap(),
            fingerprint: "ab".into(),
            version: "0".into(),
        };
        state.write(&path).unwrap();
        assert_eq!(DaemonState::read(&path).unwrap(), Some(state));
    }
}
