//! The runner against real subprocesses (`sh` is used here to build the
//! awkward children; it is a test of the runner, not of any policy).

use std::path::Path;
use std::time::{Duration, Instant};

use openpista_sandbox::{CommandSpec, ResourceLimits, SandboxError, minimal_env, run};
use tokio_util::sync::CancellationToken;

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn sh(script: &str, dir: &Path) -> CommandSpec {
    let mut spec = CommandSpec::new("/bin/sh", dir);
    spec.args = vec!["-c".to_owned(), script.to_owned()];
    spec.env = minimal_env(PATH, dir);
    spec.timeout = Duration::from_secs(10);
    spec
}

/// Whether `pid` is a live (non-zombie) process. `kill(pid, 0)` alone also
/// succeeds for a zombie that nobody reaped yet (pid 1 in a container may
/// never reap), so a zombie is read from /proc and counted as gone.
fn alive(pid: i32) -> bool {
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

fn read_pid(path: &Path) -> i32 {
    let text = std::fs::read_to_string(path).unwrap();
    text.trim().parse().unwrap()
}

async fn wait_gone(pid: i32) -> bool {
    for _ in 0..50 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let mut spec = sh("sleep 100 & echo $! > pid; wait", dir.path());
    spec.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert!(out.timed_out, "{out:?}");
    assert!(!out.cancelled);
    assert_eq!(out.signal, Some(libc::SIGKILL));
    assert!(started.elapsed() < Duration::from_secs(30));
    let pid = read_pid(&pidfile);
    assert!(
        wait_gone(pid).await,
        "background sleep {pid} survived the run"
    );
}

#[tokio::test]
async fn sigterm_grace_lets_the_child_clean_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh(
        "trap 'echo bye; exit 3' TERM; while :; do sleep 0.05; done",
        dir.path(),
    );
    spec.timeout = Duration::from_millis(300);
    spec.term_grace = Duration::from_secs(2);
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert!(out.timed_out);
    assert_eq!(out.exit_code, Some(3), "{out:?}");
    assert_eq!(out.stdout, "bye\n");
}

#[tokio::test]
async fn cancel_stops_the_run_and_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let spec = sh("sleep 100 & echo $! > pid; wait", dir.path());
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let out = run(spec, cancel).await.unwrap();
    assert!(out.cancelled, "{out:?}");
    assert!(!out.timed_out);
    assert!(started.elapsed() < Duration::from_secs(30));
    let pid = read_pid(&dir.path().join("pid"));
    assert!(
        wait_gone(pid).await,
        "background sleep {pid} survived cancel"
    );
}

#[tokio::test]
async fn dropping_the_future_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let spec = sh("sleep 100 & echo $! > pid; wait", dir.path());
    let fut = run(spec, CancellationToken::new());
    let r = tokio::time::timeout(Duration::from_millis(500), fut).await;
    assert!(r.is_err(), "the run should still be going");
    let pid = read_pid(&dir.path().join("pid"));
    assert!(
        wait_gone(pid).await,
        "background sleep {pid} survived the drop"
    );
}

#[tokio::test]
async fn grandchild_holding_the_pipe_does_not_hang_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // The main shell exits at once; the backgrounded sleep inherits stdout.
    let spec = sh("sleep 100 & echo $! > pid; echo started", dir.path());
    let started = Instant::now();
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.exit_code, Some(0));
    assert!(!out.timed_out);
    assert_eq!(out.stdout, "started\n");
    let pid = read_pid(&dir.path().join("pid"));
    assert!(
        wait_gone(pid).await,
        "leftover sleep {pid} survived the run"
    );
}

#[tokio::test]
async fn leftover_background_process_is_killed_after_normal_exit() {
    let dir = tempfile::tempdir().unwrap();
    // The grandchild does not hold the pipes; the run still ends it.
    let spec = sh("sleep 100 >/dev/null 2>&1 & echo $! > pid", dir.path());
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    let pid = read_pid(&dir.path().join("pid"));
    assert!(
        wait_gone(pid).await,
        "leftover sleep {pid} survived the run"
    );
}

