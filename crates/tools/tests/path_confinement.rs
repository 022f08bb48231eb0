//! In allowlist mode, arguments of allowed programs may not reach files
//! outside the workspace (the config file with its API key, /etc/shadow,
//! ...), through `ToolRegistry::call`, the path the agent uses.

mod common;

use std::path::{Path, PathBuf};

use common::{ctx, full_mode, registry, run_args};
use openpista_proto::ToolOutcome;
use openpista_tools::policy::CommandPolicy;

const SECRET: &str = "TOPSECRET-api-key";

/// A workspace with `notes.txt`, `sub/deep.txt`, a symlink `link` to a
/// directory outside holding `secret.txt`, a symlink `key` to that file, a
/// dangling symlink and a symlink that stays inside.
struct Fixture {
    ws: tempfile::TempDir,
    outside: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = ws.path();
        std::fs::write(root.join("notes.txt"), "hello notes\n").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/deep.txt"), "hello deep\n").unwrap();
        std::fs::write(outside.path().join("secret.txt"), format!("{SECRET}\n")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.txt"), root.join("key")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("gone"), root.join("dangling")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("alias")).unwrap();
        std::fs::write(
            root.join("list"),
            outside.path().join("secret.txt").display().to_string(),
        )
        .unwrap();
        Self { ws, outside }
    }

    fn path(&self) -> &Path {
        self.ws.path()
    }

    fn secret(&self) -> PathBuf {
        self.outside.path().join("secret.txt")
    }
}

const OUTSIDE: &str = "points outside the workspace";
const SYMLINK: &str = "leads outside the workspace through a symlink";
const PARENT: &str = "contains a `..` component";
const HOME: &str = "starts with `~`";
const OPTION: &str = "can reach files outside the workspace";

