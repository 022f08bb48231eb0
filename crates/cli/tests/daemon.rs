//! Black-box tests of `openpista start` / `status` / `--remote`: the real
//! binary as a daemon subprocess, real QUIC on loopback.
//!
//! Each test has its own `OPENPISTA_HOME` (set on the child only) with the
//! scripted provider and `[gateway] bind = "127.0.0.1:0"`; the daemon prints
//! `listening on ADDR` and `fingerprint: …` once ready, which is what the
//! tests wait for (with a deadline). A guard kills any daemon still running
//! when a test ends, pass or fail.

mod common;
use common::{DEADLINE, Out, drain, line_reader, wait_deadline, wait_output};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// Repeats each user message.
const ECHO_SCRIPT: &str = "on_exhausted = \"echo\"\n";

/// A reply that takes about 10 s to stream.
const SLOW_SCRIPT: &str = "[[reply]]\ntext = \"a slow and rather long answer that streams for quite a while\"\nchunk_chars = 1\ndelay_ms = 150\n";

struct Home {
    dir: TempDir,
}

impl Home {
    /// A scripted home whose gateway binds `bind` and drains for 1 s.
    fn new(script: &str, bind: &str) -> Self {
        Self::with_drain(script, bind, 1)
    }

    fn with_drain(script: &str, bind: &str, drain_secs: u64) -> Self {
        let home = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::write(home.path().join("replies.toml"), script).expect("script");
        std::fs::write(
            home.path().join("config.toml"),
            format!(
                "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
                 [gateway]\nbind = \"{bind}\"\ndrain_timeout_secs = {drain_secs}\n"
            ),
        )
        .expect("config");
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn pid_file(&self) -> PathBuf {
        self.path().join("openpista.pid")
    }

    fn state_file(&self) -> PathBuf {
        self.path().join("daemon.json")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_openpista"));
        cmd.args(args)
            .env("OPENPISTA_HOME", self.path())
            .env_remove("RUST_LOG")
            .env_remove("OPENPISTA_API_KEY")
            .env_remove("OPENAI_API_KEY")
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

    /// `sessions show ID --json`.
    fn messages(&self, id: &str) -> Vec<Value> {
        let out = self.ok(&["sessions", "show", id, "--json"]);
        let v: Value = serde_json::from_str(&out.stdout).expect("JSON");
        v.as_array().expect("messages").clone()
    }

    /// Starts the daemon and waits until it listens.
    fn start(&self) -> Daemon {
        let mut child = self.cmd(&["start"]).spawn().expect("spawn start");
        let lines = line_reader(child.stdout.take().expect("stdout"));
        let stderr = line_reader(child.stderr.take().expect("stderr"));
        let mut daemon = Daemon {
            child,
            lines,
            stderr,
            addr: String::new(),
            fingerprint: String::new(),
            metrics: String::new(),
        };
        let deadline = Instant::now() + DEADLINE;
        while daemon.addr.is_empty() || daemon.fingerprint.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match daemon.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!("the daemon never got ready ({e}): {}", daemon.kill_output()),
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                daemon.addr = rest.split_whitespace().next().unwrap_or_default().into();
            }
            if let Some(f) = line.strip_prefix("fingerprint: ") {
                daemon.fingerprint = f.trim().into();
            }
            if let Some(url) = line.strip_prefix("metrics: http://") {
                daemon.metrics = url.trim().trim_end_matches("/metrics").into();
            }
        }
        daemon
    }
}

/// A running `openpista start`; killed on drop if still running.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    addr: String,
    fingerprint: String,
    /// `host:port` of the metrics endpoint, when configured.
    metrics: String,
}

impl Daemon {
    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits");
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the daemon to exit (with a deadline); returns its status,
    /// the rest of its stdout, and its stderr.
    fn wait(&mut self) -> (ExitStatus, String, String) {
        let status = wait_deadline(&mut self.child, DEADLINE);
        (status, rest(&self.lines), rest(&self.stderr))
    }

