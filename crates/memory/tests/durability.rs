//! What survives processes: another process reads what one wrote, a crash in
//! the middle of a turn loses only the unfinished turn, and a file that is
//! not ours or is held by another writer is reported clearly.
//!
//! The cross-process tests re-run this test binary as a child: the parent
//! runs the `child_process` test alone (`--exact --ignored`) with the mode and
//! database path set on the child's `Command` only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use openpista_memory::{MemoryError, Store, StoreOptions, ToolInvocation};
use openpista_proto::{ChatMessage, SessionId, ToolCall, ToolOutcome, Usage};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

const MODE_ENV: &str = "OPENPISTA_MEMORY_TEST_CHILD_MODE";
const DB_ENV: &str = "OPENPISTA_MEMORY_TEST_CHILD_DB";

fn sid(raw: &str) -> SessionId {
    SessionId::parse(raw).unwrap()
}

fn run_child(mode: &str, db: &Path) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MODE_ENV, mode)
        .env(DB_ENV, db)
        .output()
        .unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The conversation the writer child stores.
fn written_turn() -> Vec<ChatMessage> {
    let call = ToolCall {
        id: "call_1".into(),
        name: "shell".into(),
        arguments: r#"{"command":"date"}"#.into(),
    };
    vec![
        ChatMessage::system("you are openpista"),
        ChatMessage::user("what day is it? ünïcode ✓"),
        ChatMessage::assistant("checking", vec![call]),
        ChatMessage::tool_result("call_1", "shell", "Tue"),
        ChatMessage::assistant("It is Tuesday.", vec![]),
    ]
}

const WRITER_USAGE: Usage = Usage {
    prompt_tokens: 321,
    completion_tokens: 12,
};

/// Entry point of the child processes; does nothing unless started by a
/// parent test below.
#[tokio::test]
#[ignore = "child process of the cross-process tests; run by them, not directly"]
async fn child_process() {
    let (Ok(mode), Ok(db)) = (std::env::var(MODE_ENV), std::env::var(DB_ENV)) else {
        return;
    };
    let db = PathBuf::from(db);
    match mode.as_str() {
        "writer" => write_a_session(&db).await,
        "crash-mid-turn" => crash_mid_turn(&db).await,
        other => panic!("unknown child mode {other:?}"),
    }
}

async fn write_a_session(db: &Path) {
    let store = Store::open(db).await.unwrap();
    let id = sid("from-child");
    store
        .create_session(&id, "telegram", Some("written by the child"))
        .await
        .unwrap();
    let turn = written_turn();
    store.append_messages(&id, &turn[..2]).await.unwrap();
    let batch: Vec<_> = turn[2..4].iter().map(|m| (m, None)).collect();
    let ids = store.append_messages_with_usage(&id, &batch).await.unwrap();
    store
        .append_message(&id, &turn[4], Some(WRITER_USAGE))
        .await
        .unwrap();
    store
        .record_tool_invocation(&ToolInvocation {
            session_id: id.clone(),
            message_id: Some(ids[0]),
            call_id: "call_1".into(),
            tool_name: "shell".into(),
            args: r#"{"command":"date"}"#.into(),
            result: "Tue".into(),
            exit_code: Some(0),
            duration_ms: 3,
            outcome: ToolOutcome::Ok,
            created_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    store.close().await;
    println!("child wrote session {id}");
}

async fn crash_mid_turn(db: &Path) {
    let store = Store::open(db).await.unwrap();
    let id = sid("crashy");
    store.ensure_session(&id, "cli").await.unwrap();
    store
        .append_message(&id, &ChatMessage::user("please do the thing"), None)
        .await
        .unwrap();
    println!("user message acknowledged");

    // The assistant's half of the turn: a write transaction big enough that
    // SQLite spills uncommitted pages into the WAL, then the process dies
    // before COMMIT.
    let wal = wal_path(db);
    let wal_before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(db))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE sessions SET updated_at = updated_at + 1 WHERE id = ?")
        .bind(id.as_str())
        .execute(&mut conn)
        .await
        .unwrap();
    let big = "x".repeat(1 << 20);
    for i in 0..8 {
        sqlx::query(
            "INSERT INTO messages (session_id, role, content, tool_calls, created_at)
             VALUES (?, 'assistant', ?, '[]', 0)",
        )
        .bind(id.as_str())
        .bind(format!("partial {i} {big}"))
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO messages (session_id, role, content, tool_call_id, tool_name, created_at)
             VALUES (?, 'tool', 'partial result', 'c', 'shell', 0)",
        )
        .bind(id.as_str())
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let wal_after = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    println!("WAL_GREW={}", wal_after > wal_before + (1 << 20));
    std::process::abort();
}

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

#[tokio::test]
async fn a_session_written_by_one_process_is_read_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("memory.db");
    let out = run_child("writer", &db);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("child wrote session from-child"),
        "the child did not run the writer: {}",
        describe(&out)
    );

    let store = Store::open(&db).await.unwrap();
    let id = sid("from-child");
    let session = store.get_session(&id).await.unwrap().unwrap();
    assert_eq!(session.channel, "telegram");
    assert_eq!(session.title.as_deref(), Some("written by the child"));
    let stored = store.recent_messages(&id, 50).await.unwrap();
    let messages: Vec<_> = stored.iter().map(|m| m.message.clone()).collect();
    assert_eq!(messages, written_turn());
    assert_eq!(stored[4].usage, Some(WRITER_USAGE));
    let tools = store.tool_invocations(&id, 10).await.unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0].message_id, Some(stored[2].id));
    assert_eq!(tools[0].outcome, ToolOutcome::Ok);
    let listed = store.list_sessions(10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].message_count, 5);
}

