//! Black-box tests of Telegram in the real binary: `openpista start` with
//! `[channels.telegram]` enabled polls the fake Bot API (`openpista-testkit`)
//! through teloxide; `openpista telegram pair CODE` admits a refused user
//! while the daemon runs; a `telegram:<chat>` cron job's answer reaches the
//! chat. Each test has its own `OPENPISTA_HOME`.

mod common;
use common::{DEADLINE, Out, line_reader, wait_deadline, wait_output};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openpista_testkit::FakeTelegram;
use tempfile::TempDir;

const OWNER: i64 = 1001;
const STRANGER: i64 = 6666;
const CRON_CHAT: i64 = 2002;
const TOKEN: &str = "4242:telegram-token-that-must-never-be-logged";

struct Home {
    dir: TempDir,
}

impl Home {
    /// An echoing scripted home with Telegram enabled against `api_url`.
    fn new(api_url: &str, extra: &str) -> Self {
        let home = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::write(
            home.path().join("replies.toml"),
            "on_exhausted = \"echo\"\n",
        )
        .expect("script");
        std::fs::write(
            home.path().join("config.toml"),
            format!(
                "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
                 [gateway]\nbind = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n\n\
                 [log]\nlevel = \"debug\"\n\n\
                 [channels.telegram]\nenabled = true\napi_url = \"{api_url}\"\n\
                 allowed_users = [{OWNER}]\npoll_timeout_secs = 1\n{extra}"
            ),
        )
        .expect("config");
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str], token: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_openpista"));
        cmd.args(args)
            .env("OPENPISTA_HOME", self.path())
            .env_remove("RUST_LOG")
            .env_remove("OPENPISTA_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENPISTA_TELEGRAM_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            cmd.env("OPENPISTA_TELEGRAM_TOKEN", t);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Out {
        wait_output(self.cmd(args, None).spawn().expect("spawn openpista"))
    }

    /// Starts the daemon (the token comes from the 0600 token file).
    fn start(&self) -> Daemon {
        let file = self.path().join("tg.token");
        std::fs::write(&file, format!("{TOKEN}\n")).expect("token file");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
        let mut child = self.cmd(&["start"], None).spawn().expect("spawn start");
        let lines = line_reader(child.stdout.take().expect("stdout"));
        let stderr = line_reader(child.stderr.take().expect("stderr"));
        let mut daemon = Daemon {
            child,
            lines,
            stderr,
            stdout_seen: Vec::new(),
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match daemon.lines.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.contains("listening on");
                    daemon.stdout_seen.push(line);
                    if ready {
                        return daemon;
                    }
                }
                Err(e) => {
                    let _ = daemon.child.kill();
                    let _ = daemon.child.wait();
                    let err: Vec<String> = daemon.stderr.try_iter().collect();
                    panic!("the daemon never got ready ({e}): {err:#?}");
                }
            }
        }
    }
}

struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    stdout_seen: Vec<String>,
}

impl Daemon {
    /// Stops the daemon with SIGTERM; returns everything it printed.
    fn stop(mut self) -> String {
        let pid = i32::try_from(self.child.id()).expect("pid fits");
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = wait_deadline(&mut self.child, DEADLINE);
        assert!(status.success(), "{status:?}");
        let mut all = std::mem::take(&mut self.stdout_seen);
        all.extend(rest(&self.lines));
        all.extend(rest(&self.stderr));
        all.join("\n")
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
fn rest(lines: &mpsc::Receiver<String>) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => out.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => return out,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("a pipe stayed open: {out:#?}"),
        }
    }
}

