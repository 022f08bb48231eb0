//! Shared helpers for the tools integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use openpista_tools::files::FileLimits;
use openpista_tools::policy::{CommandPolicy, PolicyMode};
use openpista_tools::{ToolContext, ToolRegistry, builtin_registry};
use tokio_util::sync::CancellationToken;

pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub fn env_for(dir: &Path) -> Vec<(String, String)> {
    openpista_sandbox::minimal_env(PATH, dir)
}

pub fn ctx(workspace: &Path) -> ToolContext {
    ToolContext {
        workspace: workspace.to_path_buf(),
        cancel: CancellationToken::new(),
        session_id: None,
        approved: false,
    }
}

pub fn registry(policy: CommandPolicy, workspace: &Path) -> ToolRegistry {
    builtin_registry(policy, FileLimits::default(), env_for(workspace)).unwrap()
}

pub fn full_mode() -> CommandPolicy {
    CommandPolicy {
        mode: PolicyMode::Full,
        ..CommandPolicy::default()
    }
}

/// JSON arguments for `system.run`.
pub fn run_args(command: &str) -> String {
    serde_json::json!({ "command": command }).to_string()
}

/// Whether `pid` is a live process. A zombie that nobody reaped yet (pid 1
/// in a container may never reap) answers `kill(pid, 0)` but counts as gone.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

pub async fn wait_gone(pid: i32) -> bool {
    for _ in 0..50 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
