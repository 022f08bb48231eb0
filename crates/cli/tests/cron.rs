//! `openpista cron`: validation at `add`, the add/list/pause/resume/rm round
//! trip, and `cron run` recording a run and delivering into the session.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn home() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("replies.toml"), "on_exhausted = \"echo\"\n").expect("script");
    std::fs::write(
        dir.path().join("config.toml"),
        "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n",
    )
    .expect("config");
    dir
}

fn run(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_openpista"))
        .args(args)
        .env("OPENPISTA_HOME", home)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run openpista")
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = run(home, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {out:#?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn jobs(home: &Path) -> Vec<Value> {
    serde_json::from_str::<Value>(&ok(home, &["cron", "list", "--json"]))
        .expect("JSON")
        .as_array()
        .expect("array")
        .clone()
}

#[test]
fn add_refuses_bad_expressions_zones_and_targets_naming_them() {
    let h = home();
    for (args, needle) in [
        (
            ["cron", "add", "61 * * * *", "--to", "session:s", "hi"].as_slice(),
            "61 * * * *",
        ),
        (
            &[
                "cron",
                "add",
                "0 9 * * *",
                "--tz",
                "Mars/Olympus",
                "--to",
                "session:s",
                "hi",
            ],
            "Mars/Olympus",
        ),
        (
            &["cron", "add", "0 9 * * *", "--to", "email:me", "hi"],
            "email:me",
        ),
    ] {
        let out = run(h.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:#?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(jobs(h.path()).is_empty());
}

#[test]
fn add_list_pause_resume_rm_round_trip() {
    let h = home();
    let out = ok(
        h.path(),
        &[
            "cron",
            "add",
            "0 9 * * 1-5",
            "--tz",
            "Europe/Rome",
            "--to",
            "telegram:42",
            "good morning",
        ],
    );
    assert_eq!(out.trim(), "added cron job 1");
    let list = jobs(h.path());
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["tz"], "Europe/Rome");
    assert_eq!(list[0]["target"], "telegram:42");
    assert_eq!(list[0]["paused"], false);
    assert_eq!(list[0]["missed_policy"], "skip");
    ok(h.path(), &["cron", "pause", "1"]);
    assert_eq!(jobs(h.path())[0]["paused"], true);
    ok(h.path(), &["cron", "resume", "1"]);
    assert_eq!(jobs(h.path())[0]["paused"], false);
    ok(h.path(), &["cron", "rm", "1"]);
    assert!(jobs(h.path()).is_empty());
    assert_eq!(run(h.path(), &["cron", "rm", "1"]).status.code(), Some(1));
    assert_eq!(
        run(h.path(), &["cron", "pause", "7"]).status.code(),
        Some(1)
    );
}

#[test]
fn cron_run_records_a_run_and_delivers_into_the_session() {
    let h = home();
    ok(
        h.path(),
        &[
            "cron",
            "add",
            "0 9 * * *",
            "--to",
            "session:news",
            "what is new?",
        ],
    );
    let out = ok(h.path(), &["cron", "run", "1"]);
    assert!(out.contains("what is new?"), "{out}");
    let shown = ok(h.path(), &["sessions", "show", "news", "--json"]);
    let messages: Value = serde_json::from_str(&shown).expect("JSON");
    let messages = messages.as_array().expect("array");
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["content"], "what is new?");
    assert_eq!(messages[1]["role"], "assistant");
    let db = h.path().join("openpista.db");
    let runs = tokio::runtime::Runtime::new().expect("rt").block_on(async {
        let store = openpista_memory::Store::open(&db).await.expect("db");
        store.cron_runs(1, 10).await.expect("runs")
    });
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].trigger, openpista_memory::RunTrigger::Manual);
    assert_eq!(runs[0].outcome, openpista_memory::RunOutcome::Ok);
    assert_eq!(run(h.path(), &["cron", "run", "9"]).status.code(), Some(1));
}
