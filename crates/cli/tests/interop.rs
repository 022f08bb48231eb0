//! Interop: a client in another QUIC stack (Python's aioquic), written from
//! docs/PROTOCOL.md alone (`tests/interop/aioquic_client.py`), against the
//! real `openpista start` daemon on loopback.
//!
//! The interpreter is `$OPENPISTA_TEST_PYTHON` (default `python3`); it must
//! have aioquic (`bash scripts/test.sh` makes a venv with it). Without it the
//! test fails rather than passing silently.

mod common;
use common::{DEADLINE, Out, drain, line_reader, wait_deadline, wait_output};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::Value;
use tempfile::TempDir;

/// Repeats each user message.
const ECHO_SCRIPT: &str = "on_exhausted = \"echo\"\n";

struct Home {
    dir: TempDir,
}

impl Home {
    fn new() -> Self {
        let home = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::write(home.path().join("replies.toml"), ECHO_SCRIPT).expect("script");
        std::fs::write(
            home.path().join("config.toml"),
            "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
             [gateway]\nbind = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n",
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
            .env_remove("OPENPISTA_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn ok(&self, args: &[&str]) -> Out {
        let out = wait_output(self.cmd(args).spawn().expect("spawn openpista"));
        assert_eq!(out.code, Some(0), "openpista {args:?} failed: {out:#?}");
        out
    }

    /// Starts the daemon and waits until it prints its address and fingerprint.
    fn start(&self) -> Daemon {
        let mut child = self.cmd(&["start"]).spawn().expect("spawn start");
        let lines = line_reader(child.stdout.take().expect("stdout"));
        let stderr = drain(child.stderr.take());
        let mut daemon = Daemon {
            child,
            stderr: Some(stderr),
            addr: String::new(),
            fingerprint: String::new(),
        };
        let deadline = Instant::now() + DEADLINE;
        while daemon.addr.is_empty() || daemon.fingerprint.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!("the daemon never got ready ({e}): {}", daemon.kill_output()),
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                daemon.addr = rest.split_whitespace().next().unwrap_or_default().into();
            }
            if let Some(f) = line.strip_prefix("fingerprint: ") {
                daemon.fingerprint = f.trim().into();
            }
        }
        daemon
    }
}

/// A running `openpista start`; killed on drop if still running.
struct Daemon {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
    addr: String,
    fingerprint: String,
}

impl Daemon {
    fn kill_output(&mut self) -> String {
        let _ = self.child.kill();
        let status = wait_deadline(&mut self.child, DEADLINE);
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        format!("{status:?}\nstderr: {err}")
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

fn python() -> String {
    std::env::var("OPENPISTA_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails (never skips) when the interpreter cannot import aioquic.
fn require_aioquic(python: &str) {
    let out = Command::new(python)
        .args(["-c", "import aioquic"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{python} cannot import aioquic ({}). Run `bash scripts/test.sh` (it creates a venv \
             with aioquic and sets OPENPISTA_TEST_PYTHON), or set OPENPISTA_TEST_PYTHON to a \
             Python with `pip install 'aioquic>=1.2,<2'`.",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run {python} ({e}). Run `bash scripts/test.sh`, or set OPENPISTA_TEST_PYTHON \
             to a Python with aioquic."
        ),
    }
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/aioquic_client.py")
}

fn run_client(python: &str, daemon: &Daemon, token_file: &Path, fingerprint: &str) -> Out {
    let child = Command::new(python)
        .arg(client_script())
        .args(["--addr", &daemon.addr, "--fingerprint", fingerprint])
        .arg("--token-file")
        .arg(token_file)
        .args(["--text", "hello over aioquic"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the python client");
    wait_output(child)
}

#[test]
fn an_aioquic_client_written_from_the_protocol_doc_interoperates() {
    let python = python();
    require_aioquic(&python);

    let home = Home::new();
    home.ok(&["init"]);
    let token = home.path().join("token");
    assert!(token.exists(), "init wrote no token");
    let daemon = home.start();

    // The whole exchange: hello/welcome, send_message, list_sessions, get_history.
    let out = run_client(&python, &daemon, &token, &daemon.fingerprint);
    assert_eq!(out.code, Some(0), "the aioquic client failed: {out:#?}");
    let summary: Value = serde_json::from_str(out.stdout.trim()).expect("a JSON summary");
    assert_eq!(summary["welcome"]["type"], "welcome", "{summary}");
    assert_eq!(summary["welcome"]["protocol_version"], 1, "{summary}");
    let events: Vec<&str> = summary["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e.as_str().expect("event type"))
        .collect();
    assert_eq!(events.first(), Some(&"accepted"), "{summary}");
    assert_eq!(events.last(), Some(&"final"), "{summary}");
    assert!(
        summary["final_text"]
            .as_str()
            .expect("final_text")
            .contains("hello over aioquic"),
        "{summary}"
    );
    assert_eq!(summary["history_len"], 2, "{summary}");
    assert_eq!(summary["sessions"], 1, "{summary}");

    // A wrong token: refused in the handshake with `unauthorized`.
    let bad = home.path().join("bad-token");
    std::fs::write(&bad, "not-the-token\n").expect("bad token");
    let out = run_client(&python, &daemon, &bad, &daemon.fingerprint);
    assert_eq!(out.code, Some(3), "{out:#?}");
    let refused: Value = serde_json::from_str(out.stdout.trim()).expect("JSON refusal");
    assert_eq!(refused["refused"], "unauthorized", "{out:#?}");

    // A wrong pin: the client aborts before it sends the token.
    let other = vec!["00"; 32].join(":");
    let out = run_client(&python, &daemon, &token, &other);
    assert_eq!(out.code, Some(4), "{out:#?}");
    assert!(out.stderr.contains("fingerprint mismatch"), "{out:#?}");
    assert!(out.stdout.trim().is_empty(), "{out:#?}");
}
