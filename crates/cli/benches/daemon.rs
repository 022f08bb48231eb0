//! The daemon at rest: time from exec to accepting connections, and resident
//! memory once it idles, next to `openpista --version` (process start, clap,
//! exit) as the floor of the same binary.
//!
//! `cargo bench -p openpista-cli --bench daemon --profile release` (the release
//! profile, so that the binary measured is the one `cargo build --release`
//! makes, with the same symbol names; see `startup-order.txt`) starts `openpista start`
//! (scripted provider, no local model, a token made by `init`, port 0 on
//! loopback) in turns with `--version` and prints, as medians:
//! - ready: spawn to the `listening on` line on stdout;
//! - idle RSS: `VmRSS` of `/proc/PID/status` two seconds after ready, split into
//!   anonymous and file-backed pages and, from `/proc/PID/smaps`, into the
//!   binary's own pages, shared libraries, heap and the rest;
//! - the ratio idle RSS / peak RSS of `--version` (per round, then the median);
//! - `VmRSS` again after five turns sent over QUIC by `openpista run --remote`
//!   (one client process each) and two more seconds of rest.
//!
//! It also prints how many of the functions in `startup-order.txt` the binary
//! has under those names: the linker places them together, and a list
//! recorded from another build (another profile or toolchain) matches little,
//! which shows up here before it shows in the RSS.
//!
//! The first start generates the TLS certificate; it is shown on its own line.
//! Every start ends with SIGTERM and must exit 0. Without `--bench` (e.g.
//! `cargo test --benches`) it does one round as a smoke test.

mod common;

use common::median;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
                      [gateway]\nbind = \"127.0.0.1:0\"\n";
const REPLIES: &str = "on_exhausted = \"repeat_last\"\n\n[[reply]]\ntext = \"hello\"\n";
const IDLE: Duration = Duration::from_secs(2);
const TARGET_RSS_MB: f64 = 15.0;
const TARGET_READY_MS: f64 = 100.0;

const TURNS: usize = 5;

