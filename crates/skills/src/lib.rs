//! Skills: folders with a `SKILL.md` that teach openpista a new ability.
//!
//! A `SKILL.md` starts with YAML front matter (`name`, `description`, and for
//! runnable skills `mode`, `entry`, `image`, `timeout`, `network`, `args`)
//! followed by the instructions in Markdown. This crate finds and parses
//! them ([`discover`]) and renders the bounded list of names and descriptions
//! that goes into the system prompt ([`SkillSet::prompt_context`]). An invalid
//! `SKILL.md` is reported and skipped, never fatal.
//!
//! [`SkillCatalog`] keeps the parsed set cached and reloads it when a
//! `SKILL.md` under its roots changes. The model reaches skills through two
//! tools (progressive disclosure): [`SkillRead`] (`skill.read`) returns a
//! skill's instructions, [`SkillRun`] (`skill.run`) runs a subprocess skill
//! under operator [`SkillLimits`] via `openpista-sandbox`. `mode: docker`
//! skills run in a fresh container ([`docker`]) when the operator enabled
//! `[sandbox.docker]`; with [`WasmSkills`], a `mode: wasm` skill runs as a
//! WASI module under wasmtime.

mod catalog;
pub mod docker;
mod run;
mod wasm;

pub use catalog::SkillCatalog;
pub use run::{SkillLimits, SkillRead, SkillRun, skill_tools, skill_tools_with_docker};
pub use wasm::WasmSkills;

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file that marks a skill folder.
pub const SKILL_FILE: &str = "SKILL.md";

/// How a skill runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkillMode {
    Subprocess,
    Docker,
    Wasm,
}

impl SkillMode {
    /// The name used in `SKILL.md`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkillMode::Subprocess => "subprocess",
            SkillMode::Docker => "docker",
            SkillMode::Wasm => "wasm",
        }
    }
}

/// The YAML front matter of a `SKILL.md`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkillMeta {
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub mode: Option<SkillMode>,
    #[serde(default)]
    pub entry: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    /// Seconds.
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub network: Option<bool>,
    /// JSON schema of the skill's arguments.
    #[serde(default)]
    pub args: Option<serde_json::Value>,
}

/// A parsed skill.
#[derive(Debug, Clone, PartialEq)]
pub struct Skill {
    pub meta: SkillMeta,
    /// The folder holding `SKILL.md`.
    pub dir: PathBuf,
    /// The Markdown body after the front matter.
    pub body: String,
}

/// A `SKILL.md` that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SkillError {
    pub path: PathBuf,
    pub message: String,
}

/// The skills found under some roots, plus the files that failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkillSet {
    pub skills: Vec<Skill>,
    pub errors: Vec<SkillError>,
}

/// Longest skill name accepted.
const MAX_NAME: usize = 64;

/// Finds every `SKILL.md` under `roots` (recursively; missing roots are
/// skipped). A later root's skill replaces an earlier one of the same name,
/// so a user skills dir can override the workspace's.
pub fn discover(roots: &[PathBuf]) -> SkillSet {
    let mut set = SkillSet::default();
    for root in roots {
        let mut files = Vec::new();
        collect(root, 0, &mut files);
        files.sort();
        for file in files {
            match load(&file) {
                Ok(skill) => {
                    set.skills.retain(|s| s.meta.name != skill.meta.name);
                    set.skills.push(skill);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "skipping invalid skill");
                    set.errors.push(e);
                }
            }
        }
    }
    set.skills.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    set
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            collect(&path, depth + 1, out);
        } else if ft.is_file() && entry.file_name() == SKILL_FILE {
            out.push(path);
        }
    }
}

