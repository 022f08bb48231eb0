//! A session's history as the agent writes and reads it back.

use std::path::Path;

use openpista_memory::{MemoryError, Store, ToolInvocation};
use openpista_proto::{ChatMessage, MessageId, SessionId, ToolCall, ToolOutcome, Usage};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

fn sid(raw: &str) -> SessionId {
    SessionId::parse(raw).unwrap()
}

fn shell_call(id: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: "shell".into(),
        arguments: r#"{"command":"ls -la"}"#.into(),
    }
}

async fn file_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("nested/dir/memory.db"))
        .await
        .unwrap();
    (dir, store)
}

/// A second, raw connection to the same file, for tampering.
async fn raw(path: &Path) -> SqliteConnection {
    SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_tool_message_keeps_its_image_paths() {
    let (dir, store) = file_store().await;
    let id = sid("cli:images");
    store.create_session(&id, "cli", None).await.unwrap();
    let mut capture = ChatMessage::tool_result("c1", "screen.capture", "saved a 640x480 PNG");
    capture.images = vec!["/ws/shot one.png".into(), "/ws/shot-2.png".into()];
    let plain = ChatMessage::tool_result("c2", "shell", "ok");
    store
        .append_messages_with_usage(&id, &[(&capture, None), (&plain, None)])
        .await
        .unwrap();

    let stored = store.recent_messages(&id, 10).await.unwrap();
    assert_eq!(stored[0].message, capture);
    assert_eq!(stored[1].message.images, Vec::<String>::new());

    // A message without images stores NULL; a corrupt column is an error.
    let mut conn = raw(&dir.path().join("nested/dir/memory.db")).await;
    let nulls: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE images IS NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(nulls, 1);
    sqlx::query("UPDATE messages SET images = 'not json' WHERE tool_call_id = 'c1'")
        .execute(&mut conn)
        .await
        .unwrap();
    let err = store.recent_messages(&id, 10).await.unwrap_err();
    assert!(err.to_string().contains("images"), "{err}");
}

#[tokio::test]
async fn a_turn_round_trips_with_tool_calls_and_usage() {
    let (_dir, store) = file_store().await;
    assert!(store.path().ends_with("nested/dir/memory.db"));
    let id = sid("cli:main");
    store
        .create_session(&id, "cli", Some("first"))
        .await
        .unwrap();

    let user = ChatMessage::user("what is here?");
    let assistant = ChatMessage::assistant("let me look", vec![shell_call("call_1")]);
    let result = ChatMessage::tool_result("call_1", "shell", "a.txt\nb.txt");
    let usage = Usage {
        prompt_tokens: 120,
        completion_tokens: 7,
    };

    let user_id = store.append_message(&id, &user, None).await.unwrap();
    let turn_ids = store
        .append_messages_with_usage(&id, &[(&assistant, Some(usage)), (&result, None)])
        .await
        .unwrap();
    assert_eq!(turn_ids.len(), 2);
    assert!(user_id < turn_ids[0] && turn_ids[0] < turn_ids[1]);

    let stored = store.recent_messages(&id, 10).await.unwrap();
    let messages: Vec<_> = stored.iter().map(|m| m.message.clone()).collect();
    assert_eq!(messages, vec![user, assistant, result]);
    let ids: Vec<_> = stored.iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![user_id, turn_ids[0], turn_ids[1]]);
    assert_eq!(stored[0].usage, None);
    assert_eq!(stored[1].usage, Some(usage));
    assert_eq!(store.message_count(&id).await.unwrap(), 3);

    let session = store.get_session(&id).await.unwrap().unwrap();
    assert_eq!(session.channel, "cli");
    assert_eq!(session.title.as_deref(), Some("first"));
    assert!(session.updated_at >= session.created_at);
    assert!(stored[2].created_at <= session.updated_at);
}

