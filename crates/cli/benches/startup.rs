//! Start-up cost of `openpista run -e` with the scripted provider, next to
//! `openpista --version` (process start, clap, exit) as the baseline.
//!
//! `cargo bench -p openpista-cli --bench startup` runs both commands in turns
//! (the order flipping each round, so machine noise hits both) and prints the
//! median wall time and peak RSS of each child process, read with `wait4`, plus
//! the ratio run/--version (the median of the per-round ratios). Without `--bench` (e.g. `cargo test --benches`) it
//! does two rounds as a smoke test.

mod common;

use common::median;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n";
const REPLIES: &str = "on_exhausted = \"repeat_last\"\n\n[[reply]]\ntext = \"hello\"\n";

struct Sample {
    wall: Duration,
    max_rss_kib: i64,
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = if bench { 20 } else { 2 };
    let exe = Path::new(env!("CARGO_BIN_EXE_openpista"));

    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("config.toml"), CONFIG).unwrap();
    std::fs::write(home.path().join("replies.toml"), REPLIES).unwrap();

    let run = |args: &[&str]| measure(exe, home.path(), args);
    let run_e: &[&str] = &["run", "-e", "hi"];
    let version: &[&str] = &["--version"];

    println!("binary {}", exe.display());
    println!(
        "{} ({rounds} interleaved round(s) after 1 warm-up)",
        if bench { "bench" } else { "smoke run" }
    );
    // Warm-up: page the binary in, create the database and workspace.
    run(run_e);
    run(version);

    let mut runs = Vec::with_capacity(rounds);
    let mut versions = Vec::with_capacity(rounds);
    for round in 0..rounds {
        if round % 2 == 0 {
            runs.push(run(run_e));
            versions.push(run(version));
        } else {
            versions.push(run(version));
            runs.push(run(run_e));
        }
    }

    let wall = |s: &Sample| s.wall.as_secs_f64() * 1e3;
    let rss = |s: &Sample| s.max_rss_kib as f64;
    println!(
        "{:<16} {:>12} {:>12} {:>8}",
        "median", "run -e hi", "--version", "ratio"
    );
    for (name, f, digits) in [
        ("wall ms", &wall as &dyn Fn(&Sample) -> f64, 1),
        ("peak RSS KiB", &rss, 0),
    ] {
        let run_med = median(runs.iter().map(f).collect());
        let ver_med = median(versions.iter().map(f).collect());
        // The ratio is the median of per-round ratios: each pair ran back to back.
        let ratio = median(
            runs.iter()
                .zip(&versions)
                .map(|(r, v)| f(r) / f(v))
                .collect(),
        );
        println!("{name:<16} {run_med:>12.digits$} {ver_med:>12.digits$} {ratio:>8.2}");
    }
}

/// Runs `exe args` in `home` and measures that one child: wall time from spawn
/// to exit, and its own peak RSS (`ru_maxrss` from `wait4`, in KiB on Linux).
fn measure(exe: &Path, home: &Path, args: &[&str]) -> Sample {
    let stdout_path = home.join("stdout");
    let stderr_path = home.join("stderr");
    let start = Instant::now();
    let child = Command::new(exe)
        .args(args)
        .env("OPENPISTA_HOME", home)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).unwrap())
        .stderr(File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let (ok, status, max_rss_kib) = common::reap(child);
    let wall = start.elapsed();

    let out = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(ok, "openpista {args:?} failed ({status:#x}):\n{out}\n{err}");
    if args.first() == Some(&"run") {
        assert!(out.contains("hello"), "scripted reply missing: {out:?}");
    }
    Sample { wall, max_rss_kib }
}