/// Parses one `SKILL.md`.
pub fn load(path: &Path) -> Result<Skill, SkillError> {
    let err = |message: String| SkillError {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let (front, body) = split_front_matter(&text).ok_or_else(|| {
        err("missing YAML front matter (a block between --- lines at the top)".into())
    })?;
    let meta: SkillMeta =
        serde_saphyr::from_str(front).map_err(|e| err(format!("invalid front matter: {e}")))?;
    let name_ok = !meta.name.is_empty()
        && meta.name.len() <= MAX_NAME
        && meta
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok {
        return Err(err(format!(
            "invalid name {:?}: use 1-{MAX_NAME} characters from a-z A-Z 0-9 - _ .",
            meta.name
        )));
    }
    if meta.description.trim().is_empty() {
        return Err(err("description is empty".into()));
    }
    if let Some(schema) = &meta.args
        && let Err(e) = openpista_tools::compile_schema(schema)
    {
        return Err(err(format!("args is not a valid JSON schema: {e}")));
    }
    Ok(Skill {
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        body: body.trim_start().to_owned(),
        meta,
    })
}

fn split_front_matter(text: &str) -> Option<(&str, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rest = text.strip_prefix("---")?;
    let rest = rest
        .strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            return Some((&rest[..offset], &rest[offset + line.len()..]));
        }
        offset += line.len();
    }
    None
}

impl SkillSet {
    /// The skill list for the system prompt, at most `budget` characters.
    /// Skills that do not fit are counted, not silently dropped.
    pub fn prompt_context(&self, budget: usize) -> String {
        if self.skills.is_empty() {
            return String::new();
        }
        let header = "Skills you can use (read a skill's full instructions with skill.read before \
                      using it; run a runnable one with skill.run):\n";
        let mut out = String::from(header);
        let mut left_out = 0;
        for skill in &self.skills {
            let desc: String = skill.meta.description.trim().chars().take(200).collect();
            let line = format!("- {}: {}\n", skill.meta.name, desc.replace('\n', " "));
            if out.len() + line.len() <= budget {
                out.push_str(&line);
            } else {
                left_out += 1;
            }
        }
        if left_out > 0 {
            out.push_str(&format!("(and {left_out} more skills not listed)\n"));
        }
        if out.len() > budget.max(header.len()) + 40 {
            out.truncate(budget);
        }
        out
    }

    /// Finds a skill by name.
    pub fn get(&self, name: &str) -> Option<&Skill> {
        self.skills.iter().find(|s| s.meta.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn finds_valid_skills_and_reports_invalid_ones() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a/deep/weather/SKILL.md",
            "---\nname: weather\ndescription: Tells the weather.\nmode: subprocess\nentry: run.sh\ntimeout: 10\n---\n# Weather\nRun it.\n",
        );
        write(dir.path(), "bad/SKILL.md", "no front matter here");
        write(
            dir.path(),
            "bad2/SKILL.md",
            "---\nname: x\ndescription: y\nunknown: 1\n---\n",
        );
        write(
            dir.path(),
            "bad3/SKILL.md",
            "---\nname: ../evil\ndescription: y\n---\n",
        );
        let set = discover(&[dir.path().to_path_buf(), dir.path().join("missing")]);
        assert_eq!(set.skills.len(), 1);
        let s = &set.skills[0];
        assert_eq!(s.meta.name, "weather");
        assert_eq!(s.meta.mode, Some(SkillMode::Subprocess));
        assert_eq!(s.meta.timeout, Some(10));
        assert!(s.body.starts_with("# Weather"));
        assert_eq!(set.errors.len(), 3, "{:?}", set.errors);
        assert!(set.errors.iter().any(|e| e.message.contains("unknown")));
        assert!(
            set.errors
                .iter()
                .any(|e| e.message.contains("invalid name"))
        );
    }

    #[test]
    fn later_roots_override_and_context_is_bounded() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write(
            a.path(),
            "s/SKILL.md",
            "---\nname: s\ndescription: from a\n---\n",
        );
        write(
            b.path(),
            "s/SKILL.md",
            "---\nname: s\ndescription: from b\n---\n",
        );
        for i in 0..50 {
            write(
                b.path(),
                &format!("n{i}/SKILL.md"),
                &format!(
                    "---\nname: skill{i:02}\ndescription: {}\n---\n",
                    "d".repeat(50)
                ),
            );
        }
        let set = discover(&[a.path().to_path_buf(), b.path().to_path_buf()]);
        assert_eq!(set.get("s").unwrap().meta.description, "from b");
        let ctx = set.prompt_context(600);
        assert!(ctx.len() <= 640, "{}", ctx.len());
        assert!(ctx.contains("more skills not listed"), "{ctx}");
        assert!(SkillSet::default().prompt_context(100).is_empty());
    }
}
