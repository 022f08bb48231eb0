//! A fake Telegram Bot API on loopback.
//!
//! [`FakeTelegram::start`] binds `127.0.0.1:0` and answers
//! `POST /bot{token}/{method}` the way the Bot API does: method names are
//! matched case-insensitively (teloxide sends `GetMe`, `SendMessage`), `getMe`
//! returns a full bot `User`, `getUpdates` hands out each scripted update once,
//! and `sendMessage` / `editMessageText` / `sendChatAction` are recorded and
//! answered with a plausible result. The fake keeps every message the bot
//! sent and applies edits to it ([`FakeTelegram::transcript`]), refusing an
//! edit of an unknown message or one that changes nothing, as Telegram does. Scripted failures ([`FakeTelegram::fail`])
//! are served first for their method, e.g. a 429 with `retry_after`.
//! The server stops when the [`FakeTelegram`] is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::openai::{lock, read_request, write_full};

/// The bot's own user id, as `getMe` reports it.
pub const BOT_ID: i64 = 4242;
/// How long an empty `getUpdates` waits before answering `[]`.
const EMPTY_POLL: Duration = Duration::from_millis(30);

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct TgRequest {
    /// The method, lowercased (`sendmessage`).
    pub method: String,
    /// The JSON body (`Null` if it was not JSON).
    pub body: Value,
    /// The bot token from the path (`/bot{token}/{method}`).
    pub token: Option<String>,
}

/// A scripted failure for the next call of one method.
#[derive(Debug, Clone)]
pub struct TgFailure {
    /// Lowercased method name.
    pub method: String,
    /// HTTP status (and Bot API `error_code`).
    pub code: u16,
    /// `parameters.retry_after`, if any.
    pub retry_after: Option<u64>,
}

#[derive(Default)]
struct Shared {
    updates: Mutex<VecDeque<Value>>,
    failures: Mutex<Vec<TgFailure>>,
    requests: Mutex<Vec<TgRequest>>,
    next_update_id: AtomicI64,
    next_message_id: AtomicI64,
    /// What the bot sent, by message id: (chat, current text).
    messages: Mutex<BTreeMap<i64, (i64, String)>>,
}

/// The fake Bot API server.
pub struct FakeTelegram {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeTelegram {
    /// Starts the server on an ephemeral loopback port.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        shared.next_update_id.store(1, Ordering::SeqCst);
        shared.next_message_id.store(1000, Ordering::SeqCst);
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    /// The API base URL to give the client (`http://127.0.0.1:PORT/`).
    pub fn api_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Queues a private text message from `user_id` (chat id = user id).
    pub fn push_text(&self, user_id: i64, text: &str) {
        self.push_message(user_id, json!({ "text": text }));
    }

    /// Queues a private message from `user_id` with these extra fields
    /// (`{"text": ..}`, `{"sticker": ..}`, ...).
    pub fn push_message(&self, user_id: i64, extra: Value) {
        let update_id = self.shared.next_update_id.fetch_add(1, Ordering::SeqCst);
        let message_id = self.shared.next_message_id.fetch_add(1, Ordering::SeqCst);
        let mut message = json!({
            "message_id": message_id,
            "date": 1_700_000_000,
            "chat": {"id": user_id, "type": "private", "first_name": "Ada"},
            "from": {"id": user_id, "is_bot": false, "first_name": "Ada"},
        });
        if let (Some(m), Some(e)) = (message.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                m.insert(k.clone(), v.clone());
            }
        }
        lock(&self.shared.updates).push_back(json!({"update_id": update_id, "message": message}));
    }

    /// Queues a text message in group `chat_id` from `user_id`.
    pub fn push_group_text(&self, chat_id: i64, user_id: i64, text: &str) {
        let message_id = self.shared.next_message_id.fetch_add(1, Ordering::SeqCst);
        self.push_update(json!({"message": {
            "message_id": message_id,
            "date": 1_700_000_000,
            "chat": {"id": chat_id, "type": "group", "title": "Friends"},
            "from": {"id": user_id, "is_bot": false, "first_name": "Ada"},
            "text": text,
        }}));
    }

