//! Black-box tests of `openpista audit`: a turn leaves a verifiable trail,
//! tampering with the database is named, and secrets stay out of it.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// A tool call to `system.run` that the default allowlist accepts, then a final answer.
const ECHO_HI_SCRIPT: &str = r#"
[[reply]]
text = "Let me check."
tool_calls = [{ name = "system.run", arguments = { command = "echo hi" } }]

[[reply]]
text = "The command said hi."
"#;

const SECRET: &str = "sk-SECRET-audit-7f3a9c1e5b";

/// An `OPENPISTA_HOME` whose config plays `ECHO_HI_SCRIPT` back.
fn scripted_home() -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("replies.toml"), ECHO_HI_SCRIPT).expect("write script");
    std::fs::write(
        dir.path().join("config.toml"),
        "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n",
    )
    .expect("write config");
    dir
}

/// The binary with this home; no inherited log filter or API keys; stdin closed.
fn cmd(home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openpista"));
    cmd.args(args)
        .env("OPENPISTA_HOME", home)
        .env_remove("RUST_LOG")
        .env_remove("OPENPISTA_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run(home: &Path, args: &[&str]) -> Output {
    cmd(home, args).output().expect("run openpista")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = run(home, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "openpista {args:?} failed\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn audit_rows(home: &Path) -> Vec<Value> {
    let out = ok(home, &["audit", "--json", "--limit", "1000"]);
    let v: Value = serde_json::from_str(&out).expect("audit --json is JSON");
    v.as_array().expect("an array of rows").clone()
}

/// Runs raw SQL on the database, as someone with write access would.
fn tamper(db: &Path, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use sqlx::Connection as _;
        let url = format!("sqlite://{}", db.display());
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        sqlx::raw_sql(sql).execute(&mut conn).await.expect("tamper");
        conn.close().await.expect("close");
    });
}

#[test]
fn a_turn_leaves_a_trail_that_verifies_until_it_is_edited() {
    let home = scripted_home();
    ok(home.path(), &["run", "-e", "what does echo hi print?"]);

    let rows = audit_rows(home.path());
    let actions: Vec<&str> = rows.iter().filter_map(|r| r["action"].as_str()).collect();
    assert_eq!(actions, ["turn_started", "tool_call", "turn_finished"]);
    assert_eq!(rows[1]["seq"], 2);
    assert_eq!(rows[1]["detail"]["tool"], "system.run");
    assert_eq!(rows[1]["detail"]["outcome"], "ok");
    assert_eq!(rows[1]["detail"]["exit_code"], 0);
    assert_eq!(rows[1]["prev_hash"], rows[0]["hash"]);

    let listed = ok(home.path(), &["audit"]);
    assert!(listed.contains("tool_call"), "{listed}");

    let verified = ok(home.path(), &["audit", "--verify"]);
    let head = rows[2]["hash"].as_str().expect("a hash");
    assert_eq!(
        verified.trim(),
        format!("audit trail intact: 3 rows, head {head}")
    );

    tamper(
        &home.path().join("openpista.db"),
        r#"UPDATE audit_log SET detail = '{"tool":"system.run","outcome":"denied"}' WHERE seq = 2"#,
    );
    let out = run(home.path(), &["audit", "--verify"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("seq 2"), "{stdout}");
    assert!(stdout.contains("hash mismatch"), "{stdout}");
}

#[test]
fn deleting_the_newest_row_is_detected() {
    let home = scripted_home();
    ok(home.path(), &["run", "-e", "what does echo hi print?"]);
    tamper(
        &home.path().join("openpista.db"),
        "DELETE FROM audit_log WHERE seq = 3",
    );
    let out = run(home.path(), &["audit", "--verify"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("seq 3"), "{stdout}");
}

#[test]
fn the_api_key_never_reaches_the_audit_trail_or_the_database() {
    let home = scripted_home();
    let out = cmd(home.path(), &["run", "-e", "what does echo hi print?"])
        .env("OPENPISTA_API_KEY", SECRET)
        .output()
        .expect("run openpista");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = cmd(home.path(), &["audit", "--json", "--limit", "1000"])
        .env("OPENPISTA_API_KEY", SECRET)
        .output()
        .expect("run openpista");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert!(listed.contains("tool_call"), "{listed}");
    assert!(!listed.contains(SECRET), "{listed}");

    // Nothing in the database files (the WAL included, if one is left).
    let mut checked = 0;
    for name in ["openpista.db", "openpista.db-wal", "openpista.db-shm"] {
        let Ok(bytes) = std::fs::read(home.path().join(name)) else {
            continue;
        };
        checked += 1;
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{name} contains the API key"
        );
    }
    assert!(checked >= 1, "no database file found");
}

#[test]
fn verify_on_an_empty_trail_is_intact() {
    let home = scripted_home();
    let out = ok(home.path(), &["audit", "--verify"]);
    assert!(
        out.starts_with("audit trail intact: 0 rows, head 0000"),
        "{out}"
    );
    let out = ok(home.path(), &["audit"]);
    assert!(out.contains("no audit rows yet"), "{out}");
}
