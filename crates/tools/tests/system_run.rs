//! `system.run` end to end through `ToolRegistry::call`, the path the agent uses.

mod common;

use std::time::{Duration, Instant};

use common::{ctx, full_mode, read_pid, registry, run_args, wait_gone};
use openpista_proto::ToolOutcome;
use openpista_tools::policy::CommandPolicy;
use serde_json::json;

#[tokio::test]
async fn allowlisted_commands_run() {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "foo bar\n").unwrap();
    std::fs::create_dir(ws.path().join("sub")).unwrap();
    std::fs::write(ws.path().join("sub/deep.txt"), "nothing\n").unwrap();
    let reg = registry(CommandPolicy::default(), ws.path());
    let ctx = ctx(ws.path());

    let r = reg.call("system.run", &run_args("ls"), &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(r.exit_code, Some(0));
    assert!(
        r.content.contains("notes.txt") && r.content.contains("sub"),
        "{}",
        r.content
    );
    assert!(r.content.ends_with("[exit code: 0]"));

    let r = reg
        .call("system.run", &run_args("echo \"hello world\""), &ctx)
        .await;
    assert_eq!(r.content, "[stdout]\nhello world\n[exit code: 0]");

    let r = reg
        .call("system.run", &run_args("grep -r foo ."), &ctx)
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("./notes.txt:foo bar"), "{}", r.content);

    let r = reg
        .call("system.run", &run_args("find . -name '*.txt'"), &ctx)
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("./notes.txt"), "{}", r.content);
    assert!(r.content.contains("./sub/deep.txt"), "{}", r.content);

    // Operators inside single quotes are literal: grep gets the regex a|b.
    let r = reg
        .call("system.run", &run_args("grep -E 'bar|zzz' notes.txt"), &ctx)
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("foo bar"));
}

#[tokio::test]
async fn cwd_is_confined_to_the_workspace() {
    let ws = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(ws.path().join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.path(), ws.path().join("escape")).unwrap();
    let reg = registry(CommandPolicy::default(), ws.path());
    let ctx = ctx(ws.path());

    let args = json!({"command": "pwd", "cwd": "sub"}).to_string();
    let r = reg.call("system.run", &args, &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("/sub\n"), "{}", r.content);

    for cwd in ["..", "sub/../..", "escape", "/tmp"] {
        let args = json!({"command": "pwd", "cwd": cwd}).to_string();
        let r = reg.call("system.run", &args, &ctx).await;
        assert_eq!(r.outcome, ToolOutcome::Denied, "cwd {cwd}: {}", r.content);
    }
    let args = json!({"command": "pwd", "cwd": "missing"}).to_string();
    let r = reg.call("system.run", &args, &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(
        r.content.contains("not an existing directory"),
        "{}",
        r.content
    );
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(full_mode(), ws.path());
    let args = json!({
        "command": "sleep 100 & echo $! > pid; wait",
        "timeout_secs": 1
    })
    .to_string();
    let started = Instant::now();
    let r = reg.call("system.run", &args, &ctx(ws.path())).await;
    assert_eq!(r.outcome, ToolOutcome::Timeout, "{}", r.content);
    assert!(r.content.contains("timed out"), "{}", r.content);
    assert!(started.elapsed() < Duration::from_secs(30));
    let pid = read_pid(&ws.path().join("pid"));
    assert!(
        wait_gone(pid).await,
        "background sleep {pid} survived the timeout"
    );
}

#[tokio::test]
async fn timeout_is_capped_by_the_policy() {
    let ws = tempfile::tempdir().unwrap();
    let policy = CommandPolicy {
        max_timeout_secs: 1,
        ..full_mode()
    };
    let reg = registry(policy, ws.path());
    let args = json!({"command": "sleep 30", "timeout_secs": 100}).to_string();
    let started = Instant::now();
    let r = reg.call("system.run", &args, &ctx(ws.path())).await;
    assert_eq!(r.outcome, ToolOutcome::Timeout, "{}", r.content);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cancel_stops_the_command_and_its_group() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(full_mode(), ws.path());
    let ctx = ctx(ws.path());
    let cancel = ctx.cancel.clone();
    let pidfile = ws.path().join("pid");
    let watcher = {
        let pidfile = pidfile.clone();
        tokio::spawn(async move {
            while !pidfile.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            cancel.cancel();
        })
    };
    let started = Instant::now();
    let r = reg
        .call(
            "system.run",
            &run_args("sleep 100 & echo $! > pid; wait"),
            &ctx,
        )
        .await;
    watcher.await.unwrap();
    assert_eq!(r.outcome, ToolOutcome::Cancelled, "{}", r.content);
    assert!(started.elapsed() < Duration::from_secs(30));
    let pid = read_pid(&pidfile);
    assert!(
        wait_gone(pid).await,
        "background sleep {pid} survived the cancel"
    );
}

#[tokio::test]
async fn long_output_is_truncated_with_a_marker() {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("big.txt"), "y".repeat(50_000)).unwrap();
    let policy = CommandPolicy {
        output_limit: 100,
        ..CommandPolicy::default()
    };
    let reg = registry(policy, ws.path());
    let r = reg
        .call("system.run", &run_args("cat big.txt"), &ctx(ws.path()))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok);
    assert!(
        r.content
            .contains("[... stdout truncated: 49900 more characters not shown ...]"),
        "{}",
        r.content
    );
    assert!(r.content.contains(&"y".repeat(100)));
    assert!(!r.content.contains(&"y".repeat(101)));
    assert!(r.content.len() < 300, "{}", r.content.len());
    assert!(r.content.ends_with("[exit code: 0]"));
}