#[tokio::test]
async fn recent_messages_are_the_newest_n_oldest_first() {
    let store = Store::open_in_memory().await.unwrap();
    let id = sid("s1");
    store.ensure_session(&id, "cli").await.unwrap();
    for i in 0..10 {
        store
            .append_message(&id, &ChatMessage::user(format!("m{i}")), None)
            .await
            .unwrap();
    }
    let texts = |msgs: Vec<openpista_memory::StoredMessage>| {
        msgs.into_iter()
            .map(|m| m.message.content)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        texts(store.recent_messages(&id, 3).await.unwrap()),
        ["m7", "m8", "m9"]
    );
    assert_eq!(store.recent_messages(&id, 100).await.unwrap().len(), 10);
    assert_eq!(
        store.recent_messages(&id, usize::MAX).await.unwrap().len(),
        10
    );
    assert!(store.recent_messages(&id, 0).await.unwrap().is_empty());
    assert!(
        store
            .recent_messages(&sid("nobody"), 5)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.message_count(&sid("nobody")).await.unwrap(), 0);
}

#[tokio::test]
async fn sessions_list_newest_first_with_counts() {
    let store = Store::open_in_memory().await.unwrap();
    let (a, b, c) = (sid("a"), sid("b"), sid("c"));
    assert!(store.ensure_session(&a, "cli").await.unwrap());
    assert!(store.ensure_session(&b, "telegram").await.unwrap());
    assert!(!store.ensure_session(&a, "other").await.unwrap());
    store.create_session(&c, "cli", None).await.unwrap();
    // Activity on `a` moves it to the top.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store
        .append_message(&a, &ChatMessage::user("hi"), None)
        .await
        .unwrap();
    store
        .append_message(&a, &ChatMessage::assistant("hello", vec![]), None)
        .await
        .unwrap();

    let list = store.list_sessions(10).await.unwrap();
    let order: Vec<_> = list.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(order, ["a", "c", "b"]);
    assert_eq!(list[0].message_count, 2);
    assert_eq!(list[0].channel, "cli", "ensure_session keeps the channel");
    assert_eq!(list[2].message_count, 0);
    assert_eq!(store.list_sessions(1).await.unwrap().len(), 1);

    store.set_title(&b, Some("groceries")).await.unwrap();
    let b_record = store.get_session(&b).await.unwrap().unwrap();
    assert_eq!(b_record.title.as_deref(), Some("groceries"));
    store.set_title(&b, None).await.unwrap();
    assert_eq!(store.get_session(&b).await.unwrap().unwrap().title, None);
    assert!(matches!(
        store.set_title(&sid("zzz"), Some("x")).await,
        Err(MemoryError::SessionNotFound(id)) if id.as_str() == "zzz"
    ));
    assert!(store.get_session(&sid("zzz")).await.unwrap().is_none());
}