    /// Reads stderr until a line contains `needle` (with a deadline).
    fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(e) => panic!("no {needle:?} on the daemon's stderr ({e})"),
            }
        }
    }

    fn kill_output(&mut self) -> String {
        let _ = self.child.kill();
        let (status, out, err) = self.wait();
        format!("{status:?}\nstdout: {out}\nstderr: {err}")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every line left until the pipe closes (the process has exited).
fn rest(lines: &mpsc::Receiver<String>) -> String {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => out.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => return out.join("\n"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("a pipe stayed open: {out:#?}"),
        }
    }
}

fn session_from_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("[session ")?.strip_suffix(']'))
        .unwrap_or_else(|| panic!("no [session ID] line in stderr:\n{stderr}"))
        .to_owned()
}

// ---------------------------------------------------------------- tests

#[test]
fn start_serves_status_run_and_repl_remotely_and_stops_on_sigterm() {
    let home = Home::new(ECHO_SCRIPT, "127.0.0.1:0");
    home.ok(&["init"]);
    let token = home.path().join("token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token)
            .expect("init wrote a token")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(home.run(&["status"]).code, Some(1), "nothing runs yet");

    let mut daemon = home.start();
    let pid: u32 = std::fs::read_to_string(home.pid_file())
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(pid, daemon.child.id());
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(home.state_file()).expect("state file"))
            .expect("state JSON");
    assert_eq!(state["addr"], daemon.addr.as_str());
    assert_eq!(state["fingerprint"], daemon.fingerprint.as_str());

    let out = home.ok(&["status"]);
    assert!(out.stdout.contains("running"), "{out:#?}");
    assert!(
        out.stdout
            .contains(&format!("fingerprint: {}", daemon.fingerprint)),
        "{out:#?}"
    );

    let addr = daemon.addr.clone();
    let out = home.ok(&["run", "-e", "hi over quic", "--remote", &addr]);
    assert!(out.stdout.contains("hi over quic"), "{out:#?}");
    let id = session_from_stderr(&out.stderr);
    let messages = home.messages(&id);
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert_eq!(messages[0]["content"], "hi over quic");

    // Explicit flags work too; a wrong token or fingerprint is refused.
    let fp = daemon.fingerprint.clone();
    let tok = std::fs::read_to_string(&token).expect("token");
    let out = home.ok(&[
        "run",
        "-e",
        "flags",
        "--remote",
        &addr,
        "--token",
        tok.trim(),
        "--fingerprint",
        &fp,
    ]);
    assert!(out.stdout.contains("flags"), "{out:#?}");
    let out = home.run(&["run", "-e", "x", "--remote", &addr, "--token", "wrong"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("wrong token"), "{out:#?}");
    let other_fp = "00".repeat(32);
    let out = home.run(&[
        "run",
        "-e",
        "x",
        "--remote",
        &addr,
        "--fingerprint",
        &other_fp,
    ]);
    assert_eq!(out.code, Some(1), "{out:#?}");

    let mut child = home
        .cmd(&["repl", "--remote", &addr])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn repl");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"hello remote\n/sessions\nagain\n/quit\n")
            .expect("write stdin");
    }
    let out = wait_output(child);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("hello remote"), "{out:#?}");
    assert!(out.stdout.contains("again"), "{out:#?}");
    assert!(
        out.stderr.contains(&id),
        "/sessions lists the run's session: {out:#?}"
    );

    // A second daemon on the same home refuses and leaves the first alone.
    let out = home.run(&["start"]);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("already running"), "{out:#?}");
    assert!(out.stderr.contains(&pid.to_string()), "{out:#?}");
    assert!(home.pid_file().exists());
    home.ok(&["status"]);

    daemon.signal(libc::SIGTERM);
    let (status, stdout, stderr) = daemon.wait();
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("stopped"), "{stdout}\n{stderr}");
    assert!(!home.pid_file().exists());
    assert!(!home.state_file().exists());
    let out = home.run(&["status"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stdout.contains("not running"), "{out:#?}");
}

