//! The configuration file (`config.toml`) and where things live on disk.
//!
//! Every key is documented in `config.example.toml` at the repository root,
//! which `openpista init` writes out. Unknown keys are errors that name the
//! file, line and key. Secrets may come from the environment instead of the
//! file: `OPENPISTA_API_KEY` (falling back to `OPENAI_API_KEY`), and the
//! Telegram bot token `OPENPISTA_TELEGRAM_TOKEN` (or a mode-0600 file named by
//! `[channels.telegram] token_file`). `OPENPISTA_WORKSPACE` overrides
//! `[paths] workspace`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use openpista_agent::{AgentConfig, QuotaConfig};
use openpista_channels::SecretString;
use openpista_channels::telegram::{DEFAULT_API_URL, MAX_POLL_TIMEOUT_SECS, TelegramConfig};
use openpista_gateway::{GatewayConfig, MetricsConfig};
use openpista_llm::local::LocalConfig;
use openpista_llm::openai::OpenAiConfig;
use openpista_sandbox::docker::DockerConfig;
use openpista_skills::SkillLimits;
use openpista_tools::files::FileLimits;
use openpista_tools::policy::{CommandPolicy, RunSandbox};
use serde::Deserialize;

/// The commented example configuration, written by `openpista init`.
pub const EXAMPLE: &str = include_str!("../../../config.example.toml");

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub paths: PathsConfig,
    pub llm: LlmConfig,
    pub agent: AgentConfig,
    /// `[quotas]`: per-session limits (copied into `agent.quotas` at parse).
    pub quotas: QuotaConfig,
    pub approvals: openpista_agent::ApprovalConfig,
    pub tools: ToolsConfig,
    pub skills: SkillsConfig,
    pub sandbox: SandboxConfig,
    pub gateway: GatewayConfig,
    pub metrics: MetricsConfig,
    pub channels: ChannelsConfig,
    pub log: LogConfig,
}

/// `[channels]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelsConfig {
    pub telegram: TelegramSettings,
}

/// `[channels.telegram]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelegramSettings {
    /// Run the Telegram adapter in `openpista start`.
    pub enabled: bool,
    /// The Bot API base URL (a self-hosted `telegram-bot-api`, or a test fake).
    pub api_url: String,
    /// A file (mode 0600) holding the bot token; `OPENPISTA_TELEGRAM_TOKEN` wins.
    pub token_file: Option<String>,
    /// Numeric Telegram user ids allowed to talk to the agent.
    pub allowed_users: Vec<u64>,
    /// Answer in groups too (one session per chat and user).
    pub groups: bool,
    /// Long-polling timeout of `getUpdates`, in seconds.
    pub poll_timeout_secs: u32,
    /// When the reply draft appears, and the least time between its edits, in ms.
    pub draft_interval_ms: u64,
    /// How long a pairing code stays valid, in seconds.
    pub pairing_ttl_secs: u64,
}

impl Default for TelegramSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            api_url: DEFAULT_API_URL.to_owned(),
            token_file: None,
            allowed_users: Vec::new(),
            groups: false,
            poll_timeout_secs: 10,
            draft_interval_ms: 1000,
            pairing_ttl_secs: 3600,
        }
    }
}

impl TelegramSettings {
    /// The adapter's settings with `token`.
    pub fn adapter_config(&self, token: SecretString) -> TelegramConfig {
        TelegramConfig {
            api_url: Some(self.api_url.clone()),
            allowed_users: self.allowed_users.clone(),
            groups: self.groups,
            poll_timeout_secs: self.poll_timeout_secs,
            draft_interval: std::time::Duration::from_millis(self.draft_interval_ms),
            pairing_ttl: std::time::Duration::from_secs(self.pairing_ttl_secs),
            ..TelegramConfig::new(token)
        }
    }
}

