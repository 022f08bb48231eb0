//! Messages: the conversation history of a session, in append order.

use chrono::{DateTime, Utc};
use openpista_proto::{ChatMessage, MessageId, Role, SessionId, ToolCall, Usage};
use sqlx::sqlite::{SqliteConnection, SqliteRow};

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
        let rows = encode_all(messages)?;
        let session_id = session_id.clone();
        self.write(move |conn, ctx| {
            Box::pin(async move { insert_messages(conn, ctx, &session_id, &rows).await })
        })
        .await
    }

    /// Like [`Store::append_messages_with_usage`], and in the same transaction
    /// appends the audit entry that `audit` makes from the new messages' ids:
    /// the messages and their audit row are stored together or not at all.
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
        let rows = encode_all(messages)?;
        let session_id = session_id.clone();
        self.write(move |conn, ctx| {
            Box::pin(async move {
                let ids = insert_messages(conn, ctx, &session_id, &rows).await?;
                let entry = EncodedAudit::new(&audit(&ids))?;
                let seq = entry.append(conn, ctx).await?;
                Ok((ids, seq))
            })
        })
        .await
    }

    /// The newest `limit` messages of a session, oldest first (ready to send
    /// to a model). Empty for an unknown session.
    pub async fn recent_messages(
        &self,
        session_id: &SessionId,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MemoryError> {
        let rows = sqlx::query(
            "SELECT * FROM (
                 SELECT id, role, content, tool_calls, tool_call_id, tool_name, images,
                        prompt_tokens, completion_tokens, created_at
                 FROM messages
                 WHERE session_id = ?
                 ORDER BY id DESC
                 LIMIT ?
             ) ORDER BY id ASC",
        )
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

/// Bumps the session's `updated_at` and inserts `rows` in order, inside the
/// caller's write transaction. [`MemoryError::SessionNotFound`] if the
/// session is missing.
async fn insert_messages(
    conn: &mut SqliteConnection,
    ctx: &ErrorContext,
    session_id: &SessionId,
    rows: &[EncodedMessage],
) -> Result<Vec<MessageId>, MemoryError> {
    let now = now_millis();
    let touched = sqlx::query("UPDATE sessions SET updated_at = MAX(updated_at, ?) WHERE id = ?")
        .bind(now)
        .bind(session_id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(|e| ctx.sql(e))?;
    if touched.rows_affected() == 0 {
        return Err(MemoryError::SessionNotFound(session_id.clone()));
    }
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        let done = sqlx::query(
            "INSERT INTO messages (session_id, role, content, tool_calls, tool_call_id,
                                   tool_name, images, prompt_tokens, completion_tokens,
                                   created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(session_id.as_str())
        .bind(row.role)
        .bind(&row.content)
        .bind(row.tool_calls.as_deref())
        .bind(row.tool_call_id.as_deref())
        .bind(row.tool_name.as_deref())
        .bind(row.images.as_deref())
        .bind(row.prompt_tokens)
        .bind(row.completion_tokens)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(|e| ctx.sql(e))?;
        ids.push(MessageId(done.last_insert_rowid()));
    }
    Ok(ids)
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
