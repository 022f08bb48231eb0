//! Black-box tests of skills through the `openpista` binary: listing them
//! (with invalid ones reported), running the shipped `word-count` skill, and
//! a scripted model calling `skill.run` in a real turn.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// The repository's top-level `skills/` folder.
fn repo_skills() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../skills")
}

/// One `OPENPISTA_HOME` whose config finds the repository's skills.
struct Home {
    dir: TempDir,
}

#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Home {
    /// A home with the scripted provider playing `script`.
    fn new(script: &str) -> Self {
        let home = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        home.write("replies.toml", script);
        let dirs = serde_json::to_string(&repo_skills().display().to_string()).expect("json");
        home.write(
            "config.toml",
            &format!(
                "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
                 [skills]\ndirs = [{dirs}]\n\n\
                 [approvals.tools]\n\"skill.run\" = \"allow\"\n"
            ),
        );
        home
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(&path, text).expect("write file");
    }

    fn run(&self, args: &[&str]) -> Out {
        let out = Command::new(env!("CARGO_BIN_EXE_openpista"))
            .args(args)
            .env("OPENPISTA_HOME", self.dir.path())
            .env_remove("OPENPISTA_WORKSPACE")
            .env_remove("RUST_LOG")
            .env_remove("OPENPISTA_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .stdin(Stdio::null())
            .output()
            .expect("run openpista");
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

const ECHO_SCRIPT: &str = "on_exhausted = \"echo\"\n";

#[test]
fn skills_list_shows_valid_skills_and_why_invalid_ones_were_skipped() {
    let home = Home::new(ECHO_SCRIPT);
    home.write(
        "workspace/skills/broken/SKILL.md",
        "---\nname: broken\ndescription: d\nnot_a_key: 1\n---\n",
    );
    let out = home.run(&["skills", "list"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("word-count"), "{out:#?}");
    assert!(out.stdout.contains("Counts the words"), "{out:#?}");
    let invalid = out
        .stdout
        .lines()
        .find(|l| l.starts_with("invalid: "))
        .unwrap_or_else(|| panic!("no invalid line: {out:#?}"));
    assert!(invalid.contains("broken/SKILL.md"), "{invalid}");
    assert!(invalid.contains("not_a_key"), "{invalid}");

    let out = home.run(&["skills", "list", "--json"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let v: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert!(
        v["skills"]
            .as_array()
            .expect("skills")
            .iter()
            .any(|s| s["name"] == "word-count" && s["mode"] == "subprocess"),
        "{v}"
    );
    assert_eq!(v["errors"].as_array().expect("errors").len(), 1, "{v}");
}

#[test]
fn skills_show_prints_front_matter_and_body() {
    let home = Home::new(ECHO_SCRIPT);
    let out = home.run(&["skills", "show", "word-count"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("entry:       run.sh"), "{out:#?}");
    assert!(out.stdout.contains("# Word count"), "{out:#?}");
    let out = home.run(&["skills", "show", "nope"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
}

#[test]
fn skills_run_word_count_prints_the_count() {
    let home = Home::new(ECHO_SCRIPT);
    let out = home.run(&[
        "skills",
        "run",
        "word-count",
        "--args",
        r#"{"text":"a b c"}"#,
    ]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.starts_with("[stdout]\n3\n"), "{out:#?}");
    assert!(out.stderr.contains("exit code 0"), "{out:#?}");

    let out = home.run(&["skills", "run", "word-count", "--args", r#"{"txt":"a"}"#]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stdout.contains("invalid arguments"), "{out:#?}");
}

#[test]
fn the_model_runs_a_skill_in_a_turn() {
    let home = Home::new(
        r#"
[[reply]]
text = "Counting."
tool_calls = [{ name = "skill.run", arguments = { name = "word-count", args = { text = "one two three four" } } }]

[[reply]]
text = "There are four words."
"#,
    );
    let out = home.run(&["run", "-e", "count the words", "--json"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let finished = events
        .iter()
        .find(|e| e["type"] == "tool_finished")
        .unwrap_or_else(|| panic!("no tool_finished: {out:#?}"));
    assert_eq!(finished["name"], "skill.run");
    assert_eq!(finished["outcome"], "ok", "{finished}");
    let output = finished["output"].as_str().expect("output");
    assert!(output.starts_with("[stdout]\n4\n"), "{output}");
    assert!(events.iter().any(|e| e["type"] == "final"), "{out:#?}");
}
