//! Session control through the real binary: `openpista start` as a daemon
//! (scripted model, real QUIC, real SQLite), `sessions list | kill | suspend |
//! resume` talking to it through the client SDK, and a real `sleep 300`
//! started by `system.run` under an allowlist policy.

mod common;
use common::{DEADLINE, Out, line_reader, wait_output};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The first turn runs `sleep 300`; later turns answer "awake".
const SLEEP_SCRIPT: &str = r#"
on_exhausted = "repeat_last"

[[reply]]
text = "Sleeping."
tool_calls = [{ name = "system.run", arguments = { command = "sleep 300" } }]

[[reply]]
text = "awake"
"#;

struct Home {
    dir: TempDir,
}

impl Home {
    fn new() -> Self {
        let home = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::write(home.path().join("replies.toml"), SLEEP_SCRIPT).expect("script");
        // The command timeout is far longer than the test waits, so only
        // `sessions kill` can end the sleep in time.
        std::fs::write(
            home.path().join("config.toml"),
            "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
             [gateway]\nbind = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n\n\
             [tools.system_run]\nmode = \"allowlist\"\nallowlist = [\"sleep\", \"echo\"]\n\
             timeout_secs = 300\nmax_timeout_secs = 300\n",
        )
        .expect("config");
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_openpista"));
        cmd.args(args)
            .env("OPENPISTA_HOME", self.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn run(&self, args: &[&str]) -> Out {
        wait_output(self.cmd(args).spawn().expect("spawn openpista"))
    }

    fn ok(&self, args: &[&str]) -> Out {
        let out = self.run(args);
        assert_eq!(out.code, Some(0), "openpista {args:?} failed: {out:#?}");
        out
    }

    /// `sessions list --json`.
    fn list(&self) -> Vec<Value> {
        let out = self.ok(&["sessions", "list", "--json"]);
        serde_json::from_str::<Value>(&out.stdout)
            .expect("JSON")
            .as_array()
            .expect("a list")
            .clone()
    }

    fn start(&self) -> Daemon {
        let mut child = self.cmd(&["start"]).spawn().expect("spawn start");
        let lines = line_reader(child.stdout.take().expect("stdout"));
        let _stderr = line_reader(child.stderr.take().expect("stderr"));
        let deadline = Instant::now() + DEADLINE;
        let mut addr = String::new();
        while addr.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).unwrap_or_else(|e| {
                let _ = child.kill();
                panic!("the daemon never got ready: {e}")
            });
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = rest.split_whitespace().next().unwrap_or_default().into();
            }
        }
        Daemon {
            child,
            _lines: lines,
            _stderr,
            addr,
        }
    }
}