#[tokio::test]
async fn output_is_capped_per_stream_and_the_child_is_drained() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MB on stdout: far more than a pipe buffer, so a runner that stopped
    // reading would leave the child blocked until the timeout.
    let mut spec = sh(
        "head -c 1000000 /dev/zero | tr '\\0' a; echo oops >&2",
        dir.path(),
    );
    spec.output_limit = 100;
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert!(!out.timed_out);
    assert_eq!(out.exit_code, Some(0));
    assert!(out.truncated);
    assert_eq!(out.stdout, "a".repeat(100));
    assert_eq!(out.dropped_stdout, 1_000_000 - 100);
    assert_eq!(out.stderr, "oops\n");
    assert_eq!(out.dropped_stderr, 0);
}

#[tokio::test]
async fn small_output_is_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(sh("printf 'héllo'", dir.path()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.stdout, "héllo");
    assert!(!out.truncated);
    assert!(out.success());
}

#[tokio::test]
async fn exit_codes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    for code in [0, 1, 42] {
        let out = run(
            sh(&format!("exit {code}"), dir.path()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.exit_code, Some(code));
        assert_eq!(out.signal, None);
        assert_eq!(out.success(), code == 0);
    }
}

#[tokio::test]
async fn signals_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(sh("kill -TERM $$", dir.path()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.exit_code, None);
    assert_eq!(out.signal, Some(libc::SIGTERM));
    assert!(!out.success());
}

#[tokio::test]
async fn environment_is_cleared() {
    let dir = tempfile::tempdir().unwrap();
    // The test process has many variables (at least PATH, and cargo sets
    // CARGO_*); none of them may reach the child.
    assert!(std::env::vars().count() > 3);
    let mut spec = CommandSpec::new("/usr/bin/env", dir.path());
    spec.env = vec![
        ("ONLY_THIS".to_owned(), "1".to_owned()),
        ("PATH".to_owned(), PATH.to_owned()),
    ];
    let out = run(spec, CancellationToken::new()).await.unwrap();
    let mut keys: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ONLY_THIS", "PATH"], "{}", out.stdout);
}

#[tokio::test]
async fn stdin_is_fed_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh("cat; echo done", dir.path());
    spec.stdin = Some(b"from stdin\n".to_vec());
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert_eq!(out.stdout, "from stdin\ndone\n");
    // Without stdin, a reader sees EOF at once instead of hanging.
    let out = run(sh("cat; echo eof", dir.path()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.stdout, "eof\n");
}

#[tokio::test]
async fn file_size_limit_takes_effect() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh("head -c 100000 /dev/zero > big", dir.path());
    spec.limits = ResourceLimits {
        file_size_bytes: Some(1000),
        ..ResourceLimits::default()
    };
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert!(!out.success(), "{out:?}");
    let len = std::fs::metadata(dir.path().join("big")).unwrap().len();
    assert_eq!(len, 1000);

    // The same command without the limit writes everything.
    let out = run(
        sh("head -c 100000 /dev/zero > big2", dir.path()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(out.success());
    assert_eq!(
        std::fs::metadata(dir.path().join("big2")).unwrap().len(),
        100_000
    );
}

#[tokio::test]
async fn cpu_and_address_space_limits_are_visible_to_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh("ulimit -t; ulimit -v", dir.path());
    spec.limits = ResourceLimits {
        cpu_secs: Some(7),
        address_space_bytes: Some(512 * 1024 * 1024),
        ..ResourceLimits::default()
    };
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert_eq!(out.stdout, format!("7\n{}\n", 512 * 1024), "{out:?}");
}

#[tokio::test]
async fn missing_program_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = CommandSpec::new("/definitely/not/a/program", dir.path());
    let err = run(spec, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, SandboxError::Spawn { .. }), "{err}");
}

