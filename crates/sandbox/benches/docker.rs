//! One container task end to end through `DockerSandbox::run` (what
//! `container.run`, `system.run` with `sandbox = "docker"` and docker skills
//! call: create, token mount, attach, start, wait, inspect, remove) next to
//! `docker run --rm` of the same image, command and limits, interleaved in
//! the same run. The docker CLI is used here only as the baseline.
//!
//! Needs the test dockerd (`scripts/test.sh` starts one, or see
//! `openpista_testkit::docker`). Run with
//! `cargo bench --workspace --bench docker` (`BENCH_RUNS=N` changes the
//! number of rounds, default 15). The two sides take turns and the order
//! flips every round; the ratio is the median of the per-round ratios.
//! Without `--bench` (as in `cargo test --benches`) it does one smoke round.

use std::process::Command;
use std::time::{Duration, Instant};

use openpista_sandbox::docker::{ContainerTask, DockerConfig, DockerSandbox};
use openpista_testkit::docker::{TEST_IMAGE, TEST_LABEL, docker, docker_host, ensure_test_image};
use tokio_util::sync::CancellationToken;

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let bench = std::env::args().any(|a| a == "--bench");
    let runs: usize = if bench {
        std::env::var("BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15)
            .max(1)
    } else {
        1
    };
    let host = docker_host();
    rt.block_on(async {
        let client = docker().await;
        ensure_test_image(&client).await;
    });
    let ws = tempfile::tempdir().expect("a temp dir");
    let workspace = std::fs::canonicalize(ws.path()).expect("canonical temp dir");
    let config = DockerConfig {
        image: TEST_IMAGE.to_owned(),
        memory_mb: 64,
        cpus: 1.0,
        pids_limit: 64,
        ..DockerConfig::default()
    };
    let sandbox = DockerSandbox::connect(&host).expect("a client");
    let argv = vec!["echo".to_owned(), "hello".to_owned()];

    let ours = || {
        let mut task = ContainerTask::new(argv.clone(), config.policy(), &workspace);
        task.labels
            .push((TEST_LABEL.to_owned(), "bench".to_owned()));
        let started = Instant::now();
        let out = rt
            .block_on(sandbox.run(task, CancellationToken::new()))
            .expect("the container ran");
        assert_eq!(out.run.stdout, "hello\n", "{out:?}");
        started.elapsed()
    };
    let cli = || {
        let started = Instant::now();
        let out = Command::new("docker")
            .env("DOCKER_HOST", &host)
            .args([
                "run",
                "--rm",
                "--label",
                &format!("{TEST_LABEL}=bench"),
                "--network",
                "none",
                "--memory",
                "64m",
                "--memory-swap",
                "64m",
                "--cpus",
                "1",
                "--pids-limit",
                "64",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--tmpfs",
                "/tmp",
                "-v",
                &format!("{}:/workspace:ro", workspace.display()),
                "-w",
                "/workspace",
                TEST_IMAGE,
                "echo",
                "hello",
            ])
            .output()
            .expect("the docker CLI (apt-get install docker.io)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    };

    // One warm-up each, then interleaved runs.
    ours();
    cli();
    let mut a = Vec::with_capacity(runs);
    let mut b = Vec::with_capacity(runs);
    let mut ratios = Vec::with_capacity(runs);
    for round in 0..runs {
        let (x, y) = if round % 2 == 0 {
            let x = ours();
            (x, cli())
        } else {
            let y = cli();
            (ours(), y)
        };
        a.push(x);
        b.push(y);
        ratios.push(x.as_secs_f64() / y.as_secs_f64());
    }
    let (ma, mb) = (median(&mut a), median(&mut b));
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[ratios.len() / 2];
    println!(
        "docker: one `echo hello` container end to end, {runs} rounds, order flipped each round"
    );
    println!(
        "  DockerSandbox::run (container.run)  median {:>8.1} ms",
        ms(ma)
    );
    println!(
        "  docker run --rm (CLI baseline)      median {:>8.1} ms",
        ms(mb)
    );
    println!("  ratio ours / CLI (median of per-round ratios): {ratio:.2} (target <= 1.0)");
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
