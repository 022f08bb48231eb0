//! `mode: wasm` skills through `skill.run`, on the real wasmtime: the shipped
//! `hello-wasm` skill (built from C by scripts/common.sh), and hostile
//! modules whose limits come from SKILL.md and the operator, never from the
//! model's arguments.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openpista_proto::ToolOutcome;
use openpista_sandbox::wasm::WasmConfig;
use openpista_skills::{SkillCatalog, SkillLimits, SkillRead, SkillRun, WasmSkills};
use openpista_tools::{ToolContext, ToolRegistry, ToolResult};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn repo_skills() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../skills")
}

/// Skills from `roots`, WASM enabled with a 64 MiB cap and a 30 s default,
/// `workspace` preopened.
fn registry(roots: Vec<PathBuf>, workspace: &Path, cache: &Path) -> ToolRegistry {
    let catalog = Arc::new(SkillCatalog::new(roots));
    let wasm = WasmSkills::new(
        WasmConfig {
            cache_dir: Some(cache.to_path_buf()),
            fuel: None,
        },
        workspace.to_path_buf(),
        64 << 20,
        30,
    );
    let run = SkillRun::new(catalog.clone(), Vec::new(), SkillLimits::default()).with_wasm(wasm);
    let mut registry = ToolRegistry::new();
    registry
        .register(Arc::new(SkillRead::new(catalog)))
        .expect("register");
    registry.register(Arc::new(run)).expect("register");
    registry
}

async fn call(registry: &ToolRegistry, workspace: &Path, args: Value) -> ToolResult {
    let ctx = ToolContext {
        workspace: workspace.to_path_buf(),
        cancel: CancellationToken::new(),
        session_id: None,
        approved: false,
    };
    registry.call("skill.run", &args.to_string(), &ctx).await
}

/// The JSON line hello-wasm printed.
fn hello_json(content: &str) -> Value {
    let line = content
        .lines()
        .find(|l| l.starts_with("{\"greeting\""))
        .unwrap_or_else(|| panic!("no JSON line in {content}"));
    serde_json::from_str(line).expect("hello-wasm prints JSON")
}

#[tokio::test]
async fn hello_wasm_runs_through_skill_run_and_sees_the_workspace_read_only() {
    let module = repo_skills().join("hello-wasm/hello.wasm");
    assert!(
        module.is_file(),
        "{} is not built: run `bash -c 'source scripts/common.sh && install_wasm_toolchain && \
         build_wasm_skills'` (scripts/test.sh does this)",
        module.display()
    );
    let workspace = tempfile::tempdir().expect("temp dir");
    std::fs::write(workspace.path().join("notes.txt"), "n").expect("write");
    let cache = tempfile::tempdir().expect("temp dir");
    let registry = registry(vec![repo_skills()], workspace.path(), cache.path());

    let r = call(
        &registry,
        workspace.path(),
        json!({"name": "hello-wasm", "args": {"name": "pista"}}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(r.exit_code, Some(0));
    let v = hello_json(&r.content);
    assert_eq!(v["greeting"], "hello from wasm");
    assert_eq!(v["args"], json!({"name": "pista"}));
    assert_eq!(v["workspace"], json!(["notes.txt"]));
    // The compiled module was cached on disk.
    let cached = std::fs::read_dir(cache.path()).expect("cache").count();
    assert_eq!(cached, 1);

    // Arguments are checked against the skill's schema; an attempt to pass
    // limits is refused, not applied.
    let r = call(
        &registry,
        workspace.path(),
        json!({"name": "hello-wasm", "args": {"name": "x", "memory_mb": 4096}}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(r.content.contains("memory_mb"), "{}", r.content);
    let r = call(
        &registry,
        workspace.path(),
        json!({"name": "hello-wasm", "args": {}, "timeout": 999}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

#[tokio::test]
async fn hostile_wasm_skills_are_stopped_and_reported() {
    let skills = tempfile::tempdir().expect("temp dir");
    let workspace = tempfile::tempdir().expect("temp dir");
    let cache = tempfile::tempdir().expect("temp dir");
    let root = skills.path();
    // SKILL.md's timeout (1 s) applies.
    write(
        root,
        "spin/SKILL.md",
        "---\nname: spin\ndescription: loops\nmode: wasm\nentry: spin.wat\ntimeout: 1\n---\n",
    );
    write(
        root,
        "spin/spin.wat",
        r#"(module (func (export "_start") (loop $l (br $l))))"#,
    );
    write(
        root,
        "hog/SKILL.md",
        "---\nname: hog\ndescription: allocates\nmode: wasm\nentry: hog.wat\n---\n",
    );
    write(
        root,
        "hog/hog.wat",
        r#"(module (memory 1) (func (export "_start")
             (if (i32.eq (memory.grow (i32.const 1600)) (i32.const -1)) (then unreachable))))"#,
    );
    write(
        root,
        "exit3/SKILL.md",
        "---\nname: exit3\ndescription: fails\nmode: wasm\nentry: exit3.wat\n---\n",
    );
    write(
        root,
        "exit3/exit3.wat",
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start") (call $exit (i32.const 3))))"#,
    );
    write(
        root,
        "missing/SKILL.md",
        "---\nname: missing\ndescription: not built\nmode: wasm\nentry: missing.wasm\n---\n",
    );
    write(
        root,
        "escape/SKILL.md",
        "---\nname: escape\ndescription: d\nmode: wasm\nentry: ../spin/spin.wat\n---\n",
    );
    let registry = registry(vec![root.to_path_buf()], workspace.path(), cache.path());

    let started = std::time::Instant::now();
    let r = call(&registry, workspace.path(), json!({"name": "spin"})).await;
    assert_eq!(r.outcome, ToolOutcome::Timeout, "{}", r.content);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "did not hang"
    );

    let r = call(&registry, workspace.path(), json!({"name": "hog"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(r.content.contains("out of memory"), "{}", r.content);

    let r = call(&registry, workspace.path(), json!({"name": "exit3"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert_eq!(r.exit_code, Some(3), "{}", r.content);

    let r = call(&registry, workspace.path(), json!({"name": "missing"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(r.content.contains("build_wasm_skills"), "{}", r.content);

    let r = call(&registry, workspace.path(), json!({"name": "escape"})).await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{}", r.content);
}

#[tokio::test]
async fn wasm_skills_are_refused_when_not_enabled() {
    let skills = tempfile::tempdir().expect("temp dir");
    write(
        skills.path(),
        "w/SKILL.md",
        "---\nname: w\ndescription: d\nmode: wasm\nentry: w.wat\n---\n",
    );
    let catalog = Arc::new(SkillCatalog::new(vec![skills.path().to_path_buf()]));
    let mut registry = ToolRegistry::new();
    registry
        .register(Arc::new(SkillRun::new(
            catalog,
            Vec::new(),
            SkillLimits::default(),
        )))
        .expect("register");
    let r = call(&registry, skills.path(), json!({"name": "w"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(r.content.contains("not enabled"), "{}", r.content);
}
