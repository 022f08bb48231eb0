//! Tool invocations: what each tool call ran with, returned and cost.

use chrono::{DateTime, Utc};
use openpista_proto::{MessageId, SessionId, ToolOutcome};
use sqlx::sqlite::SqliteRow;

use crate::error::{MemoryError, corrupt};
use crate::store::{Store, col, from_millis, sql_limit, to_i64, to_u64};

/// One run of a tool, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolInvocation {
    pub session_id: SessionId,
    /// The assistant message that requested the call, if stored.
    pub message_id: Option<MessageId>,
    /// The model's id for the call (`ToolCall::id`).
    pub call_id: String,
    pub tool_name: String,
    /// The raw argument text the model produced.
    pub args: String,
    /// The text fed back to the model.
    pub result: String,
    /// The exit code, for tools that run a process.
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub outcome: ToolOutcome,
    /// When the tool started.
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Records a tool invocation and returns its row id.
    ///
    /// [`MemoryError::SessionNotFound`] if the session is missing,
    /// [`MemoryError::MessageNotFound`] if `message_id` is not a message of
    /// that session.
    pub async fn record_tool_invocation(&self, inv: &ToolInvocation) -> Result<i64, MemoryError> {
        let duration_ms = to_i64("duration_ms", inv.duration_ms)?;
        let inv = inv.clone();
        self.write(move |conn, ctx| {
            let exists =
                |sql: &str, params: &[&dyn rusqlite::ToSql]| -> Result<bool, MemoryError> {
                    conn.prepare_cached(sql)
                        .and_then(|mut query| query.query_row(params, |row| row.get(0)))
                        .map_err(|e| ctx.sqlite(e))
                };
            if !exists(
                "SELECT EXISTS (SELECT 1 FROM sessions WHERE id = ?)",
                &[&inv.session_id.as_str()],
            )? {
                return Err(MemoryError::SessionNotFound(inv.session_id.clone()));
            }
            if let Some(message_id) = inv.message_id
                && !exists(
                    "SELECT EXISTS (SELECT 1 FROM messages WHERE id = ? AND session_id = ?)",
                    &[&message_id.0, &inv.session_id.as_str()],
                )?
            {
                return Err(MemoryError::MessageNotFound {
                    session_id: inv.session_id.clone(),
                    message_id,
                });
            }
            conn.prepare_cached(
                "INSERT INTO tool_invocations (session_id, message_id, call_id, tool_name, args,
                                               result, exit_code, duration_ms, outcome, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .and_then(|mut insert| {
                insert.execute(rusqlite::params![
                    inv.session_id.as_str(),
                    inv.message_id.map(|m| m.0),
                    inv.call_id,
                    inv.tool_name,
                    inv.args,
                    inv.result,
                    inv.exit_code,
                    duration_ms,
                    inv.outcome.as_str(),
                    inv.created_at.timestamp_millis(),
                ])
            })
            .map_err(|e| ctx.sqlite(e))?;
            Ok(conn.last_insert_rowid())
        })
        .await
    }

    /// The newest `limit` tool invocations of a session, oldest first.
    pub async fn tool_invocations(
        &self,
        session_id: &SessionId,
        limit: usize,
    ) -> Result<Vec<ToolInvocation>, MemoryError> {
        let rows = sqlx::query(
            "SELECT * FROM (
                 SELECT id, session_id, message_id, call_id, tool_name, args, result,
                        exit_code, duration_ms, outcome, created_at
                 FROM tool_invocations
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
        rows.iter().map(decode_invocation).collect()
    }
}

fn decode_invocation(row: &SqliteRow) -> Result<ToolInvocation, MemoryError> {
    const T: &str = "tool_invocations";
    let id: i64 = col(row, "id", T, &"?")?;
    let raw_session: String = col(row, "session_id", T, &id)?;
    let session_id = SessionId::parse(&raw_session).map_err(|e| corrupt(T, id, e))?;
    let raw_outcome: String = col(row, "outcome", T, &id)?;
    let outcome = ToolOutcome::parse(&raw_outcome)
        .ok_or_else(|| corrupt(T, id, format!("unknown outcome {raw_outcome:?}")))?;
    let message_id: Option<i64> = col(row, "message_id", T, &id)?;
    let duration_ms: i64 = col(row, "duration_ms", T, &id)?;
    let created_at: i64 = col(row, "created_at", T, &id)?;
    Ok(ToolInvocation {
        session_id,
        message_id: message_id.map(MessageId),
        call_id: col(row, "call_id", T, &id)?,
        tool_name: col(row, "tool_name", T, &id)?,
        args: col(row, "args", T, &id)?,
        result: col(row, "result", T, &id)?,
        exit_code: col(row, "exit_code", T, &id)?,
        duration_ms: to_u64(duration_ms, T, &id, "duration_ms")?,
        outcome,
        created_at: from_millis(created_at, T, &id)?,
    })
}
