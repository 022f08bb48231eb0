//! The `openpista` command line: argument definitions, configuration,
//! wiring of the library crates, and the user-facing commands.
//!
//! This is the only crate that reads the environment, installs the tracing
//! subscriber or decides the process exit code.

mod backend;
mod commands;
pub mod config;
mod cron;
mod daemon;
mod doctor;
mod sessions;
mod telegram;
mod wiring;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use openpista_proto::SessionId;

use crate::config::{Env, LogFormat};

/// A personal agent on your own machine, reachable from anywhere, secure by default.
#[derive(Debug, Parser)]
#[command(name = "openpista", version, about, long_about = None)]
pub struct Cli {
    /// Config file (default: ~/.config/openpista/config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented config file and create the workspace and models folders.
    Init {
        /// Overwrite an existing config file.
        #[arg(long)]
        force: bool,
    },
    /// Run one message and print the answer.
    Run(RunArgs),
    /// Chat interactively.
    Repl {
        /// Continue this session.
        #[arg(long, value_parser = session_id)]
        session: Option<SessionId>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Run the gateway daemon in the foreground until SIGTERM or Ctrl-C.
    Start {
        /// Also chat on stdin/stdout as the `cli` channel; `/quit` or the
        /// end of input stops the daemon.
        #[arg(long)]
        stdin: bool,
    },
    /// Ask the running daemon how it is doing.
    Status {
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List the GGUF models in the models folder.
    Models {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Inspect stored sessions; kill, suspend or resume one.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Check the setup; name every insecure setting and how to fix it.
    ///
    /// Exits 1 when something is wrong.
    Doctor,
    /// List tools or call one through the same policy as the agent.
    #[command(subcommand)]
    Tools(ToolsCommand),
    /// List, show or run skills (folders with a SKILL.md).
    #[command(subcommand)]
    Skills(SkillsCommand),
    /// Show or verify the tamper-evident audit trail.
    Audit(AuditArgs),
    /// Scheduled prompts (run by `openpista start`).
    #[command(subcommand)]
    Cron(CronCommand),
    /// Who may talk to the agent from Telegram: approve pairing codes.
    #[command(subcommand)]
    Telegram(TelegramCommand),
}

#[derive(Debug, Subcommand)]
pub enum TelegramCommand {
    /// Approve the pairing code an unknown user was given (works while the daemon runs).
    Pair { code: String },
    /// Allowed, paired and pending users.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a paired user (by numeric Telegram id).
    Unpair { user_id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum CronCommand {
    /// Add a job: EXPR is 5 cron fields, or 6 with seconds first.
    Add {
        /// The cron expression, e.g. "0 9 * * 1-5" or "*/30 * * * * *".
        expr: String,
        /// IANA time zone the expression is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Where the answer goes: session:<id>, or telegram:<chat> (a turn in the
        /// session telegram-<chat>, its answer sent to the chat when Telegram is enabled).
        #[arg(long = "to", value_name = "TARGET")]
        to: String,
        /// Pause the job after this many failed runs in a row.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        max_failures: u32,
        /// Occurrences missed while the daemon was down: skip them, or run the latest once.
        #[arg(long, value_enum, default_value = "skip")]
        missed: MissedArg,
        /// The prompt sent at each occurrence.
        prompt: String,
    },
    /// Every job.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a job and its runs.
    Rm { id: i64 },
    /// Run a job now, through the same path as the scheduler (records a run).
    Run { id: i64 },
    /// Stop running a job until it is resumed.
    Pause { id: i64 },
    /// Run a paused job again (clears its failure count).
    Resume { id: i64 },
}

/// `cron add --missed`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MissedArg {
    Skip,
    RunOnce,
}

/// `openpista audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Recompute the hash chain; exit 1 naming the first bad row if it is broken.
    #[arg(long, conflicts_with_all = ["limit", "session", "json"])]
    pub verify: bool,
    /// Show at most this many rows (the newest).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Only rows of this session.
    #[arg(long, value_parser = session_id)]
    pub session: Option<SessionId>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The message.
    #[arg(short = 'e', long = "execute", value_name = "TEXT")]
    pub text: String,
    /// Continue this session (default: a new one).
    #[arg(long, value_parser = session_id)]
    pub session: Option<SessionId>,
    /// Print every event as a JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// How to reach a running daemon.
#[derive(Debug, Clone, Default, Args)]
pub struct RemoteArgs {
    /// Talk to the daemon at this address over QUIC instead of running the agent here.
    #[arg(long, value_name = "ADDR")]
    pub remote: Option<SocketAddr>,
    /// The daemon's token (default: the token file in the data directory).
    #[arg(long, value_name = "TOKEN", requires = "remote")]
    pub token: Option<String>,
    /// The daemon's certificate SHA-256 fingerprint, as printed by `openpista start`
    /// (default: the one in the local daemon's state file).
    #[arg(long, value_name = "SHA256", requires = "remote")]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Newest sessions first, with each one's state (idle, running,
    /// waiting-approval, suspended).
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel the session's running turn in the daemon, killing its tool
    /// processes and containers.
    Kill {
        #[arg(value_parser = session_id)]
        id: SessionId,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Refuse the session's turns (and kill a running one) until `resume`.
    Suspend {
        #[arg(value_parser = session_id)]
        id: SessionId,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Let a suspended session take turns again.
    Resume {
        #[arg(value_parser = session_id)]
        id: SessionId,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// A session's messages and tool calls.
    Show {
        #[arg(value_parser = session_id)]
        id: SessionId,
        #[arg(long, default_value_t = 200)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Delete a session and everything in it.
    Rm {
        #[arg(value_parser = session_id)]
        id: SessionId,
    },
}

#[derive(Debug, Subcommand)]
pub enum ToolsCommand {
    /// The tools the agent can call, with their argument schemas.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Call one tool, exactly as the agent would.
    Call {
        name: String,
        /// Arguments as JSON.
        #[arg(long, default_value = "{}")]
        args: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SkillsCommand {
    /// The skills found, and the SKILL.md files that are invalid and why.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A skill's front matter and instructions.
    Show { name: String },
    /// Run a skill through `skill.run`, exactly as the agent would.
    Run {
        name: String,
        /// The skill's arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
    },
}

/// Validates a session id on the command line, so a bad one is a usage
/// error (exit 2) reported before anything is loaded.
fn session_id(raw: &str) -> Result<SessionId, String> {
    SessionId::parse(raw).map_err(|e| e.to_string())
}

/// Runs the command and returns the process exit code:
/// 0 success, 1 the command failed, 2 bad usage or configuration.
pub fn main(cli: Cli, env: Env) -> ExitCode {
    let loaded = match config::load(cli.config.as_deref(), &env) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let format = cli.log_format.unwrap_or(loaded.config.log.format);
    init_logging(format, loaded.config.log.level.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(commands::dispatch(cli.command, loaded, env));
    // Do not wait for blocking tasks (e.g. a generation that was cancelled).
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("warn")))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // No colour escapes in redirected output (files, pipes, CI logs).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