#[test]
fn sigterm_mid_turn_stores_the_message_and_exits_0() {
    let home = Home::new(SLOW_SCRIPT, "127.0.0.1:0");
    home.ok(&["init"]);
    let mut daemon = home.start();

    let mut client = home
        .cmd(&[
            "run",
            "-e",
            "remember me",
            "--remote",
            &daemon.addr,
            "--json",
        ])
        .spawn()
        .expect("spawn run");
    let lines = line_reader(client.stdout.take().expect("stdout"));
    let deadline = Instant::now() + DEADLINE;
    let mut session = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|e| {
            let _ = client.kill();
            panic!("no text delta before the deadline ({e})")
        });
        let ev: Value = serde_json::from_str(&line).expect("JSON event");
        match ev["type"].as_str() {
            Some("accepted") => session = ev["session_id"].as_str().map(str::to_owned),
            Some("text_delta") => break,
            other => panic!("unexpected event {other:?} before the first delta"),
        }
    }

    daemon.signal(libc::SIGTERM);
    let (status, stdout, stderr) = daemon.wait();
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!home.pid_file().exists());
    // The client learns of it and ends (the turn did not finish).
    let client_status = wait_deadline(&mut client, DEADLINE);
    let rest: Vec<String> = lines.try_iter().collect();
    let client_err = drain(client.stderr.take()).join().expect("stderr");
    assert!(!client_status.success(), "{rest:#?}\n{client_err}");
    // The client is told why: either the turn's own `cancelled` error event
    // (the drain deadline cancelled it) or the connection's `shutting_down`
    // close code, whichever reaches it first.
    let told_cancelled = rest
        .iter()
        .any(|l| l.contains("\"type\":\"error\"") && l.contains("\"cancelled\""));
    assert!(
        client_err.contains("shutting_down") || told_cancelled,
        "{rest:#?}\n{client_err}"
    );

    let id = session.expect("accepted came first");
    let messages = home.messages(&id);
    assert_eq!(messages[0]["role"], "user", "{messages:#?}");
    assert_eq!(messages[0]["content"], "remember me", "{messages:#?}");
    let last = messages.last().expect("messages");
    assert_eq!(last["role"], "assistant", "{messages:#?}");
    let text = last["content"].as_str().unwrap_or_default();
    assert!(
        text.ends_with("[cancelled]") || text.starts_with("a slow and rather long answer"),
        "the turn is either finished or recorded as interrupted: {messages:#?}"
    );
}

#[test]
fn a_second_signal_exits_at_once_without_waiting_for_the_drain() {
    let home = Home::with_drain(SLOW_SCRIPT, "127.0.0.1:0", 60);
    let mut daemon = home.start();
    let mut client = home
        .cmd(&["run", "-e", "slow", "--remote", &daemon.addr, "--json"])
        .spawn()
        .expect("spawn run");
    let lines = line_reader(client.stdout.take().expect("stdout"));
    let first = lines.recv_timeout(DEADLINE).expect("an event");
    assert!(first.contains("accepted"), "{first}");

    let started = Instant::now();
    daemon.signal(libc::SIGTERM);
    // Once the daemon says it is draining, insist.
    daemon.wait_stderr("stopping");
    daemon.signal(libc::SIGTERM);
    let (status, stdout, _) = daemon.wait();
    assert_eq!(status.code(), Some(130), "{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the second signal did not cut the 60 s drain short"
    );
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn a_stale_pid_file_is_recovered_and_ctrl_c_stops_cleanly() {
    let home = Home::new(ECHO_SCRIPT, "127.0.0.1:0");
    // The pid of a process that has exited.
    let mut dead = Command::new("true").spawn().expect("spawn true");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    std::fs::write(home.pid_file(), format!("{dead_pid}\n")).expect("stale pid file");

    let mut daemon = home.start();
    let pid = std::fs::read_to_string(home.pid_file()).expect("pid file");
    assert_eq!(pid.trim(), daemon.child.id().to_string());
    // No token without `init`: loopback only, with a warning.
    let out = home.ok(&["status"]);
    assert!(out.stdout.contains(&daemon.fingerprint), "{out:#?}");

    daemon.signal(libc::SIGINT);
    let (status, stdout, stderr) = daemon.wait();
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("no token"), "{stderr}");
    assert!(!home.pid_file().exists());
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let home = Home::new(ECHO_SCRIPT, "0.0.0.0:0");
    let out = home.run(&["start"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("without a token"), "{out:#?}");
    assert!(out.stderr.contains("openpista init"), "{out:#?}");
    assert!(!home.pid_file().exists());
    assert!(!home.state_file().exists());
}

/// GET `path` from a plain HTTP endpoint; returns the whole response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut out = String::new();
    stream.read_to_string(&mut out).expect("read response");
    out
}

