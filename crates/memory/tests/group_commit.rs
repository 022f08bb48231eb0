//! Group commit: concurrent writes share transactions, yet each write is
//! atomic on its own, a failing write does not take its neighbours down, and
//! a write whose caller stopped waiting is still stored.

use std::future::Future;
use std::time::Duration;

use openpista_memory::{AuditEntry, MemoryError, Store};
use openpista_proto::{ChatMessage, SessionId};

fn sid(raw: &str) -> SessionId {
    SessionId::parse(raw).unwrap()
}

async fn file_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_commit_independently() {
    let (_dir, store) = file_store().await;
    let good = sid("good");
    store.create_session(&good, "test", None).await.unwrap();

    // 200 writers at once: every third one names a session that does not
    // exist, so its write fails inside whatever batch it lands in.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = store.clone();
        let target = if i % 3 == 0 {
            sid("missing")
        } else {
            good.clone()
        };
        tasks.spawn(async move {
            let r = store
                .append_message(&target, &ChatMessage::user(format!("m{i}")), None)
                .await;
            (i, r)
        });
    }
    let mut ok = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.unwrap();
        if i % 3 == 0 {
            assert!(
                matches!(r, Err(MemoryError::SessionNotFound(_))),
                "write {i}: {r:?}"
            );
        } else {
            r.unwrap_or_else(|e| panic!("write {i} failed: {e}"));
            ok += 1;
        }
    }
    let stored = store.recent_messages(&good, 1000).await.unwrap();
    assert_eq!(
        stored.len(),
        ok,
        "exactly the acknowledged writes are stored"
    );
    // Every acknowledged text is there once.
    let mut texts: Vec<String> = stored.into_iter().map(|m| m.message.content).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), ok);
}

#[tokio::test]
async fn messages_and_their_audit_row_are_stored_together() {
    let (_dir, store) = file_store().await;
    let id = sid("s1");
    store.create_session(&id, "test", None).await.unwrap();
    let session = id.clone();
    let (ids, seq) = store
        .append_messages_audited(&id, &[(&ChatMessage::user("hello"), None)], move |ids| {
            AuditEntry {
                session_id: Some(session),
                actor: "test".into(),
                action: "turn_started".into(),
                detail: serde_json::json!({ "user_message_id": ids[0].0 }),
            }
        })
        .await
        .unwrap();
    assert_eq!(ids.len(), 1);
    let rows = store.audit(10, Some(&id)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].seq, seq);
    assert_eq!(rows[0].detail["user_message_id"], ids[0].0);
    assert!(store.verify_audit().await.unwrap().first_bad.is_none());

    // A missing session: neither the messages nor the audit row are stored.
    let before = store.audit(100, None).await.unwrap().len();
    let err = store
        .append_messages_audited(
            &sid("missing"),
            &[(&ChatMessage::user("lost"), None)],
            |_| AuditEntry {
                session_id: None,
                actor: "test".into(),
                action: "never".into(),
                detail: serde_json::json!({}),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, MemoryError::SessionNotFound(_)), "{err:?}");
    assert_eq!(store.audit(100, None).await.unwrap().len(), before);
}

