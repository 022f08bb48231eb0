//! The tamper-evident audit trail: an append-only hash chain of what the
//! agent did.
//!
//! Each row's `hash` is the SHA-256 of a length-prefixed encoding of
//! `(seq, at, session_id, actor, action, detail, prev_hash)`, and its
//! `prev_hash` is the hash of the row before it ([`GENESIS_HASH`] for the
//! first). The single-row table `audit_head` holds the newest `(seq, hash)`
//! and is updated in the same `BEGIN IMMEDIATE` transaction as the insert, so
//! concurrent writers cannot fork the chain.
//!
//! [`Store::verify_audit`] recomputes the chain and detects a row whose
//! content was edited (hash mismatch), a deleted row anywhere (a gap in `seq`,
//! a `prev_hash` that does not match, or, for the newest rows, a head that
//! points past the last row), and reordered rows (`seq` is part of the hash).
//!
//! What it cannot detect: someone with write access to the database who
//! rewrites the whole chain from the edit onwards *and* the head, with correct
//! hashes, produces a chain that verifies. Only an external anchor catches
//! that: record the head hash (printed by `openpista audit --verify`)
//! somewhere the database's writer cannot change, and compare later.
//!
//! Callers should keep secrets out of `detail`: the agent stores a SHA-256 of
//! tool arguments rather than the arguments themselves.

use chrono::{DateTime, Utc};
use openpista_proto::SessionId;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::error::{ErrorContext, MemoryError, corrupt};
use crate::store::{Store, col, from_millis, now_millis, sql_limit};

/// The `prev_hash` of the first row: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separator, so that these hashes are never mistaken for others.
const DOMAIN: &[u8] = b"openpista-audit-v1\0";

/// How many rows [`Store::verify_audit`] reads per query.
const VERIFY_PAGE: i64 = 1000;

/// A row to append to the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// The session the action belongs to, if any.
    pub session_id: Option<SessionId>,
    /// Who acted: `agent`, `cli`, ...
    pub actor: String,
    /// What happened: `turn_started`, `tool_call`, ...
    pub action: String,
    /// Details as JSON. Must not contain secrets.
    pub detail: serde_json::Value,
}

/// A stored audit row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub session_id: Option<SessionId>,
    pub actor: String,
    pub action: String,
    /// The stored JSON; a string holding the raw text if it is not JSON.
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// The result of [`Store::verify_audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// Rows checked.
    pub rows: u64,
    /// The `seq` recorded in `audit_head` (0 for an empty trail).
    pub head_seq: i64,
    /// The hash recorded in `audit_head` ([`GENESIS_HASH`] for an empty
    /// trail). Record it outside the database to detect a rewritten chain.
    pub head_hash: String,
    /// The first row (by `seq`) where the chain breaks, and why.
    pub first_bad: Option<(i64, String)>,
}

