//! A burst of failed tool calls suspends the session and its user is told,
//! through the real daemon and the fake Bot API: `[quotas] failure_burst`,
//! real `system.run` commands that fail, and `openpista sessions resume`.

mod common;
use common::{DEADLINE, line_reader, wait_output};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use openpista_testkit::FakeTelegram;

const BOT_TOKEN: &str = "4242:suspension-test-token";
const OWNER: i64 = 555;

/// Two failing commands in one round, then (after the resume) an answer.
const SCRIPT: &str = r#"
[[reply]]
text = "Looking."
tool_calls = [
  { name = "system.run", arguments = { command = "ls no-such-file" } },
  { name = "system.run", arguments = { command = "ls no-such-dir" } },
]

[[reply]]
text = "back to work"
"#;

async fn wait_sent(tg: &FakeTelegram, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some((_, t)) = tg.sent().into_iter().find(|(_, t)| t.contains(needle)) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no Telegram message with {needle:?}: {:?}",
            tg.sent()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_calls_suspend_the_session_and_tell_the_telegram_user() {
    let tg = FakeTelegram::start().await.expect("fake Bot API");
    let home = tempfile::tempdir().expect("temp dir");
    let h = home.path().to_path_buf();
    std::fs::write(h.join("replies.toml"), SCRIPT).expect("script");
    std::fs::write(
        h.join("config.toml"),
        format!(
            "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
             [gateway]\nbind = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n\n\
             [quotas]\nfailure_burst = 2\nfailure_window_secs = 600\n\n\
             [channels.telegram]\nenabled = true\napi_url = \"{}\"\nallowed_users = [{OWNER}]\npoll_timeout_secs = 1\n",
            tg.api_url()
        ),
    )
    .expect("config");
    let cmd = |h: &Path, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_openpista"));
        c.args(args)
            .env("OPENPISTA_HOME", h)
            .env("OPENPISTA_TELEGRAM_TOKEN", BOT_TOKEN)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut daemon = cmd(&h, &["start"]).spawn().expect("start");
    let stdout = line_reader(daemon.stdout.take().expect("stdout"));
    let _stderr = line_reader(daemon.stderr.take().expect("stderr"));
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = stdout.recv_timeout(left).unwrap_or_else(|e| {
            let _ = daemon.kill();
            panic!("the daemon never got ready: {e}")
        });
        if line.contains("listening on") {
            break;
        }
    }

    tg.push_text(OWNER, "look around");
    let told = wait_sent(&tg, "suspended").await;
    assert!(told.contains("2 tool calls failed"), "{told}");
    assert!(told.contains("openpista sessions resume"), "{told}");

    // Listed as suspended; further messages are refused the same way.
    let h2 = h.clone();
    let list = tokio::task::spawn_blocking(move || {
        wait_output(
            cmd(&h2, &["sessions", "list", "--json"])
                .spawn()
                .expect("list"),
        )
    })
    .await
    .expect("join");
    assert_eq!(list.code, Some(0), "{list:#?}");
    let rows: serde_json::Value = serde_json::from_str(&list.stdout).expect("JSON");
    let row = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["state"] == "suspended")
        .unwrap_or_else(|| panic!("no suspended session: {rows:#?}"))
        .clone();
    let id = row["id"].as_str().expect("id").to_owned();
    let before = tg.sent().len();
    tg.push_text(OWNER, "hello?");
    let deadline = Instant::now() + Duration::from_secs(40);
    while tg.sent().len() == before {
        assert!(Instant::now() < deadline, "no reply to the second message");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = tg.sent()[before..]
        .iter()
        .map(|(_, t)| t.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(second.contains("suspended"), "{second}");

    // The operator lifts it; the next message is answered.
    let h3 = h.clone();
    let resumed = tokio::task::spawn_blocking(move || {
        wait_output(
            cmd(&h3, &["sessions", "resume", &id])
                .spawn()
                .expect("resume"),
        )
    })
    .await
    .expect("join");
    assert_eq!(resumed.code, Some(0), "{resumed:#?}");
    tg.push_text(OWNER, "and now?");
    wait_sent(&tg, "back to work").await;
    let _ = daemon.kill();
    let _ = daemon.wait();
}