struct Sample {
    ready: Duration,
    kib: BTreeMap<&'static str, u64>,
    after_turns_kib: u64,
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = if bench { 10 } else { 1 };
    let exe = Path::new(env!("CARGO_BIN_EXE_openpista"));

    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("config.toml"), CONFIG).unwrap();
    std::fs::write(home.path().join("replies.toml"), REPLIES).unwrap();
    run_to_end(exe, home.path(), &["init"]);

    println!("binary {}", exe.display());
    println!("{}", order_coverage(exe));
    println!(
        "{} ({rounds} interleaved round(s) after the first start)",
        if bench { "bench" } else { "smoke run" }
    );
    let first = daemon(exe, home.path());
    println!(
        "first start (generates the certificate): ready {:.1} ms, idle RSS {} KiB",
        ms(first.ready),
        first.kib["VmRSS"]
    );

    let mut daemons = Vec::with_capacity(rounds);
    let mut versions = Vec::with_capacity(rounds);
    for round in 0..rounds {
        if round % 2 == 0 {
            daemons.push(daemon(exe, home.path()));
            versions.push(run_to_end(exe, home.path(), &["--version"]));
        } else {
            versions.push(run_to_end(exe, home.path(), &["--version"]));
            daemons.push(daemon(exe, home.path()));
        }
    }

    let ready = median(daemons.iter().map(|s| ms(s.ready)).collect());
    println!(
        "ready (spawn to `listening on`): median {ready:.1} ms (target < {TARGET_READY_MS} ms)"
    );
    println!("{:<34} {:>10}", "idle RSS, median", "KiB");
    for key in [
        "VmRSS",
        "RssAnon",
        "RssFile",
        "binary",
        "libraries",
        "heap",
        "stacks+other",
    ] {
        let v = median(daemons.iter().map(|s| s.kib[key] as f64).collect());
        println!("  {key:<32} {v:>10.0}");
    }
    let after = median(daemons.iter().map(|s| s.after_turns_kib as f64).collect());
    println!(
        "  {:<32} {after:>10.0}",
        format!("VmRSS after {TURNS} turns")
    );
    let version = median(versions.iter().map(|&k| k as f64).collect());
    println!("  {:<32} {version:>10.0}", "--version peak RSS");
    let ratio = median(
        daemons
            .iter()
            .zip(&versions)
            .map(|(d, &v)| d.kib["VmRSS"] as f64 / v as f64)
            .collect(),
    );
    let rss_mb = median(daemons.iter().map(|s| s.kib["VmRSS"] as f64).collect()) / 1024.0;
    println!("idle RSS / --version peak RSS: {ratio:.2}");
    println!(
        "targets: idle RSS {rss_mb:.1} MB < {TARGET_RSS_MB} MB: {}; ready {ready:.1} ms < {TARGET_READY_MS} ms: {}",
        met(rss_mb < TARGET_RSS_MB),
        met(ready < TARGET_READY_MS)
    );
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Starts the daemon, waits for `listening on`, lets it idle, reads its
/// memory, then stops it with SIGTERM and checks it exits 0.
fn daemon(exe: &Path, home: &Path) -> Sample {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .arg("start")
        .env("OPENPISTA_HOME", home)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(home.join("daemon.stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            fail(
                &mut child,
                home,
                &format!("exited before listening:\n{seen}"),
            );
        }
        seen.push_str(&line);
        if let Some((_, rest)) = line.split_once(" listening on ") {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    let ready = start.elapsed();
    // Keep reading stdout so the daemon never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    std::thread::sleep(IDLE);
    let kib = memory(child.id());
    for _ in 0..TURNS {
        run_to_end(exe, home, &["run", "-e", "hi", "--remote", &addr]);
    }
    std::thread::sleep(IDLE);
    let after_turns_kib = memory(child.id())["VmRSS"];

    // SAFETY: kill(2) on our own child's pid, not yet reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let status = child.wait().unwrap();
    let rest = reader.join().unwrap();
    if !status.success() || !rest.contains("stopped") {
        fail(
            &mut child,
            home,
            &format!("did not stop cleanly ({status}):\n{seen}{rest}"),
        );
    }
    Sample {
        ready,
        kib,
        after_turns_kib,
    }
}

fn fail(child: &mut Child, home: &Path, what: &str) -> ! {
    let _ = child.kill();
    let _ = child.wait();
    let err = std::fs::read_to_string(home.join("daemon.stderr")).unwrap_or_default();
    panic!("openpista start {what}\nstderr:\n{err}");
}

/// `VmRSS`, `RssAnon` and `RssFile` of the process, and its resident pages
/// split by mapping: the executable itself, shared libraries, `[heap]`, and
/// everything else (thread stacks, anonymous mappings).
fn memory(pid: u32) -> BTreeMap<&'static str, u64> {
    let mut kib = BTreeMap::new();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for key in ["VmRSS", "RssAnon", "RssFile"] {
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
        let v = line[key.len() + 1..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kib.insert(key, v);
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut binary, mut libraries, mut heap, mut other) = (0, 0, 0, 0);
    let mut current = "";
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            let path = line.split_whitespace().nth(5).unwrap_or("");
            current = if Path::new(path) == exe {
                "binary"
            } else if path.starts_with('/') {
                "libraries"
            } else if path == "[heap]" {
                "heap"
            } else {
                "other"
            };
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let v: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
            match current {
                "binary" => binary += v,
                "libraries" => libraries += v,
                "heap" => heap += v,
                _ => other += v,
            }
        }
    }
    kib.insert("binary", binary);
    kib.insert("libraries", libraries);
    kib.insert("heap", heap);
    kib.insert("stacks+other", other);
    kib
}

/// Runs `exe args` to the end; returns its peak RSS in KiB (`wait4`).
fn run_to_end(exe: &Path, home: &Path, args: &[&str]) -> u64 {
    let child = Command::new(exe)
        .args(args)
        .env("OPENPISTA_HOME", home)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(home.join("run.stderr")).unwrap())
        .spawn()
        .unwrap();
    let (ok, status, max_rss_kib) = common::reap(child);
    let err = std::fs::read_to_string(home.join("run.stderr")).unwrap_or_default();
    assert!(ok, "openpista {args:?} failed ({status:#x}):\n{err}");
    max_rss_kib as u64
}

/// How many names of `startup-order.txt` are functions of `exe` (`nm`).
fn order_coverage(exe: &Path) -> String {
    let list = Path::new(env!("CARGO_MANIFEST_DIR")).join("startup-order.txt");
    let Ok(list) = std::fs::read_to_string(&list) else {
        return "startup order: no startup-order.txt".into();
    };
    let nm = match Command::new("nm").arg("--defined-only").arg(exe).output() {
        Ok(out) if out.status.success() => out.stdout,
        _ => return "startup order: coverage unknown (`nm` failed; stripped binary?)".into(),
    };
    let nm = String::from_utf8_lossy(&nm);
    let defined: std::collections::HashSet<&str> = nm
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let names: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    let found = names.iter().filter(|n| defined.contains(*n)).count();
    format!(
        "startup order: {found} of {} listed functions found in the binary",
        names.len()
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
