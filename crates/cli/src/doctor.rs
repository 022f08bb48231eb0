//! `openpista doctor`: checks the configuration and the files it names, and
//! names every insecure setting with how to fix it.
//!
//! The config file has already parsed (a bad one is a usage error before
//! any command runs). Then: secret files (gateway token, TLS key and
//! certificate, Telegram token file, a config file holding an API key) must
//! not be readable by group or others; a non-loopback gateway needs a
//! token; the local model must be present and readable; Docker must answer
//! when `[sandbox.docker]` is enabled; `[tools.system_run] mode = "full"` and
//! a Docker fallback to plain subprocesses are insecure. Each line is `ok`,
//! `warn` (worth knowing, not wrong) or `FAIL`; any `FAIL` exits 1.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use openpista_gateway::{CERT_FILE, KEY_FILE};
use openpista_llm::local::resolve_model;
use openpista_sandbox::docker::{DockerSandbox, Fallback};
use openpista_tools::policy::{PolicyMode, RunSandbox};

use crate::config::{Env, Loaded, ProviderKind};

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Default)]
struct Report {
    lines: Vec<(Level, String)>,
}

impl Report {
    fn ok(&mut self, msg: impl Into<String>) {
        self.lines.push((Level::Ok, msg.into()));
    }
    fn warn(&mut self, msg: impl Into<String>) {
        self.lines.push((Level::Warn, msg.into()));
    }
    fn fail(&mut self, msg: impl Into<String>) {
        self.lines.push((Level::Fail, msg.into()));
    }
}