#[tokio::test]
async fn duplicate_and_missing_sessions_are_reported() {
    let store = Store::open_in_memory().await.unwrap();
    let id = sid("dup");
    store.create_session(&id, "cli", None).await.unwrap();
    assert!(matches!(
        store.create_session(&id, "cli", None).await,
        Err(MemoryError::SessionExists(got)) if got == id
    ));
    let ghost = sid("ghost");
    assert!(matches!(
        store.append_message(&ghost, &ChatMessage::user("x"), None).await,
        Err(MemoryError::SessionNotFound(got)) if got == ghost
    ));
    assert!(store.get_session(&ghost).await.unwrap().is_none());
    let too_big = Usage {
        prompt_tokens: u64::MAX,
        completion_tokens: 0,
    };
    assert!(matches!(
        store
            .append_message(&id, &ChatMessage::user("x"), Some(too_big))
            .await,
        Err(MemoryError::OutOfRange {
            field: "prompt_tokens",
            ..
        })
    ));
    assert_eq!(store.message_count(&id).await.unwrap(), 0);
    assert!(store.append_messages(&id, &[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn deleting_a_session_deletes_its_history() {
    let store = Store::open_in_memory().await.unwrap();
    let (gone, kept) = (sid("gone"), sid("kept"));
    for id in [&gone, &kept] {
        store.ensure_session(id, "cli").await.unwrap();
        let msg_id = store
            .append_message(id, &ChatMessage::assistant("", vec![shell_call("c")]), None)
            .await
            .unwrap();
        store
            .record_tool_invocation(&invocation(id, Some(msg_id), "c"))
            .await
            .unwrap();
    }
    assert!(store.delete_session(&gone).await.unwrap());
    assert!(!store.delete_session(&gone).await.unwrap());
    assert!(store.get_session(&gone).await.unwrap().is_none());
    assert_eq!(store.message_count(&gone).await.unwrap(), 0);
    assert!(store.tool_invocations(&gone, 10).await.unwrap().is_empty());
    assert_eq!(store.message_count(&kept).await.unwrap(), 1);
    assert_eq!(store.tool_invocations(&kept, 10).await.unwrap().len(), 1);
    assert_eq!(store.integrity_check().await.unwrap(), Vec::<String>::new());
}

fn invocation(session: &SessionId, message_id: Option<MessageId>, call: &str) -> ToolInvocation {
    ToolInvocation {
        session_id: session.clone(),
        message_id,
        call_id: call.into(),
        tool_name: "shell".into(),
        args: r#"{"command":"false"}"#.into(),
        result: "exit status 1".into(),
        exit_code: Some(1),
        duration_ms: 42,
        outcome: ToolOutcome::Error,
        // Stored at millisecond precision.
        created_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
    }
}

#[tokio::test]
async fn tool_invocations_round_trip_newest_n_oldest_first() {
    let store = Store::open_in_memory().await.unwrap();
    let id = sid("tools");
    store.ensure_session(&id, "cli").await.unwrap();
    let msg_id = store
        .append_message(
            &id,
            &ChatMessage::assistant("", vec![shell_call("c0")]),
            None,
        )
        .await
        .unwrap();
    let mut expected = Vec::new();
    for (i, outcome) in [ToolOutcome::Ok, ToolOutcome::Denied, ToolOutcome::Timeout]
        .into_iter()
        .enumerate()
    {
        let mut inv = invocation(&id, Some(msg_id), &format!("c{i}"));
        inv.outcome = outcome;
        inv.exit_code = (i != 1).then_some(i as i32);
        let row = store.record_tool_invocation(&inv).await.unwrap();
        assert!(row > 0);
        expected.push(inv);
    }
    let mut no_message = invocation(&id, None, "c3");
    no_message.outcome = ToolOutcome::Cancelled;
    store.record_tool_invocation(&no_message).await.unwrap();
    expected.push(no_message);

    assert_eq!(store.tool_invocations(&id, 10).await.unwrap(), expected);
    assert_eq!(store.tool_invocations(&id, 2).await.unwrap(), expected[2..]);

    let ghost = sid("ghost");
    assert!(matches!(
        store
            .record_tool_invocation(&invocation(&ghost, None, "x"))
            .await,
        Err(MemoryError::SessionNotFound(_))
    ));
    let other = sid("other");
    store.ensure_session(&other, "cli").await.unwrap();
    assert!(matches!(
        store.record_tool_invocation(&invocation(&other, Some(msg_id), "x")).await,
        Err(MemoryError::MessageNotFound { message_id, .. }) if message_id == msg_id
    ));
}

#[tokio::test]
async fn a_batch_that_fails_halfway_stores_nothing() {
    let (dir, store) = file_store().await;
    let path = dir.path().join("nested/dir/memory.db");
    let id = sid("atomic");
    store.ensure_session(&id, "cli").await.unwrap();
    store
        .append_message(&id, &ChatMessage::user("run it"), None)
        .await
        .unwrap();
    let before = store.get_session(&id).await.unwrap().unwrap();

    // Make the second insert of the batch fail inside the transaction.
    let mut conn = raw(&path).await;
    sqlx::query(
        "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.content = 'boom'
         BEGIN SELECT RAISE(ABORT, 'boom'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let assistant = ChatMessage::assistant("", vec![shell_call("c1")]);
    let result = ChatMessage::tool_result("c1", "shell", "boom");
    let err = store
        .append_messages(&id, &[assistant, result])
        .await
        .unwrap_err();
    assert!(matches!(err, MemoryError::Write { .. }), "{err:?}");

    let stored = store.recent_messages(&id, 10).await.unwrap();
    assert_eq!(stored.len(), 1, "no partial turn: {stored:?}");
    assert_eq!(stored[0].message, ChatMessage::user("run it"));
    let after = store.get_session(&id).await.unwrap().unwrap();
    assert_eq!(after.updated_at, before.updated_at, "bump rolled back too");
}

#[tokio::test]
async fn malformed_stored_rows_are_errors_not_panics() {
    let (dir, store) = file_store().await;
    let path = dir.path().join("nested/dir/memory.db");
    let id = sid("tampered");
    store.ensure_session(&id, "cli").await.unwrap();
    let msg_id = store
        .append_message(
            &id,
            &ChatMessage::assistant("", vec![shell_call("c1")]),
            None,
        )
        .await
        .unwrap();
    let mut conn = raw(&path).await;

    // Invalid JSON is refused by the schema.
    let refused = sqlx::query("UPDATE messages SET tool_calls = '[{' WHERE id = ?")
        .bind(msg_id.0)
        .execute(&mut conn)
        .await;
    assert!(refused.is_err());

    // Valid JSON of the wrong shape gets in, and reading reports it.
    sqlx::query(r#"UPDATE messages SET tool_calls = '[{"id": 7}]' WHERE id = ?"#)
        .bind(msg_id.0)
        .execute(&mut conn)
        .await
        .unwrap();
    let err = store.recent_messages(&id, 10).await.unwrap_err();
    match &err {
        MemoryError::CorruptRow { table, key, reason } => {
            assert_eq!(*table, "messages");
            assert_eq!(*key, msg_id.0.to_string());
            assert!(reason.contains("tool_calls"), "{reason}");
        }
        other => panic!("expected CorruptRow, got {other:?}"),
    }
    // Writing to the session still works; only reading that row fails.
    store
        .append_message(&id, &ChatMessage::user("still here"), None)
        .await
        .unwrap();

    // A text where a number belongs (SQLite's loose typing) is also a corrupt row.
    sqlx::query("UPDATE messages SET tool_calls = NULL, created_at = 'yesterday' WHERE id = ?")
        .bind(msg_id.0)
        .execute(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        store.recent_messages(&id, 10).await,
        Err(MemoryError::CorruptRow {
            table: "messages",
            ..
        })
    ));

    // An invalid session id in the sessions table.
    sqlx::query(
        "INSERT INTO sessions (id, channel, created_at, updated_at) VALUES ('a b', 'cli', 0, 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert!(matches!(
        store.list_sessions(10).await,
        Err(MemoryError::CorruptRow {
            table: "sessions",
            ..
        })
    ));
}

#[tokio::test]
async fn messages_read_back_exactly_as_appended() {
    // The agent keeps what it appended in memory instead of reading it back,
    // so the stored form must give back the very same messages.
    let (_dir, store) = file_store().await;
    let id = sid("cli:exact");
    store.create_session(&id, "cli", None).await.unwrap();
    let mut capture = ChatMessage::tool_result("c2", "screen.capture", "");
    capture.images = vec!["/ws/ä b.png".into()];
    let messages = vec![
        ChatMessage::user("grüße, 你好 \u{1F980}\nline two\ttab \"quoted\" \\ back"),
        ChatMessage::user("nul \0 inside"),
        ChatMessage::user(""),
        ChatMessage::assistant("", vec![shell_call("c1"), shell_call("c2")]),
        ChatMessage::tool_result("c1", "shell", "  leading and trailing  \n"),
        capture,
        ChatMessage::assistant("done", Vec::new()),
    ];
    store.append_messages(&id, &messages).await.unwrap();
    let back: Vec<ChatMessage> = store
        .recent_messages(&id, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message)
        .collect();
    assert_eq!(back, messages);
}

#[tokio::test]
async fn history_versions_follow_appends_and_notice_other_writers() {
    let (_dir, store) = file_store().await;
    let id = sid("cli:versions");
    assert!(store.history(&id, 10).await.unwrap().is_none());
    store.create_session(&id, "cli", None).await.unwrap();
    let (v0, empty) = store.history(&id, 10).await.unwrap().unwrap();
    assert!(empty.is_empty());

    // Our own appends advance the version by exactly their message count.
    let user = ChatMessage::user("one");
    let done = store
        .append_turn(&id, &[(&user, None)], None)
        .await
        .unwrap();
    assert_eq!(done.version, v0.advanced_by(1));
    let pair = [
        ChatMessage::assistant("", vec![shell_call("c1")]),
        ChatMessage::tool_result("c1", "shell", "ok"),
    ];
    let two = store
        .append_turn(&id, &[(&pair[0], None), (&pair[1], None)], None)
        .await
        .unwrap();
    assert_eq!(two.version, done.version.advanced_by(2));
    let (read, messages) = store.history(&id, 10).await.unwrap().unwrap();
    assert_eq!(read, two.version);
    assert_eq!(messages.len(), 3);

    // Somebody else's append in between shows as a version we did not expect.
    store
        .append_message(&id, &ChatMessage::user("from elsewhere"), None)
        .await
        .unwrap();
    let ours = store
        .append_turn(&id, &[(&ChatMessage::user("mine"), None)], None)
        .await
        .unwrap();
    assert_ne!(ours.version, two.version.advanced_by(1));
    assert_eq!(ours.version, two.version.advanced_by(2));

    // A session deleted and created again under the same id, with as many
    // messages as before, is not the same history.
    assert!(store.delete_session(&id).await.unwrap());
    store.create_session(&id, "cli", None).await.unwrap();
    let mut again = None;
    for i in 0..5 {
        let m = ChatMessage::user(format!("new {i}"));
        again = Some(store.append_turn(&id, &[(&m, None)], None).await.unwrap());
    }
    assert_ne!(again.unwrap().version, ours.version);

    // A failed append (unknown session) changes nothing.
    let missing = sid("cli:missing");
    let err = store
        .append_turn(&missing, &[(&user, None)], None)
        .await
        .unwrap_err();
    assert!(matches!(err, MemoryError::SessionNotFound(_)), "{err:?}");
}

#[tokio::test]
async fn a_database_from_before_history_versions_gets_them_on_open() {
    // A session written under migration 6 (no `history_version`) must still
    // be readable and appendable after the upgrade.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let id = sid("cli:old");
    {
        let store = Store::open(&path).await.unwrap();
        store.create_session(&id, "cli", None).await.unwrap();
        store
            .append_message(&id, &ChatMessage::user("before"), None)
            .await
            .unwrap();
        store.close().await;
    }
    {
        // Roll the schema back to version 6 by hand.
        let mut conn = raw(&path).await;
        sqlx::query("ALTER TABLE sessions DROP COLUMN history_version")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 7")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let store = Store::open(&path).await.unwrap();
    let (v, messages) = store.history(&id, 10).await.unwrap().unwrap();
    assert_eq!(messages.len(), 1);
    let done = store
        .append_turn(&id, &[(&ChatMessage::user("after"), None)], None)
        .await
        .unwrap();
    assert_eq!(done.version, v.advanced_by(1));
}