impl AuditReport {
    /// Whether the chain verified.
    pub fn is_intact(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The chain hash of one row. Integers are fixed-width big-endian, strings
/// are prefixed by their byte length, and the optional session by a tag byte,
/// so no two different rows encode to the same bytes.
fn chain_hash(
    seq: i64,
    at: i64,
    session_id: Option<&str>,
    actor: &str,
    action: &str,
    detail: &str,
    prev_hash: &str,
) -> String {
    fn field(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(at.to_be_bytes());
    match session_id {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            field(&mut h, s);
        }
    }
    field(&mut h, actor);
    field(&mut h, action);
    field(&mut h, detail);
    field(&mut h, prev_hash);
    hex(&h.finalize())
}

/// An [`AuditEntry`] encoded for storage, owned so that it can be handed to
/// the store's writer and appended in the same transaction as other writes.
pub(crate) struct EncodedAudit {
    session: Option<String>,
    actor: String,
    action: String,
    detail: String,
}

impl EncodedAudit {
    pub(crate) fn new(entry: &AuditEntry) -> Result<Self, MemoryError> {
        let detail =
            serde_json::to_string(&entry.detail).map_err(|source| MemoryError::Encode {
                what: "audit detail",
                source,
            })?;
        Ok(Self {
            session: entry.session_id.as_ref().map(|s| s.as_str().to_owned()),
            actor: entry.actor.clone(),
            action: entry.action.clone(),
            detail,
        })
    }

    /// Chains this entry onto `audit_head` inside the caller's write
    /// transaction (which holds the write lock, so concurrent writers, other
    /// tasks or processes, chain one after another). Returns its `seq`.
    /// [`MemoryError::AuditHeadMissing`] if `audit_head` was deleted.
    pub(crate) fn append(
        &self,
        conn: &rusqlite::Connection,
        ctx: &ErrorContext,
    ) -> Result<i64, MemoryError> {
        use rusqlite::OptionalExtension;
        let head: Option<(i64, String)> = conn
            .prepare_cached(AUDIT_HEAD)
            .and_then(|mut head| {
                head.query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(|e| ctx.sqlite_row(e, "audit_head", &1))?;
        let (head_seq, prev_hash) = head.ok_or(MemoryError::AuditHeadMissing)?;
        let seq = head_seq
            .checked_add(1)
            .ok_or_else(|| corrupt("audit_head", 1, "seq is at its maximum"))?;
        // Taken inside the lock, so `at` never goes backwards along the chain
        // (unless the clock does).
        let at = now_millis();
        let hash = chain_hash(
            seq,
            at,
            self.session.as_deref(),
            &self.actor,
            &self.action,
            &self.detail,
            &prev_hash,
        );
        conn.prepare_cached(
            "INSERT INTO audit_log (seq, at, session_id, actor, action, detail, prev_hash, hash)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .and_then(|mut insert| {
            insert.execute(rusqlite::params![
                seq,
                at,
                self.session,
                self.actor,
                self.action,
                self.detail,
                prev_hash,
                hash,
            ])
        })
        .map_err(|e| ctx.sqlite(e))?;
        // The trigger `audit_head_follows` (migration 8) moved the head.
        Ok(seq)
    }
}

/// Reads the head of the chain: one row `(seq, hash)`, none if deleted.
const AUDIT_HEAD: &str = "SELECT seq, hash FROM audit_head WHERE id = 1";

impl Store {
    /// Appends `entry` to the audit trail and returns its `seq`.
    ///
    /// Reads the head and inserts in one `BEGIN IMMEDIATE` transaction, so
    /// concurrent writers (other tasks or processes) chain one after another.
    /// [`MemoryError::AuditHeadMissing`] if `audit_head` was deleted.
    pub async fn append_audit(&self, entry: &AuditEntry) -> Result<i64, MemoryError> {
        let row = EncodedAudit::new(entry)?;
        self.write(move |conn, ctx| row.append(conn, ctx)).await
    }

    /// The newest `limit` audit rows (of `session`, if given), oldest first.
    pub async fn audit(
        &self,
        limit: usize,
        session: Option<&SessionId>,
    ) -> Result<Vec<AuditRecord>, MemoryError> {
        let session = session.map(|s| s.as_str());
        let rows = sqlx::query(
            "SELECT * FROM (
                 SELECT seq, at, session_id, actor, action, detail, prev_hash, hash
                 FROM audit_log
                 WHERE ? IS NULL OR session_id = ?
                 ORDER BY seq DESC
                 LIMIT ?
             ) ORDER BY seq ASC",
        )
        .bind(session)
        .bind(session)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        rows.iter().map(decode_record).collect()
    }

    /// Recomputes the whole chain and compares it with `audit_head`.
    ///
    /// Reads in one transaction (a consistent snapshot) and pages through
    /// the rows, so memory use does not grow with the trail. A tampered chain
    /// is not an error: it is reported in [`AuditReport::first_bad`].
    pub async fn verify_audit(&self) -> Result<AuditReport, MemoryError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.sql(e))?;
        let head = sqlx::query(AUDIT_HEAD)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.sql(e))?;
        let head = match head {
            Some(row) => Some((
                col::<i64>(&row, "seq", "audit_head", &1)?,
                col::<String>(&row, "hash", "audit_head", &1)?,
            )),
            None => None,
        };
        let mut rows = 0u64;
        let mut last_seq = 0i64;
        let mut last_hash = GENESIS_HASH.to_owned();
        let mut first_bad = None;
        'pages: loop {
            let page = sqlx::query(
                "SELECT seq, at, session_id, actor, action, detail, prev_hash, hash
                 FROM audit_log WHERE seq > ? ORDER BY seq ASC LIMIT ?",
            )
            .bind(last_seq)
            .bind(VERIFY_PAGE)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.sql(e))?;
            if page.is_empty() {
                break;
            }
            for row in &page {
                let seq: i64 = row.try_get("seq").map_err(|e| self.sql(e))?;
                rows += 1;
                if let Err(reason) = check_row(row, seq, last_seq, &last_hash) {
                    first_bad = Some(reason);
                    break 'pages;
                }
                last_seq = seq;
                last_hash = row.try_get("hash").map_err(|e| self.sql(e))?;
            }
        }
        tx.rollback().await.map_err(|e| self.sql(e))?;
        let (head_seq, head_hash) = head.clone().unwrap_or_else(|| (0, GENESIS_HASH.to_owned()));
        if first_bad.is_none() {
            first_bad = match head {
                None => Some((
                    last_seq + 1,
                    "the audit_head record is missing (deleted)".to_owned(),
                )),
                Some((seq, _)) if seq > last_seq => Some((
                    last_seq + 1,
                    format!(
                        "missing: the head records seq {seq} but the last row is seq {last_seq} \
                         (rows deleted from the end)"
                    ),
                )),
                Some((seq, hash)) if seq != last_seq || hash != last_hash => Some((
                    last_seq,
                    format!(
                        "the head (seq {seq}, hash {hash}) does not match the last row \
                         (seq {last_seq}, hash {last_hash})"
                    ),
                )),
                Some(_) => None,
            };
        }
        Ok(AuditReport {
            rows,
            head_seq,
            head_hash,
            first_bad,
        })
    }
}

