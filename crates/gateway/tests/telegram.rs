//! The Telegram adapter end to end: the real teloxide client against the fake
//! Bot API (`openpista-testkit`), through the in-process gateway to a scripted
//! model, with pairings in real SQLite.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use openpista_channels::telegram::{
    HELLO, NOT_SUPPORTED, TELEGRAM, TOO_LONG, TelegramAdapter, TelegramConfig, UNKNOWN_COMMAND,
};
use openpista_channels::{ChannelAdapter, SecretString};
use openpista_gateway::{CANCELLED_REPLY, CronScheduler, GatewayBridge, GatewayConfig, Outbox};
use openpista_memory::{MissedPolicy, NewCronJob};
use openpista_proto::SessionId;
use openpista_testkit::FakeTelegram;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const OWNER: i64 = 1001;
const STRANGER: i64 = 6666;
/// Generous "did not hang" bound.
const PATIENCE: Duration = Duration::from_secs(30);

struct Running {
    tg: FakeTelegram,
    h: common::Harness,
    adapter: TelegramAdapter,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn config(tg: &FakeTelegram) -> TelegramConfig {
    TelegramConfig {
        api_url: Some(tg.api_url()),
        allowed_users: vec![OWNER as u64],
        backoff: Duration::from_millis(10),
        poll_timeout_secs: 0,
        ..TelegramConfig::new(SecretString::from("123:secret"))
    }
}

impl Running {
    async fn start(script: &str, before: impl FnOnce(&FakeTelegram)) -> Self {
        Self::start_with(script, |_| {}, before).await
    }

    async fn start_with(
        script: &str,
        tweak: impl FnOnce(&mut TelegramConfig),
        before: impl FnOnce(&FakeTelegram),
    ) -> Self {
        let tg = FakeTelegram::start().await.unwrap();
        before(&tg);
        let h = common::harness(script, &GatewayConfig::default()).await;
        let mut cfg = config(&tg);
        tweak(&mut cfg);
        let adapter = TelegramAdapter::new(&cfg, h.store.clone()).unwrap();
        let stop = CancellationToken::new();
        let bridge = Arc::new(GatewayBridge::new(h.gateway.clone()));
        let (a, s) = (adapter.clone(), stop.clone());
        let task = tokio::spawn(async move {
            a.run(bridge, s).await.unwrap();
        });
        Self {
            tg,
            h,
            adapter,
            stop,
            task,
        }
    }

