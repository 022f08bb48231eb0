//! The audit trail as an operator relies on it: rows chain, the chain
//! verifies, and editing, deleting (in the middle or at the end) or
//! reordering rows behind openpista's back is caught and named.

use std::path::Path;

use openpista_memory::{AuditEntry, GENESIS_HASH, Store};
use openpista_proto::SessionId;
use serde_json::json;
use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;

fn entry(session: Option<&SessionId>, action: &str, n: u64) -> AuditEntry {
    AuditEntry {
        session_id: session.cloned(),
        actor: "agent".to_owned(),
        action: action.to_owned(),
        detail: json!({ "n": n }),
    }
}

/// A store on disk with `n` rows, and the directory that holds it.
async fn store_with_rows(n: u64) -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("audit.db")).await.unwrap();
    let session = SessionId::generate();
    for i in 1..=n {
        let s = (i % 2 == 0).then_some(&session);
        store.append_audit(&entry(s, "tool_call", i)).await.unwrap();
    }
    (dir, store)
}

/// Runs raw SQL on the database file, as someone with write access would.
async fn tamper(db: &Path, sql: &str) {
    let url = format!("sqlite://{}", db.display());
    let mut conn = SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn appends_chain_and_verify() {
    let store = Store::open_in_memory().await.unwrap();
    let empty = store.verify_audit().await.unwrap();
    assert!(empty.is_intact(), "{empty:?}");
    assert_eq!((empty.rows, empty.head_hash.as_str()), (0, GENESIS_HASH));

    let session = SessionId::generate();
    let first = store
        .append_audit(&entry(Some(&session), "turn_started", 1))
        .await
        .unwrap();
    let second = store
        .append_audit(&entry(None, "tool_call", 2))
        .await
        .unwrap();
    assert_eq!((first, second), (1, 2));

    let rows = store.audit(10, None).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].prev_hash, GENESIS_HASH);
    assert_eq!(rows[1].prev_hash, rows[0].hash);
    assert_eq!(rows[0].session_id.as_ref(), Some(&session));
    assert_eq!(rows[1].detail, json!({ "n": 2 }));
    assert_ne!(rows[0].hash, rows[1].hash);

    let only = store.audit(10, Some(&session)).await.unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].action, "turn_started");
    let newest = store.audit(1, None).await.unwrap();
    assert_eq!(newest[0].seq, 2);

    let report = store.verify_audit().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.rows, 2);
    assert_eq!(report.head_seq, 2);
    assert_eq!(report.head_hash, rows[1].hash);
}

#[tokio::test]
async fn an_edited_row_is_named() {
    let (dir, store) = store_with_rows(5).await;
    assert!(store.verify_audit().await.unwrap().is_intact());
    tamper(
        &dir.path().join("audit.db"),
        r#"UPDATE audit_log SET detail = '{"n":99}' WHERE seq = 3"#,
    )
    .await;
    let report = store.verify_audit().await.unwrap();
    let (seq, reason) = report.first_bad.expect("the edit is detected");
    assert_eq!(seq, 3, "{reason}");
    assert!(reason.contains("hash mismatch"), "{reason}");
}

#[tokio::test]
async fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    let (dir, store) = store_with_rows(5).await;
    // The attacker copies row 4's hash into row 3: row 3 no longer hashes to
    // its stored value, and so on; either way the chain is broken at 3 or 4.
    tamper(
        &dir.path().join("audit.db"),
        "UPDATE audit_log SET hash = (SELECT hash FROM audit_log WHERE seq = 4) WHERE seq = 3",
    )
    .await;
    let (seq, _) = store.verify_audit().await.unwrap().first_bad.unwrap();
    assert_eq!(seq, 3);
}

#[tokio::test]
async fn a_deleted_middle_row_is_detected() {
    let (dir, store) = store_with_rows(5).await;
    tamper(
        &dir.path().join("audit.db"),
        "DELETE FROM audit_log WHERE seq = 2",
    )
    .await;
    let (seq, reason) = store.verify_audit().await.unwrap().first_bad.unwrap();
    assert_eq!(seq, 2, "{reason}");
    assert!(reason.contains("missing"), "{reason}");
}

#[tokio::test]
async fn a_deleted_first_row_is_detected() {
    let (dir, store) = store_with_rows(3).await;
    tamper(
        &dir.path().join("audit.db"),
        "DELETE FROM audit_log WHERE seq = 1",
    )
    .await;
    let (seq, _) = store.verify_audit().await.unwrap().first_bad.unwrap();
    assert_eq!(seq, 1);
}

#[tokio::test]
async fn a_deleted_last_row_is_detected_through_the_head() {
    let (dir, store) = store_with_rows(5).await;
    tamper(
        &dir.path().join("audit.db"),
        "DELETE FROM audit_log WHERE seq = 5",
    )
    .await;
    let (seq, reason) = store.verify_audit().await.unwrap().first_bad.unwrap();
    assert_eq!(seq, 5, "{reason}");
    assert!(reason.contains("head"), "{reason}");
}

#[tokio::test]
async fn a_deleted_head_is_detected_and_refuses_appends() {
    let (dir, store) = store_with_rows(2).await;
    tamper(&dir.path().join("audit.db"), "DELETE FROM audit_head").await;
    let (_, reason) = store.verify_audit().await.unwrap().first_bad.unwrap();
    assert!(reason.contains("audit_head"), "{reason}");
    let err = store
        .append_audit(&entry(None, "tool_call", 3))
        .await
        .unwrap_err();
    assert!(
        matches!(err, openpista_memory::MemoryError::AuditHeadMissing),
        "{err:?}"
    );
}

#[tokio::test]
async fn reordered_rows_are_detected() {
    let (dir, store) = store_with_rows(4).await;
    // Swap the content (hashes included) of rows 2 and 3.
    tamper(
        &dir.path().join("audit.db"),
        "UPDATE audit_log SET seq = -2 WHERE seq = 2;
         UPDATE audit_log SET seq = 2 WHERE seq = 3;
         UPDATE audit_log SET seq = 3 WHERE seq = -2;",
    )
    .await;
    let (seq, reason) = store.verify_audit().await.unwrap().first_bad.unwrap();
    assert_eq!(seq, 2, "{reason}");
}

#[tokio::test]
async fn concurrent_appends_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("audit.db")).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                store
                    .append_audit(&entry(None, "tool_call", t * 100 + i))
                    .await
                    .unwrap();
            }
        }));
    }
    // A second store (another process's pool) writes at the same time.
    let other = Store::open(&dir.path().join("audit.db")).await.unwrap();
    for i in 0..10u64 {
        other
            .append_audit(&entry(None, "turn_started", 1000 + i))
            .await
            .unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = store.verify_audit().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.rows, 90);
    assert_eq!(report.head_seq, 90);
    let seqs: Vec<i64> = store
        .audit(usize::MAX, None)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (1..=90).collect::<Vec<_>>());
}
