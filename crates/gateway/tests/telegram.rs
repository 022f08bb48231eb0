//! The Telegram adapter end to end: the real teloxide client against the fake
//! Bot API (`openpista-testkit`), through the in-process gateway to a scripted
//! model.

mod common;

use std::sync::Arc;
use std::time::Duration;

use openpista_channels::ChannelAdapter;
use openpista_channels::telegram::{NOT_SUPPORTED, TelegramAdapter, TelegramConfig};
use openpista_gateway::{GatewayBridge, GatewayConfig};
use openpista_testkit::FakeTelegram;
use tokio_util::sync::CancellationToken;

const OWNER: i64 = 1001;
const STRANGER: i64 = 6666;

struct Running {
    tg: FakeTelegram,
    h: common::Harness,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(script: &str, before: impl FnOnce(&FakeTelegram)) -> Self {
        let tg = FakeTelegram::start().await.unwrap();
        before(&tg);
        let h = common::harness(script, &GatewayConfig::default()).await;
        let adapter = TelegramAdapter::new(&TelegramConfig {
            token: "123:secret".into(),
            api_url: Some(tg.api_url()),
            allowed_users: vec![OWNER as u64],
            backoff: Duration::from_millis(10),
        })
        .unwrap();
        let stop = CancellationToken::new();
        let bridge = Arc::new(GatewayBridge::new(h.gateway.clone()));
        let (a, s) = (adapter.clone(), stop.clone());
        let task = tokio::spawn(async move {
            a.run(bridge, s).await.unwrap();
        });
        Self { tg, h, stop, task }
    }

    async fn wait_sent(&self, n: usize) -> Vec<(i64, String)> {
        for _ in 0..1000 {
            let sent = self.tg.sent();
            if sent.len() >= n {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "expected {n} messages, got {:?}; requests {:?}",
            self.tg.sent(),
            self.tg
                .requests()
                .iter()
                .map(|r| r.method.clone())
                .collect::<Vec<_>>()
        );
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("adapter stops")
            .unwrap();
    }
}

fn reply(text: &str) -> String {
    format!("[[reply]]\ntext = {}\n", toml_string(text))
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[tokio::test]
async fn an_allowed_user_gets_the_models_reply_in_their_chat() {
    let r = Running::start(&reply("hello from the agent"), |tg| {
        tg.push_text(OWNER, "hi there")
    })
    .await;
    let sent = r.wait_sent(1).await;
    assert_eq!(sent, vec![(OWNER, "hello from the agent".to_owned())]);
    let msg = &r.tg.calls("sendMessage")[0].body;
    assert_eq!(msg["parse_mode"], "HTML");
    assert!(!r.tg.calls("sendChatAction").is_empty(), "typing indicator");
    assert_eq!(r.h.llm.requests().len(), 1);
    r.stop().await;
}

#[tokio::test]
async fn an_unknown_user_gets_one_refusal_with_id_and_code_and_no_model_call() {
    let r = Running::start("", |tg| {
        tg.push_text(STRANGER, "let me in");
        tg.push_text(STRANGER, "please");
        tg.push_message(STRANGER, serde_json::json!({"sticker": {}}));
    })
    .await;
    let sent = r.wait_sent(1).await;
    // Let the other two updates be processed too.
    for _ in 0..50 {
        if r.tg.calls("getUpdates").len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent_after = r.tg.sent();
    assert_eq!(sent_after.len(), 1, "{sent_after:?}");
    let (chat, text) = &sent[0];
    assert_eq!(*chat, STRANGER);
    assert!(text.contains(&STRANGER.to_string()), "{text}");
    assert!(text.contains("openpista telegram pair"), "{text}");
    let code = text.rsplit(' ').next().unwrap();
    assert_eq!(code.len(), 6, "{text}");
    assert!(
        r.h.llm.requests().is_empty(),
        "no model call for a stranger"
    );
    r.stop().await;
}

#[tokio::test]
async fn a_long_reply_arrives_split_in_order_within_the_limit() {
    let long: String = (0..1000).map(|i| format!("w{i:04}.... ")).collect();
    let long = format!("{}\n{}", &long[..5000], &long[5000..]);
    assert_eq!(long.chars().count(), 10_001);
    let r = Running::start(&reply(&long), |tg| tg.push_text(OWNER, "tell me a lot")).await;
    let sent = r.wait_sent(4).await;
    assert_eq!(sent.len(), 4, "4096 + up to the line break + 4096 + rest");
    assert!(
        sent.iter()
            .all(|(c, t)| *c == OWNER && t.chars().count() <= 4096)
    );
    let joined: Vec<&str> = sent
        .iter()
        .flat_map(|(_, t)| t.split_whitespace())
        .collect();
    let expected: Vec<&str> = long.split_whitespace().collect();
    assert_eq!(joined, expected, "words in order, none lost or cut");
    r.stop().await;
}

#[tokio::test]
async fn html_specials_in_model_text_are_escaped() {
    let r = Running::start(&reply("if a < b && c > d then <b>x</b>"), |tg| {
        tg.push_text(OWNER, "compare")
    })
    .await;
    let sent = r.wait_sent(1).await;
    assert_eq!(
        sent[0].1,
        "if a &lt; b &amp;&amp; c &gt; d then &lt;b&gt;x&lt;/b&gt;"
    );
    r.stop().await;
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_the_reply_delivered() {
    let r = Running::start(&reply("eventually"), |tg| {
        tg.fail("sendMessage", 429, Some(1));
        tg.push_text(OWNER, "hi");
    })
    .await;
    let sent = r.wait_sent(1).await;
    assert_eq!(sent, vec![(OWNER, "eventually".to_owned())]);
    assert_eq!(
        r.tg.calls("sendMessage").len(),
        2,
        "one refused, one retried"
    );
    r.stop().await;
}

#[tokio::test]
async fn telegram_down_at_start_is_retried_not_fatal() {
    let r = Running::start(&reply("back online"), |tg| {
        // (teloxide itself sleeps 10 s on a 5xx; a 401 and a 429 keep this quick.)
        tg.fail("getMe", 401, None);
        tg.fail("getMe", 401, None);
        tg.fail("getUpdates", 429, Some(0));
        tg.push_text(OWNER, "anyone?");
    })
    .await;
    let sent = r.wait_sent(1).await;
    assert_eq!(sent, vec![(OWNER, "back online".to_owned())]);
    assert!(r.tg.calls("getMe").len() >= 3);
    r.stop().await;
}

#[tokio::test]
async fn non_text_messages_and_commands_are_answered() {
    let r = Running::start("", |tg| {
        tg.push_message(OWNER, serde_json::json!({"sticker": {}}));
    })
    .await;
    let sent = r.wait_sent(1).await;
    assert_eq!(sent[0].1, NOT_SUPPORTED);
    r.tg.push_text(OWNER, "/status");
    let sent = r.wait_sent(2).await;
    assert!(sent[1].1.contains("live sessions"), "{sent:?}");
    r.tg.push_text(OWNER, "/start");
    let sent = r.wait_sent(3).await;
    assert!(sent[2].1.contains("/new"), "{sent:?}");
    assert!(r.h.llm.requests().is_empty());
    r.stop().await;
}
