//! Attempts to get around the allowlist policy, each refused with a clear
//! reason, through `ToolRegistry::call` (the path the agent uses).
//!
//! Most wrapper cases run against a *careless* policy whose allowlist names
//! every wrapper too, so the refusal must come from the wrapper rule itself
//! and not merely from the program being unlisted.

mod common;

use common::{ctx, registry, run_args};
use openpista_proto::ToolOutcome;
use openpista_tools::policy::{CommandPolicy, PolicyMode};

fn careless() -> CommandPolicy {
    let mut p = CommandPolicy::default();
    p.allowlist.extend(
        [
            "env",
            "sh",
            "bash",
            "python3",
            "python3.12",
            "perl",
            "awk",
            "sed",
            "xargs",
            "sudo",
            "nohup",
            "timeout",
            "busybox",
            "sort",
            "id",
            "touch",
        ]
        .map(str::to_owned),
    );
    p
}

fn deny() -> CommandPolicy {
    CommandPolicy {
        mode: PolicyMode::Deny,
        ..CommandPolicy::default()
    }
}

struct Case {
    label: &'static str,
    command: &'static str,
    policy: fn() -> CommandPolicy,
    /// A fragment the refusal must contain.
    reason: &'static str,
}

const OPERATOR: &str = "shell operator";
const WRAPPER: &str = "wrapper or interpreter";
const PATHS: &str = "programs are run by bare name";
const FIND: &str = "find may not";
const UNICODE: &str = "Unicode character";

fn cases() -> Vec<Case> {
    let d = CommandPolicy::default as fn() -> CommandPolicy;
    let c = careless as fn() -> CommandPolicy;
    vec![
        Case {
            label: "semicolon",
            command: "ls; touch pwned",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "and-and",
            command: "ls && touch pwned",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "or-or",
            command: "ls nope || touch pwned",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "pipe to shell",
            command: "echo id | sh",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "background",
            command: "touch pwned &",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "backticks",
            command: "echo `touch pwned`",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "command substitution",
            command: "echo $(touch pwned)",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "substitution in double quotes",
            command: "echo \"$(touch pwned)\"",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "${IFS} word splitting",
            command: "ls${IFS}-la",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "escaped semicolon",
            command: "ls \\; touch pwned",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "output redirection",
            command: "echo x > /etc/x",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "append redirection",
            command: "echo x >> pwned",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "input redirection",
            command: "cat < /etc/shadow",
            policy: c,
            reason: OPERATOR,
        },
        Case {
            label: "newline",
            command: "ls\ntouch pwned",
            policy: c,
            reason: "newline",
        },
        Case {
            label: "carriage return",
            command: "ls\rtouch pwned",
            policy: c,
            reason: "carriage return",
        },
        Case {
            label: "NUL byte",
            command: "ls\0touch pwned",
            policy: c,
            reason: "NUL",
        },
        Case {
            label: "escape character",
            command: "ls \u{1b}[2J",
            policy: c,
            reason: "control character",
        },
        Case {
            label: "comment hides text",
            command: "ls # touch pwned",
            policy: c,
            reason: "comment",
        },
        Case {
            label: "env sh -c",
            command: "env sh -c 'touch pwned'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "bash -c",
            command: "bash -c 'touch pwned'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "sh -c",
            command: "sh -c 'touch pwned'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "python3 -c",
            command: "python3 -c 'import os'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "versioned python",
            command: "python3.12 -c 'import os'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "perl -e",
            command: "perl -e 'system(1)'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "awk system()",
            command: "awk 'BEGIN{system(\"touch pwned\")}'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "sed e command",
            command: "sed -n '1e touch pwned' /etc/hostname",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "xargs",
            command: "xargs touch",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "sudo",
            command: "sudo ls",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "nohup sh",
            command: "nohup sh",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "timeout 1 sh",
            command: "timeout 1 sh",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "busybox sh",
            command: "busybox sh",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "split quotes 's''h'",
            command: "'s''h' -c 'touch pwned'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "partly quoted \"ba\"sh",
            command: "\"ba\"sh -c 'touch pwned'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "backslash-escaped \\sh",
            command: "\\sh -c 'touch pwned'",
            policy: c,
            reason: WRAPPER,
        },
        Case {
            label: "absolute path to a refused program",
            command: "/bin/sh -c 'touch pwned'",
            policy: c,
            reason: PATHS,
        },
        Case {
            label: "absolute path to an allowed program",
            command: "/bin/ls",
            policy: d,
            reason: PATHS,
        },
        Case {
            label: "relative path ./ls",
            command: "./ls",
            policy: d,
            reason: PATHS,
        },
        Case {
            label: "find -exec",
            command: "find . -exec touch pwned +",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "find -execdir",
            command: "find . -execdir touch pwned +",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "find -ok",
            command: "find . -okdir touch pwned",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "find -delete",
            command: "find . -delete",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "find -fprint",
            command: "find . -fprint pwned",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "find -fprintf",
            command: "find . -fprintf pwned %p",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "find -fls",
            command: "find . -fls pwned",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "find predicate quoted",
            command: "find . '-exec' touch pwned +",
            policy: d,
            reason: FIND,
        },
        Case {
            label: "sort --compress-program",
            command: "sort --compress-program=sh /etc/hostname",
            policy: c,
            reason: "--compress-program",
        },
        Case {
            label: "abbreviated --compress-prog",
            command: "sort --compress-prog=sh /etc/hostname",
            policy: c,
            reason: "abbreviat",
        },
        Case {
            label: "abbreviated --outp writes",
            command: "sort --outp=pwned /etc/hostname",
            policy: c,
            reason: "--output",
        },
        Case {
            label: "sort -o bundle",
            command: "sort -ro pwned /etc/hostname",
            policy: c,
            reason: "writes a file",
        },
        Case {
            label: "fullwidth semicolon",
            command: "ls\u{FF1B}touch pwned",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "fullwidth pipe",
            command: "ls \u{FF5C} sh",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "fullwidth ampersand",
            command: "ls \u{FF06}\u{FF06} id",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "fullwidth greater-than",
            command: "echo x \u{FF1E} pwned",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "Greek question mark",
            command: "ls\u{037E} id",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "zero-width joiner in name",
            command: "l\u{200D}s",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "zero-width space in name",
            command: "s\u{200B}h -c id",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "right-to-left override",
            command: "ls \u{202E}hs",
            policy: c,
            reason: UNICODE,
        },
        Case {
            label: "fullwidth letters (NFKC)",
            command: "\u{FF53}\u{FF48} -c id",
            policy: c,
            reason: "not plain ASCII",
        },
        Case {
            label: "unknown program rm -rf /",
            command: "rm -rf /",
            policy: d,
            reason: "not on the allowlist",
        },
        Case {
            label: "variable assignment prefix",
            command: "PATH=. ls",
            policy: d,
            reason: "not on the allowlist",
        },
        Case {
            label: "case-changed name",
            command: "LS",
            policy: d,
            reason: "not on the allowlist",
        },
        Case {
            label: "unbalanced quote",
            command: "echo 'abc",
            policy: d,
            reason: "unbalanced",
        },
        Case {
            label: "deny mode refuses everything",
            command: "ls",
            policy: deny,
            reason: "deny",
        },
        Case {
            label: "deny mode refuses echo",
            command: "echo hi",
            policy: deny,
            reason: "deny",
        },
    ]
}