    /// Every message the bot sent to `chat_id` with its id (edits applied),
    /// oldest first.
    pub fn messages_with_ids(&self, chat_id: i64) -> Vec<(i64, String)> {
        lock(&self.shared.messages)
            .iter()
            .filter(|(_, (chat, _))| *chat == chat_id)
            .map(|(id, (_, text))| (*id, text.clone()))
            .collect()
    }

    /// Queues a press by `user_id` of an inline button carrying `data` under
    /// the bot's message `message_id` in private chat `chat_id`.
    pub fn push_button(&self, user_id: i64, chat_id: i64, message_id: i64, data: &str) {
        let query_id = self.shared.next_update_id.load(Ordering::SeqCst);
        self.push_update(json!({"callback_query": {
            "id": format!("cq-{query_id}"),
            "from": {"id": user_id, "is_bot": false, "first_name": "Ada"},
            "chat_instance": "ci-1",
            "data": data,
            "message": {
                "message_id": message_id,
                "date": 1_700_000_000,
                "chat": {"id": chat_id, "type": "private", "first_name": "Ada"},
                "from": {"id": BOT_ID, "is_bot": true, "first_name": "Pista"},
                "text": "approval",
            },
        }}));
    }

    /// Queues a raw update (`{"edited_message": ..}`, `{"callback_query": ..}`,
    /// ...); its `update_id` is set here.
    pub fn push_update(&self, mut update: Value) {
        let update_id = self.shared.next_update_id.fetch_add(1, Ordering::SeqCst);
        if let Some(obj) = update.as_object_mut() {
            obj.insert("update_id".into(), json!(update_id));
        }
        lock(&self.shared.updates).push_back(update);
    }

    /// The current text of every message the bot sent to `chat_id` (edits
    /// applied), oldest first.
    pub fn transcript(&self, chat_id: i64) -> Vec<String> {
        lock(&self.shared.messages)
            .values()
            .filter(|(chat, _)| *chat == chat_id)
            .map(|(_, text)| text.clone())
            .collect()
    }

