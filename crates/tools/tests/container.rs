//! `container.run` and `system.run` with `sandbox = "docker"` against a real
//! dockerd (started by `scripts/test.sh`) and the locally imported busybox
//! image. Every container carries `openpista.test=<test>`; each test ends by
//! asserting that none of them remains.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{ctx, env_for};
use openpista_proto::ToolOutcome;
use openpista_sandbox::docker::{DockerConfig, Fallback};
use openpista_testkit::docker::{
    TEST_IMAGE, TEST_LABEL, assert_no_container_left, docker, docker_host, ensure_test_image,
};
use openpista_tools::container::{ContainerRun, DockerRunner};
use openpista_tools::policy::{CommandPolicy, PolicyMode, RunSandbox};
use openpista_tools::system_run::SystemRun;
use openpista_tools::{ToolRegistry, ToolResult};
use serde_json::json;

fn config() -> DockerConfig {
    DockerConfig {
        enabled: true,
        host: docker_host(),
        image: TEST_IMAGE.to_owned(),
        memory_mb: 48,
        pids_limit: 32,
        timeout_secs: 20,
        ..DockerConfig::default()
    }
}

struct Fx {
    registry: ToolRegistry,
    workspace: tempfile::TempDir,
    client: bollard::Docker,
    label: String,
}

async fn fixture(test: &str, config: DockerConfig, policy: CommandPolicy) -> Fx {
    let client = docker().await;
    ensure_test_image(&client).await;
    let workspace = tempfile::tempdir().unwrap();
    let runner = Arc::new(
        DockerRunner::new(config)
            .unwrap()
            .with_labels(vec![(TEST_LABEL.to_owned(), test.to_owned())]),
    );
    let env = env_for(workspace.path());
    let mut registry = ToolRegistry::new();
    registry
        .register(Arc::new(ContainerRun::new(runner.clone(), env.clone())))
        .unwrap();
    registry
        .register(Arc::new(SystemRun::new(policy, env).with_docker(runner)))
        .unwrap();
    Fx {
        registry,
        workspace,
        client,
        label: format!("{TEST_LABEL}={test}"),
    }
}

impl Fx {
    async fn call(&self, tool: &str, args: serde_json::Value) -> ToolResult {
        self.registry
            .call(tool, &args.to_string(), &ctx(self.workspace.path()))
            .await
    }

    async fn finish(self) {
        assert_no_container_left(&self.client, &self.label).await;
    }
}

fn docker_policy(mode: PolicyMode) -> CommandPolicy {
    CommandPolicy {
        mode,
        sandbox: RunSandbox::Docker,
        ..CommandPolicy::default()
    }
}

#[tokio::test]
async fn container_run_returns_the_output_and_exit_code() {
    let fx = fixture("ct-run", config(), CommandPolicy::default()).await;
    std::fs::create_dir(fx.workspace.path().join("sub")).unwrap();
    std::fs::write(fx.workspace.path().join("sub/notes.txt"), "n\n").unwrap();
    let r = fx
        .call(
            "container.run",
            json!({"argv": ["sh", "-c", "pwd; ls; echo err >&2; exit 4"], "cwd": "sub"}),
        )
        .await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert_eq!(r.exit_code, Some(4));
    assert!(
        r.content.contains("/workspace/sub\nnotes.txt"),
        "{}",
        r.content
    );
    assert!(r.content.contains("err"), "{}", r.content);
    // argv is passed as is: no shell interprets a single argument.
    let r = fx
        .call("container.run", json!({"argv": ["echo", "$HOME; id"]}))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(r.content.contains("$HOME; id"), "{}", r.content);
    fx.finish().await;
}