#[tokio::test]
async fn a_write_whose_caller_stopped_waiting_is_still_stored() {
    let (_dir, store) = file_store().await;
    let id = sid("s1");
    store.create_session(&id, "test", None).await.unwrap();
    // Polled once (which queues the write), then dropped.
    let orphan = ChatMessage::user("orphan");
    {
        let mut write = std::pin::pin!(store.append_message(&id, &orphan, None));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
        assert!(
            first.is_pending(),
            "the write should not have finished on its first poll"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = store.recent_messages(&id, 10).await.unwrap();
        if stored.len() == 1 {
            assert_eq!(stored[0].message.content, "orphan");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_closed_store_refuses_writes_with_a_clear_error() {
    let (_dir, store) = file_store().await;
    store.close().await;
    let err = store
        .create_session(&sid("s1"), "test", None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("closed") || matches!(err, MemoryError::Database { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn title_is_set_once() {
    let (_dir, store) = file_store().await;
    let id = sid("s1");
    store.create_session(&id, "test", None).await.unwrap();
    assert!(store.set_title_if_unset(&id, "first").await.unwrap());
    assert!(!store.set_title_if_unset(&id, "second").await.unwrap());
    assert!(
        !store
            .set_title_if_unset(&sid("missing"), "x")
            .await
            .unwrap()
    );
    let rec = store.get_session(&id).await.unwrap().unwrap();
    assert_eq!(rec.title.as_deref(), Some("first"));
}

/// The writer runs its batches on a pool connection through its own handle;
/// whatever a batch did, no transaction stays open after it, so the store
/// neither holds the write lock between batches nor serves reads from a
/// stale snapshot. Both ways the writer gets its connection: kept for its
/// life (a pool of several), lent per batch (a pool of one, shared with
/// reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_leave_no_transaction_open() {
    for connections in [1, 4] {
        failed_writes_leave_no_transaction_open_with(connections).await;
    }
}

async fn failed_writes_leave_no_transaction_open_with(connections: u32) {
    use openpista_memory::StoreOptions;
    use sqlx::Connection;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = Store::open_with(
        &path,
        &StoreOptions::default().with_max_connections(connections),
    )
    .await
    .unwrap();
    let id = sid("s1");
    store.create_session(&id, "test", None).await.unwrap();

    // A write that fails alone in its batch, then a batch where some fail.
    let err = store.create_session(&id, "test", None).await.unwrap_err();
    assert!(matches!(err, MemoryError::SessionExists(_)), "{err:?}");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        let target = if i % 2 == 0 {
            sid("missing")
        } else {
            id.clone()
        };
        tasks.spawn(async move {
            store
                .append_message(&target, &ChatMessage::user(format!("m{i}")), None)
                .await
                .is_ok()
        });
    }
    let stored = tasks.join_all().await.into_iter().filter(|ok| *ok).count();
    assert_eq!(stored, 10);

    // Another process takes the write lock at once: the store holds none.
    let mut other = SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("the store left its write transaction open");
    sqlx::query(
        "INSERT INTO messages (session_id, role, content, created_at)
                 VALUES ('s1', 'user', 'from outside', 0)",
    )
    .execute(&mut other)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();

    // The store's one connection sees that commit (no stale snapshot) and
    // still writes.
    store
        .append_message(&id, &ChatMessage::user("after"), None)
        .await
        .unwrap();
    let all = store.recent_messages(&id, 100).await.unwrap();
    assert_eq!(all.len(), 12, "{all:?}");
    assert_eq!(all[10].message.content, "from outside");
    assert_eq!(all[11].message.content, "after");

    // Closing stops the writer and gives its connection back: close returns.
    store.close().await;
    let err = store
        .append_message(&id, &ChatMessage::user("too late"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
}

/// Caller code that runs inside a write (here the audit entry builder) and
/// panics loses that write only: nothing of it is stored, its caller gets an
/// error, and the store goes on writing.
#[tokio::test]
async fn a_write_that_panics_is_rolled_back_and_the_store_goes_on() {
    let (_dir, store) = file_store().await;
    let id = sid("s1");
    store.create_session(&id, "test", None).await.unwrap();
    let audit_before = store.audit(100, None).await.unwrap().len();

    let lost = ChatMessage::user("lost");
    let err = store
        .append_messages_audited(&id, &[(&lost, None)], |_| panic!("audit builder bug"))
        .await
        .unwrap_err();
    assert!(matches!(err, MemoryError::NotStored { .. }), "{err:?}");
    assert!(store.recent_messages(&id, 10).await.unwrap().is_empty());
    assert_eq!(store.audit(100, None).await.unwrap().len(), audit_before);

    store
        .append_message(&id, &ChatMessage::user("kept"), None)
        .await
        .unwrap();
    let stored = store.recent_messages(&id, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].message.content, "kept");
}

/// A write whose error makes SQLite roll back the whole transaction (here a
/// trigger's `RAISE(ROLLBACK)`, as a full disk or an I/O error can) takes
/// the writes batched with it along: none of them may be acknowledged.
/// Every write that returned Ok is in the database, every other one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_rolls_back_the_transaction_takes_no_acknowledged_write_with_it() {
    use sqlx::Connection;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

    let (dir, store) = file_store().await;
    let id = sid("s1");
    store.create_session(&id, "test", None).await.unwrap();
    let mut raw = SqliteConnection::connect_with(
        &SqliteConnectOptions::new().filename(dir.path().join("db.sqlite")),
    )
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER everything_goes BEFORE INSERT ON messages
         WHEN NEW.content LIKE 'rollback%'
         BEGIN SELECT RAISE(ROLLBACK, 'the whole transaction goes'); END",
    )
    .execute(&mut raw)
    .await
    .unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..120 {
        let store = store.clone();
        let id = id.clone();
        tasks.spawn(async move {
            let text = if i % 10 == 5 {
                format!("rollback {i}")
            } else {
                format!("m{i}")
            };
            let ok = store
                .append_message(&id, &ChatMessage::user(text.clone()), None)
                .await
                .is_ok();
            (text, ok)
        });
    }
    let results = tasks.join_all().await;
    let stored: std::collections::HashSet<String> = store
        .recent_messages(&id, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message.content)
        .collect();
    for (text, ok) in &results {
        assert_eq!(
            stored.contains(text),
            *ok,
            "{text}: acknowledged {ok}, stored {}",
            stored.contains(text)
        );
        if text.starts_with("rollback") {
            assert!(!ok, "{text} was acknowledged");
        }
    }
    // The store goes on writing afterwards.
    store
        .append_message(&id, &ChatMessage::user("after"), None)
        .await
        .unwrap();
}