/// The Telegram bot token: `OPENPISTA_TELEGRAM_TOKEN`, else the token file
/// (which must not be readable by group or others).
pub fn telegram_token(loaded: &Loaded, env: &Env) -> Result<SecretString> {
    if let Some(token) = &env.telegram_token {
        return Ok(token.clone());
    }
    let Some(raw) = &loaded.config.channels.telegram.token_file else {
        bail!(
            "[channels.telegram] is enabled but there is no bot token: set OPENPISTA_TELEGRAM_TOKEN \
             or point channels.telegram.token_file at a file with mode 0600"
        );
    };
    let mut path = env.expand(raw);
    if path.is_relative()
        && let Some(dir) = loaded.paths.config_file.parent()
    {
        path = dir.join(path);
    }
    let meta = std::fs::metadata(&path)
        .with_context(|| format!("reading the Telegram token file {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "the Telegram token file {} has mode {mode:o}; make it private: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the Telegram token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the Telegram token file {} is empty", path.display());
    }
    Ok(SecretString::from(token))
}

/// `[paths]`: empty values mean the defaults under the data directory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    pub data_dir: Option<String>,
    pub models_dir: Option<String>,
    pub workspace: Option<String>,
    pub database: Option<String>,
}

/// Which provider answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    #[default]
    Local,
    Openai,
    Scripted,
}

/// `[llm]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    pub provider: ProviderKind,
    pub local: LocalConfig,
    pub openai: OpenAiConfig,
    pub scripted: ScriptedConfig,
}

/// `[llm.scripted]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptedConfig {
    /// TOML file of scripted replies (relative paths are relative to the config file).
    pub file: Option<String>,
}

/// `[tools]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    pub system_run: CommandPolicy,
    pub files: FileLimits,
    /// `[tools.desktop]`: `screen.capture` and `input.control`, off by default.
    pub desktop: openpista_tools::desktop::DesktopConfig,
}

/// `[skills]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SkillsConfig {
    /// Extra skill folders searched after the workspace's `skills/`.
    pub dirs: Vec<String>,
    /// Characters of skill names/descriptions allowed in the system prompt.
    pub prompt_budget: usize,
    /// `[skills.limits]`: timeouts, rlimits and output cap for `skill.run`.
    pub limits: SkillLimits,
}

impl Default for SkillsConfig {
    fn default() -> Self {
        Self {
            dirs: Vec::new(),
            prompt_budget: 2000,
            limits: SkillLimits::default(),
        }
    }
}

/// `[sandbox]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// `[sandbox.docker]`: containers for `container.run`, `system.run` with
    /// `sandbox = "docker"` and `mode: docker` skills.
    pub docker: DockerConfig,
    /// `[sandbox.wasm]`: limits and the module cache for `mode: wasm` skills.
    pub wasm: WasmSandboxConfig,
}

/// `[sandbox.wasm]`: how `mode: wasm` skills run (wasmtime, WASI preview 1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WasmSandboxConfig {
    /// Linear memory cap per call, in MiB.
    pub memory_mb: u64,
    /// Deadline in seconds when `SKILL.md` names no `timeout` (at most
    /// `[skills.limits] max_timeout_secs`).
    pub timeout_secs: u64,
    /// Fuel per call (roughly, WebAssembly instructions); unset: no metering.
    pub fuel: Option<u64>,
    /// Compiled modules; default `<data_dir>/wasm-cache`.
    pub cache_dir: Option<String>,
}