struct Daemon {
    child: Child,
    _lines: mpsc::Receiver<String>,
    _stderr: mpsc::Receiver<String>,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` until it returns `Some` (generous deadline).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The parent pid of `pid`, from /proc.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: skip past it.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Live `sleep 300` processes descended from `ancestor`.
fn sleeps_under(ancestor: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // The program may be resolved to a full path (`/usr/bin/sleep`).
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !(args.len() == 3 && args[0].ends_with(b"sleep") && args[1] == b"300") {
            continue;
        }
        let mut p = pid;
        for _ in 0..16 {
            match ppid(p) {
                Some(parent) if parent == ancestor => {
                    found.push(pid);
                    break;
                }
                Some(parent) if parent > 1 => p = parent,
                _ => break,
            }
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only a running or sleeping process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s[s.rfind(')')? + 2..].to_owned();
            after.split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn sessions_kill_ends_a_running_sleep_and_suspend_refuses_turns_until_resume() {
    let home = Home::new();
    home.ok(&["init"]);
    let daemon = home.start();
    let addr = daemon.addr.clone();

    // A turn whose tool sleeps for 300 s.
    let running = home
        .cmd(&["run", "-e", "take a nap", "--remote", &addr])
        .spawn()
        .expect("spawn run");
    let id = wait_for("a running session", || {
        home.list()
            .into_iter()
            .find(|s| s["state"] == "running")
            .map(|s| s["id"].as_str().expect("id").to_owned())
    });
    let sleep_pid = wait_for("the sleep process", || {
        sleeps_under(daemon.child.id()).first().copied()
    });
    let out = home.ok(&["sessions", "list"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("running")),
        "{out:#?}"
    );

    let out = home.ok(&["sessions", "kill", &id]);
    assert!(out.stdout.contains("killed its running turn"), "{out:#?}");
    wait_for("the sleep to be killed", || {
        (!alive(sleep_pid)).then_some(())
    });
    let out = wait_output(running);
    assert_ne!(out.code, Some(0), "the killed turn failed: {out:#?}");
    assert!(out.stderr.contains("cancelled"), "{out:#?}");
    wait_for("the session to be idle", || {
        home.list()
            .into_iter()
            .any(|s| s["id"] == id.as_str() && s["state"] == "idle")
            .then_some(())
    });

    // Suspended: turns are refused with a clear code, across a restart.
    let out = home.ok(&["sessions", "suspend", &id]);
    assert!(out.stdout.contains("now suspended"), "{out:#?}");
    let out = home.run(&["run", "-e", "wake up", "--session", &id, "--remote", &addr]);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("suspended"), "{out:#?}");
    let listed = home.list();
    let row = listed
        .iter()
        .find(|s| s["id"] == id.as_str())
        .expect("listed");
    assert_eq!(row["state"], "suspended", "{listed:#?}");
    assert_eq!(row["suspended_reason"], "suspended by the operator");

    drop(daemon);
    let out = home.ok(&["sessions", "list"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("suspended")),
        "still suspended with no daemon: {out:#?}"
    );
    // The restarted daemon's model only answers.
    std::fs::write(
        home.path().join("replies.toml"),
        "[[reply]]\ntext = \"awake\"\n",
    )
    .expect("script");
    let daemon = home.start();
    let addr = daemon.addr.clone();
    let out = home.run(&["run", "-e", "wake up", "--session", &id, "--remote", &addr]);
    assert_ne!(
        out.code,
        Some(0),
        "still suspended after a restart: {out:#?}"
    );

    let out = home.ok(&["sessions", "resume", &id]);
    assert!(out.stdout.contains("now idle"), "{out:#?}");
    let out = home.ok(&["run", "-e", "wake up", "--session", &id, "--remote", &addr]);
    assert!(out.stdout.contains("awake"), "{out:#?}");

    // Unknown sessions are errors; the operator's actions are audited.
    let out = home.run(&["sessions", "kill", "no-such-session"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("no session"), "{out:#?}");
    let out = home.ok(&["audit", "--session", &id, "--json"]);
    for action in [
        "session_killed",
        "session_suspended",
        "session_resumed",
        "turn_refused",
    ] {
        assert!(out.stdout.contains(action), "{action}: {out:#?}");
    }
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_kill_removes_the_container_of_a_running_docker_command() {
    use openpista_testkit::docker::{
        TEST_IMAGE, containers_with_label, docker, docker_host, ensure_test_image,
    };
    const MANAGED: &str = "openpista.managed";
    let client = docker().await;
    ensure_test_image(&client).await;
    let home = Home::new();
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
             [gateway]\nbind = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n\n\
             [tools.system_run]\nmode = \"allowlist\"\nallowlist = [\"sleep\"]\n\
             sandbox = \"docker\"\ntimeout_secs = 300\nmax_timeout_secs = 300\n\n\
             [sandbox.docker]\nenabled = true\nhost = \"{}\"\nimage = \"{TEST_IMAGE}\"\n\
             timeout_secs = 300\nmax_timeout_secs = 300\n",
            docker_host()
        ),
    )
    .expect("config");
    let before = containers_with_label(&client, MANAGED).await;
    let h = tokio::task::spawn_blocking(move || {
        home.ok(&["init"]);
        let daemon = home.start();
        let running = home
            .cmd(&["run", "-e", "nap in a box", "--remote", &daemon.addr])
            .spawn()
            .expect("spawn run");
        let id = wait_for("a running session", || {
            home.list()
                .into_iter()
                .find(|s| s["state"] == "running")
                .map(|s| s["id"].as_str().expect("id").to_owned())
        });
        (home, daemon, running, id)
    });
    let (home, daemon, running, id) = h.await.expect("join");
    // The container of this turn (others' containers may come and go).
    let deadline = Instant::now() + Duration::from_secs(40);
    let ours = loop {
        let now: Vec<String> = containers_with_label(&client, MANAGED)
            .await
            .into_iter()
            .filter(|c| !before.contains(c))
            .collect();
        if let Some(c) = now.into_iter().next() {
            break c;
        }
        assert!(Instant::now() < deadline, "no container started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let (home, out) = tokio::task::spawn_blocking(move || {
        let out = home.run(&["sessions", "kill", &id]);
        (home, out)
    })
    .await
    .expect("join");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("killed its running turn"), "{out:#?}");
    let deadline = Instant::now() + Duration::from_secs(40);
    while containers_with_label(&client, MANAGED)
        .await
        .contains(&ours)
    {
        assert!(
            Instant::now() < deadline,
            "container {ours} was not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = tokio::task::spawn_blocking(move || wait_output(running))
        .await
        .expect("join");
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("cancelled"), "{out:#?}");
    drop(daemon);
    drop(home);
}

/// `openpista run -e` stopped by SIGTERM or SIGINT (Ctrl-C) while a tool
/// runs cancels the turn, so the tool's process group is killed: the tool
/// does not outlive the command that started it.
#[test]
fn a_signalled_run_does_not_leave_its_tool_running() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let home = Home::new();
        home.ok(&["init"]);
        let child = home
            .cmd(&["run", "-e", "sleep please"])
            .spawn()
            .expect("spawn openpista run");
        let pid = child.id();
        let sleep = wait_for("the tool's sleep to start", || {
            sleeps_under(pid).first().copied()
        });
        // SAFETY: kill with a pid we spawned and a valid signal.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
        let out = wait_output(child);
        assert_ne!(out.code, Some(0), "signal {signal}: {out:#?}");
        wait_for("the sleep to be killed", || (!alive(sleep)).then_some(()));
    }
}

/// The daemon stopped by SIGTERM while a turn's tool runs: after the drain
/// deadline the turn is cancelled and the tool's process group killed, and
/// the daemon exits 0.
#[test]
fn a_stopped_daemon_does_not_leave_a_tool_running() {
    let home = Home::new();
    home.ok(&["init"]);
    let mut daemon = home.start();
    let addr = daemon.addr.clone();
    let running = home
        .cmd(&["run", "-e", "take a nap", "--remote", &addr])
        .spawn()
        .expect("spawn run");
    let sleep = wait_for("the sleep process", || {
        sleeps_under(daemon.child.id()).first().copied()
    });
    // SAFETY: kill with a pid we spawned.
    assert_eq!(
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) },
        0
    );
    let status = wait_for("the daemon to exit", || {
        daemon.child.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status:?}");
    wait_for("the sleep to be killed", || (!alive(sleep)).then_some(()));
    let out = wait_output(running);
    assert_ne!(out.code, Some(0), "{out:#?}");
}
