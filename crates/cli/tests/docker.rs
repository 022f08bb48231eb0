//! Black-box: `[sandbox.docker]` in the config file wires `container.run`
//! (only when enabled), `system.run` with `sandbox = "docker"` and docker
//! skills, against the real test dockerd (started by `scripts/test.sh`).

use std::path::Path;
use std::process::{Command, Stdio};

use openpista_testkit::docker::{
    TEST_IMAGE, assert_no_container_left, docker, docker_host, ensure_test_image,
};

mod common;

fn openpista(home: &Path, args: &[&str], secret: &str) -> common::Out {
    let child = Command::new(env!("CARGO_BIN_EXE_openpista"))
        .args(args)
        .env("OPENPISTA_HOME", home)
        .env_remove("OPENPISTA_WORKSPACE")
        .env_remove("RUST_LOG")
        .env("OPENPISTA_API_KEY", secret)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openpista");
    common::wait_output(child)
}

fn docker_config(host: &str) -> String {
    format!(
        "[tools.system_run]\nmode = \"full\"\nsandbox = \"docker\"\n\n\
         [sandbox.docker]\nenabled = true\nhost = \"{host}\"\nimage = \"{TEST_IMAGE}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn enabled_docker_runs_container_run_and_system_run_in_containers() {
    let client = docker().await;
    ensure_test_image(&client).await;
    let home = tempfile::tempdir().expect("temp dir");
    let secret = "sk-test-DOCKER-SECRET-42";

    // Default config: no container.run.
    let out = openpista(home.path(), &["tools", "list"], secret);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(!out.stdout.contains("container.run"), "{out:#?}");

    std::fs::write(
        home.path().join("config.toml"),
        docker_config(&docker_host()),
    )
    .unwrap();
    let out = openpista(home.path(), &["tools", "list"], secret);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("container.run")),
        "{out:#?}"
    );

    let out = openpista(
        home.path(),
        &[
            "tools",
            "call",
            "container.run",
            "--args",
            r#"{"argv":["sh","-c","echo in-container; env"]}"#,
        ],
        secret,
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("in-container"), "{out:#?}");
    assert!(!out.stdout.contains(secret), "secret leaked: {out:#?}");
    assert!(!out.stdout.contains("OPENPISTA_HOME"), "{out:#?}");

    let out = openpista(
        home.path(),
        &[
            "tools",
            "call",
            "system.run",
            "--args",
            r#"{"command":"test -r /run/secrets/task_token && echo sandboxed; env"}"#,
        ],
        secret,
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("sandboxed"), "{out:#?}");
    assert!(!out.stdout.contains(secret), "secret leaked: {out:#?}");

    // Every container carries openpista.managed; none is left behind.
    assert_no_container_left(&client, "openpista.managed=1").await;
}

#[test]
fn an_unreachable_daemon_is_a_clear_error() {
    let home = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        home.path().join("config.toml"),
        docker_config("unix:///nonexistent/openpista/docker.sock"),
    )
    .unwrap();
    let out = openpista(
        home.path(),
        &[
            "tools",
            "call",
            "system.run",
            "--args",
            r#"{"command":"echo hi"}"#,
        ],
        "x",
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stdout.contains(
            "cannot reach the Docker daemon at unix:///nonexistent/openpista/docker.sock"
        ),
        "{out:#?}"
    );
}
