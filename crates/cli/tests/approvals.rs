//! Black-box: a tool call that needs approval asks on the terminal
//! (`approve TOOL ARGS? [y/N/always]` on stderr, the answer on stdin) in
//! `openpista run -e` and `openpista repl`, typed on a real pseudo-terminal.
//! No stdin, a stdin that is not a terminal, or `CI` set means deny without
//! asking. The scripted model makes the calls. CI is removed from the
//! child's environment (as on a developer's terminal) except where tested.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Out, wait_output};
use tempfile::TempDir;

fn home(script: &str, extra: &str) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("replies.toml"), script).expect("script");
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n{extra}"
        ),
    )
    .expect("config");
    dir
}

fn write_call(path: &str) -> String {
    format!(
        "[[reply]]\ntext = \"Writing.\"\ntool_calls = [{{ name = \"file.write\", arguments = {{ path = \"{path}\", content = \"hi\" }} }}]\n"
    )
}

fn run_call(command: &str) -> String {
    format!(
        "[[reply]]\ntext = \"Running.\"\ntool_calls = [{{ name = \"system.run\", arguments = {{ command = \"{command}\" }} }}]\n"
    )
}

const DONE: &str = "[[reply]]\ntext = \"Done.\"\n";

/// `openpista ARGS` in `home` (no CI, no inherited secrets or log filter).
fn command(program: &str, home: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("OPENPISTA_HOME", home)
        .env_remove("RUST_LOG")
        .env_remove("OPENPISTA_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .env_remove("CI")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `openpista ARGS` in `home`. `typed: Some(text)` runs it on a
/// terminal (a pseudo-terminal from util-linux `script`; Debian package
/// bsdutils, which is essential) where `text` is typed, then the terminal
/// is closed (EOF); the output is the terminal's (stdout and stderr
/// together, in both fields). `None`: no stdin at all.
fn openpista(home: &Path, args: &[&str], typed: Option<&str>) -> Out {
    let Some(text) = typed else {
        let mut cmd = command(env!("CARGO_BIN_EXE_openpista"), home);
        cmd.args(args).stdin(Stdio::null());
        return wait_output(cmd.spawn().expect("spawn openpista"));
    };
    let line = std::iter::once(env!("CARGO_BIN_EXE_openpista"))
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = command("script", home);
    // TERM=dumb: the line editor reads plain lines.
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"])
        .env("TERM", "dumb")
        .stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run `script` (util-linux) for a pseudo-terminal: {e}; \
             install util-linux (Debian: bsdutils)"
        )
    });
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(text.as_bytes()).expect("type the answers");
    drop(pipe);
    let out = wait_output(child);
    Out {
        code: out.code,
        stderr: out.stdout.clone(),
        stdout: out.stdout,
    }
}

/// Runs `openpista ARGS` with `text` piped to its stdin (not a terminal).
fn piped(home: &Path, args: &[&str], text: &str) -> Out {
    let mut cmd = command(env!("CARGO_BIN_EXE_openpista"), home);
    cmd.args(args).stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn openpista");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(text.as_bytes()).expect("write stdin");
    drop(pipe);
    wait_output(child)
}

fn workspace(home: &Path) -> std::path::PathBuf {
    home.join("workspace")
}

fn prompts(out: &Out) -> usize {
    out.stderr.matches("[y/N/always]").count()
}

#[test]
fn run_asks_before_writing_and_y_approves() {
    let h = home(&format!("{}{DONE}", write_call("a.txt")), "");
    let out = openpista(h.path(), &["run", "-e", "write a file"], Some("y\n"));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr.contains("approve file.write"),
        "the prompt names the tool: {out:#?}"
    );
    assert!(out.stderr.contains("a.txt"), "and its arguments: {out:#?}");
    assert_eq!(
        std::fs::read_to_string(workspace(h.path()).join("a.txt")).expect("written"),
        "hi"
    );
}

#[test]
fn no_stdin_means_deny_with_a_clear_message() {
    let h = home(&format!("{}{DONE}", write_call("b.txt")), "");
    let out = openpista(h.path(), &["run", "-e", "write a file"], None);
    assert!(
        out.stderr
            .contains("denied: file.write needs approval and stdin is not a terminal"),
        "{out:#?}"
    );
    assert!(
        out.stderr.contains("[approvals.tools]"),
        "says how to allow it: {out:#?}"
    );
    assert!(out.stderr.contains("<- file.write denied"), "{out:#?}");
    assert!(!workspace(h.path()).join("b.txt").exists());
}

#[test]
fn under_ci_nobody_is_asked_and_the_call_is_denied() {
    let h = home(&format!("{}{DONE}", write_call("ci.txt")), "");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openpista"));
    cmd.args(["run", "-e", "write a file"])
        .env("OPENPISTA_HOME", h.path())
        .env_remove("RUST_LOG")
        .env("CI", "true")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn openpista");
    // A "y" is waiting on stdin, and still nobody reads it.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"y\n")
        .expect("write stdin");
    let out = wait_output(child);
    assert_eq!(prompts(&out), 0, "{out:#?}");
    assert!(
        out.stderr
            .contains("denied: file.write needs approval and CI is set"),
        "{out:#?}"
    );
    assert!(!workspace(h.path()).join("ci.txt").exists());
}