#[test]
fn metrics_are_served_on_loopback_when_configured() {
    let home = Home::new(ECHO_SCRIPT, "127.0.0.1:0");
    let config = home.path().join("config.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("\n[metrics]\nbind = \"127.0.0.1:0\"\n");
    std::fs::write(&config, text).expect("config");
    let mut daemon = home.start();
    assert!(
        !daemon.metrics.is_empty(),
        "no metrics line: {}",
        daemon.kill_output()
    );
    let metrics = daemon.metrics.clone();
    assert!(http_get(&metrics, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(&metrics, "/readyz").starts_with("HTTP/1.1 200"));
    home.ok(&["run", "-e", "count me", "--remote", &daemon.addr]);
    let body = http_get(&metrics, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("# TYPE openpista_turns"), "{body}");
    assert!(body.contains("outcome=\"final\"} 1"), "{body}");
    daemon.signal(libc::SIGTERM);
    let (status, _out, err) = daemon.wait();
    assert_eq!(status.code(), Some(0), "{err}");

    // A public metrics address is refused at start.
    let public = Home::new(ECHO_SCRIPT, "127.0.0.1:0");
    let config = public.path().join("config.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("\n[metrics]\nbind = \"0.0.0.0:0\"\n");
    std::fs::write(&config, text).expect("config");
    let out = public.run(&["start"]);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("loopback"), "{out:#?}");
}

#[test]
fn start_with_stdin_answers_lines_on_stdout_and_quit_stops_the_daemon() {
    let home = Home::new(
        "[[reply]]\ntext = \"pong from the terminal\"\n",
        "127.0.0.1:0",
    );
    let mut child = home
        .cmd(&["start", "--stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn start --stdin");
    let mut stdin = child.stdin.take().expect("stdin");
    let lines = line_reader(child.stdout.take().expect("stdout"));
    let stderr = line_reader(child.stderr.take().expect("stderr"));
    let mut daemon = Daemon {
        child,
        lines,
        stderr,
        addr: String::new(),
        fingerprint: String::new(),
        metrics: String::new(),
    };
    use std::io::Write as _;
    writeln!(stdin, "ping").expect("write a line");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match daemon.lines.recv_timeout(left) {
            Ok(line) if line == "pong from the terminal" => break,
            Ok(_) => {}
            Err(e) => panic!("no reply on stdout ({e}): {}", daemon.kill_output()),
        }
    }
    // `/quit` stops reading (the next line is never read) and stops the
    // daemon, though stdin stays open.
    writeln!(stdin, "/quit").expect("write /quit");
    let _ = writeln!(stdin, "never read");
    let (status, out, err) = daemon.wait();
    assert!(status.success(), "{status:?}\nstdout: {out}\nstderr: {err}");
    assert!(out.contains("stopped"), "{out}");
    drop(stdin);
    let messages = home.messages("cli-cli");
    let users: Vec<_> = messages
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(users, vec![Value::from("ping")], "{messages:#?}");
}