/// Waits (without blocking the fake's runtime) until `chat` has `n` messages.
async fn wait_messages(tg: &FakeTelegram, chat: i64, n: usize) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let t = tg.transcript(chat);
        if t.len() >= n {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "chat {chat} never got {n} messages: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_telegram_without_a_token_or_with_a_readable_token_file() {
    let tg = FakeTelegram::start().await.unwrap();
    let home = Home::new(&tg.api_url(), "");
    let out = tokio::task::spawn_blocking(move || (home.run(&["start"]), home))
        .await
        .unwrap();
    let (out, _home) = out;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("OPENPISTA_TELEGRAM_TOKEN"),
        "{}",
        out.stderr
    );

    let home = Home::new(&tg.api_url(), "token_file = \"tg.token\"\n");
    let file = home.path().join("tg.token");
    std::fs::write(&file, TOKEN).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (out, _home) = tokio::task::spawn_blocking(move || (home.run(&["start"]), home))
        .await
        .unwrap();
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    assert!(!out.stderr.contains(TOKEN));
    assert!(tg.requests().is_empty(), "nothing reached Telegram");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_answers_on_telegram_and_pairing_admits_a_refused_user() {
    let tg = FakeTelegram::start().await.unwrap();
    let home = Home::new(
        &tg.api_url(),
        "draft_interval_ms = 100\ntoken_file = \"tg.token\"\n",
    );
    let (daemon, home) = tokio::task::spawn_blocking(move || {
        let add = home.run(&[
            "cron",
            "add",
            "* * * * * *",
            "--to",
            &format!("telegram:{CRON_CHAT}"),
            "cron ping",
        ]);
        assert_eq!(add.code, Some(0), "{add:#?}");
        (home.start(), home)
    })
    .await
    .unwrap();

    // The daemon's scheduler delivers the job's answer to its chat.
    let t = wait_messages(&tg, CRON_CHAT, 1).await;
    assert_eq!(t[0], "cron ping");

    tg.push_text(OWNER, "hello daemon");
    let t = wait_messages(&tg, OWNER, 1).await;
    assert_eq!(t, vec!["hello daemon".to_owned()], "the echo model answers");

    tg.push_text(STRANGER, "let me in");
    let t = wait_messages(&tg, STRANGER, 1).await;
    let code = t[0].rsplit(' ').next().unwrap().to_owned();
    assert!(t[0].contains("6666"), "{t:?}");
    assert_eq!(code.len(), 6, "{t:?}");

    let (out, home) = tokio::task::spawn_blocking(move || {
        let list = home.run(&["telegram", "list", "--json"]);
        (list, home)
    })
    .await
    .unwrap();
    assert_eq!(out.code, Some(0), "{out:#?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["pending"][0]["code"], code.as_str());

    let (bad, good, home) = tokio::task::spawn_blocking(move || {
        let bad = home.run(&["telegram", "pair", "000000x"]);
        // With the token at hand, `pair` also tells the user.
        let good = wait_output(
            home.cmd(&["telegram", "pair", &code], Some(TOKEN))
                .spawn()
                .expect("spawn pair"),
        );
        (bad, good, home)
    })
    .await
    .unwrap();
    assert_eq!(bad.code, Some(1), "{bad:#?}");
    assert!(bad.stderr.contains("no pending pairing code"), "{bad:#?}");
    assert_eq!(good.code, Some(0), "{good:#?}");
    assert!(good.stdout.contains("6666"), "{good:#?}");

    let t = wait_messages(&tg, STRANGER, 2).await;
    assert_eq!(
        t[1], "You're approved: send me a message.",
        "pair tells the user"
    );
    tg.push_text(STRANGER, "thank you");
    let t = wait_messages(&tg, STRANGER, 3).await;
    assert_eq!(t[2], "thank you", "the paired user reaches the model");

    assert!(
        tg.requests()
            .iter()
            .all(|r| r.token.as_deref() == Some(TOKEN)),
        "every request used the bot token from the file (daemon) or the environment (pair)"
    );
    let logs = tokio::task::spawn_blocking(move || daemon.stop())
        .await
        .unwrap();
    assert!(logs.contains("telegram: polling"), "{logs}");
    assert!(
        logs.contains("telegram: connected") && logs.contains("refused an unknown user"),
        "the debug logs were captured: {logs}"
    );
    assert!(!logs.contains(TOKEN), "the bot token reached the logs");
    assert!(!logs.contains("telegram-token-that"), "{logs}");
    drop(home);
}
