//! Session control and quota counters: whether a session is suspended (and
//! why), and the model tokens it spent per UTC day.

use openpista_proto::SessionId;

use crate::error::MemoryError;
use crate::store::Store;

impl Store {
    /// Suspends the session with `reason`; [`MemoryError::SessionNotFound`]
    /// if there is no such session. A suspended session stays suspended
    /// across restarts until [`Store::resume_session`].
    pub async fn suspend_session(&self, id: &SessionId, reason: &str) -> Result<(), MemoryError> {
        let (id, reason) = (id.clone(), reason.to_owned());
        self.write(move |conn, ctx| {
            let updated = conn
                .prepare_cached("UPDATE sessions SET suspended_reason = ? WHERE id = ?")
                .and_then(|mut update| update.execute(rusqlite::params![reason, id.as_str()]))
                .map_err(|e| ctx.sqlite(e))?;
            if updated == 0 {
                return Err(MemoryError::SessionNotFound(id));
            }
            Ok(())
        })
        .await
    }

    /// Lifts a suspension; returns whether the session was suspended.
    /// [`MemoryError::SessionNotFound`] if there is no such session.
    pub async fn resume_session(&self, id: &SessionId) -> Result<bool, MemoryError> {
        let Some(was) = self.suspension(id).await? else {
            return Err(MemoryError::SessionNotFound(id.clone()));
        };
        let id = id.clone();
        self.write(move |conn, ctx| {
            conn.prepare_cached("UPDATE sessions SET suspended_reason = NULL WHERE id = ?")
                .and_then(|mut update| update.execute([id.as_str()]))
                .map_err(|e| ctx.sqlite(e))?;
            Ok(())
        })
        .await?;
        Ok(was.is_some())
    }

    /// `None` if there is no session `id`; `Some(None)` if it is not
    /// suspended; `Some(Some(reason))` if it is.
    pub async fn suspension(&self, id: &SessionId) -> Result<Option<Option<String>>, MemoryError> {
        let row: Option<Option<String>> =
            sqlx::query_scalar("SELECT suspended_reason FROM sessions WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.sql(e))?;
        Ok(row)
    }

    /// Adds `tokens` to the session's count for `day` (`YYYY-MM-DD`, UTC) and
    /// returns the new total for that day.
    pub async fn add_token_usage(
        &self,
        id: &SessionId,
        day: &str,
        tokens: u64,
    ) -> Result<u64, MemoryError> {
        let (id, day) = (id.clone(), day.to_owned());
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        self.write(move |conn, ctx| {
            let total: i64 = conn
                .prepare_cached(
                    "INSERT INTO session_token_usage (session_id, day, tokens) VALUES (?, ?, ?)
                     ON CONFLICT (session_id, day) DO UPDATE SET tokens = tokens + excluded.tokens
                     RETURNING tokens",
                )
                .and_then(|mut add| {
                    add.query_row(rusqlite::params![id.as_str(), day, tokens], |row| {
                        row.get(0)
                    })
                })
                .map_err(|e| ctx.sqlite(e))?;
            Ok(u64::try_from(total).unwrap_or(0))
        })
        .await
    }

    /// The tokens the session spent on `day` (`YYYY-MM-DD`, UTC).
    pub async fn token_usage(&self, id: &SessionId, day: &str) -> Result<u64, MemoryError> {
        let row: Option<i64> = sqlx::query_scalar(
            "SELECT tokens FROM session_token_usage WHERE session_id = ? AND day = ?",
        )
        .bind(id.as_str())
        .bind(day)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        Ok(row.map_or(0, |t| u64::try_from(t).unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn suspension_and_daily_tokens_are_stored() {
        let store = Store::open_in_memory().await.unwrap();
        let id = SessionId::parse("s1").unwrap();
        assert_eq!(store.suspension(&id).await.unwrap(), None);
        assert!(store.suspend_session(&id, "x").await.is_err());
        store.create_session(&id, "cli", None).await.unwrap();
        assert_eq!(store.suspension(&id).await.unwrap(), Some(None));
        store
            .suspend_session(&id, "too many failures")
            .await
            .unwrap();
        assert_eq!(
            store.suspension(&id).await.unwrap(),
            Some(Some("too many failures".to_owned()))
        );
        assert!(store.resume_session(&id).await.unwrap());
        assert!(!store.resume_session(&id).await.unwrap());
        assert_eq!(store.suspension(&id).await.unwrap(), Some(None));

        assert_eq!(
            store.add_token_usage(&id, "2026-01-01", 10).await.unwrap(),
            10
        );
        assert_eq!(
            store.add_token_usage(&id, "2026-01-01", 5).await.unwrap(),
            15
        );
        assert_eq!(store.token_usage(&id, "2026-01-01").await.unwrap(), 15);
        // A new day starts from zero.
        assert_eq!(store.token_usage(&id, "2026-01-02").await.unwrap(), 0);
        assert_eq!(
            store.add_token_usage(&id, "2026-01-02", 1).await.unwrap(),
            1
        );
    }
}