#[tokio::test]
async fn arguments_outside_the_workspace_are_refused() {
    let fx = Fixture::new();
    let secret = fx.secret().display().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        ("absolute file", "cat /etc/passwd".into(), OUTSIDE),
        ("shadow", "cat /etc/shadow".into(), OUTSIDE),
        ("absolute secret", format!("cat {secret}"), OUTSIDE),
        (
            "home config",
            "cat ~/.config/openpista/config.toml".into(),
            HOME,
        ),
        ("home rc", "cat ~/.bashrc".into(), HOME),
        ("bare tilde", "ls ~".into(), HOME),
        ("parent", "cat ../outside.txt".into(), PARENT),
        ("bare parent", "ls ..".into(), PARENT),
        ("parent inside a path", "cat sub/../../x".into(), PARENT),
        (
            "harmless parent still refused",
            "cat sub/../notes.txt".into(),
            PARENT,
        ),
        ("root", "ls /".into(), OUTSIDE),
        ("root home", "ls /root".into(), OUTSIDE),
        ("recursive grep in /home", "grep -r x /home".into(), OUTSIDE),
        ("find from /", "find / -name x".into(), OUTSIDE),
        (
            "separate option value",
            "head --lines=1 /etc/hostname".into(),
            OUTSIDE,
        ),
        (
            "long option value",
            "grep --file=/etc/passwd x".into(),
            OUTSIDE,
        ),
        (
            "attached short value",
            "grep -f/etc/passwd x".into(),
            OUTSIDE,
        ),
        (
            "attached in a bundle",
            "grep -nf/etc/passwd x".into(),
            OUTSIDE,
        ),
        ("after --", "cat -- /etc/passwd".into(), OUTSIDE),
        ("quoted", "cat '/etc/passwd'".into(), OUTSIDE),
        ("double slash", "cat //etc//passwd".into(), OUTSIDE),
        (
            "symlink dir, file through it",
            "cat link/secret.txt".into(),
            SYMLINK,
        ),
        ("symlink dir itself", "cat link".into(), SYMLINK),
        ("symlink dir listed", "ls link".into(), SYMLINK),
        ("symlink dir with ./", "ls ./link/".into(), SYMLINK),
        ("symlink to a file outside", "cat key".into(), SYMLINK),
        ("symlink as attached value", "grep -fkey x".into(), SYMLINK),
        ("symlink as separate value", "grep -f key x".into(), SYMLINK),
        (
            "symlink in recursive grep",
            "grep -r TOPSECRET link".into(),
            SYMLINK,
        ),
        (
            "dangling symlink",
            "cat dangling".into(),
            "cannot be resolved",
        ),
        (
            "find follows symlinks",
            "find -L . -name secret.txt".into(),
            OPTION,
        ),
        (
            "find -follow",
            "find . -follow -name secret.txt".into(),
            OPTION,
        ),
        (
            "grep -R follows symlinks",
            "grep -R TOPSECRET .".into(),
            OPTION,
        ),
        ("grep -rR bundle", "grep -rR TOPSECRET .".into(), OPTION),
        ("ls -L", "ls -laL link".into(), OPTION),
        (
            "wc reads names from a file",
            "wc --files0-from=list".into(),
            OPTION,
        ),
        (
            "find reads names from a file",
            "find -files0-from list".into(),
            OPTION,
        ),
    ];
    let reg = registry(CommandPolicy::default(), fx.path());
    let ctx = ctx(fx.path());
    let mut failures = Vec::new();
    for (label, command, reason) in &cases {
        let r = reg.call("system.run", &run_args(command), &ctx).await;
        let ok = r.outcome == ToolOutcome::Denied
            && r.content.starts_with("error: denied by policy: ")
            && r.content.contains(reason)
            && !r.content.contains(SECRET);
        if !ok {
            failures.push(format!(
                "[{label}] {command:?} -> {:?}: {}",
                r.outcome, r.content
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "not refused as expected:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn the_refusal_names_the_argument_and_the_rule() {
    let fx = Fixture::new();
    let reg = registry(CommandPolicy::default(), fx.path());
    let r = reg
        .call("system.run", &run_args("cat /etc/passwd"), &ctx(fx.path()))
        .await;
    assert_eq!(
        r.content,
        "error: denied by policy: argument \"/etc/passwd\" points outside the workspace; \
         system.run may only touch files inside the workspace (use paths relative to the \
         working directory, without `..`)"
    );
    let r = reg
        .call(
            "system.run",
            &run_args("grep --file=/etc/passwd x"),
            &ctx(fx.path()),
        )
        .await;
    assert!(
        r.content.contains(
            "argument \"--file=/etc/passwd\" contains \"/etc/passwd\", which points outside"
        ),
        "{}",
        r.content
    );
}

#[tokio::test]
async fn arguments_inside_the_workspace_still_run() {
    let fx = Fixture::new();
    let root = std::fs::canonicalize(fx.path()).unwrap();
    let reg = registry(CommandPolicy::default(), fx.path());
    let ctx = ctx(fx.path());
    let cases: Vec<(String, &str)> = vec![
        ("cat notes.txt".into(), "hello notes"),
        ("cat ./notes.txt".into(), "hello notes"),
        ("ls sub".into(), "deep.txt"),
        ("ls sub/".into(), "deep.txt"),
        ("ls .".into(), "notes.txt"),
        ("ls -la".into(), "notes.txt"),
        ("find . -name '*.txt'".into(), "./sub/deep.txt"),
        ("grep -r hello .".into(), "./notes.txt:hello notes"),
        ("grep -rn hello sub".into(), "sub/deep.txt:1:hello deep"),
        ("head --lines=1 notes.txt".into(), "hello notes"),
        ("cat alias/deep.txt".into(), "hello deep"),
        ("echo 'hello world'".into(), "hello world"),
        (format!("cat {}/notes.txt", root.display()), "hello notes"),
    ];
    for (command, expected) in &cases {
        let r = reg.call("system.run", &run_args(command), &ctx).await;
        assert_eq!(r.outcome, ToolOutcome::Ok, "{command}: {}", r.content);
        assert!(r.content.contains(expected), "{command}: {}", r.content);
    }
    // `find .` lists the symlink but does not follow it.
    let r = reg.call("system.run", &run_args("find ."), &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("./link\n"), "{}", r.content);
    assert!(!r.content.contains("secret.txt"), "{}", r.content);
}

#[tokio::test]
async fn the_working_directory_is_the_base_of_relative_arguments() {
    let fx = Fixture::new();
    let reg = registry(CommandPolicy::default(), fx.path());
    let ctx = ctx(fx.path());
    let args = serde_json::json!({"command": "cat deep.txt", "cwd": "sub"}).to_string();
    let r = reg.call("system.run", &args, &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    // From sub, `..` would be the workspace itself: still refused.
    let args = serde_json::json!({"command": "cat ../notes.txt", "cwd": "sub"}).to_string();
    let r = reg.call("system.run", &args, &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{}", r.content);
}

#[tokio::test]
async fn the_operator_can_lift_the_check_and_full_mode_is_unchanged() {
    let fx = Fixture::new();
    let command = format!("cat {}", fx.secret().display());
    let lifted = CommandPolicy {
        allow_paths_outside_workspace: true,
        ..CommandPolicy::default()
    };
    for policy in [lifted, full_mode()] {
        let reg = registry(policy.clone(), fx.path());
        let r = reg
            .call("system.run", &run_args(&command), &ctx(fx.path()))
            .await;
        assert_eq!(r.outcome, ToolOutcome::Ok, "{policy:?}: {}", r.content);
        assert!(r.content.contains(SECRET), "{}", r.content);
    }
    // Lifting the path check does not lift the other rules.
    let lifted = CommandPolicy {
        allow_paths_outside_workspace: true,
        ..CommandPolicy::default()
    };
    let reg = registry(lifted, fx.path());
    let r = reg
        .call(
            "system.run",
            &run_args("find / -maxdepth 0 -exec id ;"),
            &ctx(fx.path()),
        )
        .await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{}", r.content);
}