#[tokio::test]
async fn a_crash_mid_turn_keeps_the_user_message_and_no_partial_reply() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("memory.db");
    let out = run_child("crash-mid-turn", &db);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the child should have aborted: {}",
        describe(&out)
    );
    assert!(
        stdout.contains("user message acknowledged"),
        "{}",
        describe(&out)
    );
    // The crash really happened with uncommitted data on disk.
    assert!(stdout.contains("WAL_GREW=true"), "{}", describe(&out));

    let store = Store::open(&db).await.unwrap();
    assert_eq!(store.integrity_check().await.unwrap(), Vec::<String>::new());
    let id = sid("crashy");
    let stored = store.recent_messages(&id, 50).await.unwrap();
    let messages: Vec<_> = stored.iter().map(|m| m.message.clone()).collect();
    assert_eq!(messages, vec![ChatMessage::user("please do the thing")]);
    assert_eq!(store.message_count(&id).await.unwrap(), 1);

    // The dead process holds no lock: the turn can be retried.
    store
        .append_message(&id, &ChatMessage::assistant("done", vec![]), None)
        .await
        .unwrap();
    assert_eq!(store.message_count(&id).await.unwrap(), 2);
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    let bytes: Vec<u8> = b"# my notes\nthis is not a database, just text that is long enough \
        to fill the 100-byte SQLite header and then some more text.\n"
        .repeat(50);
    std::fs::write(&path, &bytes).unwrap();

    let err = Store::open(&path).await.unwrap_err();
    match &err {
        MemoryError::NotADatabase { path: named } => assert_eq!(named, &path),
        other => panic!("expected NotADatabase, got {other:?}"),
    }
    assert!(err.to_string().contains("notes.db"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "file must be untouched"
    );
    assert!(!wal_path(&path).exists());
}

async fn raw(path: &Path) -> SqliteConnection {
    SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn opening_a_database_held_by_another_writer_reports_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.db");
    // Another program's rollback-journal database, held in an EXCLUSIVE transaction.
    let mut other = raw(&path).await;
    sqlx::query("CREATE TABLE notes (x)")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("INSERT INTO notes VALUES (1)")
        .execute(&mut other)
        .await
        .unwrap();

    let options = StoreOptions::default().with_busy_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let err = Store::open_with(&path, &options).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(&err, MemoryError::Locked { path: named, .. } if named == &path),
        "expected Locked, got {err:?}"
    );
    assert!(err.to_string().contains("locked"), "{err}");
    assert!(
        waited >= Duration::from_millis(100),
        "gave up after {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");

    // Once the other writer is done, opening works.
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    other.close().await.unwrap();
    Store::open_with(&path, &options).await.unwrap();
}

#[tokio::test]
async fn writing_while_another_writer_holds_the_lock_reports_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.db");
    let options = StoreOptions::default().with_busy_timeout(Duration::from_millis(50));
    let store = Store::open_with(&path, &options).await.unwrap();
    let id = sid("busy");
    store.ensure_session(&id, "cli").await.unwrap();
    store
        .append_message(&id, &ChatMessage::user("before"), None)
        .await
        .unwrap();

    let mut other = raw(&path).await;
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();

    let err = store
        .append_message(&id, &ChatMessage::user("during"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MemoryError::Locked { .. }),
        "expected Locked, got {err:?}"
    );
    assert!(matches!(
        store.create_session(&sid("new"), "cli", None).await,
        Err(MemoryError::Locked { .. })
    ));
    // WAL readers are not blocked by the writer.
    assert_eq!(store.message_count(&id).await.unwrap(), 1);

    // Retrying after the other writer finishes succeeds.
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    store
        .append_message(&id, &ChatMessage::user("after"), None)
        .await
        .unwrap();
    let texts: Vec<_> = store
        .recent_messages(&id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message.content)
        .collect();
    assert_eq!(texts, ["before", "after"]);
}