    /// The next call of `method` fails with `code` (and `retry_after`).
    pub fn fail(&self, method: &str, code: u16, retry_after: Option<u64>) {
        lock(&self.shared.failures).push(TgFailure {
            method: method.to_ascii_lowercase(),
            code,
            retry_after,
        });
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<TgRequest> {
        lock(&self.shared.requests).clone()
    }

    /// The requests for `method` (case-insensitive), in order.
    pub fn calls(&self, method: &str) -> Vec<TgRequest> {
        let method = method.to_ascii_lowercase();
        self.requests()
            .into_iter()
            .filter(|r| r.method == method)
            .collect()
    }

    /// `(chat_id, text)` of every successfully answered `sendMessage`.
    pub fn sent(&self) -> Vec<(i64, String)> {
        self.calls("sendMessage")
            .into_iter()
            .filter(|r| r.body.get("__failed").is_none())
            .map(|r| {
                (
                    r.body["chat_id"].as_i64().unwrap_or_default(),
                    r.body["text"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                connections.spawn(serve_connection(stream, Arc::clone(&shared)));
            }
            Err(_) => tokio::task::yield_now().await,
        }
    }
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Ok(Some(req)) = read_request(&mut stream, &mut buf).await {
        let close = req.close;
        let method = req
            .path
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let mut body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let failure = {
            let mut failures = lock(&shared.failures);
            let pos = failures.iter().position(|f| f.method == method);
            pos.map(|i| failures.remove(i))
        };
        if failure.is_some()
            && let Some(obj) = body.as_object_mut()
        {
            obj.insert("__failed".into(), Value::Bool(true));
        }
        let token = req
            .path
            .strip_prefix("/bot")
            .and_then(|rest| rest.split_once('/'))
            .map(|(token, _)| token.to_owned());
        lock(&shared.requests).push(TgRequest {
            method: method.clone(),
            body: body.clone(),
            token,
        });
        let (code, answer) = match failure {
            Some(f) => {
                let mut err = json!({
                    "ok": false,
                    "error_code": f.code,
                    "description": format!("fake failure {}", f.code),
                });
                if let Some(secs) = f.retry_after {
                    err["parameters"] = json!({"retry_after": secs});
                    err["description"] = json!(format!("Too Many Requests: retry after {secs}"));
                }
                (f.code, err)
            }
            None => match result(&shared, &method, &body).await {
                Ok(result) => (200, json!({"ok": true, "result": result})),
                Err((code, description)) => (
                    code,
                    json!({"ok": false, "error_code": code, "description": description}),
                ),
            },
        };
        let bytes = answer.to_string();
        if write_full(&mut stream, code, "application/json", &[], bytes.as_bytes())
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}

async fn result(shared: &Shared, method: &str, body: &Value) -> Result<Value, (u16, String)> {
    Ok(match method {
        "getme" => json!({
            "id": BOT_ID,
            "is_bot": true,
            "first_name": "Pista",
            "username": "pista_bot",
            "can_join_groups": false,
            "can_read_all_group_messages": false,
            "supports_inline_queries": false,
            "can_connect_to_business": false,
            "has_main_web_app": false,
        }),
        "getwebhookinfo" => {
            json!({"url": "", "has_custom_certificate": false, "pending_update_count": 0})
        }
        "deletewebhook" | "sendchataction" | "answercallbackquery" => json!(true),
        "editmessagereplymarkup" => {
            let chat = body["chat_id"].as_i64().unwrap_or_default();
            let id = body["message_id"].as_i64().unwrap_or_default();
            let text = match lock(&shared.messages).get(&id) {
                Some((c, text)) if *c == chat => text.clone(),
                _ => return Err((400, "Bad Request: message to edit not found".into())),
            };
            json!({
                "message_id": id,
                "date": 1_700_000_000,
                "chat": {"id": chat, "type": "private", "first_name": "Ada"},
                "from": {"id": BOT_ID, "is_bot": true, "first_name": "Pista"},
                "text": text,
            })
        }
        "getupdates" => {
            let drained: Vec<Value> = lock(&shared.updates).drain(..).collect();
            if drained.is_empty() {
                tokio::time::sleep(EMPTY_POLL).await;
            }
            Value::Array(drained)
        }
        "sendmessage" | "editmessagetext" => {
            let chat = body["chat_id"].as_i64().unwrap_or_default();
            let text = body["text"].as_str().unwrap_or_default().to_owned();
            let id = if method == "sendmessage" {
                let id = shared.next_message_id.fetch_add(1, Ordering::SeqCst);
                lock(&shared.messages).insert(id, (chat, text));
                id
            } else {
                let id = body["message_id"].as_i64().unwrap_or_default();
                let mut messages = lock(&shared.messages);
                match messages.get_mut(&id) {
                    Some((c, _)) if *c != chat => {
                        return Err((400, "Bad Request: message to edit not found".into()));
                    }
                    None => return Err((400, "Bad Request: message to edit not found".into())),
                    Some((_, old)) if *old == text => {
                        return Err((400, "Bad Request: message is not modified".into()));
                    }
                    Some((_, old)) => *old = text,
                }
                id
            };
            json!({
                "message_id": id,
                "date": 1_700_000_000,
                "chat": {"id": chat, "type": "private", "first_name": "Ada"},
                "from": {"id": BOT_ID, "is_bot": true, "first_name": "Pista"},
                "text": body["text"].clone(),
            })
        }
        _ => json!(true),
    })
}