#[test]
fn a_piped_answer_is_not_taken_as_a_human_one() {
    let h = home(&format!("{}{DONE}", write_call("p.txt")), "");
    let out = piped(h.path(), &["run", "-e", "write a file"], "y\n");
    assert_eq!(prompts(&out), 0, "{out:#?}");
    assert!(
        out.stderr
            .contains("denied: file.write needs approval and stdin is not a terminal"),
        "{out:#?}"
    );
    assert!(!workspace(h.path()).join("p.txt").exists());
}

#[test]
fn closing_the_terminal_without_an_answer_denies() {
    let h = home(&format!("{}{DONE}", write_call("q.txt")), "");
    let out = openpista(h.path(), &["run", "-e", "write a file"], Some(""));
    assert_eq!(prompts(&out), 1, "{out:#?}");
    assert!(
        out.stderr.contains("the terminal closed without an answer"),
        "{out:#?}"
    );
    assert!(!workspace(h.path()).join("q.txt").exists());
}

#[test]
fn n_denies() {
    let h = home(&format!("{}{DONE}", write_call("c.txt")), "");
    let out = openpista(h.path(), &["run", "-e", "write a file"], Some("n\n"));
    assert!(out.stderr.contains("<- file.write denied"), "{out:#?}");
    assert!(!workspace(h.path()).join("c.txt").exists());
}

#[test]
fn an_operator_allow_runs_without_asking() {
    let h = home(
        &format!("{}{DONE}", write_call("d.txt")),
        "\n[approvals.tools]\n\"file.write\" = \"allow\"\n",
    );
    let out = openpista(h.path(), &["run", "-e", "write a file"], None);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(prompts(&out), 0, "{out:#?}");
    assert!(workspace(h.path()).join("d.txt").exists());
}

#[test]
fn always_covers_the_same_command_and_a_changed_argv_asks_again() {
    let script = format!(
        "{}{}{}{DONE}",
        run_call("echo one"),
        run_call("echo one"),
        run_call("echo two")
    );
    let h = home(&script, "\n[approvals.tools]\n\"system.run\" = \"ask\"\n");
    // One answer only: `always` for `echo one`; `echo two` then finds no
    // answer and is denied.
    let out = openpista(h.path(), &["run", "-e", "run things"], Some("always\n"));
    assert_eq!(prompts(&out), 2, "{out:#?}");
    assert!(
        out.stderr
            .contains("approve system.run {\"command\":\"echo one\"}"),
        "{out:#?}"
    );
    assert!(
        out.stderr
            .contains("approve system.run {\"command\":\"echo two\"}"),
        "{out:#?}"
    );
    assert_eq!(
        out.stderr.matches("<- system.run ok").count(),
        2,
        "echo one ran twice: {out:#?}"
    );
    assert!(out.stderr.contains("<- system.run denied"), "{out:#?}");
}

#[test]
fn the_repl_asks_between_messages() {
    let h = home(&format!("{}{DONE}", write_call("e.txt")), "");
    let out = openpista(h.path(), &["repl"], Some("write a file\ny\n/quit\n"));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(prompts(&out), 1, "{out:#?}");
    assert!(workspace(h.path()).join("e.txt").exists(), "{out:#?}");
}

/// Through the daemon: `run -e --remote` gets `approval_required` over QUIC,
/// asks on the terminal and answers with `approve` (the SDK's
/// `Client::approve`); the daemon runs the call only then.
#[test]
fn a_remote_run_answers_the_daemons_approval_over_quic() {
    let script = format!("{}{DONE}{}{DONE}", write_call("r.txt"), write_call("s.txt"));
    let h = home(&script, "\n[gateway]\nbind = \"127.0.0.1:0\"\n");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_openpista"))
        .arg("start")
        .env("OPENPISTA_HOME", h.path())
        .env_remove("RUST_LOG")
        .env_remove("CI")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openpista start");
    let lines = common::line_reader(daemon.stdout.take().expect("stdout"));
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let addr = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = daemon.kill();
            panic!("the daemon never said where it listens");
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    let approved = openpista(
        h.path(),
        &["run", "-e", "write remotely", "--remote", &addr],
        Some("y\n"),
    );
    let denied = openpista(
        h.path(),
        &["run", "-e", "write again", "--remote", &addr],
        None,
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(approved.code, Some(0), "{approved:#?}");
    assert_eq!(prompts(&approved), 1, "{approved:#?}");
    assert!(workspace(h.path()).join("r.txt").exists(), "{approved:#?}");
    assert!(
        denied.stderr.contains("<- file.write denied"),
        "{denied:#?}"
    );
    assert!(!workspace(h.path()).join("s.txt").exists());
}
