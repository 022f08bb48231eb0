//! Approval buttons on Telegram: the real teloxide adapter against the fake
//! Bot API, through the gateway bridge to a scripted model whose `file.write`
//! call needs approval (the default for mutating tools). Only the allowed
//! user whose session asked can press Approve / Deny / Always; anyone else's
//! press, or a forged button, is answered with a refusal and audited.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openpista_agent::{Agent, AgentConfig, AgentParts, ApprovalConfig, Approvals};
use openpista_channels::telegram::{TelegramAdapter, TelegramConfig};
use openpista_channels::{APPROVAL_REFUSED, ChannelAdapter, SecretString};
use openpista_gateway::{APPROVED_REPLY, DENIED_REPLY, Gateway, GatewayBridge, GatewayConfig};
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::Store;
use openpista_proto::SessionId;
use openpista_testkit::FakeTelegram;
use openpista_tools::builtin_registry;
use openpista_tools::policy::CommandPolicy;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const OWNER: i64 = 1001;
/// Another allowed user.
const FRIEND: i64 = 2002;
/// A user nobody allowed.
const STRANGER: i64 = 6666;
/// A "did not hang" bound.
const PATIENCE: Duration = Duration::from_secs(30);

const SCRIPT: &str = r#"
[[reply]]
text = "Writing."
tool_calls = [{ name = "file.write", arguments = { path = "note.txt", content = "hi" } }]

[[reply]]
text = "All done."
"#;