/// `openpista doctor`.
pub async fn run(loaded: &Loaded, env: &Env) -> Result<ExitCode> {
    let mut r = Report::default();
    let cfg = &loaded.config;
    let p = &loaded.paths;

    if loaded.from_file {
        r.ok(format!("config: {} parses", p.config_file.display()));
    } else {
        r.warn(format!(
            "config: no file at {}; using the defaults (`openpista init` writes one)",
            p.config_file.display()
        ));
    }

    // Secret files.
    let token_present = p.token_file.exists();
    if token_present {
        private_file(&mut r, "gateway token", &p.token_file);
    }
    let (cert, key) = match (&cfg.gateway.cert_path, &cfg.gateway.key_path) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (p.tls_dir.join(CERT_FILE), p.tls_dir.join(KEY_FILE)),
    };
    for (what, path) in [("TLS key", &key), ("TLS certificate", &cert)] {
        if path.exists() {
            private_file(&mut r, what, path);
        } else if cfg.gateway.cert_path.is_some() {
            r.fail(format!(
                "{what}: {} is missing; fix gateway.cert_path / gateway.key_path",
                path.display()
            ));
        }
    }
    let tg = &cfg.channels.telegram;
    if let Some(raw) = &tg.token_file {
        let mut path = env.expand(raw);
        if path.is_relative()
            && let Some(dir) = p.config_file.parent()
        {
            path = dir.join(path);
        }
        if path.exists() {
            private_file(&mut r, "Telegram token file", &path);
        } else if tg.enabled && env.telegram_token.is_none() {
            r.fail(format!(
                "Telegram token file: {} is missing; write the bot token there (chmod 600) or set OPENPISTA_TELEGRAM_TOKEN",
                path.display()
            ));
        }
    } else if tg.enabled && env.telegram_token.is_none() {
        r.fail(
            "telegram: enabled without a bot token; set OPENPISTA_TELEGRAM_TOKEN or channels.telegram.token_file (mode 0600)",
        );
    }
    if cfg.llm.openai.api_key.is_some() && loaded.from_file {
        if group_or_other_readable(&p.config_file) {
            r.fail(format!(
                "llm.openai.api_key is in {}, which other users can read; chmod 600 it, or remove the key and set OPENPISTA_API_KEY",
                p.config_file.display()
            ));
        } else {
            r.warn(
                "llm.openai.api_key is in the config file; OPENPISTA_API_KEY keeps it out of files",
            );
        }
    }

    // Bind addresses.
    match cfg.gateway.bind.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() => {
            r.ok(format!("gateway: binds {addr} (loopback)"));
        }
        Ok(addr) if token_present => r.ok(format!(
            "gateway: binds {addr} (reachable from the network; clients need the token)"
        )),
        Ok(addr) => r.fail(format!(
            "gateway: INSECURE: binds {addr} (not loopback) with no token at {}; run `openpista init` to create one, or set gateway.bind = \"127.0.0.1:7879\"",
            p.token_file.display()
        )),
        Err(_) => r.fail(format!(
            "gateway.bind = {:?} is not an address; use e.g. \"127.0.0.1:7879\"",
            cfg.gateway.bind
        )),
    }

    // The model.
    match cfg.llm.provider {
        ProviderKind::Local => match resolve_model(&p.models_dir, &cfg.llm.local.model) {
            Ok(path) => match std::fs::File::open(&path) {
                Ok(_) => r.ok(format!("model: {} is readable", path.display())),
                Err(e) => r.fail(format!(
                    "model: {} cannot be read ({e}); fix its permissions",
                    path.display()
                )),
            },
            Err(e) => r.fail(format!(
                "model: {e}; put a GGUF file in {} or set llm.local.model",
                p.models_dir.display()
            )),
        },
        ProviderKind::Openai => {
            let has_key = env.api_key.is_some() || cfg.llm.openai.api_key.is_some();
            if has_key {
                r.ok(format!(
                    "model: {} at {}",
                    cfg.llm.openai.model, cfg.llm.openai.base_url
                ));
            } else {
                r.warn(format!(
                    "model: no API key for {} (set OPENPISTA_API_KEY if the server needs one)",
                    cfg.llm.openai.base_url
                ));
            }
        }
        ProviderKind::Scripted => r.warn("model: the scripted provider (for tests) answers"),
    }

    // Docker.
    let docker = &cfg.sandbox.docker;
    if docker.enabled {
        let reached = match DockerSandbox::connect(&docker.host) {
            Ok(d) => d.ping().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match reached {
            Ok(()) => r.ok(format!("docker: {} answers", docker.host)),
            Err(e) => r.fail(format!(
                "docker: {e}; start dockerd, fix sandbox.docker.host, or set [sandbox.docker] enabled = false"
            )),
        }
        if docker.fallback == Fallback::Subprocess {
            r.fail(
                "sandbox.docker.fallback: INSECURE: \"subprocess\" runs container tasks without a container when Docker is down; set fallback = \"none\"",
            );
        }
        if docker.network {
            r.warn("sandbox.docker.network = true: containers can reach the network");
        }
    }

    // The command policy.
    let run = &cfg.tools.system_run;
    match run.mode {
        PolicyMode::Full => r.fail(
            "tools.system_run.mode: INSECURE: \"full\" lets the model run any shell command as you; set mode = \"allowlist\"",
        ),
        PolicyMode::Allowlist | PolicyMode::Deny => {
            let mode = if run.mode == PolicyMode::Deny { "deny" } else { "allowlist" };
            r.ok(format!("tools.system_run.mode: {mode}"));
        }
    }
    if run.allow_paths_outside_workspace {
        r.warn("tools.system_run.allow_paths_outside_workspace = true: commands may read files outside the workspace");
    }
    if run.sandbox == RunSandbox::Subprocess && run.mode != PolicyMode::Deny {
        r.ok("tools.system_run.sandbox: subprocess (rlimits; \"docker\" isolates more)");
    }

    let mut failed = 0;
    for (level, msg) in &r.lines {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => {
                failed += 1;
                "FAIL"
            }
        };
        println!("{tag} {msg}");
    }
    if failed > 0 {
        println!("{failed} problem(s) found");
        Ok(ExitCode::from(1))
    } else {
        println!("no problems found");
        Ok(ExitCode::SUCCESS)
    }
}

/// A secret file must not be readable or writable by group or others.
fn private_file(r: &mut Report, what: &str, path: &Path) {
    match mode(path) {
        Ok(m) if m & 0o077 == 0 => r.ok(format!("{what}: {} is private ({m:o})", path.display())),
        Ok(m) => r.fail(format!(
            "{what}: INSECURE: {} has mode {m:o}, open to other users; chmod 600 {}",
            path.display(),
            path.display()
        )),
        Err(e) => r.fail(format!("{what}: {}: {e}", path.display())),
    }
}

fn group_or_other_readable(path: &Path) -> bool {
    mode(path).is_ok_and(|m| m & 0o044 != 0)
}

#[cfg(unix)]
fn mode(path: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn mode(path: &Path) -> std::io::Result<u32> {
    std::fs::metadata(path).map(|_| 0o600)
}