impl Default for WasmSandboxConfig {
    fn default() -> Self {
        Self {
            memory_mb: 64,
            timeout_secs: 30,
            fuel: None,
            cache_dir: None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`RUST_LOG` overrides it), e.g. "info" or "openpista_agent=debug".
    pub level: Option<String>,
}

/// What the process environment contributes (read once, in `main`).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub home: Option<PathBuf>,
    /// `OPENPISTA_HOME`: one root for config and data (tests, portable installs).
    pub openpista_home: Option<PathBuf>,
    /// `OPENPISTA_API_KEY` (or `OPENAI_API_KEY`), held as a secret.
    pub api_key: Option<SecretString>,
    /// `OPENPISTA_TELEGRAM_TOKEN`: the Telegram bot token.
    pub telegram_token: Option<SecretString>,
    pub path: String,
    /// `OPENPISTA_WORKSPACE`: the workspace, overriding the config file.
    pub workspace: Option<PathBuf>,
    /// `DISPLAY` and `WAYLAND_DISPLAY`, for the desktop tools.
    pub desktop: openpista_tools::desktop::DesktopEnv,
}

impl Env {
    /// Reads the variables openpista uses. The only place that reads the environment.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            home: dirs::home_dir(),
            openpista_home: var("OPENPISTA_HOME").map(PathBuf::from),
            api_key: var("OPENPISTA_API_KEY")
                .or_else(|| var("OPENAI_API_KEY"))
                .map(SecretString::from),
            telegram_token: var("OPENPISTA_TELEGRAM_TOKEN").map(SecretString::from),
            path: var("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_owned()),
            workspace: var("OPENPISTA_WORKSPACE").map(PathBuf::from),
            desktop: openpista_tools::desktop::DesktopEnv {
                display: var("DISPLAY"),
                wayland_display: var("WAYLAND_DISPLAY"),
            },
        }
    }

    /// The default config directory.
    pub fn config_dir(&self) -> PathBuf {
        match &self.openpista_home {
            Some(h) => h.clone(),
            None => dirs::config_dir()
                .unwrap_or_else(|| self.home_or_tmp().join(".config"))
                .join("openpista"),
        }
    }

    /// The default data directory.
    pub fn data_dir(&self) -> PathBuf {
        match &self.openpista_home {
            Some(h) => h.clone(),
            None => dirs::data_dir()
                .unwrap_or_else(|| self.home_or_tmp().join(".local/share"))
                .join("openpista"),
        }
    }

    fn home_or_tmp(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// Expands a leading `~`.
    pub fn expand(&self, raw: &str) -> PathBuf {
        openpista_memory::expand_tilde(raw, self.home.as_deref())
    }
}

/// Resolved locations.
#[derive(Debug, Clone)]
pub struct Paths {
    pub config_file: PathBuf,
    pub data_dir: PathBuf,
    pub models_dir: PathBuf,
    pub workspace: PathBuf,
    pub database: PathBuf,
    /// The gateway's shared secret (mode 0600), written by `init`.
    pub token_file: PathBuf,
    /// The generated TLS certificate and key.
    pub tls_dir: PathBuf,
    /// Holds the running daemon's pid.
    pub pid_file: PathBuf,
    /// The running daemon's address and certificate fingerprint (JSON).
    pub state_file: PathBuf,
}

/// A loaded configuration with its resolved paths.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub paths: Paths,
    /// Whether a config file was found (false: built-in defaults).
    pub from_file: bool,
}

/// Loads `explicit` (must exist) or the default config file (may be absent).
pub fn load(explicit: Option<&Path>, env: &Env) -> Result<Loaded> {
    let default_file = env.config_dir().join("config.toml");
    let (file, must_exist) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (default_file, false),
    };
    let (config, from_file) = match std::fs::read_to_string(&file) {
        Ok(text) => (parse(&text, &file)?, true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            (Config::default(), false)
        }
        Err(e) => bail!("cannot read config file {}: {e}", file.display()),
    };
    let data_dir = config
        .paths
        .data_dir
        .as_deref()
        .map(|p| env.expand(p))
        .unwrap_or_else(|| env.data_dir());
    let under = |opt: &Option<String>, default: &str| {
        opt.as_deref()
            .map(|p| env.expand(p))
            .unwrap_or_else(|| data_dir.join(default))
    };
    let paths = Paths {
        models_dir: under(&config.paths.models_dir, "models"),
        workspace: match &env.workspace {
            Some(w) => w.clone(),
            None => under(&config.paths.workspace, "workspace"),
        },
        database: under(&config.paths.database, "openpista.db"),
        token_file: data_dir.join("token"),
        tls_dir: data_dir.join("tls"),
        pid_file: data_dir.join("openpista.pid"),
        state_file: data_dir.join("daemon.json"),
        data_dir: data_dir.clone(),
        config_file: file,
    };
    Ok(Loaded {
        config,
        paths,
        from_file,
    })
}

