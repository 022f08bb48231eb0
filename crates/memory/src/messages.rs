//! Messages: the conversation history of a session, in append order.

use chrono::{DateTime, Utc};
use openpista_proto::{ChatMessage, MessageId, Role, SessionId, ToolCall, Usage};
use sqlx::sqlite::SqliteRow;

use crate::audit::{AuditEntry, EncodedAudit};
use crate::error::{ErrorContext, MemoryError, corrupt};
use crate::store::{Store, col, from_millis, now_millis, sql_limit, to_i64, to_u64};

/// A message as stored: its row id, the message, the tokens it cost (if the
/// caller recorded them) and when it was appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: MessageId,
    pub message: ChatMessage,
    pub usage: Option<Usage>,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Appends one message and bumps the session's `updated_at`, in one
    /// transaction. [`MemoryError::SessionNotFound`] if the session is missing.
    pub async fn append_message(
        &self,
        session_id: &SessionId,
        message: &ChatMessage,
        usage: Option<Usage>,
    ) -> Result<MessageId, MemoryError> {
        let ids = self
            .append_messages_with_usage(session_id, &[(message, usage)])
            .await?;
        ids.first()
            .copied()
            .ok_or_else(|| MemoryError::SessionNotFound(session_id.clone()))
    }

    /// Appends `messages` in order, all or nothing (one transaction): an
    /// assistant message and the results of its tool calls are stored together.
    /// Returns their ids in order.
    pub async fn append_messages(
        &self,
        session_id: &SessionId,
        messages: &[ChatMessage],
    ) -> Result<Vec<MessageId>, MemoryError> {
        let batch: Vec<(&ChatMessage, Option<Usage>)> =
            messages.iter().map(|m| (m, None)).collect();
        self.append_messages_with_usage(session_id, &batch).await
    }

    /// Like [`Store::append_messages`], with the token usage of each message.
    /// An empty batch does nothing.
    pub async fn append_messages_with_usage(
        &self,
        session_id: &SessionId,
        messages: &[(&ChatMessage, Option<Usage>)],
    ) -> Result<Vec<MessageId>, MemoryError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.append_turn(session_id, messages, None).await?.ids)
    }

    /// Like [`Store::append_messages_with_usage`], and in the same transaction
    /// appends the audit entry that `audit` makes from the new messages' ids:
    /// the messages and their audit row are stored together or not at all.
    /// `audit` runs inside the write transaction (see [`AuditFn`]).
    /// Returns the messages' ids and the audit row's `seq`.
    pub async fn append_messages_audited<A>(
        &self,
        session_id: &SessionId,
        messages: &[(&ChatMessage, Option<Usage>)],
        audit: A,
    ) -> Result<(Vec<MessageId>, i64), MemoryError>
    where
        A: FnOnce(&[MessageId]) -> AuditEntry + Send + 'static,
    {
        let done = self
            .append_turn(session_id, messages, Some(Box::new(audit)))
            .await?;
        Ok((done.ids, done.audit_seq.unwrap_or_default()))
    }

    /// Appends `messages` in order (all or nothing), with the audit entry
    /// `audit` makes from their ids if given, in one transaction; returns
    /// their ids, the audit row's `seq` and the session's [`HistoryVersion`]
    /// right after this append (see [`Store::history`]).
    pub async fn append_turn(
        &self,
        session_id: &SessionId,
        messages: &[(&ChatMessage, Option<Usage>)],
        audit: Option<AuditFn>,
    ) -> Result<Appended, MemoryError> {
        self.append_checked(session_id, messages, audit, false)
            .await
    }

    /// Like [`Store::append_turn`], but stores nothing and fails with
    /// [`MemoryError::SessionSuspended`] if the session is suspended: the
    /// check and the append are one write, so a turn is admitted without a
    /// read of its own.
    pub async fn append_turn_unless_suspended(
        &self,
        session_id: &SessionId,
        messages: &[(&ChatMessage, Option<Usage>)],
        audit: Option<AuditFn>,
    ) -> Result<Appended, MemoryError> {
        self.append_checked(session_id, messages, audit, true).await
    }

    async fn append_checked(
        &self,
        session_id: &SessionId,
        messages: &[(&ChatMessage, Option<Usage>)],
        audit: Option<AuditFn>,
        unless_suspended: bool,
    ) -> Result<Appended, MemoryError> {
        let rows = encode_all(messages)?;
        let session_id = session_id.clone();
        self.write(move |conn, ctx| {
            let (ids, version) = insert_messages(conn, ctx, &session_id, &rows, unless_suspended)?;
            let audit_seq = match audit {
                Some(audit) => Some(EncodedAudit::new(&audit(&ids))?.append(conn, ctx)?),
                None => None,
            };
            Ok(Appended {
                ids,
                audit_seq,
                version,
            })
        })
        .await
    }

    /// The newest `limit` messages of a session, oldest first, and the
    /// [`HistoryVersion`] they are, read in one transaction. `None` for an
    /// unknown session.
    ///
    /// A caller that keeps this history in memory and appends to it through
    /// [`Store::append_turn`] knows its copy is still whole as long as each
    /// append returns `version.advanced_by(n)` for the `n` messages it
    /// appended; any other version means someone else wrote to the session
    /// (or it was deleted and created again), and the copy must be read anew.
    pub async fn history(
        &self,
        session_id: &SessionId,
        limit: usize,
    ) -> Result<Option<(HistoryVersion, Vec<StoredMessage>)>, MemoryError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.sql(e))?;
        let version: Option<i64> =
            sqlx::query_scalar("SELECT history_version FROM sessions WHERE id = ?")
                .bind(session_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.sql(e))?;
        let Some(version) = version.map(HistoryVersion) else {
            return Ok(None);
        };
        let rows = sqlx::query(RECENT_MESSAGES)
            .bind(session_id.as_str())
            .bind(sql_limit(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.sql(e))?;
        tx.commit().await.map_err(|e| self.sql(e))?;
        let messages = rows.iter().map(decode_message).collect::<Result<_, _>>()?;
        Ok(Some((version, messages)))
    }

    /// The newest `limit` messages of a session, oldest first (ready to send
    /// to a model). Empty for an unknown session.
    pub async fn recent_messages(
        &self,
        session_id: &SessionId,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MemoryError> {
        let rows = sqlx::query(RECENT_MESSAGES)
            .bind(session_id.as_str())
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        rows.iter().map(decode_message).collect()
    }

    /// How many messages the session holds (0 for an unknown session).
    pub async fn message_count(&self, session_id: &SessionId) -> Result<u64, MemoryError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE session_id = ?")
            .bind(session_id.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        to_u64(count, "messages", session_id, "COUNT(*)")
    }
}