/// Checks one row against its predecessor; `Err((seq, reason))` names the
/// first bad row.
fn check_row(
    row: &SqliteRow,
    seq: i64,
    prev_seq: i64,
    prev_hash: &str,
) -> Result<(), (i64, String)> {
    let expected = prev_seq + 1;
    if seq > expected {
        let missing = if seq - 1 == expected {
            format!("seq {expected} is")
        } else {
            format!("seqs {expected}..={} are", seq - 1)
        };
        return Err((
            expected,
            format!("missing: {missing} not in the table (deleted); the next row is seq {seq}"),
        ));
    }
    if seq < expected {
        return Err((seq, format!("unexpected seq {seq} (expected {expected})")));
    }
    let text = |name: &str| -> Result<String, (i64, String)> {
        row.try_get::<String, _>(name)
            .map_err(|e| (seq, format!("column {name} is unreadable: {e}")))
    };
    let at: i64 = row
        .try_get("at")
        .map_err(|e| (seq, format!("column at is unreadable: {e}")))?;
    let session: Option<String> = row
        .try_get("session_id")
        .map_err(|e| (seq, format!("column session_id is unreadable: {e}")))?;
    let stored_prev = text("prev_hash")?;
    let stored_hash = text("hash")?;
    let computed = chain_hash(
        seq,
        at,
        session.as_deref(),
        &text("actor")?,
        &text("action")?,
        &text("detail")?,
        &stored_prev,
    );
    if computed != stored_hash {
        return Err((
            seq,
            "hash mismatch: the row's content was edited after it was written".to_owned(),
        ));
    }
    if stored_prev != prev_hash {
        return Err((
            seq,
            format!(
                "prev_hash does not match the hash of the row before it (seq {prev_seq}): \
                 rows were deleted, replaced or reordered"
            ),
        ));
    }
    Ok(())
}

fn decode_record(row: &SqliteRow) -> Result<AuditRecord, MemoryError> {
    const T: &str = "audit_log";
    let seq: i64 = col(row, "seq", T, &"?")?;
    let at: i64 = col(row, "at", T, &seq)?;
    let session: Option<String> = col(row, "session_id", T, &seq)?;
    let session_id = session
        .map(|s| SessionId::parse(&s).map_err(|e| corrupt(T, seq, e)))
        .transpose()?;
    let raw_detail: String = col(row, "detail", T, &seq)?;
    let detail = serde_json::from_str(&raw_detail).unwrap_or(serde_json::Value::String(raw_detail));
    Ok(AuditRecord {
        seq,
        at: from_millis(at, T, &seq)?,
        session_id,
        actor: col(row, "actor", T, &seq)?,
        action: col(row, "action", T, &seq)?,
        detail,
        prev_hash: col(row, "prev_hash", T, &seq)?,
        hash: col(row, "hash", T, &seq)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_is_unambiguous() {
        let a = chain_hash(1, 2, None, "ab", "c", "{}", GENESIS_HASH);
        let b = chain_hash(1, 2, None, "a", "bc", "{}", GENESIS_HASH);
        let c = chain_hash(1, 2, Some(""), "ab", "c", "{}", GENESIS_HASH);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 64);
        assert_eq!(a, chain_hash(1, 2, None, "ab", "c", "{}", GENESIS_HASH));
    }

    #[test]
    fn sha256_hex_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
