//! `openpista doctor` through the real binary: a good home passes, and each
//! insecure or broken setting is named with its fix and exits 1.

mod common;
use common::{Out, wait_output};

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

/// A home made by `openpista init`, with a config naming a model file that
/// exists (doctor only checks that it is there and readable).
struct Home {
    dir: TempDir,
}

const GOOD_CONFIG: &str = "[llm.local]\nmodel = \"tiny.gguf\"\n";

impl Home {
    fn new() -> Self {
        let home = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let out = home.run(&["init"]);
        assert_eq!(out.code, Some(0), "{out:#?}");
        home.config(GOOD_CONFIG);
        std::fs::write(home.path().join("models/tiny.gguf"), b"GGUF").expect("model");
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self, extra: &str) -> PathBuf {
        let file = self.path().join("config.toml");
        std::fs::write(&file, extra).expect("config");
        chmod(&file, 0o600);
        file
    }

    fn run(&self, args: &[&str]) -> Out {
        let child = Command::new(env!("CARGO_BIN_EXE_openpista"))
            .args(args)
            .env("OPENPISTA_HOME", self.path())
            .env_remove("RUST_LOG")
            .env_remove("OPENPISTA_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENPISTA_TELEGRAM_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn openpista");
        wait_output(child)
    }

    /// `doctor`, which must fail naming `needles` on one FAIL line.
    fn fails_with(&self, needles: &[&str]) -> Out {
        let out = self.run(&["doctor"]);
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("FAIL") && needles.iter().all(|n| l.contains(n))),
            "no FAIL line with {needles:?}: {out:#?}"
        );
        out
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn a_good_home_passes() {
    let home = Home::new();
    let out = home.run(&["doctor"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(!out.stdout.contains("FAIL"), "{out:#?}");
    assert!(out.stdout.contains("no problems found"), "{out:#?}");
    for want in [
        "config.toml parses",
        "gateway token",
        "(loopback)",
        "tiny.gguf is readable",
        "tools.system_run.mode: allowlist",
    ] {
        assert!(out.stdout.contains(want), "{want}: {out:#?}");
    }
}

#[test]
fn a_readable_token_file_is_named_with_its_fix() {
    let home = Home::new();
    chmod(&home.path().join("token"), 0o644);
    home.fails_with(&["gateway token", "644", "chmod 600"]);
}

#[test]
fn readable_tls_key_and_certificate_are_named() {
    let home = Home::new();
    let tls = home.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for f in ["key.pem", "cert.pem"] {
        std::fs::write(tls.join(f), "x").unwrap();
        chmod(&tls.join(f), 0o600);
    }
    assert_eq!(home.run(&["doctor"]).code, Some(0));
    chmod(&tls.join("key.pem"), 0o640);
    home.fails_with(&["TLS key", "chmod 600"]);
    chmod(&tls.join("key.pem"), 0o600);
    chmod(&tls.join("cert.pem"), 0o644);
    home.fails_with(&["TLS certificate", "chmod 600"]);
}

#[test]
fn a_public_bind_without_a_token_is_insecure() {
    let home = Home::new();
    home.config(&format!(
        "{GOOD_CONFIG}[gateway]\nbind = \"0.0.0.0:7879\"\n"
    ));
    // With the token it is allowed (clients must present it) ...
    assert_eq!(home.run(&["doctor"]).code, Some(0));
    // ... without, anyone on the network could connect.
    std::fs::remove_file(home.path().join("token")).unwrap();
    home.fails_with(&["INSECURE", "0.0.0.0:7879", "openpista init"]);
}

#[test]
fn a_missing_or_unreadable_model_is_named() {
    let home = Home::new();
    home.config("[llm.local]\nmodel = \"absent.gguf\"\n");
    home.fails_with(&["model", "absent.gguf"]);
    if nix_is_root() {
        // root reads any file; the mode check below would not fail.
        return;
    }
    home.config(GOOD_CONFIG);
    chmod(&home.path().join("models/tiny.gguf"), 0o000);
    home.fails_with(&["model", "cannot be read"]);
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn unreachable_docker_and_a_subprocess_fallback_are_named() {
    let home = Home::new();
    let sock = home.path().join("no-docker.sock");
    home.config(&format!(
        "{GOOD_CONFIG}[sandbox.docker]\nenabled = true\nhost = \"unix://{}\"\nfallback = \"subprocess\"\n",
        sock.display()
    ));
    let out = home.fails_with(&["docker", "enabled = false"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("fallback") && l.contains("INSECURE")),
        "{out:#?}"
    );
}

#[test]
fn full_command_policy_is_insecure() {
    let home = Home::new();
    home.config(&format!(
        "{GOOD_CONFIG}[tools.system_run]\nmode = \"full\"\n"
    ));
    home.fails_with(&["INSECURE", "full", "mode = \"allowlist\""]);
}

#[test]
fn readable_telegram_token_and_api_key_files_are_named() {
    let home = Home::new();
    let token = home.path().join("telegram-token");
    std::fs::write(&token, "123:abc").unwrap();
    chmod(&token, 0o644);
    home.config(&format!(
        "{GOOD_CONFIG}[channels.telegram]\ntoken_file = \"telegram-token\"\n"
    ));
    home.fails_with(&["Telegram token file", "chmod 600"]);

    let file =
        home.config("[llm]\nprovider = \"openai\"\n\n[llm.openai]\napi_key = \"sk-in-the-file\"\n");
    assert_eq!(home.run(&["doctor"]).code, Some(0), "0600: only a warning");
    chmod(&file, 0o644);
    let out = home.fails_with(&["api_key", "OPENPISTA_API_KEY", "chmod 600"]);
    assert!(!out.stdout.contains("sk-in-the-file"), "{out:#?}");
}

#[test]
fn a_config_that_does_not_parse_is_a_usage_error() {
    let home = Home::new();
    home.config("[gateway]\nbind = 7\n");
    let out = home.run(&["doctor"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("config.toml"), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachable_docker_passes() {
    use openpista_testkit::docker::{docker, docker_host};
    // Fails with how to start the test dockerd when there is none.
    let _ = docker().await;
    let home = Home::new();
    home.config(&format!(
        "{GOOD_CONFIG}[sandbox.docker]\nenabled = true\nhost = \"{}\"\n",
        docker_host()
    ));
    let out = tokio::task::spawn_blocking(move || home.run(&["doctor"]))
        .await
        .expect("join");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("docker") && l.contains("answers")),
        "{out:#?}"
    );
}
