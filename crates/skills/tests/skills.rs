//! Skills as the agent uses them: discovered from real folders, read and run
//! as real subprocesses through `skill.read` and `skill.run`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openpista_proto::ToolOutcome;
use openpista_skills::{SkillCatalog, SkillLimits, skill_tools};
use openpista_tools::{ToolContext, ToolRegistry, ToolResult};
use serde_json::json;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

struct Fixture {
    dir: TempDir,
    registry: ToolRegistry,
    catalog: Arc<SkillCatalog>,
}

fn registry(catalog: Arc<SkillCatalog>, home: &Path, limits: SkillLimits) -> ToolRegistry {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    let env = openpista_sandbox::minimal_env(&path, home);
    let mut registry = ToolRegistry::new();
    for tool in skill_tools(catalog, env, limits) {
        registry.register(tool).unwrap();
    }
    registry
}

async fn call(
    registry: &ToolRegistry,
    dir: &Path,
    tool: &str,
    args: serde_json::Value,
) -> ToolResult {
    let ctx = ToolContext {
        workspace: dir.to_path_buf(),
        cancel: CancellationToken::new(),
        session_id: None,
        approved: false,
    };
    registry.call(tool, &args.to_string(), &ctx).await
}

impl Fixture {
    fn new() -> Self {
        Self::with_limits(SkillLimits::default())
    }

    fn with_limits(limits: SkillLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("skills")).unwrap();
        let catalog = Arc::new(SkillCatalog::new(vec![dir.path().join("skills")]));
        let registry = registry(catalog.clone(), dir.path(), limits);
        Self {
            dir,
            registry,
            catalog,
        }
    }

    fn skills(&self) -> PathBuf {
        self.dir.path().join("skills")
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.skills().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A subprocess skill `name` whose entry `entry` holds `script`.
    fn skill(&self, name: &str, extra_meta: &str, entry: &str, script: &str) {
        self.write(
            &format!("{name}/SKILL.md"),
            &format!(
                "---\nname: {name}\ndescription: test skill {name}\nmode: subprocess\nentry: {entry}\n{extra_meta}---\nBody of {name}.\n"
            ),
        );
        self.write(&format!("{name}/{entry}"), script);
    }

    async fn call(&self, tool: &str, args: serde_json::Value) -> ToolResult {
        call(&self.registry, self.dir.path(), tool, args).await
    }
}

#[tokio::test]
async fn catalog_reloads_when_a_skill_md_changes() {
    let f = Fixture::new();
    assert!(f.catalog.current().skills.is_empty());
    f.write("a/SKILL.md", "---\nname: a\ndescription: first\n---\n");
    assert_eq!(
        f.catalog.current().get("a").unwrap().meta.description,
        "first"
    );
    let same = f.catalog.current();
    assert!(
        Arc::ptr_eq(&same, &f.catalog.current()),
        "no change, no reload"
    );

    f.write(
        "a/SKILL.md",
        "---\nname: a\ndescription: second version\n---\n",
    );
    assert_eq!(
        f.catalog.current().get("a").unwrap().meta.description,
        "second version"
    );
    f.write("deep/er/b/SKILL.md", "not front matter");
    let set = f.catalog.current();
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    std::fs::remove_dir_all(f.skills().join("a")).unwrap();
    assert!(f.catalog.current().get("a").is_none());
}

