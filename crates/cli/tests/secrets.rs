//! Known secret values never leave their place: the real daemon at debug log
//! level with the OpenAI-compatible provider (a loopback fake that records
//! every request), Telegram (the fake Bot API) and the QUIC gateway (its
//! token), running a real `system.run env` under an allowlist. The test greps
//! the logs, the audit trail, the database files, the tool's environment and
//! every model request body for the API key, the gateway token and the bot
//! token.

mod common;
use common::{DEADLINE, line_reader, wait_deadline, wait_output};

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openpista_testkit::FakeTelegram;
use openpista_testkit::openai::{FakeOpenAi, Reply};

const API_KEY: &str = "sk-SECRET-api-key-5d1e8a";
const BOT_TOKEN: &str = "4242:SECRET-bot-token-9c7b2f";
const OWNER: i64 = 777;

fn all_lines(rx: &mpsc::Receiver<String>, into: &mut Vec<String>) {
    into.extend(rx.try_iter());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_audit_tool_env_and_model_requests() {
    let fake = FakeOpenAi::start([
        Reply::tool_calls([("system.run", r#"{"command":"env"}"#)]),
        Reply::text("telegram done"),
        Reply::text("quic done"),
    ])
    .await
    .expect("fake OpenAI");
    let tg = FakeTelegram::start().await.expect("fake Bot API");
    let home = tempfile::tempdir().expect("temp dir");
    let h = home.path().to_path_buf();
    let cmd = |h: &Path, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_openpista"));
        c.args(args)
            .env("OPENPISTA_HOME", h)
            .env("OPENPISTA_API_KEY", API_KEY)
            .env("OPENPISTA_TELEGRAM_TOKEN", BOT_TOKEN)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let init = wait_output(cmd(&h, &["init"]).spawn().expect("init"));
    assert_eq!(init.code, Some(0), "{init:#?}");
    // `init` wrote the example config and the token: use our config.
    std::fs::write(
        h.join("config.toml"),
        format!(
            "[llm]\nprovider = \"openai\"\n\n[llm.openai]\nbase_url = \"{}\"\nmodel = \"fake\"\nmax_retries = 0\n\n\
             [gateway]\nbind = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n\n\
             [tools.system_run]\nmode = \"allowlist\"\nallowlist = [\"env\"]\nallow_wrappers = [\"env\"]\n\n\
             [channels.telegram]\nenabled = true\napi_url = \"{}\"\nallowed_users = [{OWNER}]\npoll_timeout_secs = 1\n\n\
             [log]\nlevel = \"debug\"\n",
            fake.base_url(),
            tg.api_url()
        ),
    )
    .expect("config");
    let gateway_token = std::fs::read_to_string(h.join("token"))
        .expect("init wrote the gateway token")
        .trim()
        .to_owned();
    assert!(gateway_token.len() >= 16, "{gateway_token}");
    let secrets = [API_KEY, BOT_TOKEN, gateway_token.as_str()];

    let mut daemon = cmd(&h, &["start"]).spawn().expect("start");
    let stdout = line_reader(daemon.stdout.take().expect("stdout"));
    let stderr = line_reader(daemon.stderr.take().expect("stderr"));
    let mut logs = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = stdout.recv_timeout(left).unwrap_or_else(|e| {
            let _ = daemon.kill();
            all_lines(&stderr, &mut logs);
            panic!("the daemon never got ready ({e}): {logs:#?}")
        });
        logs.push(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };

    // A Telegram turn that runs `env` as a tool.
    tg.push_text(OWNER, "what is in your environment?");
    let deadline = Instant::now() + Duration::from_secs(40);
    while !tg.sent().iter().any(|(_, t)| t.contains("telegram done")) {
        assert!(
            Instant::now() < deadline,
            "no Telegram reply: {:?}",
            tg.sent()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A QUIC turn, authenticated with the gateway token.
    let h2 = h.clone();
    let run = tokio::task::spawn_blocking(move || {
        wait_output(
            cmd(&h2, &["run", "-e", "hello over quic", "--remote", &addr])
                .spawn()
                .expect("run"),
        )
    })
    .await
    .expect("join");
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("quic done"), "{run:#?}");

    let audit = wait_output(
        cmd(&h, &["audit", "--json", "--limit", "1000"])
            .spawn()
            .expect("audit"),
    );
    assert_eq!(audit.code, Some(0), "{audit:#?}");
    assert!(audit.stdout.contains("tool_call"), "{audit:#?}");

    // SIGTERM, then everything the daemon printed.
    let pid = i32::try_from(daemon.id()).expect("pid");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_deadline(&mut daemon, DEADLINE);
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(200));
    all_lines(&stdout, &mut logs);
    all_lines(&stderr, &mut logs);
    let logs = logs.join("\n");
    assert!(
        logs.lines().filter(|l| l.contains("DEBUG")).count() > 5,
        "expected debug logs: {logs}"
    );

    // The tool really ran `env`, and its output went to the model.
    let requests = fake.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    assert!(requests.iter().all(|r| r.bearer_token() == Some(API_KEY)));
    let bodies: Vec<String> = requests
        .iter()
        .map(|r| serde_json::to_string(&r.body).expect("json"))
        .collect();
    assert!(
        bodies[1].contains("PATH="),
        "the env output reached the model: {}",
        bodies[1]
    );
    // Every Bot API call carried the bot token (it is used, not absent).
    assert!(!tg.requests().is_empty());

    let mut db = Vec::new();
    for name in ["openpista.db", "openpista.db-wal"] {
        if let Ok(bytes) = std::fs::read(h.join(name)) {
            db.extend(bytes);
        }
    }
    assert!(!db.is_empty(), "no database file");
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} in the daemon's logs");
        assert!(
            !run.stderr.contains(secret),
            "{secret} in the client's logs"
        );
        assert!(
            !run.stdout.contains(secret),
            "{secret} on the client's stdout"
        );
        assert!(
            !audit.stdout.contains(secret),
            "{secret} in the audit trail"
        );
        for (i, body) in bodies.iter().enumerate() {
            assert!(!body.contains(secret), "{secret} in model request {i}");
        }
        assert!(
            !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} in the database (messages hold the tool's env output)"
        );
    }
}
