//! Black-box: `openpista skills run hello-wasm --args JSON` runs the shipped
//! WASM skill (built from C by scripts/common.sh) under the `[sandbox.wasm]`
//! limits, with the workspace preopened read-only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;

fn repo_skills() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../skills")
}

fn openpista(home: &Path, args: &[&str]) -> common::Out {
    let child = Command::new(env!("CARGO_BIN_EXE_openpista"))
        .args(args)
        .env("OPENPISTA_HOME", home)
        .env_remove("OPENPISTA_WORKSPACE")
        .env_remove("RUST_LOG")
        .env_remove("OPENPISTA_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openpista");
    common::wait_output(child)
}

#[test]
fn skills_run_hello_wasm_prints_its_greeting_and_the_workspace() {
    let module = repo_skills().join("hello-wasm/hello.wasm");
    assert!(
        module.is_file(),
        "{} is not built: run `bash -c 'source scripts/common.sh && install_wasm_toolchain && \
         build_wasm_skills'` (scripts/test.sh does this)",
        module.display()
    );
    let home = tempfile::tempdir().expect("temp dir");
    let dirs = serde_json::to_string(&repo_skills().display().to_string()).expect("json");
    let cache = home.path().join("my-wasm-cache");
    let cache_toml = serde_json::to_string(&cache.display().to_string()).expect("json");
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
             [skills]\ndirs = [{dirs}]\n\n[sandbox.wasm]\nmemory_mb = 32\ntimeout_secs = 20\n\
             cache_dir = {cache_toml}\n"
        ),
    )
    .expect("config");
    std::fs::write(
        home.path().join("replies.toml"),
        "on_exhausted = \"echo\"\n",
    )
    .expect("script");

    // `skills list` shows the mode.
    let out = openpista(home.path(), &["skills", "list"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("hello-wasm"))
        .unwrap_or_else(|| panic!("hello-wasm not listed: {out:#?}"));
    assert!(line.contains("wasm"), "{line}");

    // The workspace defaults to <home>/workspace; put a file there.
    let out = openpista(
        home.path(),
        &[
            "skills",
            "run",
            "hello-wasm",
            "--args",
            r#"{"name":"pista"}"#,
        ],
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    let json_line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("{\"greeting\""))
        .unwrap_or_else(|| panic!("no JSON line: {out:#?}"));
    let v: serde_json::Value = serde_json::from_str(json_line).expect("JSON");
    assert_eq!(v["greeting"], "hello from wasm");
    assert_eq!(v["args"]["name"], "pista");
    assert!(v["workspace"].is_array(), "{v}");
    // The configured cache folder got the compiled module.
    let cached = std::fs::read_dir(&cache).expect("cache dir").count();
    assert_eq!(cached, 1);

    // Arguments outside the schema are refused.
    let out = openpista(
        home.path(),
        &["skills", "run", "hello-wasm", "--args", r#"{"name":1}"#],
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
}