#[tokio::test]
async fn bare_names_use_the_given_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = CommandSpec::new("echo", dir.path());
    spec.args = vec!["hi".to_owned()];
    spec.env = minimal_env(PATH, dir.path());
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert_eq!(out.stdout, "hi\n");
    // With an empty PATH the name is not found.
    let mut spec = CommandSpec::new("echo", dir.path());
    spec.env = vec![("PATH".to_owned(), dir.path().display().to_string())];
    assert!(run(spec, CancellationToken::new()).await.is_err());
}

#[tokio::test]
async fn the_cpu_limit_stops_a_busy_loop() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh("while :; do :; done", dir.path());
    spec.timeout = Duration::from_secs(60);
    spec.limits = ResourceLimits {
        cpu_secs: Some(1),
        ..ResourceLimits::default()
    };
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert!(
        !out.timed_out,
        "stopped by the CPU limit, not the timeout: {out:?}"
    );
    assert!(
        matches!(out.signal, Some(libc::SIGXCPU | libc::SIGKILL)),
        "{out:?}"
    );
}

#[tokio::test]
async fn the_address_space_limit_makes_a_big_allocation_fail() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = CommandSpec::new("/usr/bin/python3", dir.path());
    assert!(
        spec.program.exists(),
        "this test needs python3: apt-get install python3 (scripts/test.sh does)"
    );
    spec.args = vec![
        "-c".into(),
        "b = bytearray(600 * 1024 * 1024); print('allocated')".into(),
    ];
    spec.env = minimal_env(PATH, dir.path());
    spec.timeout = Duration::from_secs(30);
    spec.limits = ResourceLimits {
        address_space_bytes: Some(256 * 1024 * 1024),
        ..ResourceLimits::default()
    };
    let out = run(spec, CancellationToken::new()).await.unwrap();
    assert!(!out.stdout.contains("allocated"), "{out:?}");
    assert!(out.stderr.contains("MemoryError"), "{out:?}");
    assert_eq!(out.exit_code, Some(1), "{out:?}");
}

/// `RLIMIT_NPROC` counts the processes of the child's real user and is not
/// enforced for root, so as root the child first drops to `nobody`
/// (`setpriv`, util-linux). The limit is set five above the processes that
/// user already has.
#[tokio::test]
async fn the_process_limit_stops_a_fork_loop() {
    let dir = tempfile::tempdir().unwrap();
    let python = "/usr/bin/python3";
    assert!(
        Path::new(python).exists(),
        "this test needs python3: apt-get install python3 (scripts/test.sh does)"
    );
    // Forks up to 20 children that sleep, and counts how many could be forked.
    let script = "import os, time\n\
                  n = 0\n\
                  for i in range(20):\n\
                  \x20   try:\n\
                  \x20       pid = os.fork()\n\
                  \x20   except OSError:\n\
                  \x20       break\n\
                  \x20   if pid == 0:\n\
                  \x20       time.sleep(5)\n\
                  \x20       os._exit(0)\n\
                  \x20   n += 1\n\
                  print('started=%d' % n)\n";
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let (mut spec, uid) = if root {
        let setpriv = Path::new("/usr/bin/setpriv");
        assert!(
            setpriv.exists(),
            "this test needs setpriv: apt-get install util-linux"
        );
        let mut spec = CommandSpec::new(setpriv, dir.path());
        spec.args = [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-c",
            script,
        ]
        .map(String::from)
        .to_vec();
        (spec, 65534)
    } else {
        let mut spec = CommandSpec::new(python, dir.path());
        spec.args = vec!["-c".into(), script.into()];
        // SAFETY: getuid has no preconditions.
        (spec, unsafe { libc::getuid() })
    };
    let existing = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::metadata(e.path())
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid)
                .unwrap_or(false)
        })
        .count() as u64;
    spec.env = minimal_env(PATH, dir.path());
    spec.timeout = Duration::from_secs(30);
    spec.limits = ResourceLimits {
        max_processes: Some(existing + 5),
        ..ResourceLimits::default()
    };
    let out = run(spec, CancellationToken::new()).await.unwrap();
    let started: u64 = out
        .stdout
        .trim()
        .strip_prefix("started=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {out:?}"));
    assert!(started < 5, "the limit stopped the forks: {out:?}");
}