/// The newest `?2` messages of session `?1`, oldest first.
const RECENT_MESSAGES: &str = "SELECT * FROM (
         SELECT id, role, content, tool_calls, tool_call_id, tool_name, images,
                prompt_tokens, completion_tokens, created_at
         FROM messages
         WHERE session_id = ?
         ORDER BY id DESC
         LIMIT ?
     ) ORDER BY id ASC";

/// Makes the audit entry of an append from the new messages' ids.
///
/// It runs on the store's writer thread, inside the write transaction that
/// holds the database's write lock: it must be quick, must not block, and
/// must not use the store (that would wait for itself).
pub type AuditFn = Box<dyn FnOnce(&[MessageId]) -> AuditEntry + Send>;

/// What [`Store::append_turn`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The new messages' ids, in order.
    pub ids: Vec<MessageId>,
    /// The audit row's `seq`, when an audit entry was given.
    pub audit_seq: Option<i64>,
    /// The session's history version right after this append.
    pub version: HistoryVersion,
}

/// Which state of a session's history a reader saw. A session starts at a
/// random version and every append adds the number of messages it appended,
/// so two equal versions are the same history, and a session deleted and
/// created again under the same id starts over at another random version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryVersion(i64);

/// Versions count modulo 2^53, in SQL as here (`insert_messages`).
const VERSION_MODULUS: i64 = 1 << 53;

impl HistoryVersion {
    /// The version after `n` more messages were appended to this one.
    pub fn advanced_by(self, n: usize) -> HistoryVersion {
        let n = i64::try_from(n % (VERSION_MODULUS as usize)).unwrap_or(0);
        HistoryVersion((self.0.rem_euclid(VERSION_MODULUS) + n) % VERSION_MODULUS)
    }
}

/// One message in its column form.
fn encode_all(
    messages: &[(&ChatMessage, Option<Usage>)],
) -> Result<Vec<EncodedMessage>, MemoryError> {
    // Encode everything before queuing for the write lock.
    messages
        .iter()
        .map(|(message, usage)| EncodedMessage::new(message, *usage))
        .collect()
}

