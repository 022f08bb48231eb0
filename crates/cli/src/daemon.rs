//! `start`, `status`, and connecting to a daemon (`--remote`).
//!
//! The daemon keeps its files in the data directory: `openpista.pid` (held
//! locked while it runs), `daemon.json` (its pid, bound address and
//! certificate fingerprint, written once it listens), `token` (mode 0600,
//! written by `init`) and `tls/` (the generated certificate and key).
//! `start` also prints `listening on ADDR` and `fingerprint: SHA256` on
//! stdout once it is ready.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use openpista_channels::{ExposeSecret, SecretString, StdioAdapter};
use openpista_client::{Client, ClientOptions, Trust};
use openpista_gateway::{
    DaemonOptions, DaemonState, Gateway, GatewayError, MetricsServer, TlsIdentity,
    load_or_create_token, run_daemon, running_pid,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::RemoteArgs;
use crate::config::{Env, Loaded};
use crate::wiring;

/// `openpista start`: runs the gateway until SIGTERM or Ctrl-C, then drains
/// running turns (up to `gateway.drain_timeout_secs`) and exits 0. With
/// `stdin`, the terminal is a channel too (`cli`), and `/quit` or the end of
/// input stops the daemon the same way.
pub async fn start(loaded: &Loaded, env: &Env, stdin: bool) -> Result<ExitCode> {
    let p = &loaded.paths;
    let cfg = loaded.config.gateway.clone();
    // Fail fast, before loading a model.
    if let Some(pid) = running_pid(&p.pid_file)? {
        bail!(
            "openpista is already running (pid {pid}, {}); `openpista status` shows it",
            p.pid_file.display()
        );
    }
    let token = read_token(loaded)?;
    let bind = cfg.validate()?;
    if token.is_none() {
        if !bind.ip().is_loopback() {
            return Err(GatewayError::TokenRequired(bind))
                .context("no token: run `openpista init` to create one");
        }
        eprintln!(
            "warning: no token ({} is missing; `openpista init` creates it): any local user can connect",
            p.token_file.display()
        );
    }
    let identity = match (&cfg.cert_path, &cfg.key_path) {
        (Some(cert), Some(key)) => TlsIdentity::from_pem_files(cert, key)?,
        _ => TlsIdentity::load_or_generate(&p.tls_dir)?,
    };
    let metrics_addr = loaded.config.metrics.validate()?;
    // Fail fast on a missing bot token, before loading a model.
    if loaded.config.channels.telegram.enabled {
        crate::config::telegram_token(loaded, env)?;
    }
    let agent = wiring::agent(loaded, env).await?;
    let telegram = wiring::telegram(loaded, env, agent.store().clone())?;
    if telegram.is_some() {
        println!(
            "telegram: polling {}",
            loaded.config.channels.telegram.api_url
        );
    }
    let gateway = Gateway::new(agent, &cfg);
    let metrics = match metrics_addr {
        Some(addr) => {
            let server = MetricsServer::bind(addr, gateway.clone())?;
            println!("metrics: http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };

    let shutdown = CancellationToken::new();
    // Installed before the server listens, so no signal is missed.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let drain = Duration::from_secs(cfg.drain_timeout_secs);
    let stop = shutdown.clone();
    let signals = tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        eprintln!(
            "{name}: stopping (running turns get {}s to finish; signal again to exit now)",
            drain.as_secs()
        );
        stop.cancel();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Stored messages are safe (each is written when it happens); the
        // PID file is left for the next start to take over.
        eprintln!("{name} again: exiting without draining");
        std::process::exit(130);
    });

    let opts = DaemonOptions {
        gateway,
        config: cfg,
        identity,
        token,
        pid_file: p.pid_file.clone(),
        state_file: p.state_file.clone(),
        drain_deadline: drain,
        shutdown,
        cron: true,
        telegram,
        stdin: stdin.then(|| StdioAdapter::stdio("local")),
    };
    let state_file = p.state_file.clone();
    let exit = run_daemon(opts, |state| {
        println!(
            "openpista {} listening on {} (pid {})",
            state.version, state.addr, state.pid
        );
        println!("fingerprint: {}", state.fingerprint);
        println!("state: {}", state_file.display());
        release_startup_heap();
    })
    .await;
    signals.abort();
    if let Some(m) = &metrics {
        m.shutdown(Duration::from_secs(1)).await;
    }
    let exit = exit?;
    if !exit.drained {
        eprintln!("warning: some turns did not finish storing in time");
    }
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Hands the heap that start-up used and freed (parsing config, compiling
/// tool schemas) back to the system, so an idle daemon does not keep it
/// resident. glibc keeps freed memory in its arenas otherwise.
fn release_startup_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; it
    // touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `openpista status`: asks the daemon (the local one, or `--remote`).
pub async fn status(loaded: &Loaded, remote: &RemoteArgs) -> Result<ExitCode> {
    let p = &loaded.paths;
    let state = DaemonState::read(&p.state_file)?;
    let addr = match (remote.remote, &state) {
        (Some(addr), _) => addr,
        (None, Some(state)) if running_pid(&p.pid_file)?.is_some() => state.addr,
        (None, _) => {
            println!("openpista is not running");
            return Ok(ExitCode::from(1));
        }
    };
    let client = connect(loaded, remote, addr).await?;
    let s = client.status().await.context("asking the daemon")?;
    client.close().await;
    println!("openpista {} running at {addr}", s.server_version);
    if let Some(state) = state.filter(|st| remote.remote.is_none() || st.addr == addr) {
        println!("pid: {}", state.pid);
    }
    println!("fingerprint: {}", fingerprint(loaded, remote)?);
    println!("uptime: {}s", s.uptime_secs);
    println!(
        "sessions: {} live, {} running turns",
        s.live_sessions, s.running_turns
    );
    println!("connections: {}", s.connections);
    Ok(ExitCode::SUCCESS)
}

/// Connects to the daemon at `addr`, pinning its certificate.
pub async fn connect(loaded: &Loaded, remote: &RemoteArgs, addr: SocketAddr) -> Result<Client> {
    let token = match &remote.token {
        Some(t) => Some(t.clone()),
        // The client SDK sends it in `hello`; it is exposed only here.
        None => read_token(loaded)?.map(|t| t.expose_secret().to_owned()),
    };
    let trust = Trust::Fingerprint(fingerprint(loaded, remote)?);
    let options = ClientOptions {
        client_name: format!("openpista-cli/{}", env!("CARGO_PKG_VERSION")),
        ..ClientOptions::default()
    };
    Client::connect_with(addr, token, trust, options)
        .await
        .with_context(|| format!("connecting to the daemon at {addr}"))
}

/// `--fingerprint`, or the one the local daemon published.
fn fingerprint(loaded: &Loaded, remote: &RemoteArgs) -> Result<String> {
    if let Some(f) = &remote.fingerprint {
        return Ok(f.clone());
    }
    match DaemonState::read(&loaded.paths.state_file)? {
        Some(state) => Ok(state.fingerprint),
        None => bail!(
            "no fingerprint to check the daemon against: pass --fingerprint (printed by `openpista start`)"
        ),
    }
}

/// The token file's contents, if `init` wrote one.
fn read_token(loaded: &Loaded) -> Result<Option<SecretString>> {
    let path = &loaded.paths.token_file;
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(load_or_create_token(path)?))
}
