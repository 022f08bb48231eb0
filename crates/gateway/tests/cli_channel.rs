//! The terminal channel end to end: the CLI adapter reading a pipe and
//! writing a pipe (stdin and stdout in production), through the gateway
//! bridge and the in-process gateway to a scripted model.

mod common;

use std::sync::Arc;
use std::time::Duration;

use openpista_channels::cli::{CLI, CliAdapter, CliReplier, UNKNOWN_COMMAND};
use openpista_channels::{ChannelAdapter, ChannelError, Outbound};
use openpista_gateway::{CANCELLED_REPLY, GatewayBridge, GatewayConfig};
use openpista_proto::SessionId;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader, DuplexStream};
use tokio_util::sync::CancellationToken;

/// Generous "did not hang" bound.
const PATIENCE: Duration = Duration::from_secs(30);

struct Term {
    h: common::Harness,
    stdin: Option<DuplexStream>,
    stdout: DuplexStream,
    /// Everything read from stdout so far.
    seen: String,
    replier: Option<CliReplier<DuplexStream>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ChannelError>>,
}

impl Term {
    async fn start(script: &str) -> Self {
        let h = common::harness(script, &GatewayConfig::default()).await;
        let (stdin, adapter_in) = tokio::io::duplex(64 * 1024);
        let (adapter_out, stdout) = tokio::io::duplex(64 * 1024);
        let adapter = CliAdapter::new(BufReader::new(adapter_in), adapter_out, "ada");
        assert_eq!(adapter.name(), CLI);
        let replier = adapter.replier();
        let bridge = Arc::new(GatewayBridge::new(h.gateway.clone()));
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { adapter.run(bridge, s).await });
        Self {
            h,
            stdin: Some(stdin),
            stdout,
            seen: String::new(),
            replier: Some(replier),
            stop,
            task,
        }
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
    }

    /// Reads stdout until `done` holds for all of it; returns it.
    async fn wait_for(&mut self, done: impl Fn(&str) -> bool) -> String {
        let mut buf = [0u8; 4096];
        while !done(&self.seen) {
            let n = tokio::time::timeout(PATIENCE, self.stdout.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no more output; so far: {:?}", self.seen))
                .unwrap();
            assert!(n > 0, "stdout closed; so far: {:?}", self.seen);
            self.seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        self.seen.clone()
    }

    async fn lines(&mut self, n: usize) -> Vec<String> {
        let out = self
            .wait_for(|s| s.lines().count() >= n && s.ends_with('\n'))
            .await;
        out.lines().map(str::to_owned).collect()
    }

    async fn finished(self) -> Result<(), ChannelError> {
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("run ended")
            .unwrap()
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn replies(texts: &[&str]) -> String {
    texts
        .iter()
        .map(|t| format!("[[reply]]\ntext = {}\n", toml_string(t)))
        .collect()
}

#[tokio::test]
async fn lines_are_answered_in_order_in_the_cli_session() {
    let mut t = Term::start(&replies(&["first answer", "second answer"])).await;
    t.say("one").await;
    t.say("").await;
    t.say("two").await;
    let lines = t.lines(2).await;
    assert_eq!(lines, vec!["first answer", "second answer"]);
    // Both turns ran in the one session of the terminal.
    let session = SessionId::parse("cli-cli").unwrap();
    let stored = t.h.store.recent_messages(&session, 100).await.unwrap();
    let users: Vec<_> = stored
        .iter()
        .filter(|m| m.message.role == openpista_proto::Role::User)
        .map(|m| m.message.content.clone())
        .collect();
    assert_eq!(users, vec!["one", "two"]);
    t.stop.cancel();
    t.finished().await.unwrap();
}

#[tokio::test]
async fn quit_ends_the_run_and_later_lines_are_not_read() {
    let mut t = Term::start(&replies(&["hello", "never"])).await;
    t.say("hi").await;
    t.say("/quit").await;
    t.say("after quit").await;
    t.replier.take();
    let stdin = t.stdin.take();
    let out = {
        // The adapter drops stdout when it ends: read to the end.
        let mut rest = String::new();
        tokio::time::timeout(PATIENCE, t.stdout.read_to_string(&mut rest))
            .await
            .expect("stdout closed after /quit")
            .unwrap();
        rest
    };
    assert_eq!(
        out, "hello\n",
        "the line before /quit is answered, none after"
    );
    assert_eq!(t.h.llm.requests().len(), 1);
    drop(stdin);
    t.finished().await.unwrap();
}

#[tokio::test]
async fn end_of_input_ends_the_run_after_answering() {
    let mut t = Term::start(&replies(&["bye"])).await;
    t.say("last words").await;
    t.stdin.take();
    assert_eq!(t.lines(1).await, vec!["bye"]);
    t.finished().await.unwrap();
}

#[tokio::test]
async fn cancel_stops_a_slow_turn() {
    let long = "this reply streams slowly and would take far too long to finish ".repeat(10);
    let script = format!(
        "[[reply]]\ntext = {}\nchunk_chars = 2\ndelay_ms = 100\n",
        toml_string(&long)
    );
    let mut t = Term::start(&script).await;
    t.say("talk for a long time").await;
    // The reply streams: some of it is shown before it ends.
    t.wait_for(|s| !s.is_empty()).await;
    t.say("/cancel").await;
    let out = t
        .wait_for(|s| s.lines().any(|l| l == CANCELLED_REPLY))
        .await;
    assert!(
        out.lines().any(|l| l.starts_with("Cancelling")),
        "the /cancel is acknowledged: {out:?}"
    );
    assert!(!out.contains(long.trim_end()), "{out:?}");
    assert_eq!(t.h.gateway.status().running_turns, 0);
    t.stop.cancel();
    t.finished().await.unwrap();
}

#[tokio::test]
async fn commands_and_the_repliers_messages_reach_the_terminal() {
    let mut t = Term::start(&replies(&["fine"])).await;
    let replier = t.replier.clone().unwrap();
    replier
        .send(&Outbound {
            conversation: CLI.into(),
            text: "a cron answer".into(),
        })
        .await
        .unwrap();
    t.say("/bogus").await;
    t.say("/status").await;
    let lines = t.lines(3).await;
    assert_eq!(lines[0], "a cron answer");
    assert_eq!(lines[1], UNKNOWN_COMMAND);
    assert!(lines[2].starts_with("Up "), "{lines:?}");
    t.say("/new").await;
    let lines = t.lines(4).await;
    assert_eq!(lines[3], "Started a new session.");
    t.say("after new").await;
    assert_eq!(t.lines(5).await[4], "fine");
    // `/new` moved the terminal to a fresh session.
    let old = SessionId::parse("cli-cli").unwrap();
    assert_eq!(t.h.store.message_count(&old).await.unwrap(), 0);
    t.stop.cancel();
    t.finished().await.unwrap();
}
