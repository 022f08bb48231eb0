//! The registry's guarantees: every call ends in a result, never a panic.

mod common;

use common::{ctx, registry};
use openpista_proto::ToolOutcome;
use openpista_tools::policy::CommandPolicy;

#[tokio::test]
async fn builtin_registry_has_the_four_tools() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(CommandPolicy::default(), ws.path());
    let names: Vec<String> = reg.definitions().into_iter().map(|d| d.name).collect();
    assert_eq!(
        names,
        ["file.list", "file.read", "file.write", "system.run"]
    );
    for def in reg.definitions() {
        assert_eq!(def.parameters["type"], "object", "{}", def.name);
        assert_eq!(
            def.parameters["additionalProperties"], false,
            "{}",
            def.name
        );
        assert!(!def.description.is_empty());
    }
}

#[tokio::test]
async fn unknown_tool_is_an_error_result() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(CommandPolicy::default(), ws.path());
    let r = reg
        .call("shell.exec", r#"{"command":"ls"}"#, &ctx(ws.path()))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Error);
    assert!(
        r.content.contains("unknown tool \"shell.exec\""),
        "{}",
        r.content
    );
    assert!(r.content.contains("system.run"), "{}", r.content);
}

#[tokio::test]
async fn schema_failures_and_invalid_json_are_error_results() {
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(CommandPolicy::default(), ws.path());
    let ctx = ctx(ws.path());
    for (name, args) in [
        ("file.read", r#"{}"#),
        ("file.read", r#"{"path": 3}"#),
        ("file.read", r#"{"path": "a", "offset": -1}"#),
        ("file.read", r#"{"path": "a", "limit": 0}"#),
        ("file.write", r#"{"path": "a"}"#),
        (
            "file.write",
            r#"{"path": "a", "content": "x", "append": "yes"}"#,
        ),
        ("file.list", r#"{"recursive": 1}"#),
        ("file.list", r#"{"path": "."  "#),
        ("file.list", r#"{"bogus": true}"#),
        ("system.run", "[1, 2]"),
        ("system.run", "\"ls\""),
        ("system.run", "{\"command\": \"ls\u{0}\"}"),
    ] {
        let r = reg.call(name, args, &ctx).await;
        assert_eq!(
            r.outcome,
            ToolOutcome::Error,
            "{name} {args}: {}",
            r.content
        );
        assert!(
            r.content
                .starts_with(&format!("error: invalid arguments for {name}")),
            "{name} {args}: {}",
            r.content
        );
    }
    // Empty arguments mean `{}`: fine for file.list.
    let r = reg.call("file.list", "", &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
}