#[tokio::test]
async fn non_zero_exit_is_an_error_with_its_code() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(CommandPolicy::default(), ws.path());
    let ctx = ctx(ws.path());
    let r = reg
        .call("system.run", &run_args("ls does-not-exist"), &ctx)
        .await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert_eq!(r.exit_code, Some(2));
    assert!(r.content.contains("[stderr]"), "{}", r.content);
    assert!(r.content.contains("does-not-exist"), "{}", r.content);
    assert!(r.content.ends_with("[exit code: 2]"));

    std::fs::write(ws.path().join("f"), "abc\n").unwrap();
    let r = reg.call("system.run", &run_args("grep zzz f"), &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert_eq!(r.exit_code, Some(1));
}

#[tokio::test]
async fn child_env_is_exactly_what_was_passed() {
    let ws = tempfile::tempdir().unwrap();
    // The test process has CARGO_* and many more; none may leak.
    let parent: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    assert!(parent.iter().any(|k| k.starts_with("CARGO")));
    let policy = CommandPolicy {
        allowlist: vec!["env".to_owned()],
        allow_wrappers: vec!["env".to_owned()],
        ..CommandPolicy::default()
    };
    let passed = vec![
        ("PATH".to_owned(), common::PATH.to_owned()),
        ("VISIBLE_TO_CHILD".to_owned(), "yes".to_owned()),
    ];
    let reg = openpista_tools::builtin_registry(
        policy,
        openpista_tools::files::FileLimits::default(),
        passed,
    )
    .unwrap();
    let r = reg
        .call("system.run", &run_args("env"), &ctx(ws.path()))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    let body = r
        .content
        .strip_prefix("[stdout]\n")
        .and_then(|b| b.strip_suffix("[exit code: 0]"))
        .unwrap();
    let mut keys: Vec<&str> = body
        .lines()
        .map(|l| l.split_once('=').map_or(l, |(k, _)| k))
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["PATH", "VISIBLE_TO_CHILD"], "{body}");
    for k in &parent {
        if k != "PATH" {
            assert!(!body.contains(&format!("{k}=")), "{k} leaked");
        }
    }
}

#[tokio::test]
async fn full_mode_runs_shell_syntax() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(full_mode(), ws.path());
    let r = reg
        .call(
            "system.run",
            &run_args("echo a; echo b | tr b c"),
            &ctx(ws.path()),
        )
        .await;
    assert_eq!(r.content, "[stdout]\na\nc\n[exit code: 0]");
}

#[tokio::test]
async fn bad_arguments_are_error_results() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(CommandPolicy::default(), ws.path());
    let ctx = ctx(ws.path());
    for args in [
        r#"{"command": "ls", "extra": 1}"#,
        r#"{"command": "ls", "timeout_secs": 0}"#,
        r#"{"command": "ls", "timeout_secs": "5"}"#,
        r#"{"command": ""}"#,
        r#"{}"#,
        r#"{"command": 5}"#,
        r#"{"command": "ls""#,
        "not json at all",
    ] {
        let r = reg.call("system.run", args, &ctx).await;
        assert_eq!(r.outcome, ToolOutcome::Error, "{args}: {}", r.content);
        assert!(
            r.content
                .starts_with("error: invalid arguments for system.run"),
            "{args}: {}",
            r.content
        );
    }
}
