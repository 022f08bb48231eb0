//! `mode: docker` skills through `skill.run`, against a real dockerd (started
//! by `scripts/test.sh`) and the locally imported busybox image.

use std::path::Path;
use std::sync::Arc;

use openpista_proto::ToolOutcome;
use openpista_sandbox::docker::DockerConfig;
use openpista_skills::{SkillCatalog, SkillLimits, skill_tools, skill_tools_with_docker};
use openpista_testkit::docker::{
    TEST_IMAGE, TEST_LABEL, assert_no_container_left, docker, docker_host, ensure_test_image,
};
use openpista_tools::container::DockerRunner;
use openpista_tools::{ToolContext, ToolRegistry, ToolResult};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn write_skill(root: &Path, name: &str, front: &str, script: &str) {
    let dir = root.join("skills").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("SKILL.md"),
        format!(
            "---\nname: {name}\ndescription: test skill {name}\nmode: docker\n{front}---\nBody.\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("run.sh"), script).unwrap();
}

fn registry(root: &Path, docker: Option<Arc<DockerRunner>>) -> ToolRegistry {
    let catalog = Arc::new(SkillCatalog::new(vec![root.join("skills")]));
    let env = openpista_sandbox::minimal_env("/usr/bin:/bin", root);
    let tools = match docker {
        Some(d) => skill_tools_with_docker(catalog, env, SkillLimits::default(), Some(d)),
        None => skill_tools(catalog, env, SkillLimits::default()),
    };
    let mut registry = ToolRegistry::new();
    for t in tools {
        registry.register(t).unwrap();
    }
    registry
}

async fn run(registry: &ToolRegistry, root: &Path, args: serde_json::Value) -> ToolResult {
    let ctx = ToolContext {
        workspace: root.to_path_buf(),
        cancel: CancellationToken::new(),
        session_id: None,
        approved: false,
    };
    registry.call("skill.run", &args.to_string(), &ctx).await
}

#[tokio::test]
async fn a_docker_skill_runs_in_a_container_and_its_output_returns() {
    let client = docker().await;
    ensure_test_image(&client).await;
    let ws = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(ws.path()).unwrap();
    std::fs::write(root.join("data.txt"), "workspace data\n").unwrap();
    write_skill(
        &root,
        "greet",
        &format!("image: {TEST_IMAGE}\nnetwork: true\n"),
        "read args\necho \"args: $args\"\ncat /workspace/data.txt\n\
         test -r /run/secrets/task_token && echo token-present\n\
         cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '\n\
         touch /skill/x 2>/dev/null || echo skill-dir-read-only\n",
    );
    let label = "skill-docker";
    let runner = DockerRunner::new(DockerConfig {
        enabled: true,
        host: docker_host(),
        image: "openpista-image-that-the-skill-overrides:none".to_owned(),
        ..DockerConfig::default()
    })
    .unwrap()
    .with_labels(vec![(TEST_LABEL.to_owned(), label.to_owned())]);
    let registry = registry(&root, Some(Arc::new(runner)));
    let r = run(
        &registry,
        &root,
        json!({"name": "greet", "args": {"who": "Ada"}}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(
        r.content.contains(r#"args: {"who":"Ada"}"#),
        "{}",
        r.content
    );
    assert!(r.content.contains("workspace data"), "{}", r.content);
    assert!(r.content.contains("token-present"), "{}", r.content);
    assert!(r.content.contains("skill-dir-read-only"), "{}", r.content);
    // SKILL.md asked for the network, but the operator did not allow it.
    assert!(r.content.contains("\nlo\n"), "{}", r.content);
    assert!(!r.content.contains("eth0"), "{}", r.content);
    assert_no_container_left(&client, &format!("{TEST_LABEL}={label}")).await;
}

#[tokio::test]
async fn a_docker_skill_without_docker_enabled_is_a_clear_error() {
    let ws = tempfile::tempdir().unwrap();
    write_skill(ws.path(), "boxed", "", "echo hi\n");
    let registry = registry(ws.path(), None);
    let r = run(&registry, ws.path(), json!({"name": "boxed"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert!(
        r.content.contains("[sandbox.docker] is not enabled"),
        "{}",
        r.content
    );
}