#[tokio::test]
async fn model_arguments_cannot_choose_image_network_mounts_or_limits() {
    let fx = fixture("ct-refuse", config(), CommandPolicy::default()).await;
    let def = fx
        .registry
        .definitions()
        .into_iter()
        .find(|d| d.name == "container.run")
        .unwrap();
    let props: Vec<&String> = def.parameters["properties"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(props, ["argv", "cwd"]);
    assert_eq!(def.parameters["additionalProperties"], json!(false));
    for (key, value) in [
        ("image", json!("alpine:latest")),
        ("network", json!(true)),
        ("network_mode", json!("host")),
        ("mounts", json!(["/:/host"])),
        ("binds", json!(["/etc:/etc"])),
        ("volumes", json!({"/": {}})),
        ("memory_mb", json!(100_000)),
        ("cpus", json!(64)),
        ("pids_limit", json!(0)),
        ("timeout_secs", json!(100_000)),
        ("privileged", json!(true)),
        ("user", json!("0:0")),
        ("env", json!({"A": "b"})),
    ] {
        let mut args = json!({"argv": ["true"]});
        args[key] = value;
        let r = fx.call("container.run", args).await;
        assert_eq!(r.outcome, ToolOutcome::Error, "{key}: {r:?}");
        assert!(
            r.content.contains("invalid arguments") && r.content.contains(key),
            "{key}: {}",
            r.content
        );
    }
    // The same argv without the extra key does run (the refusal was the key).
    let r = fx.call("container.run", json!({"argv": ["true"]})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    let r = fx
        .call("container.run", json!({"argv": ["true"], "cwd": "../.."}))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{r:?}");
    fx.finish().await;
}

#[tokio::test]
async fn an_out_of_memory_kill_is_reported_to_the_model() {
    let fx = fixture("ct-oom", config(), CommandPolicy::default()).await;
    let r = fx
        .call(
            "container.run",
            json!({"argv": ["awk", "BEGIN { s = \"x\"; while (1) s = s s }"]}),
        )
        .await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert!(r.content.contains("out of memory"), "{}", r.content);
    fx.finish().await;
}

#[tokio::test]
async fn a_timeout_is_reported_and_the_container_removed() {
    let cfg = DockerConfig {
        timeout_secs: 2,
        ..config()
    };
    let fx = fixture("ct-timeout", cfg, CommandPolicy::default()).await;
    let r = fx
        .call("container.run", json!({"argv": ["sleep", "600"]}))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Timeout, "{r:?}");
    assert!(
        r.duration < std::time::Duration::from_secs(40),
        "did not hang"
    );
    fx.finish().await;
}

#[tokio::test]
async fn system_run_can_run_inside_the_container() {
    let fx = fixture("ct-system-run", config(), docker_policy(PolicyMode::Full)).await;
    let r = fx
        .call(
            "system.run",
            json!({"command": "test -r /run/secrets/task_token && echo in-container; touch /workspace/x"}),
        )
        .await;
    assert!(r.content.contains("in-container"), "{}", r.content);
    assert!(r.content.contains("Read-only file system"), "{}", r.content);
    assert!(!fx.workspace.path().join("x").exists());
    fx.finish().await;

    // Allowlist mode keeps its checks and runs the allowed program in the container.
    let fx = fixture(
        "ct-system-run-allow",
        config(),
        docker_policy(PolicyMode::Allowlist),
    )
    .await;
    std::fs::write(fx.workspace.path().join("a.txt"), "from the host\n").unwrap();
    let r = fx.call("system.run", json!({"command": "cat a.txt"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(r.content.contains("from the host"), "{}", r.content);
    let r = fx.call("system.run", json!({"command": "sh -c id"})).await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{r:?}");
    fx.finish().await;
}

fn unreachable(fallback: Fallback) -> DockerConfig {
    DockerConfig {
        host: "unix:///nonexistent/openpista-test/docker.sock".to_owned(),
        fallback,
        ..config()
    }
}

async fn registry_without_daemon(config: DockerConfig, workspace: &Path) -> ToolRegistry {
    let runner = Arc::new(DockerRunner::new(config).unwrap());
    let mut registry = ToolRegistry::new();
    registry
        .register(Arc::new(ContainerRun::new(runner, env_for(workspace))))
        .unwrap();
    registry
}

#[tokio::test]
async fn an_unreachable_daemon_is_an_error_unless_the_fallback_is_enabled() {
    let ws = tempfile::tempdir().unwrap();
    let args = json!({"argv": ["echo", "ran-on-the-host"]}).to_string();

    let registry = registry_without_daemon(unreachable(Fallback::None), ws.path()).await;
    let r = registry.call("container.run", &args, &ctx(ws.path())).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{r:?}");
    assert!(
        r.content.contains(
            "cannot reach the Docker daemon at unix:///nonexistent/openpista-test/docker.sock"
        ),
        "{}",
        r.content
    );
    assert!(!r.content.contains("ran-on-the-host"));

    let registry = registry_without_daemon(unreachable(Fallback::Subprocess), ws.path()).await;
    let r = registry.call("container.run", &args, &ctx(ws.path())).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{r:?}");
    assert!(r.content.contains("ran-on-the-host"), "{}", r.content);
}
