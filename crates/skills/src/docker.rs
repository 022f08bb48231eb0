//! `mode: docker` skills: the container task for one `skill.run`.
//!
//! The skill folder is mounted read-only at [`SKILL_DIR`] (also the working
//! directory), the workspace read-only at `/workspace`, and the arguments are
//! written as JSON to the entry's stdin, as in subprocess mode. The image is
//! the skill's `image` (or the operator's default); every other limit is the
//! operator's `[sandbox.docker]`, except that `SKILL.md` may shorten the
//! timeout (bounded by `[skills.limits]`) and may ask for the network, which
//! it only gets when the operator allows network for containers.

use std::path::Path;

use openpista_sandbox::docker::ContainerTask;
use openpista_tools::container::DockerRunner;
use openpista_tools::{ToolContext, ToolError};
use serde_json::Value;

use crate::Skill;
use crate::run::SkillLimits;

/// Where the skill folder appears inside the container.
pub const SKILL_DIR: &str = "/skill";

/// The container task running `entry` (inside the canonical skill folder `dir`).
pub(crate) fn task(
    runner: &DockerRunner,
    skill: &Skill,
    limits: &SkillLimits,
    dir: &Path,
    entry: &Path,
    args: &Value,
    ctx: &ToolContext,
) -> Result<ContainerTask, ToolError> {
    let name = &skill.meta.name;
    let rel = entry.strip_prefix(dir).map_err(|_| {
        ToolError::Denied(format!(
            "skill {name}: the entry leads outside the skill folder"
        ))
    })?;
    let inside = format!("{SKILL_DIR}/{}", rel.to_string_lossy());
    let argv = if inside.ends_with(".sh") {
        vec!["sh".to_owned(), inside]
    } else if inside.ends_with(".py") {
        vec!["python3".to_owned(), inside]
    } else {
        vec![inside]
    };
    let workspace = std::fs::canonicalize(&ctx.workspace).map_err(|e| {
        ToolError::Failed(format!(
            "the workspace {} is not usable: {e}",
            ctx.workspace.display()
        ))
    })?;
    let mut task = runner.task(argv, &workspace, SKILL_DIR.to_owned());
    if let Some(image) = &skill.meta.image {
        task.policy.image = image.clone();
    }
    task.policy.network = runner.config().network && skill.meta.network.unwrap_or(false);
    task.timeout = limits.timeout_for(skill);
    task.mounts.push((dir.to_path_buf(), SKILL_DIR.to_owned()));
    task.stdin = Some(serde_json::to_vec(args).map_err(|e| ToolError::Failed(e.to_string()))?);
    task.output_limit = limits.output_limit.saturating_mul(4);
    Ok(task)
}
