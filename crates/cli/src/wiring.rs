//! Builds the running parts (store, tools, model, agent) from the configuration.

use std::sync::Arc;

use anyhow::{Context, Result};
use openpista_agent::{Agent, AgentParts, Approvals};
use openpista_llm::LlmProvider;
use openpista_llm::local::{LocalProvider, resolve_model};
use openpista_llm::openai::OpenAiProvider;
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::Store;
use openpista_sandbox::wasm::WasmConfig;
use openpista_skills::{SkillCatalog, SkillRead, SkillRun, WasmSkills};
use openpista_tools::ToolRegistry;
use openpista_tools::container::{ContainerRun, DockerRunner};
use openpista_tools::system_run::SystemRun;

use crate::config::{Env, Loaded, ProviderKind};

/// Opens (and migrates) the database.
pub async fn store(loaded: &Loaded) -> Result<Store> {
    Store::open(&loaded.paths.database)
        .await
        .with_context(|| format!("opening the database {}", loaded.paths.database.display()))
}

/// The built-in tools under the configured policy, `container.run` when
/// `[sandbox.docker]` is enabled, plus `skill.read` and `skill.run` over
/// `catalog`. Tool and skill processes get a minimal
/// environment: no secret of ours can reach them.
pub fn tools(loaded: &Loaded, env: &Env, catalog: Arc<SkillCatalog>) -> Result<Arc<ToolRegistry>> {
    std::fs::create_dir_all(&loaded.paths.workspace).with_context(|| {
        format!(
            "creating the workspace {}",
            loaded.paths.workspace.display()
        )
    })?;
    let child_env = openpista_sandbox::minimal_env(&env.path, &loaded.paths.workspace);
    let docker = docker_runner(loaded)?;
    let mut registry = ToolRegistry::new();
    let mut system_run = SystemRun::new(loaded.config.tools.system_run.clone(), child_env.clone());
    if let Some(runner) = &docker {
        system_run = system_run.with_docker(runner.clone());
        registry.register(Arc::new(ContainerRun::new(
            runner.clone(),
            child_env.clone(),
        )))?;
    }
    registry.register(Arc::new(system_run))?;
    for tool in openpista_tools::files::file_tools(loaded.config.tools.files) {
        registry.register(tool)?;
    }
    let desktop = loaded.config.tools.desktop;
    if !cfg!(feature = "desktop") && (desktop.screen_capture || desktop.input_control) {
        anyhow::bail!(
            "[tools.desktop] enables a desktop tool, but this openpista was built without the \
             `desktop` feature"
        );
    }
    for tool in openpista_tools::desktop::desktop_tools(desktop, env.desktop.clone()) {
        registry.register(tool)?;
    }
    let mut skill_run = SkillRun::new(catalog.clone(), child_env, loaded.config.skills.limits)
        .with_wasm(wasm_skills(loaded, env));
    if let Some(runner) = docker {
        skill_run = skill_run.with_docker(runner);
    }
    registry.register(Arc::new(SkillRead::new(catalog)))?;
    registry.register(Arc::new(skill_run))?;
    Ok(Arc::new(registry))
}

/// `mode: wasm` skills under `[sandbox.wasm]`, with the workspace preopened
/// read-only and compiled modules cached under `<data_dir>/wasm-cache`.
fn wasm_skills(loaded: &Loaded, env: &Env) -> WasmSkills {
    let cfg = &loaded.config.sandbox.wasm;
    let cache_dir = cfg.cache_dir.as_deref().map_or_else(
        || loaded.paths.data_dir.join("wasm-cache"),
        |d| env.expand(d),
    );
    WasmSkills::new(
        WasmConfig {
            cache_dir: Some(cache_dir),
            fuel: cfg.fuel,
        },
        loaded.paths.workspace.clone(),
        cfg.memory_mb.saturating_mul(1 << 20),
        cfg.timeout_secs,
    )
}