    /// Waits until `check` holds for the chat's transcript.
    async fn wait_transcript(&self, chat: i64, check: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let t = self.tg.transcript(chat);
            if check(&t) {
                return t;
            }
            if Instant::now() > deadline {
                panic!(
                    "transcript of {chat} never matched: {t:?}; requests {:?}",
                    self.methods()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `n` messages in the chat (edits applied).
    async fn wait_messages(&self, chat: i64, n: usize) -> Vec<String> {
        self.wait_transcript(chat, |t| t.len() >= n).await
    }

    /// Waits until every queued update was fetched and handled (the fake
    /// got a later getUpdates call and no handler is left sending).
    async fn settle(&self) {
        let polls = self.tg.calls("getUpdates").len();
        let deadline = Instant::now() + PATIENCE;
        while self.tg.calls("getUpdates").len() < polls + 3 {
            assert!(Instant::now() < deadline, "polling stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    fn methods(&self) -> Vec<String> {
        self.tg
            .requests()
            .iter()
            .map(|r| r.method.clone())
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

fn reply(text: &str) -> String {
    format!("[[reply]]\ntext = {}\n", toml_string(text))
}

fn slow_reply(text: &str, delay_ms: u64) -> String {
    format!(
        "[[reply]]\ntext = {}\nchunk_chars = 2\ndelay_ms = {delay_ms}\n",
        toml_string(text)
    )
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
    let t = r.wait_messages(OWNER, 1).await;
    assert_eq!(t, vec!["hello from the agent".to_owned()]);
    let msg = &r.tg.calls("sendMessage")[0].body;
    assert_eq!(msg["parse_mode"], "HTML");
    assert!(!r.tg.calls("sendChatAction").is_empty(), "typing indicator");
    assert_eq!(r.h.llm.requests().len(), 1);
    let session =
        r.h.store
            .get_session(&SessionId::parse("telegram-1001").unwrap())
            .await
            .unwrap();
    assert!(session.is_some(), "one stable session per private chat");
    r.stop().await;
}

#[tokio::test]
async fn an_unknown_user_is_refused_once_with_a_stored_code_until_the_owner_pairs_them() {
    let r = Running::start(&reply("welcome aboard"), |tg| {
        tg.push_text(STRANGER, "let me in");
        tg.push_text(STRANGER, "please");
        tg.push_message(STRANGER, json!({"sticker": {}}));
        tg.push_text(STRANGER, "/start");
    })
    .await;
    let t = r.wait_messages(STRANGER, 1).await;
    r.settle().await;
    let t_after = r.tg.transcript(STRANGER);
    assert_eq!(t_after.len(), 1, "one refusal only: {t_after:?}");
    let text = &t[0];
    assert!(text.contains(&STRANGER.to_string()), "{text}");
    assert!(text.contains("openpista telegram pair"), "{text}");
    let code = text.rsplit(' ').next().unwrap();
    assert_eq!(code.len(), 6, "{text}");
    assert!(
        r.h.llm.requests().is_empty(),
        "no model call for a stranger"
    );
    assert!(
        r.tg.calls("sendChatAction").is_empty(),
        "no typing for a stranger"
    );

    // The code is in the database; the owner approves it (as `openpista
    // telegram pair` does) while the adapter runs.
    let pending = r.h.store.pending_pairings(TELEGRAM).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].user_id, STRANGER.to_string());
    assert_eq!(pending[0].conversation, STRANGER.to_string());
    assert_eq!(pending[0].code, code);
    r.h.store
        .approve_pairing(TELEGRAM, code)
        .await
        .unwrap()
        .unwrap();
    r.tg.push_text(STRANGER, "now?");
    let t = r.wait_messages(STRANGER, 2).await;
    assert_eq!(t[1], "welcome aboard");
    assert_eq!(r.h.llm.requests().len(), 1);
    r.stop().await;
}

#[tokio::test]
async fn a_long_reply_arrives_split_in_order_within_the_limit() {
    let long: String = (0..1000).map(|i| format!("w{i:04}.... ")).collect();
    let long = format!("{}\n{}", &long[..5000], &long[5000..]);
    assert_eq!(long.chars().count(), 10_001);
    let r = Running::start(&reply(&long), |tg| tg.push_text(OWNER, "tell me a lot")).await;
    let t = r.wait_messages(OWNER, 4).await;
    assert_eq!(t.len(), 4, "4096 + up to the line break + 4096 + rest");
    assert!(t.iter().all(|m| m.chars().count() <= 4096));
    let joined: Vec<&str> = t.iter().flat_map(|m| m.split_whitespace()).collect();
    let expected: Vec<&str> = long.split_whitespace().collect();
    assert_eq!(joined, expected, "words in order, none lost or cut");
    r.stop().await;
}

#[tokio::test]
async fn html_and_markdown_specials_in_model_text_survive() {
    let markdown_specials = r"_a_ *b* [c](d) ~e~ `f` #g +h -i =j |k {l} .m !n \o";
    let text = format!("if a < b && c > d then <b>x</b>\n{markdown_specials}");
    let r = Running::start(&reply(&text), |tg| tg.push_text(OWNER, "compare")).await;
    let t = r.wait_messages(OWNER, 1).await;
    assert_eq!(
        t[0],
        format!("if a &lt; b &amp;&amp; c &gt; d then &lt;b&gt;x&lt;/b&gt;\n{markdown_specials}"),
        "HTML specials escaped, MarkdownV2 specials untouched (HTML parse mode)"
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
    let t = r.wait_messages(OWNER, 1).await;
    assert_eq!(t, vec!["eventually".to_owned()]);
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
    let t = r.wait_messages(OWNER, 1).await;
    assert_eq!(t, vec!["back online".to_owned()]);
    assert!(r.tg.calls("getMe").len() >= 3);
    r.stop().await;
}

#[tokio::test]
async fn non_text_messages_and_commands_are_answered() {
    let r = Running::start("", |tg| {
        tg.push_message(OWNER, json!({"sticker": {}}));
    })
    .await;
    let t = r.wait_messages(OWNER, 1).await;
    assert_eq!(t[0], NOT_SUPPORTED);
    r.tg.push_text(OWNER, "/status");
    let t = r.wait_messages(OWNER, 2).await;
    assert!(t[1].contains("live sessions"), "{t:?}");
    r.tg.push_text(OWNER, "/start");
    let t = r.wait_messages(OWNER, 3).await;
    assert_eq!(t[2], HELLO);
    r.tg.push_text(OWNER, "/frobnicate");
    let t = r.wait_messages(OWNER, 4).await;
    assert_eq!(t[3], UNKNOWN_COMMAND);
    r.tg.push_text(OWNER, "/new");
    let t = r.wait_messages(OWNER, 5).await;
    assert!(t[4].contains("new session"), "{t:?}");
    r.tg.push_text(OWNER, "/cancel");
    let t = r.wait_messages(OWNER, 6).await;
    assert_eq!(t[5], "Nothing is running.");
    assert!(r.h.llm.requests().is_empty());
    r.stop().await;
}

#[tokio::test]
async fn a_slow_reply_streams_into_a_draft_that_is_edited_throttled() {
    let text = "streaming this answer two characters at a time, so that it takes a while";
    let interval = Duration::from_millis(300);
    let r = Running::start_with(
        &slow_reply(text, 40),
        |c| c.draft_interval = interval,
        |tg| tg.push_text(OWNER, "go"),
    )
    .await;
    let started = Instant::now();
    let t = r.wait_transcript(OWNER, |t| t == [text]).await;
    let elapsed = started.elapsed();
    assert_eq!(t, vec![text.to_owned()]);
    let sends = r.tg.calls("sendMessage");
    assert_eq!(sends.len(), 1, "one draft, no second message");
    let draft = sends[0].body["text"].as_str().unwrap();
    assert!(
        text.starts_with(draft) && draft.len() < text.len(),
        "the draft shows the reply so far: {draft:?}"
    );
    let edits = r.tg.calls("editMessageText");
    assert!(!edits.is_empty(), "the draft is edited");
    let bound = (elapsed.as_millis() / interval.as_millis()) as usize + 2;
    assert!(
        edits.len() <= bound,
        "{} edits in {elapsed:?} at one per {interval:?}",
        edits.len()
    );
    assert!(edits.iter().all(|e| e.body["parse_mode"] == "HTML"));
    r.stop().await;
}

#[tokio::test]
async fn a_long_streamed_reply_replaces_its_draft_and_continues_in_order() {
    let long: String = (0..900).map(|i| format!("<w{i:03}> & ")).collect();
    let script = format!(
        "[[reply]]\ntext = {}\nchunk_chars = 100\ndelay_ms = 40\n",
        toml_string(&long)
    );
    let r = Running::start_with(
        &script,
        |c| c.draft_interval = Duration::from_millis(250),
        |tg| tg.push_text(OWNER, "a long one, slowly"),
    )
    .await;
    let expected: Vec<String> = long
        .split_whitespace()
        .map(|w| {
            w.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        })
        .collect();
    let t = r
        .wait_transcript(OWNER, |t| {
            t.iter().flat_map(|m| m.split_whitespace()).count() >= expected.len()
        })
        .await;
    assert!(
        !r.tg.calls("editMessageText").is_empty(),
        "a draft was shown"
    );
    assert!(t.len() >= 2, "{} messages", t.len());
    assert!(t.iter().all(|m| m.chars().count() <= 4096));
    let words: Vec<&str> = t.iter().flat_map(|m| m.split_whitespace()).collect();
    assert_eq!(
        words, expected,
        "escaped, in order, the draft replaced not repeated"
    );
    r.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_turn() {
    let long = "this reply streams slowly and would take far too long to finish ".repeat(10);
    let r = Running::start_with(
        &slow_reply(&long, 100),
        |c| c.draft_interval = Duration::from_millis(200),
        |tg| tg.push_text(OWNER, "talk for a long time"),
    )
    .await;
    // The draft shows the turn is running.
    r.wait_messages(OWNER, 1).await;
    r.tg.push_text(OWNER, "/cancel");
    let t = r
        .wait_transcript(OWNER, |t| t.iter().any(|m| m == CANCELLED_REPLY))
        .await;
    assert!(
        t.iter().any(|m| m.starts_with("Cancelling")),
        "the /cancel is acknowledged: {t:?}"
    );
    assert!(!t.iter().any(|m| m == long.trim_end()), "{t:?}");
    assert_eq!(r.h.gateway.status().running_turns, 0);
    r.stop().await;
}

#[tokio::test]
async fn malformed_and_unexpected_updates_are_answered_or_ignored_and_the_adapter_lives_on() {
    let r = Running::start(&reply("still here"), |tg| {
        tg.push_update(json!({"edited_message": {
            "message_id": 1, "date": 1, "edit_date": 2, "text": "edited",
            "chat": {"id": OWNER, "type": "private", "first_name": "Ada"},
            "from": {"id": OWNER, "is_bot": false, "first_name": "Ada"},
        }}));
        tg.push_update(json!({"callback_query": {
            "id": "77", "chat_instance": "x", "data": "approve:../../etc",
            "from": {"id": STRANGER, "is_bot": false, "first_name": "Eve"},
        }}));
        tg.push_update(json!({"channel_post": {
            "message_id": 2, "date": 1, "text": "news",
            "chat": {"id": -100_500, "type": "channel", "title": "News"},
        }}));
        tg.push_update(json!({"something_new": {"x": 1}}));
        tg.push_group_text(-4242, OWNER, "hello group");
        tg.push_message(
            OWNER,
            json!({"text": "x".repeat(openpista_channels::telegram::MAX_INBOUND_CHARS + 1)}),
        );
    })
    .await;
    let t = r.wait_messages(OWNER, 1).await;
    assert_eq!(t[0], TOO_LONG);
    r.settle().await;
    assert_eq!(r.tg.calls("answerCallbackQuery").len(), 1);
    assert!(r.tg.transcript(-4242).is_empty(), "groups are off");
    assert!(r.tg.transcript(-100_500).is_empty());
    assert!(r.h.llm.requests().is_empty());
    r.tg.push_text(OWNER, "are you alive?");
    let t = r.wait_messages(OWNER, 2).await;
    assert_eq!(t[1], "still here");
    r.stop().await;
}

#[tokio::test]
async fn with_groups_on_a_group_session_is_keyed_per_chat_and_user() {
    let r = Running::start_with(
        &reply("hi group"),
        |c| c.groups = true,
        |tg| tg.push_group_text(-4242, OWNER, "hello group"),
    )
    .await;
    let t = r.wait_messages(-4242, 1).await;
    assert_eq!(t, vec!["hi group".to_owned()]);
    let id = SessionId::parse(&format!("telegram--4242-{OWNER}")).unwrap();
    assert!(r.h.store.get_session(&id).await.unwrap().is_some());
    r.stop().await;
}

#[tokio::test]
async fn a_cron_job_for_a_chat_delivers_its_answer_to_telegram() {
    let r = Running::start("[[reply]]\ntext = \"good morning\"\n", |_| {}).await;
    let job =
        r.h.store
            .add_cron_job(&NewCronJob {
                expr: "* * * * * *".into(),
                tz: "UTC".into(),
                target: format!("telegram:{OWNER}"),
                prompt: "say good morning".into(),
                max_failures: 3,
                missed_policy: MissedPolicy::Skip,
            })
            .await
            .unwrap();
    let outbox = Outbox {
        telegram: Some(r.adapter.replier()),
    };
    let cron = CronScheduler::start_with(r.h.gateway.clone(), CancellationToken::new(), outbox);
    let t = r.wait_messages(OWNER, 1).await;
    assert_eq!(t[0], "good morning");
    assert!(cron.stop(PATIENCE).await);
    let runs = r.h.store.cron_runs(job.id, 10).await.unwrap();
    assert!(!runs.is_empty());
    let history =
        r.h.store
            .recent_messages(&SessionId::parse(&format!("telegram-{OWNER}")).unwrap(), 10)
            .await
            .unwrap();
    assert!(
        history.iter().any(|m| m.message.content == "good morning"),
        "the answer is also in the chat's session"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_of_one_chat_are_answered_in_the_order_they_were_sent() {
    // Five messages fetched in one getUpdates batch; the first reply is slow,
    // so a later message that overtook it would be stored first.
    let mut script = slow_reply("answer 1", 20);
    for i in 2..=5 {
        script.push_str(&reply(&format!("answer {i}")));
    }
    let r = Running::start(&script, |tg| {
        for i in 1..=5 {
            tg.push_text(OWNER, &format!("message {i}"));
        }
    })
    .await;
    let t = r
        .wait_transcript(OWNER, |t| {
            t.iter().filter(|m| m.starts_with("answer")).count() == 5
        })
        .await;
    let answers: Vec<&String> = t.iter().filter(|m| m.starts_with("answer")).collect();
    let expected: Vec<String> = (1..=5).map(|i| format!("answer {i}")).collect();
    assert_eq!(answers, expected.iter().collect::<Vec<_>>(), "{t:?}");
    let stored =
        r.h.store
            .recent_messages(&SessionId::parse("telegram-1001").unwrap(), 20)
            .await
            .unwrap();
    let asked: Vec<String> = stored
        .iter()
        .filter(|m| m.message.role == openpista_proto::Role::User)
        .map(|m| m.message.content.clone())
        .collect();
    let sent: Vec<String> = (1..=5).map(|i| format!("message {i}")).collect();
    assert_eq!(asked, sent, "turns ran in arrival order");
    r.stop().await;
}
