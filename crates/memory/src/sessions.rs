//! Sessions: one row per conversation.

use chrono::{DateTime, Utc};
use openpista_proto::SessionId;
use sqlx::sqlite::SqliteRow;

use crate::error::{MemoryError, corrupt};
use crate::store::{Store, col, from_millis, now_millis, sql_limit, to_u64};

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: SessionId,
    /// The channel the session was created on (`cli`, `telegram`, ...).
    pub channel: String,
    pub title: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When the last message was appended (creation time until then).
    pub updated_at: DateTime<Utc>,
}

/// A session as listed: its record plus how many messages it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub id: SessionId,
    pub channel: String,
    pub title: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub message_count: u64,
    /// Why the session is suspended, if it is.
    pub suspended_reason: Option<String>,
}

impl Store {
    /// Creates a session; [`MemoryError::SessionExists`] if `id` is taken.
    pub async fn create_session(
        &self,
        id: &SessionId,
        channel: &str,
        title: Option<&str>,
    ) -> Result<(), MemoryError> {
        let (id, channel, title) = (id.clone(), channel.to_owned(), title.map(str::to_owned));
        self.write(move |conn, ctx| {
            conn.prepare_cached(
                "INSERT INTO sessions (id, channel, title, created_at, updated_at, history_version)
                 VALUES (?, ?, ?, ?, ?, abs(random() % 4503599627370496))",
            )
            .and_then(|mut insert| {
                let now = now_millis();
                insert.execute(rusqlite::params![id.as_str(), channel, title, now, now])
            })
            .map_err(|e| ctx.sqlite_insert_session(e, &id))?;
            Ok(())
        })
        .await
    }

    /// Creates the session unless it exists; returns whether it was created.
    /// An existing session keeps its channel and title.
    pub async fn ensure_session(&self, id: &SessionId, channel: &str) -> Result<bool, MemoryError> {
        let (id, channel) = (id.clone(), channel.to_owned());
        self.write(move |conn, ctx| {
            let now = now_millis();
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO sessions (id, channel, title, created_at, updated_at, history_version)
                     VALUES (?, ?, NULL, ?, ?, abs(random() % 4503599627370496))
                     ON CONFLICT (id) DO NOTHING",
                )
                .and_then(|mut insert| {
                    insert.execute(rusqlite::params![id.as_str(), channel, now, now])
                })
                .map_err(|e| ctx.sqlite(e))?;
            Ok(inserted == 1)
        })
        .await
    }

    /// The session `id`, if it exists.
    pub async fn get_session(&self, id: &SessionId) -> Result<Option<SessionRecord>, MemoryError> {
        let row = sqlx::query(
            "SELECT id, channel, title, created_at, updated_at FROM sessions WHERE id = ?",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        row.as_ref().map(decode_record).transpose()
    }

    /// Up to `limit` sessions, most recently updated first, with their
    /// message counts.
    pub async fn list_sessions(&self, limit: usize) -> Result<Vec<SessionSummary>, MemoryError> {
        let rows = sqlx::query(
            "SELECT s.id, s.channel, s.title, s.created_at, s.updated_at, s.suspended_reason,
                    (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS message_count
             FROM sessions s
             ORDER BY s.updated_at DESC, s.rowid DESC
             LIMIT ?",
        )
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        rows.iter()
            .map(|row| {
                let record = decode_record(row)?;
                let count: i64 = col(row, "message_count", "sessions", &record.id)?;
                let suspended_reason = col(row, "suspended_reason", "sessions", &record.id)?;
                Ok(SessionSummary {
                    message_count: to_u64(count, "sessions", &record.id, "message_count")?,
                    id: record.id,
                    channel: record.channel,
                    title: record.title,
                    created_at: record.created_at,
                    updated_at: record.updated_at,
                    suspended_reason,
                })
            })
            .collect()
    }

    /// Deletes a session with its messages and tool invocations; returns
    /// whether it existed.
    pub async fn delete_session(&self, id: &SessionId) -> Result<bool, MemoryError> {
        let done = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Sets (or with `None`, clears) the title; [`MemoryError::SessionNotFound`]
    /// if there is no such session. Does not change `updated_at`.
    pub async fn set_title(&self, id: &SessionId, title: Option<&str>) -> Result<(), MemoryError> {
        let done = sqlx::query("UPDATE sessions SET title = ? WHERE id = ?")
            .bind(title)
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| self.sql(e))?;
        if done.rows_affected() == 0 {
            return Err(MemoryError::SessionNotFound(id.clone()));
        }
        Ok(())
    }

    /// Sets the title of a session that has none (one conditional write, no
    /// read first); returns whether it was set. An unknown session or one
    /// with a title is left alone. Does not change `updated_at`.
    pub async fn set_title_if_unset(
        &self,
        id: &SessionId,
        title: &str,
    ) -> Result<bool, MemoryError> {
        let (id, title) = (id.clone(), title.to_owned());
        self.write(move |conn, ctx| {
            let updated = conn
                .prepare_cached("UPDATE sessions SET title = ? WHERE id = ? AND title IS NULL")
                .and_then(|mut update| update.execute(rusqlite::params![title, id.as_str()]))
                .map_err(|e| ctx.sqlite(e))?;
            Ok(updated > 0)
        })
        .await
    }
}

fn decode_record(row: &SqliteRow) -> Result<SessionRecord, MemoryError> {
    const T: &str = "sessions";
    let raw_id: String = col(row, "id", T, &"?")?;
    let id = SessionId::parse(&raw_id).map_err(|e| corrupt(T, &raw_id, e))?;
    let created_at: i64 = col(row, "created_at", T, &id)?;
    let updated_at: i64 = col(row, "updated_at", T, &id)?;
    Ok(SessionRecord {
        channel: col(row, "channel", T, &id)?,
        title: col(row, "title", T, &id)?,
        created_at: from_millis(created_at, T, &id)?,
        updated_at: from_millis(updated_at, T, &id)?,
        id,
    })
}
