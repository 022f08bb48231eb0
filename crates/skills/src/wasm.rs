//! `mode: wasm` skills: the entry is a WASI preview 1 command module run by
//! [`openpista_sandbox::wasm`], with the arguments as JSON on stdin, the
//! workspace preopened read-only at `/workspace`, and the operator's
//! [`WasmSkills`] limits (the timeout may come from `SKILL.md`, capped by
//! `[skills.limits] max_timeout_secs`). Nothing in the model's arguments
//! changes a limit.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openpista_proto::ToolOutcome;
use openpista_sandbox::RunOutput;
use openpista_sandbox::wasm::{
    WasmConfig, WasmError, WasmLimits, WasmOutput, WasmRequest, WasmRuntime,
};
use openpista_tools::system_run::render;
use openpista_tools::{ToolContext, ToolError, ToolOutput};

use serde_json::{Value, json};

use crate::Skill;
use crate::run::{SkillLimits, check_args, resolve_entry};

/// What WASM skills run with: the shared runtime (built on first use), the
/// workspace to preopen and the operator's limits (`[sandbox.wasm]`).
#[derive(Debug, Clone)]
pub struct WasmSkills {
    config: WasmConfig,
    runtime: Arc<OnceLock<Result<WasmRuntime, String>>>,
    /// Preopened read-only at `/workspace`.
    pub workspace: PathBuf,
    /// Linear memory cap, in bytes.
    pub memory_bytes: u64,
    /// Deadline when `SKILL.md` names no `timeout`.
    pub timeout_secs: u64,
}

impl WasmSkills {
    /// The engine is built on the first WASM skill call, with `config`.
    pub fn new(
        config: WasmConfig,
        workspace: PathBuf,
        memory_bytes: u64,
        timeout_secs: u64,
    ) -> Self {
        Self {
            config,
            runtime: Arc::new(OnceLock::new()),
            workspace,
            memory_bytes,
            timeout_secs,
        }
    }

    /// The shared runtime, built on first use.
    pub fn runtime(&self) -> Result<&WasmRuntime, ToolError> {
        self.runtime
            .get_or_init(|| WasmRuntime::new(self.config.clone()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| ToolError::Failed(e.clone()))
    }
}

/// `skill.run` for a `mode: wasm` skill: checks the arguments against the
/// skill's schema, finds its module (`entry`, inside the skill folder) and
/// runs it with the arguments as JSON on stdin. A non-zero exit is reported
/// like a subprocess skill's; traps, out of memory and out of fuel are tool
/// errors that carry what the module printed.
pub(crate) async fn run_skill(
    wasm: Option<&WasmSkills>,
    limits: &SkillLimits,
    skill: &Skill,
    args: Option<Value>,
    ctx: &ToolContext,
) -> Result<ToolOutput, ToolError> {
    let name = &skill.meta.name;
    let Some(wasm) = wasm else {
        return Err(ToolError::Failed(format!(
            "skill {name} uses mode wasm, but WASM skills are not enabled here"
        )));
    };
    let skill_args = args.unwrap_or_else(|| json!({}));
    check_args(skill, &skill_args)?;
    let Some(entry) = skill.meta.entry.as_deref() else {
        return Err(ToolError::Failed(format!(
            "skill {name} uses mode wasm but names no `entry` (its .wasm file)"
        )));
    };
    if !skill.dir.join(entry).exists() {
        return Err(ToolError::Failed(format!(
            "skill {name}: its module {entry} is missing; build it with scripts/common.sh \
             (build_wasm_skills compiles skills/*/*.c with clang-14 --target=wasm32-wasi)"
        )));
    }
    let (_dir, entry) = resolve_entry(skill)?;
    let stdin = serde_json::to_vec(&skill_args).map_err(|e| ToolError::Failed(e.to_string()))?;
    let max = limits.max_timeout_secs.max(1);
    let timeout = Duration::from_secs(
        skill
            .meta
            .timeout
            .unwrap_or(wasm.timeout_secs)
            .clamp(1, max),
    );
    let request = WasmRequest {
        stdin,
        workspace: Some(wasm.workspace.clone()),
        limits: WasmLimits {
            memory_bytes: wasm.memory_bytes,
            timeout,
            output_limit: limits.output_limit.saturating_mul(4),
        },
    };
    tracing::debug!(skill = %name, ?timeout, "skill.run (wasm)");
    let result = wasm
        .runtime()?
        .run_file_async(entry, request, ctx.cancel.clone())
        .await;
    let (out, code) = match result {
        Ok(out) => (out, 0),
        Err(WasmError::Exit { code, output }) => (*output, code),
        Err(WasmError::Cancelled { .. }) => return Err(ToolError::Cancelled),
        Err(WasmError::DeadlineExceeded { timeout, .. }) => {
            return Err(ToolError::Timeout(timeout));
        }
        Err(e) => {
            let shown = e
                .output()
                .map(|out| format!("\n{}", render(&run_output(out, None), limits.output_limit)))
                .unwrap_or_default();
            return Err(ToolError::Failed(format!("skill {name}: {e}{shown}")));
        }
    };
    Ok(ToolOutput {
        content: render(&run_output(&out, Some(code)), limits.output_limit),
        exit_code: Some(code),
        outcome: if code == 0 {
            ToolOutcome::Ok
        } else {
            ToolOutcome::Error
        },
        images: Vec::new(),
    })
}

/// The shape `system.run` renders, so both kinds of skill read the same.
fn run_output(out: &WasmOutput, exit_code: Option<i32>) -> RunOutput {
    RunOutput {
        stdout: out.stdout.clone(),
        stderr: out.stderr.clone(),
        exit_code,
        signal: None,
        timed_out: false,
        cancelled: false,
        truncated: out.truncated(),
        dropped_stdout: out.dropped_stdout,
        dropped_stderr: out.dropped_stderr,
        duration: out.duration,
    }
}