/// Bumps the session's `updated_at` and `history_version` and inserts `rows` in
/// order, inside the caller's write transaction; returns their ids and the
/// session's new history version. [`MemoryError::SessionNotFound`] if the
/// session is missing, [`MemoryError::SessionSuspended`] if `unless_suspended`
/// and it is suspended; on an error the caller's savepoint undoes whatever
/// ran.
fn insert_messages(
    conn: &rusqlite::Connection,
    ctx: &ErrorContext,
    session_id: &SessionId,
    rows: &[EncodedMessage],
    unless_suspended: bool,
) -> Result<(Vec<MessageId>, HistoryVersion), MemoryError> {
    use rusqlite::OptionalExtension;
    let now = now_millis();
    let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    // `history_version` wraps at 2^53 like `HistoryVersion::advanced_by`.
    let touched: Option<(i64, Option<String>)> = conn
        .prepare_cached(
            "UPDATE sessions SET updated_at = MAX(updated_at, ?),
                                 history_version = (history_version + ?) % 9007199254740992
             WHERE id = ? RETURNING history_version, suspended_reason",
        )
        .and_then(|mut update| {
            update
                .query_row(rusqlite::params![now, count, session_id.as_str()], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
        })
        .map_err(|e| ctx.sqlite_row(e, "sessions", session_id))?;
    let version = match touched {
        None => return Err(MemoryError::SessionNotFound(session_id.clone())),
        // The caller's savepoint rolls this update back.
        Some((_, Some(reason))) if unless_suspended => {
            return Err(MemoryError::SessionSuspended {
                session: session_id.clone(),
                reason,
            });
        }
        Some((version, _)) => HistoryVersion(version),
    };
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO messages (session_id, role, content, tool_calls, tool_call_id,
                                   tool_name, images, prompt_tokens, completion_tokens,
                                   created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .map_err(|e| ctx.sqlite(e))?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        let id = insert
            .insert(rusqlite::params![
                session_id.as_str(),
                row.role,
                row.content,
                row.tool_calls,
                row.tool_call_id,
                row.tool_name,
                row.images,
                row.prompt_tokens,
                row.completion_tokens,
                now,
            ])
            .map_err(|e| ctx.sqlite(e))?;
        ids.push(MessageId(id));
    }
    Ok((ids, version))
}

/// A message encoded for its row, owned so that it can be handed to the
/// store's writer.
struct EncodedMessage {
    role: &'static str,
    content: String,
    tool_calls: Option<String>,
    tool_call_id: Option<String>,
    tool_name: Option<String>,
    /// JSON array of image paths, `None` when there are none.
    images: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
}

impl EncodedMessage {
    fn new(message: &ChatMessage, usage: Option<Usage>) -> Result<Self, MemoryError> {
        let tool_calls = if message.tool_calls.is_empty() {
            None
        } else {
            let json = serde_json::to_string(&message.tool_calls).map_err(|source| {
                MemoryError::Encode {
                    what: "tool_calls",
                    source,
                }
            })?;
            Some(json)
        };
        let images = if message.images.is_empty() {
            None
        } else {
            let json =
                serde_json::to_string(&message.images).map_err(|source| MemoryError::Encode {
                    what: "images",
                    source,
                })?;
            Some(json)
        };
        let (prompt_tokens, completion_tokens) = match usage {
            Some(u) => (
                Some(to_i64("prompt_tokens", u.prompt_tokens)?),
                Some(to_i64("completion_tokens", u.completion_tokens)?),
            ),
            None => (None, None),
        };
        Ok(Self {
            role: message.role.as_str(),
            content: message.content.clone(),
            tool_calls,
            tool_call_id: message.tool_call_id.clone(),
            tool_name: message.name.clone(),
            images,
            prompt_tokens,
            completion_tokens,
        })
    }
}

fn decode_message(row: &SqliteRow) -> Result<StoredMessage, MemoryError> {
    const T: &str = "messages";
    let id: i64 = col(row, "id", T, &"?")?;
    let role_raw: String = col(row, "role", T, &id)?;
    let role = Role::parse(&role_raw)
        .ok_or_else(|| corrupt(T, id, format!("unknown role {role_raw:?}")))?;
    let tool_calls_raw: Option<String> = col(row, "tool_calls", T, &id)?;
    let tool_calls = match tool_calls_raw {
        None => Vec::new(),
        Some(text) => serde_json::from_str::<Vec<ToolCall>>(&text).map_err(|e| {
            corrupt(
                T,
                id,
                format!("tool_calls is not a list of tool calls: {e}"),
            )
        })?,
    };
    let images_raw: Option<String> = col(row, "images", T, &id)?;
    let images = match images_raw {
        None => Vec::new(),
        Some(text) => serde_json::from_str::<Vec<String>>(&text)
            .map_err(|e| corrupt(T, id, format!("images is not a list of paths: {e}")))?,
    };
    let prompt: Option<i64> = col(row, "prompt_tokens", T, &id)?;
    let completion: Option<i64> = col(row, "completion_tokens", T, &id)?;
    let usage = match (prompt, completion) {
        (None, None) => None,
        (prompt, completion) => Some(Usage {
            prompt_tokens: to_u64(prompt.unwrap_or(0), T, &id, "prompt_tokens")?,
            completion_tokens: to_u64(completion.unwrap_or(0), T, &id, "completion_tokens")?,
        }),
    };
    let created_at: i64 = col(row, "created_at", T, &id)?;
    Ok(StoredMessage {
        id: MessageId(id),
        message: ChatMessage {
            role,
            content: col(row, "content", T, &id)?,
            tool_calls,
            tool_call_id: col(row, "tool_call_id", T, &id)?,
            name: col(row, "tool_name", T, &id)?,
            images,
        },
        usage,
        created_at: from_millis(created_at, T, &id)?,
    })
}