#[tokio::test]
async fn skill_read_returns_the_body() {
    let f = Fixture::new();
    f.skill("hello", "", "run.sh", "echo hi\n");
    let r = f.call("skill.read", json!({"name": "hello"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(r.content.contains("Body of hello."), "{}", r.content);
    let r = f.call("skill.read", json!({"name": "nope"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert!(
        r.content.contains("available skills: hello"),
        "{}",
        r.content
    );
}

#[tokio::test]
async fn bash_and_python_skills_get_their_args_as_json_on_stdin() {
    let f = Fixture::new();
    let schema =
        "args:\n  type: object\n  properties:\n    text: {type: string}\n  required: [text]\n";
    f.skill(
        "shout",
        schema,
        "run.sh",
        "read -r input\necho \"got: $input\"\necho \"cwd: $(pwd)\"\n",
    );
    f.skill(
        "upper",
        schema,
        "main.py",
        "import json, sys\nprint(json.load(sys.stdin)['text'].upper())\n",
    );
    let r = f
        .call(
            "skill.run",
            json!({"name": "shout", "args": {"text": "hi"}}),
        )
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(r.content.contains(r#"got: {"text":"hi"}"#), "{}", r.content);
    let dir = std::fs::canonicalize(f.skills().join("shout")).unwrap();
    assert!(
        r.content.contains(&format!("cwd: {}", dir.display())),
        "{}",
        r.content
    );
    assert_eq!(r.exit_code, Some(0));

    let r = f
        .call(
            "skill.run",
            json!({"name": "upper", "args": {"text": "abc"}}),
        )
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(r.content.contains("[stdout]\nABC\n"), "{}", r.content);
}

#[tokio::test]
async fn args_failing_the_schema_are_refused_before_running() {
    let f = Fixture::new();
    f.skill(
        "strict",
        "args:\n  type: object\n  properties:\n    count: {type: integer}\n  required: [count]\n",
        "run.sh",
        "touch ran\n",
    );
    let r = f
        .call(
            "skill.run",
            json!({"name": "strict", "args": {"count": "x"}}),
        )
        .await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert!(r.content.contains("invalid arguments"), "{}", r.content);
    assert!(r.content.contains("/count"), "{}", r.content);
    assert!(!f.skills().join("strict/ran").exists());
    let r = f.call("skill.run", json!({"name": "strict"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert!(!f.skills().join("strict/ran").exists());
    // The same skill with valid args does run, so the checks above can fail.
    let r = f
        .call("skill.run", json!({"name": "strict", "args": {"count": 1}}))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(f.skills().join("strict/ran").exists());
}

#[tokio::test]
async fn a_non_zero_exit_is_an_error_with_the_code() {
    let f = Fixture::new();
    f.skill("fail", "", "run.sh", "echo oops >&2\nexit 3\n");
    let r = f.call("skill.run", json!({"name": "fail"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert_eq!(r.exit_code, Some(3));
    assert!(r.content.contains("[stderr]\noops\n"), "{}", r.content);
    assert!(r.content.ends_with("[exit code: 3]"), "{}", r.content);
}

/// Whether `pid` is still a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_timeout_kills_the_whole_process_group() {
    let f = Fixture::new();
    f.skill(
        "hang",
        "timeout: 1\n",
        "run.sh",
        "sleep 100 &\necho $! > sleep.pid\nwait\n",
    );
    let r = f.call("skill.run", json!({"name": "hang"})).await;
    assert_eq!(r.outcome, ToolOutcome::Timeout, "{r:?}");
    let pid: i32 = std::fs::read_to_string(f.skills().join("hang/sleep.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The group got SIGKILL before `run` returned; give the kernel a moment to reap.
    let mut gone = false;
    for _ in 0..100 {
        if !alive(pid) {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone, "the backgrounded sleep {pid} outlived the skill");
}

#[tokio::test]
async fn entries_outside_the_skill_folder_are_refused() {
    let f = Fixture::new();
    f.write(
        "dots/SKILL.md",
        "---\nname: dots\ndescription: d\nmode: subprocess\nentry: ../../etc/passwd\n---\n",
    );
    f.write(
        "abs/SKILL.md",
        "---\nname: abs\ndescription: d\nmode: subprocess\nentry: /bin/true\n---\n",
    );
    let outside = f.dir.path().join("outside.sh");
    std::fs::write(&outside, "touch escaped\n").unwrap();
    f.write(
        "link/SKILL.md",
        "---\nname: link\ndescription: d\nmode: subprocess\nentry: run.sh\n---\n",
    );
    std::os::unix::fs::symlink(&outside, f.skills().join("link/run.sh")).unwrap();
    for name in ["dots", "abs", "link"] {
        let r = f.call("skill.run", json!({"name": name})).await;
        assert_eq!(r.outcome, ToolOutcome::Denied, "{name}: {r:?}");
        assert!(r.content.contains("skill folder"), "{name}: {}", r.content);
    }
    assert!(!f.skills().join("link/escaped").exists());
    assert!(!f.dir.path().join("escaped").exists());
}

#[tokio::test]
async fn docker_and_wasm_skills_need_the_operators_setup() {
    let f = Fixture::new();
    f.write(
        "box/SKILL.md",
        "---\nname: box\ndescription: d\nmode: docker\nimage: alpine\n---\n",
    );
    f.write(
        "wasm/SKILL.md",
        "---\nname: wasm\ndescription: d\nmode: wasm\nentry: x.wasm\n---\n",
    );
    // Docker skills need the operator's [sandbox.docker] (see tests/docker.rs).
    let r = f.call("skill.run", json!({"name": "box"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert!(
        r.content.contains("[sandbox.docker] is not enabled"),
        "{}",
        r.content
    );
    // WASM skills run only where the caller enabled them (see tests/wasm.rs).
    let r = f.call("skill.run", json!({"name": "wasm"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert!(
        r.content.contains("WASM skills are not enabled"),
        "{}",
        r.content
    );
}

#[tokio::test]
async fn the_file_size_limit_stops_a_big_write() {
    let limit = 1 << 20;
    let f = Fixture::with_limits(SkillLimits {
        file_size_bytes: limit,
        ..SkillLimits::default()
    });
    f.skill(
        "big",
        "",
        "run.sh",
        "set -e\nhead -c 10485760 /dev/zero > big.bin\necho wrote\n",
    );
    let r = f.call("skill.run", json!({"name": "big"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert!(!r.content.contains("wrote"), "{}", r.content);
    let len = std::fs::metadata(f.skills().join("big/big.bin"))
        .unwrap()
        .len();
    assert!(len <= limit, "{len} bytes written past the {limit} limit");
}

#[tokio::test]
async fn the_shipped_word_count_skill_counts_words() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../skills");
    let catalog = Arc::new(SkillCatalog::new(vec![root]));
    let set = catalog.current();
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert!(set.get("word-count").is_some());
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(catalog, dir.path(), SkillLimits::default());
    let args = json!({"name": "word-count", "args": {"text": "one two  three\nfour"}});
    let r = call(&registry, dir.path(), "skill.run", args).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(r.content.starts_with("[stdout]\n4\n"), "{}", r.content);
}
