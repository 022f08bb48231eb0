//! `openpista run -e` on the OpenAI-compatible provider, against a loopback
//! server that speaks the real wire format: the key comes from the
//! environment, reaches the provider as a bearer token, and never appears in
//! the logs, even at trace level.

use std::process::{Command, Stdio};

use openpista_testkit::openai::{FakeOpenAi, Reply};

const SECRET: &str = "sk-test-very-SECRET-4242";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_uses_the_env_key_and_never_logs_it() {
    let fake = FakeOpenAi::start([
        Reply::tool_calls([("system.run", r#"{"command":"echo from-tool"}"#)]),
        Reply::text("The tool said from-tool."),
    ])
    .await
    .expect("fake server");
    let home = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "[llm]\nprovider = \"openai\"\n\n[llm.openai]\nbase_url = \"{}\"\nmodel = \"fake-model\"\nmax_retries = 0\n",
            fake.base_url()
        ),
    )
    .expect("config");
    let home_path = home.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_openpista"))
            .args([
                "--log-format",
                "json",
                "run",
                "-e",
                "what does the tool say?",
            ])
            .env("OPENPISTA_HOME", &home_path)
            .env("OPENPISTA_API_KEY", SECRET)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .output()
            .expect("run openpista")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("The tool said from-tool."), "{stdout}");
    assert!(
        stderr.contains("-> system.run"),
        "tool activity on stderr: {stderr}"
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(
        requests.iter().all(|r| r.bearer_token() == Some(SECRET)),
        "the key from the environment is sent as a bearer token"
    );
    // The tool's output went back to the model in the second request.
    let second = serde_json::to_string(&requests[1].body).expect("json");
    assert!(second.contains("from-tool"), "{second}");

    // Trace-level logs were really written, and the key is in none of them.
    assert!(stderr.lines().count() > 5, "expected trace logs: {stderr}");
    assert!(!stderr.contains(SECRET), "the API key leaked into the logs");
    assert!(!stdout.contains(SECRET), "the API key leaked to stdout");
    // Nor into the database or the tool's environment.
    let db = std::fs::read(home.path().join("openpista.db")).expect("db");
    assert!(
        !String::from_utf8_lossy(&db).contains(SECRET),
        "the API key was stored"
    );
}