struct Running {
    tg: FakeTelegram,
    store: Store,
    gateway: Gateway,
    workspace: std::path::PathBuf,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start() -> Self {
        let tg = FakeTelegram::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        let tools = builtin_registry(Default::default(), Default::default(), Vec::new()).unwrap();
        let agent = Agent::with_approvals(
            AgentParts {
                llm: Arc::new(ScriptedProvider::new(Script::from_toml(SCRIPT).unwrap())),
                tools: Arc::new(tools),
                store: store.clone(),
                config: AgentConfig::default(),
                workspace: workspace.clone(),
                skills_context: String::new(),
            },
            Approvals::new(ApprovalConfig::default(), Some(CommandPolicy::default())),
        );
        let gateway = Gateway::new(agent, &GatewayConfig::default());
        let cfg = TelegramConfig {
            api_url: Some(tg.api_url()),
            allowed_users: vec![OWNER as u64, FRIEND as u64],
            backoff: Duration::from_millis(10),
            poll_timeout_secs: 0,
            ..TelegramConfig::new(SecretString::from("123:secret"))
        };
        let adapter = TelegramAdapter::new(&cfg, store.clone()).unwrap();
        let bridge = Arc::new(GatewayBridge::new(gateway.clone()));
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { adapter.run(bridge, s).await.unwrap() });
        Self {
            tg,
            store,
            gateway,
            workspace,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn wait<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never happened; requests {:?}",
                self.tg
                    .requests()
                    .iter()
                    .map(|r| (r.method.clone(), r.body.clone()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the message with buttons in `chat`: its id and the callback
    /// data of Approve, Deny and Always.
    async fn prompt(&self, chat: i64) -> (i64, [String; 3]) {
        let body = self
            .wait("an approval prompt", || {
                self.tg
                    .calls("sendMessage")
                    .into_iter()
                    .map(|r| r.body)
                    .find(|b| b["chat_id"] == chat && !b["reply_markup"].is_null())
            })
            .await;
        let text = body["text"].as_str().unwrap().to_owned();
        assert!(text.contains("file.write"), "{text}");
        assert!(text.contains("note.txt"), "{text}");
        let row = &body["reply_markup"]["inline_keyboard"][0];
        let labels: Vec<&str> = (0..3).map(|i| row[i]["text"].as_str().unwrap()).collect();
        assert_eq!(labels, ["Approve", "Deny", "Always"]);
        let data = [0, 1, 2].map(|i| row[i]["callback_data"].as_str().unwrap().to_owned());
        assert!(data.iter().all(|d| d.len() <= 64), "{data:?}");
        let id = self
            .tg
            .messages_with_ids(chat)
            .into_iter()
            .find(|(_, t)| *t == text)
            .map(|(id, _)| id)
            .expect("the prompt's message id");
        (id, data)
    }

    /// The texts of the `n`th..answerCallbackQuery calls.
    async fn callback_answers(&self, n: usize) -> Vec<String> {
        self.wait("the button answers", || {
            let calls = self.tg.calls("answerCallbackQuery");
            (calls.len() >= n).then(|| {
                calls
                    .iter()
                    .map(|c| c.body["text"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
        })
        .await
    }

    async fn audited(&self, action: &str) -> Vec<Value> {
        self.store
            .audit(10_000, None)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.action == action)
            .map(|r| r.detail)
            .collect()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("adapter stops")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_approves_with_a_button_and_others_presses_are_refused() {
    let r = Running::start().await;
    r.tg.push_text(OWNER, "write a note");
    let (message, [approve, _deny, _always]) = r.prompt(OWNER).await;
    let session = SessionId::parse("telegram-1001").unwrap();
    assert!(r.gateway.is_waiting_approval(&session));

    // Another allowed user, a stranger and a forged button: refused.
    r.tg.push_button(FRIEND, OWNER, message, &approve);
    r.tg.push_button(STRANGER, OWNER, message, &approve);
    r.tg.push_button(
        OWNER,
        OWNER,
        message,
        &format!("ap:y:ap-{}", "0".repeat(32)),
    );
    let answers = r.callback_answers(3).await;
    assert_eq!(answers, [APPROVAL_REFUSED; 3], "{answers:?}");
    assert!(!r.workspace.join("note.txt").exists());
    assert!(r.gateway.is_waiting_approval(&session), "still waiting");
    let refused = r.audited("approval_refused").await;
    // The stranger never reaches the gateway; the friend and the forgery do.
    assert_eq!(refused.len(), 2, "{refused:?}");
    // (The presses are handled concurrently: any order.)
    assert!(
        refused
            .iter()
            .any(|d| d["user"] == "2002" && d["reason"].as_str().unwrap().contains("another")),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|d| d["user"] == "1001" && d["reason"].as_str().unwrap().contains("no pending")),
        "{refused:?}"
    );
    assert!(r.tg.calls("editMessageReplyMarkup").is_empty());

    // The owner's press runs the call and removes the buttons.
    r.tg.push_button(OWNER, OWNER, message, &approve);
    let answers = r.callback_answers(4).await;
    assert_eq!(answers[3], APPROVED_REPLY);
    r.wait("the final answer", || {
        r.tg.transcript(OWNER)
            .iter()
            .any(|t| t == "All done.")
            .then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(r.workspace.join("note.txt")).unwrap(),
        "hi"
    );
    let edits = r
        .wait("the buttons removed", || {
            let edits = r.tg.calls("editMessageReplyMarkup");
            (!edits.is_empty()).then_some(edits)
        })
        .await;
    assert_eq!(edits.len(), 1);
    assert_eq!(edits[0].body["message_id"], message);

    // Pressing again (a replay) is refused.
    r.tg.push_button(OWNER, OWNER, message, &approve);
    let answers = r.callback_answers(5).await;
    assert_eq!(answers[4], APPROVAL_REFUSED);
    let refused = r.audited("approval_refused").await;
    assert_eq!(refused.len(), 3);
    assert!(
        refused[2]["reason"]
            .as_str()
            .unwrap()
            .contains("already answered")
    );
    let decided = r.audited("approval_decided").await;
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0]["user"], "1001");
    assert_eq!(decided[0]["channel"], "telegram");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deny_runs_nothing() {
    let r = Running::start().await;
    r.tg.push_text(OWNER, "write a note");
    let (message, [_approve, deny, _always]) = r.prompt(OWNER).await;
    r.tg.push_button(OWNER, OWNER, message, &deny);
    let answers = r.callback_answers(1).await;
    assert_eq!(answers, [DENIED_REPLY]);
    r.wait("the final answer", || {
        r.tg.transcript(OWNER)
            .iter()
            .any(|t| t == "All done.")
            .then_some(())
    })
    .await;
    assert!(!r.workspace.join("note.txt").exists());
    assert_eq!(r.audited("approval_decided").await[0]["decision"], "deny");
    r.stop().await;
}
