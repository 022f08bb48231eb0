//! Docker mode against a real dockerd (started by `scripts/test.sh`; see
//! `openpista_testkit::docker`) and a busybox image imported locally.
//!
//! Every container a test makes carries `openpista.test=<test name>`, and
//! every test ends by asserting that none of its containers remains.

use std::time::Duration;

use openpista_sandbox::docker::{
    ContainerOutput, ContainerTask, DockerConfig, DockerError, DockerPolicy, DockerSandbox,
    LABEL_TASK,
};
use openpista_testkit::docker::{
    TEST_IMAGE, TEST_LABEL, assert_no_container_left, containers_with_label, docker, docker_host,
    ensure_test_image,
};
use tokio_util::sync::CancellationToken;

fn policy() -> DockerPolicy {
    DockerConfig {
        image: TEST_IMAGE.to_owned(),
        memory_mb: 64,
        cpus: 1.0,
        pids_limit: 32,
        ..DockerConfig::default()
    }
    .policy()
}

struct Env {
    sandbox: DockerSandbox,
    client: bollard::Docker,
    workspace: tempfile::TempDir,
    label: String,
}

async fn setup(test: &str) -> Env {
    let client = docker().await;
    ensure_test_image(&client).await;
    Env {
        sandbox: DockerSandbox::connect(&docker_host()).unwrap(),
        client,
        workspace: tempfile::tempdir().unwrap(),
        label: format!("{TEST_LABEL}={test}"),
    }
}

impl Env {
    fn task(&self, script: &str) -> ContainerTask {
        let mut t = ContainerTask::new(
            vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
            policy(),
            std::fs::canonicalize(self.workspace.path()).unwrap(),
        );
        let (k, v) = self.label.split_once('=').unwrap();
        t.labels.push((k.to_owned(), v.to_owned()));
        t.timeout = Duration::from_secs(30);
        t
    }

    async fn run(&self, task: ContainerTask) -> ContainerOutput {
        self.sandbox
            .run(task, CancellationToken::new())
            .await
            .unwrap()
    }

    async fn finish(self) {
        assert_no_container_left(&self.client, &self.label).await;
    }
}

#[tokio::test]
async fn a_task_runs_with_stdin_and_a_secret_token_file() {
    let env = setup("runs").await;
    std::fs::write(
        env.workspace.path().join("input.txt"),
        "from the workspace\n",
    )
    .unwrap();
    let mut task = env.task(
        "echo hello; cat; echo; cat /workspace/input.txt; echo oops >&2; \
         echo token=$(cat $OPENPISTA_TASK_TOKEN_FILE); stat -c mode=%a /run/secrets/task_token; \
         env | grep -c \"$(cat /run/secrets/task_token)\"; exit 3",
    );
    task.stdin = Some(br#"{"city":"Rome"}"#.to_vec());
    let out = env.run(task).await;
    let run = &out.run;
    assert_eq!(run.exit_code, Some(3), "{run:?}");
    assert!(!run.timed_out && !run.cancelled && !out.oom_killed);
    assert!(
        run.stdout.starts_with("hello\n{\"city\":\"Rome\"}\n"),
        "{run:?}"
    );
    assert!(run.stdout.contains("from the workspace"), "{run:?}");
    assert_eq!(run.stderr, "oops\n");
    let token = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .unwrap();
    assert_eq!(token.len(), 32, "{run:?}");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(run.stdout.contains("mode=400\n"), "{run:?}");
    // The token is in the file only, never in the environment.
    assert!(run.stdout.ends_with("\n0\n"), "{run:?}");
    env.finish().await;
}

#[tokio::test]
async fn the_container_is_locked_down() {
    let env = setup("locked").await;
    let out = env
        .run(env.task(
            "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; id -u; \
             cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null; \
             touch /etc/x 2>&1; echo ok > /tmp/x && cat /tmp/x",
        ))
        .await;
    let s = &out.run.stdout;
    assert!(s.contains("CapEff:\t0000000000000000"), "{s}");
    assert!(s.contains("NoNewPrivs:\t1"), "{s}");
    assert!(s.contains("\n32\n"), "pids limit not applied: {s}");
    assert!(s.contains("Read-only file system"), "root fs writable: {s}");
    assert!(s.ends_with("ok\n"), "/tmp not writable: {s}");
    env.finish().await;
}

#[tokio::test]
async fn a_write_to_the_workspace_fails() {
    let env = setup("workspace-ro").await;
    let out = env
        .run(env.task("echo x > /workspace/new.txt; echo rc=$?"))
        .await;
    assert!(out.run.stdout.contains("rc=1"), "{:?}", out.run);
    assert!(
        out.run.stderr.contains("Read-only file system"),
        "{:?}",
        out.run
    );
    assert!(!env.workspace.path().join("new.txt").exists());
    env.finish().await;
}

#[tokio::test]
async fn the_network_is_unreachable_unless_the_operator_allows_it() {
    let env = setup("network").await;
    // The docker0 bridge's address on the host: reachable from a container
    // with a network, and from nowhere else.
    let bridge = env
        .client
        .inspect_network(
            "bridge",
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .unwrap();
    // Docker 20.10 lists only the subnet for the default bridge; its
    // gateway is then the subnet's first address.
    let config = bridge
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().next())
        .expect("the bridge network has an IPAM config");
    let gateway = config.gateway.unwrap_or_else(|| {
        let subnet = config.subnet.expect("a subnet");
        let base: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(base) + 1).to_string()
    });
    let listener = tokio::net::TcpListener::bind((gateway.as_str(), 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        loop {
            if listener.accept().await.is_err() {
                break;
            }
        }
    });
    let script = format!(
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1; nc -w 5 {gateway} {port} </dev/null && echo connected"
    );

    // Control: with the operator's permission the same command connects.
    let mut open = env.task(&script);
    open.policy.network = true;
    let out = env.run(open).await;
    assert!(out.run.stdout.contains("connected"), "{:?}", out.run);

    let out = env.run(env.task(&script)).await;
    let interfaces: Vec<&str> = out.run.stdout.lines().map(str::trim).collect();
    assert_eq!(interfaces, ["lo"], "{:?}", out.run);
    assert!(
        out.run.stderr.contains("Network is unreachable"),
        "{:?}",
        out.run
    );
    accept.abort();
    env.finish().await;
}