fn words(text: &str) -> String {
    text.to_lowercase()
}

#[tokio::test]
async fn bypass_attempts_are_refused_with_a_reason() {
    let cases = cases();
    assert!(cases.len() >= 25);
    let mut labels: Vec<&str> = cases.iter().map(|c| c.label).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), cases.len(), "labels must be distinct");

    let ws = tempfile::tempdir().unwrap();
    let ctx = ctx(ws.path());
    let mut failures = Vec::new();
    for case in &cases {
        let reg = registry((case.policy)(), ws.path());
        let r = reg.call("system.run", &run_args(case.command), &ctx).await;
        let ok = r.outcome == ToolOutcome::Denied
            && r.content.starts_with("error: denied by policy: ")
            && words(&r.content).contains(&words(case.reason));
        if !ok {
            failures.push(format!(
                "[{}] {:?} -> {:?}: {}",
                case.label, case.command, r.outcome, r.content
            ));
        }
    }
    assert!(
        !ws.path().join("pwned").exists(),
        "a refused command ran anyway"
    );
    assert!(
        failures.is_empty(),
        "not refused as expected:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn the_careless_policy_does_run_its_plain_programs() {
    // Guards the table above: the same policy does run the listed programs
    // when nothing is wrong, so the refusals come from the rules.
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(careless(), ws.path());
    let ctx = ctx(ws.path());
    let r = reg.call("system.run", &run_args("touch made"), &ctx).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(ws.path().join("made").exists());
    let r = reg
        .call("system.run", &run_args("sort -r made"), &ctx)
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    let r = reg
        .call("system.run", &run_args("find . -name made"), &ctx)
        .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("./made"));
}

#[tokio::test]
async fn allow_wrappers_lets_the_operator_opt_in() {
    let ws = tempfile::tempdir().unwrap();
    let mut policy = careless();
    policy.allow_wrappers = vec!["xargs".to_owned()];
    let reg = registry(policy, ws.path());
    let r = reg
        .call("system.run", &run_args("xargs echo"), &ctx(ws.path()))
        .await;
    // stdin is /dev/null, so xargs runs `echo` once with no arguments.
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    // Still refused: a wrapper the operator did not name.
    let r = reg
        .call("system.run", &run_args("sh -c id"), &ctx(ws.path()))
        .await;
    assert_eq!(r.outcome, ToolOutcome::Denied);
}