/// Parses config text; errors name the file, line and key.
pub fn parse(text: &str, file: &Path) -> Result<Config> {
    let mut config: Config = toml::from_str(text)
        .map_err(|e| anyhow::anyhow!("invalid config file {}:\n{e}", file.display()))?;
    config.agent.quotas = config.quotas.clone();
    validate(&config).with_context(|| format!("invalid config file {}", file.display()))?;
    Ok(config)
}

fn validate(config: &Config) -> Result<()> {
    let l = &config.llm.local;
    if !(0.0..=5.0).contains(&l.temperature) {
        bail!(
            "llm.local.temperature must be between 0 and 5, got {}",
            l.temperature
        );
    }
    if !(0.0..=1.0).contains(&l.top_p) || l.top_p == 0.0 {
        bail!("llm.local.top_p must be in (0, 1], got {}", l.top_p);
    }
    if l.max_tokens == 0 {
        bail!("llm.local.max_tokens must be at least 1");
    }
    if config.agent.history_limit == 0 {
        bail!("agent.history_limit must be at least 1");
    }
    if config.llm.provider == ProviderKind::Scripted && config.llm.scripted.file.is_none() {
        bail!("llm.provider = \"scripted\" needs llm.scripted.file");
    }
    let d = &config.sandbox.docker;
    if d.enabled && d.image.trim().is_empty() {
        bail!("sandbox.docker.image must name an image");
    }
    if !(d.cpus.is_finite() && d.cpus >= 0.0) {
        bail!(
            "sandbox.docker.cpus must be 0 (no quota) or more, got {}",
            d.cpus
        );
    }
    if config.tools.system_run.sandbox == RunSandbox::Docker && !d.enabled {
        bail!("tools.system_run.sandbox = \"docker\" needs [sandbox.docker] enabled = true");
    }
    let q = &config.quotas;
    if q.failure_burst > 0 && q.failure_window_secs == 0 {
        bail!("quotas.failure_window_secs must be at least 1 when quotas.failure_burst is set");
    }
    config.gateway.validate()?;
    let tg = &config.channels.telegram;
    if tg.poll_timeout_secs > MAX_POLL_TIMEOUT_SECS {
        bail!("channels.telegram.poll_timeout_secs must be at most {MAX_POLL_TIMEOUT_SECS}");
    }
    if tg.draft_interval_ms < 100 {
        bail!("channels.telegram.draft_interval_ms must be at least 100");
    }
    if tg.pairing_ttl_secs == 0 {
        bail!("channels.telegram.pairing_ttl_secs must be at least 1");
    }
    if url::Url::parse(&tg.api_url).is_err() {
        bail!("channels.telegram.api_url is not a URL: {:?}", tg.api_url);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let c = parse(EXAMPLE, Path::new("config.example.toml")).unwrap();
        assert_eq!(c.llm.provider, ProviderKind::Local);
        assert_eq!(
            c.agent.max_tool_rounds,
            AgentConfig::default().max_tool_rounds
        );
        assert_eq!(c.llm.local, LocalConfig::default());
        assert_eq!(c.gateway, GatewayConfig::default());
        assert_eq!(c.channels, ChannelsConfig::default());
        assert_eq!(c.skills.limits, SkillLimits::default());
        assert_eq!(c.sandbox.docker, DockerConfig::default());
        assert_eq!(c.sandbox.wasm, WasmSandboxConfig::default());
        assert_eq!(c.tools.system_run, CommandPolicy::default());
        assert_eq!(
            c.tools.desktop,
            openpista_tools::desktop::DesktopConfig::default()
        );
        assert_eq!(c.quotas, QuotaConfig::default());
        assert_eq!(c.agent, AgentConfig::default());
        assert_eq!(c.approvals, openpista_agent::ApprovalConfig::default());
        assert_eq!(
            c.skills.prompt_budget,
            SkillsConfig::default().prompt_budget
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse(
            "[llm]\nprovider = \"local\"\n\n[agent]\nmax_rounds = 3\n",
            Path::new("/x/config.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/x/config.toml"), "{err}");
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("max_rounds"), "{err}");
    }

    #[test]
    fn docker_settings_are_checked() {
        let docker_run = "[tools.system_run]\nsandbox = \"docker\"\n";
        let e = parse(docker_run, Path::new("c")).unwrap_err();
        assert!(
            format!("{e:#}").contains("needs [sandbox.docker] enabled = true"),
            "{e:#}"
        );
        let enabled = format!("{docker_run}[sandbox.docker]\nenabled = true\n");
        assert!(parse(&enabled, Path::new("c")).is_ok());
        for bad in [
            "[sandbox.docker]\ncpus = -1.0\n",
            "[sandbox.docker]\nenabled = true\nimage = \" \"\n",
            "[sandbox.docker]\nnetwork = \"host\"\n",
            "[sandbox.docker]\nfallback = \"yolo\"\n",
            "[sandbox.docker]\nprivileged = true\n",
        ] {
            assert!(parse(bad, Path::new("c")).is_err(), "{bad}");
        }
    }

    #[test]
    fn quotas_reach_the_agent_and_are_checked() {
        let c = parse(
            "[quotas]\ntokens_per_turn = 100\ntokens_per_day = 1000\ntool_calls_per_minute = 5\nfailure_burst = 3\nfailure_window_secs = 30\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.agent.quotas, c.quotas);
        assert_eq!(c.agent.quotas.tokens_per_day, 1000);
        assert!(parse("[quotas]\nfailure_window_secs = 0\n", Path::new("c")).is_err());
        assert!(parse("[quotas]\ntokens_per_week = 1\n", Path::new("c")).is_err());
        assert!(parse("[agent]\nquotas = {}\n", Path::new("c")).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse("[llm.local]\ntemperature = -1.0\n", Path::new("c")).is_err());
        assert!(parse("[llm]\nprovider = \"scripted\"\n", Path::new("c")).is_err());
        assert!(parse("[llm]\nprovider = \"nope\"\n", Path::new("c")).is_err());
        assert!(
            parse(
                "[channels.telegram]\npoll_timeout_secs = 500\n",
                Path::new("c")
            )
            .is_err()
        );
        assert!(parse("[channels.telegram]\napi_url = \"nope\"\n", Path::new("c")).is_err());
    }

    #[test]
    fn paths_default_under_data_dir_and_expand_tilde() {
        let env = Env {
            home: Some(PathBuf::from("/home/u")),
            openpista_home: Some(PathBuf::from("/tmp/op")),
            ..Env::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[paths]\nworkspace = \"~/ws\"\n").unwrap();
        let l = load(Some(&f), &env).unwrap();
        assert_eq!(l.paths.workspace, PathBuf::from("/home/u/ws"));
        assert_eq!(l.paths.database, PathBuf::from("/tmp/op/openpista.db"));
        assert!(load(Some(&dir.path().join("missing.toml")), &env).is_err());

        let env = Env {
            workspace: Some(PathBuf::from("/elsewhere")),
            ..env
        };
        let l = load(Some(&f), &env).unwrap();
        assert_eq!(l.paths.workspace, PathBuf::from("/elsewhere"));
    }
}