#[tokio::test]
async fn a_memory_hog_is_killed_and_reported_as_out_of_memory() {
    let env = setup("oom").await;
    let mut task = env.task("awk 'BEGIN { s = \"x\"; while (1) s = s s }'");
    task.policy.memory_bytes = 32 << 20;
    let out = env.run(task).await;
    assert!(out.oom_killed, "{out:?}");
    assert_eq!(out.run.exit_code, Some(137), "{out:?}");
    env.finish().await;
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_pids_limit() {
    let env = setup("pids").await;
    let mut task = env.task(
        "i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); echo $i; done; echo all-started",
    );
    task.policy.pids_limit = 16;
    let out = env.run(task).await;
    let started: u64 = out
        .run
        .stdout
        .lines()
        .filter_map(|l| l.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(!out.run.stdout.contains("all-started"), "{:?}", out.run);
    assert!(started < 16, "{started} processes started: {:?}", out.run);
    assert!(out.run.stderr.contains("fork"), "{:?}", out.run);
    assert_ne!(out.run.exit_code, Some(0));
    env.finish().await;
}

#[tokio::test]
async fn a_timeout_kills_and_removes_the_container() {
    let env = setup("timeout").await;
    let mut task = env.task("sleep 600");
    task.timeout = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let out = env.run(task).await;
    assert!(out.run.timed_out, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(40), "did not hang");
    // Removed before `run` returned, not eventually.
    let left = containers_with_label(&env.client, &format!("{LABEL_TASK}={}", out.task_id)).await;
    assert!(left.is_empty(), "{left:?}");
    env.finish().await;
}

#[tokio::test]
async fn cancel_stops_and_removes_the_container() {
    let env = setup("cancel").await;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        trigger.cancel();
    });
    let out = env
        .sandbox
        .run(env.task("sleep 600"), cancel)
        .await
        .unwrap();
    assert!(out.run.cancelled, "{out:?}");
    let left = containers_with_label(&env.client, &format!("{LABEL_TASK}={}", out.task_id)).await;
    assert!(left.is_empty(), "{left:?}");
    env.finish().await;
}

#[tokio::test]
async fn dropping_the_run_still_removes_the_container() {
    let env = setup("dropped").await;
    let run = env
        .sandbox
        .run(env.task("sleep 600"), CancellationToken::new());
    let r = tokio::time::timeout(Duration::from_secs(3), run).await;
    assert!(r.is_err(), "the run should still be going");
    // It existed while running ...
    // ... and is removed by the guard's spawned task soon after the drop.
    env.finish().await;
}

#[tokio::test]
async fn output_is_capped() {
    let env = setup("capped").await;
    let mut task = env.task("head -c 100000 /dev/zero | tr '\\0' a");
    task.output_limit = 1000;
    let out = env.run(task).await;
    assert_eq!(out.run.stdout.len(), 1000);
    assert!(out.run.truncated);
    assert_eq!(out.run.dropped_stdout, 99_000);
    env.finish().await;
}

#[tokio::test]
async fn an_unreachable_daemon_is_a_clear_error_naming_the_socket() {
    let ws = tempfile::tempdir().unwrap();
    let sandbox = DockerSandbox::connect("unix:///nonexistent/openpista/docker.sock").unwrap();
    let task = ContainerTask::new(vec!["true".to_owned()], policy(), ws.path());
    let err = sandbox
        .run(task, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, DockerError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/openpista/docker.sock") && msg.contains("fallback"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_missing_image_is_a_clear_error() {
    let env = setup("no-image").await;
    let mut task = env.task("true");
    task.policy.image = "openpista-no-such-image:none".to_owned();
    let err = env
        .sandbox
        .run(task, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, DockerError::ImageMissing { .. }), "{err:?}");
    env.finish().await;
}
