//! The file tools through `ToolRegistry::call`, against real directories.

mod common;

use std::path::Path;

use common::{ctx, env_for};
use openpista_proto::ToolOutcome;
use openpista_tools::files::FileLimits;
use openpista_tools::policy::CommandPolicy;
use openpista_tools::{ToolRegistry, ToolResult, builtin_registry};
use serde_json::json;

fn reg_with(limits: FileLimits, ws: &Path) -> ToolRegistry {
    builtin_registry(CommandPolicy::default(), limits, env_for(ws)).unwrap()
}

async fn call(reg: &ToolRegistry, ws: &Path, name: &str, args: serde_json::Value) -> ToolResult {
    reg.call(name, &args.to_string(), &ctx(ws)).await
}

#[tokio::test]
async fn write_read_and_list_work() {
    let ws = tempfile::tempdir().unwrap();
    let reg = reg_with(FileLimits::default(), ws.path());

    let r = call(
        &reg,
        ws.path(),
        "file.write",
        json!({"path": "notes/a.txt", "content": "héllo\n"}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(r.content, "wrote 7 bytes to notes/a.txt");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("notes/a.txt")).unwrap(),
        "héllo\n"
    );

    let r = call(
        &reg,
        ws.path(),
        "file.write",
        json!({"path": "notes/a.txt", "content": "more\n", "append": true}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);

    let r = call(&reg, ws.path(), "file.read", json!({"path": "notes/a.txt"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok);
    assert_eq!(r.content, "héllo\nmore\n");

    // Absolute paths inside the workspace are fine.
    let abs = ws.path().join("notes/a.txt").display().to_string();
    let r = call(
        &reg,
        ws.path(),
        "file.read",
        json!({"path": abs, "offset": 7, "limit": 4}),
    )
    .await;
    assert_eq!(
        r.content,
        "more\n[... file truncated: showed bytes 7..11 of 12; call file.read with offset=11 to continue ...]"
    );

    std::fs::write(ws.path().join("top.txt"), "x").unwrap();
    let r = call(&reg, ws.path(), "file.list", json!({})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok);
    assert_eq!(r.content, "notes/\ntop.txt (1 bytes)");
    let r = call(
        &reg,
        ws.path(),
        "file.list",
        json!({"path": ".", "recursive": true}),
    )
    .await;
    assert_eq!(
        r.content,
        "notes/\nnotes/a.txt (12 bytes)\ntop.txt (1 bytes)"
    );
    let r = call(&reg, ws.path(), "file.list", json!({"path": "notes"})).await;
    assert_eq!(r.content, "notes/a.txt (12 bytes)");
}

#[tokio::test]
async fn parent_components_are_refused() {
    let ws = tempfile::tempdir().unwrap();
    let inner = ws.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(ws.path().join("secret.txt"), "s3cret").unwrap();
    let reg = reg_with(FileLimits::default(), &inner);
    for (name, args) in [
        ("file.read", json!({"path": "../secret.txt"})),
        ("file.read", json!({"path": "a/../../secret.txt"})),
        ("file.write", json!({"path": "../x.txt", "content": "x"})),
        (
            "file.write",
            json!({"path": "new/../../x.txt", "content": "x"}),
        ),
        ("file.list", json!({"path": ".."})),
    ] {
        let r = call(&reg, &inner, name, args.clone()).await;
        assert_eq!(
            r.outcome,
            ToolOutcome::Denied,
            "{name} {args}: {}",
            r.content
        );
        assert!(r.content.contains("`..`"), "{}", r.content);
        assert!(!r.content.contains("s3cret"));
    }
    assert!(!ws.path().join("x.txt").exists());
}

#[tokio::test]
async fn absolute_paths_outside_are_refused() {
    let ws = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let reg = reg_with(FileLimits::default(), ws.path());
    let target = outside.path().join("x.txt");
    for (name, args) in [
        ("file.read", json!({"path": "/etc/passwd"})),
        (
            "file.write",
            json!({"path": target.display().to_string(), "content": "x"}),
        ),
        ("file.list", json!({"path": "/"})),
    ] {
        let r = call(&reg, ws.path(), name, args.clone()).await;
        assert_eq!(
            r.outcome,
            ToolOutcome::Denied,
            "{name} {args}: {}",
            r.content
        );
        assert!(r.content.contains("outside the workspace"), "{}", r.content);
    }
    assert!(!target.exists());
}

#[tokio::test]
async fn symlink_escapes_are_refused() {
    let ws = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "s3cret").unwrap();
    std::os::unix::fs::symlink(outside.path(), ws.path().join("door")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        ws.path().join("alias.txt"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", ws.path().join("etc")).unwrap();
    let reg = reg_with(FileLimits::default(), ws.path());

    for (name, args) in [
        ("file.read", json!({"path": "door/secret.txt"})),
        ("file.read", json!({"path": "alias.txt"})),
        ("file.read", json!({"path": "etc/hostname"})),
        (
            "file.write",
            json!({"path": "door/new.txt", "content": "x"}),
        ),
        (
            "file.write",
            json!({"path": "door/deep/new.txt", "content": "x"}),
        ),
        (
            "file.write",
            json!({"path": "alias.txt", "content": "overwritten"}),
        ),
        ("file.list", json!({"path": "door"})),
        ("file.list", json!({"path": "etc"})),
    ] {
        let r = call(&reg, ws.path(), name, args.clone()).await;
        assert_eq!(
            r.outcome,
            ToolOutcome::Denied,
            "{name} {args}: {}",
            r.content
        );
        assert!(r.content.contains("symlink"), "{}", r.content);
        assert!(!r.content.contains("s3cret"));
    }
    assert!(!outside.path().join("new.txt").exists());
    assert!(!outside.path().join("deep").exists());
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret.txt")).unwrap(),
        "s3cret"
    );

    // Listing shows the links but never walks through them.
    let r = call(&reg, ws.path(), "file.list", json!({"recursive": true})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok);
    assert_eq!(r.content, "alias.txt@\ndoor@\netc@");
}

#[tokio::test]
async fn size_caps_are_enforced() {
    let ws = tempfile::tempdir().unwrap();
    let limits = FileLimits {
        max_read_bytes: 10,
        max_write_bytes: 16,
        max_list_entries: 3,
    };
    let reg = reg_with(limits, ws.path());
    std::fs::write(ws.path().join("big.txt"), "0123456789abcdefghij").unwrap();

    let r = call(&reg, ws.path(), "file.read", json!({"path": "big.txt"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok);
    assert!(r.content.starts_with("0123456789\n[... file truncated: showed bytes 0..10 of 20; call file.read with offset=10"), "{}", r.content);
    // A larger limit is still capped.
    let r = call(
        &reg,
        ws.path(),
        "file.read",
        json!({"path": "big.txt", "offset": 10, "limit": 1000}),
    )
    .await;
    assert_eq!(r.content, "abcdefghij");

    let r = call(
        &reg,
        ws.path(),
        "file.write",
        json!({"path": "w.txt", "content": "x".repeat(17)}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert!(
        r.content.contains("17 bytes") && r.content.contains("at most 16"),
        "{}",
        r.content
    );
    assert!(!ws.path().join("w.txt").exists());
    let r = call(
        &reg,
        ws.path(),
        "file.write",
        json!({"path": "w.txt", "content": "x".repeat(16)}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok);

    for i in 0..5 {
        std::fs::write(ws.path().join(format!("f{i}")), "").unwrap();
    }
    let r = call(&reg, ws.path(), "file.list", json!({})).await;
    let lines: Vec<&str> = r.content.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.content);
    assert_eq!(
        lines[3],
        "[... listing stopped at 3 entries; list a subdirectory to see more ...]"
    );
}

#[tokio::test]
async fn reads_split_no_character() {
    let ws = tempfile::tempdir().unwrap();
    let limits = FileLimits {
        max_read_bytes: 2,
        ..FileLimits::default()
    };
    let reg = reg_with(limits, ws.path());
    std::fs::write(ws.path().join("u.txt"), "aéb").unwrap();
    let r = call(&reg, ws.path(), "file.read", json!({"path": "u.txt"})).await;
    assert!(
        r.content.starts_with(
            "a\n[... file truncated: showed bytes 0..1 of 4; call file.read with offset=1"
        ),
        "{}",
        r.content
    );
    let r = call(
        &reg,
        ws.path(),
        "file.read",
        json!({"path": "u.txt", "offset": 1}),
    )
    .await;
    assert!(r.content.starts_with("é\n"), "{}", r.content);
}

#[tokio::test]
async fn wrong_kinds_of_targets_are_errors() {
    let ws = tempfile::tempdir().unwrap();
    std::fs::create_dir(ws.path().join("dir")).unwrap();
    std::fs::write(ws.path().join("file"), "x").unwrap();
    let reg = reg_with(FileLimits::default(), ws.path());
    let r = call(&reg, ws.path(), "file.read", json!({"path": "dir"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert!(r.content.contains("not a regular file"), "{}", r.content);
    let r = call(&reg, ws.path(), "file.read", json!({"path": "missing"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    let r = call(
        &reg,
        ws.path(),
        "file.write",
        json!({"path": "dir", "content": "x"}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    let r = call(&reg, ws.path(), "file.list", json!({"path": "file"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert!(r.content.contains("not a directory"), "{}", r.content);
    let r = call(
        &reg,
        ws.path(),
        "file.read",
        json!({"path": "file", "offset": 5}),
    )
    .await;
    assert!(r.content.contains("past the end"), "{}", r.content);
}