/// The Docker runner when `[sandbox.docker] enabled = true`.
fn docker_runner(loaded: &Loaded) -> Result<Option<Arc<DockerRunner>>> {
    let cfg = &loaded.config.sandbox.docker;
    if !cfg.enabled {
        return Ok(None);
    }
    Ok(Some(Arc::new(DockerRunner::new(cfg.clone())?)))
}

/// Skills from `<workspace>/skills`, the user skills folder
/// `<config dir>/skills` and the configured extra folders, cached and
/// reloaded when they change.
pub fn skills(loaded: &Loaded, env: &Env) -> Arc<SkillCatalog> {
    let mut roots = vec![
        loaded.paths.workspace.join("skills"),
        env.config_dir().join("skills"),
    ];
    roots.extend(loaded.config.skills.dirs.iter().map(|d| env.expand(d)));
    Arc::new(SkillCatalog::new(roots))
}

/// The configured model provider. Loading a local model shows progress on stderr.
pub async fn llm(loaded: &Loaded, env: &Env) -> Result<Arc<dyn LlmProvider>> {
    let cfg = &loaded.config.llm;
    Ok(match cfg.provider {
        ProviderKind::Local => {
            let path = resolve_model(&loaded.paths.models_dir, &cfg.local.model)?;
            let local_cfg = cfg.local.clone();
            let bar = indicatif::ProgressBar::new(100).with_message(format!(
                "loading {}",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ));
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}%")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let cb_bar = bar.clone();
            let provider = tokio::task::spawn_blocking(move || {
                LocalProvider::load(&path, local_cfg, move |p| {
                    cb_bar.set_position((p * 100.0) as u64);
                    true
                })
            })
            .await
            .context("the model loader stopped")??;
            bar.finish_and_clear();
            Arc::new(provider)
        }
        ProviderKind::Openai => {
            let mut oc = cfg.openai.clone();
            if env.api_key.is_some() {
                oc.api_key = env.api_key.clone();
            }
            Arc::new(OpenAiProvider::new(oc)?)
        }
        ProviderKind::Scripted => {
            let raw = cfg.scripted.file.as_deref().unwrap_or_default();
            let mut path = env.expand(raw);
            if path.is_relative()
                && let Some(dir) = loaded.paths.config_file.parent()
            {
                path = dir.join(path);
            }
            Arc::new(ScriptedProvider::new(Script::from_file(&path)?))
        }
    })
}

/// The agent with everything wired in.
pub async fn agent(loaded: &Loaded, env: &Env) -> Result<Agent> {
    let store = store(loaded).await?;
    let catalog = skills(loaded, env);
    let tools = tools(loaded, env, catalog.clone())?;
    let skills = catalog.current();
    for e in &skills.errors {
        tracing::warn!(error = %e, "invalid skill skipped");
    }
    let llm = llm(loaded, env).await?;
    Ok(Agent::with_approvals(
        AgentParts {
            llm,
            tools,
            store,
            config: loaded.config.agent.clone(),
            workspace: loaded.paths.workspace.clone(),
            skills_context: skills.prompt_context(loaded.config.skills.prompt_budget),
        },
        // The allowlist vets system.run commands; one off it asks.
        Approvals::new(
            loaded.config.approvals.clone(),
            Some(loaded.config.tools.system_run.clone()),
        ),
    ))
}

/// The Telegram adapter over `store`, when `[channels.telegram]` is enabled;
/// an error if it is enabled without a token or with a bad setting.
pub fn telegram(
    loaded: &Loaded,
    env: &Env,
    store: Store,
) -> Result<Option<openpista_channels::TelegramAdapter>> {
    let settings = &loaded.config.channels.telegram;
    if !settings.enabled {
        return Ok(None);
    }
    let token = crate::config::telegram_token(loaded, env)?;
    let adapter = openpista_channels::TelegramAdapter::new(&settings.adapter_config(token), store)
        .context("[channels.telegram]")?;
    Ok(Some(adapter))
}
