//! Who may talk to the agent through a channel: pending pairing codes and
//! paired users. Which codes to hand out, and when a user counts as allowed,
//! is the channel adapter's; this is storage only.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;

use crate::error::MemoryError;
use crate::store::{Store, col, from_millis, now_millis};

/// A pairing code waiting for the owner's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPairing {
    pub channel: String,
    /// The platform's user id.
    pub user_id: String,
    /// Where the user wrote from (a chat id).
    pub conversation: String,
    pub code: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A user the owner approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedUser {
    pub channel: String,
    pub user_id: String,
    pub paired_at: DateTime<Utc>,
}

const PENDING_COLUMNS: &str = "channel, user_id, conversation, code, created_at, expires_at";

impl Store {
    /// The user's live pairing code, or a new one (`code`, valid for `ttl`)
    /// if they have none. The flag says whether the code is new, i.e.
    /// whether the user has not been told one yet.
    pub async fn request_pairing(
        &self,
        channel: &str,
        user_id: &str,
        conversation: &str,
        code: &str,
        ttl: Duration,
    ) -> Result<(PendingPairing, bool), MemoryError> {
        let now = now_millis();
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM channel_pairings WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.sql(e))?;
        let existing = sqlx::query(&format!(
            "SELECT {PENDING_COLUMNS} FROM channel_pairings WHERE channel = ? AND user_id = ?"
        ))
        .bind(channel)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.sql(e))?;
        if let Some(row) = existing {
            let pending = decode_pending(&row)?;
            self.commit(tx).await?;
            return Ok((pending, false));
        }
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let row = sqlx::query(&format!(
            "INSERT INTO channel_pairings ({PENDING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)
             RETURNING {PENDING_COLUMNS}"
        ))
        .bind(channel)
        .bind(user_id)
        .bind(conversation)
        .bind(code)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.sql(e))?;
        let pending = decode_pending(&row)?;
        self.commit(tx).await?;
        Ok((pending, true))
    }

    /// Approves the live pairing `code` of `channel`: its user becomes a
    /// paired user. `None` if no such code is pending (unknown or expired).
    pub async fn approve_pairing(
        &self,
        channel: &str,
        code: &str,
    ) -> Result<Option<PendingPairing>, MemoryError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "DELETE FROM channel_pairings WHERE channel = ? AND code = ? AND expires_at > ?
             RETURNING {PENDING_COLUMNS}"
        ))
        .bind(channel)
        .bind(code)
        .bind(now_millis())
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.sql(e))?;
        let Some(row) = row else {
            self.commit(tx).await?;
            return Ok(None);
        };
        let pending = decode_pending(&row)?;
        sqlx::query(
            "INSERT INTO channel_users (channel, user_id, paired_at) VALUES (?, ?, ?)
             ON CONFLICT (channel, user_id) DO NOTHING",
        )
        .bind(channel)
        .bind(&pending.user_id)
        .bind(now_millis())
        .execute(&mut *tx)
        .await
        .map_err(|e| self.sql(e))?;
        self.commit(tx).await?;
        Ok(Some(pending))
    }

    /// Whether the owner approved `user_id` on `channel`.
    pub async fn is_paired(&self, channel: &str, user_id: &str) -> Result<bool, MemoryError> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM channel_users WHERE channel = ? AND user_id = ?")
                .bind(channel)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.sql(e))?;
        Ok(found.is_some())
    }

    /// Paired users of `channel`, oldest first.
    pub async fn paired_users(&self, channel: &str) -> Result<Vec<PairedUser>, MemoryError> {
        let rows = sqlx::query(
            "SELECT channel, user_id, paired_at FROM channel_users WHERE channel = ?
             ORDER BY paired_at, user_id",
        )
        .bind(channel)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        rows.iter()
            .map(|row| {
                let user_id: String = col(row, "user_id", "channel_users", &"?")?;
                let paired_at: i64 = col(row, "paired_at", "channel_users", &user_id)?;
                Ok(PairedUser {
                    channel: col(row, "channel", "channel_users", &user_id)?,
                    paired_at: from_millis(paired_at, "channel_users", &user_id)?,
                    user_id,
                })
            })
            .collect()
    }

    /// Live (unexpired) pairing codes of `channel`, oldest first.
    pub async fn pending_pairings(
        &self,
        channel: &str,
    ) -> Result<Vec<PendingPairing>, MemoryError> {
        let rows = sqlx::query(&format!(
            "SELECT {PENDING_COLUMNS} FROM channel_pairings WHERE channel = ? AND expires_at > ?
             ORDER BY created_at, user_id"
        ))
        .bind(channel)
        .bind(now_millis())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        rows.iter().map(decode_pending).collect()
    }

    /// Removes a paired user (and any pending code of theirs); returns
    /// whether they were paired.
    pub async fn unpair(&self, channel: &str, user_id: &str) -> Result<bool, MemoryError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM channel_users WHERE channel = ? AND user_id = ?")
            .bind(channel)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.sql(e))?;
        sqlx::query("DELETE FROM channel_pairings WHERE channel = ? AND user_id = ?")
            .bind(channel)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.sql(e))?;
        self.commit(tx).await?;
        Ok(done.rows_affected() > 0)
    }
}

fn decode_pending(row: &SqliteRow) -> Result<PendingPairing, MemoryError> {
    const T: &str = "channel_pairings";
    let user_id: String = col(row, "user_id", T, &"?")?;
    let created_at: i64 = col(row, "created_at", T, &user_id)?;
    let expires_at: i64 = col(row, "expires_at", T, &user_id)?;
    Ok(PendingPairing {
        channel: col(row, "channel", T, &user_id)?,
        conversation: col(row, "conversation", T, &user_id)?,
        code: col(row, "code", T, &user_id)?,
        created_at: from_millis(created_at, T, &user_id)?,
        expires_at: from_millis(expires_at, T, &user_id)?,
        user_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_code_is_handed_out_once_and_approving_it_pairs_the_user() {
        let (_dir, s) = store().await;
        let ttl = Duration::from_secs(600);
        let (p, fresh) = s
            .request_pairing("telegram", "7", "7", "123456", ttl)
            .await
            .unwrap();
        assert!(fresh);
        assert_eq!(p.code, "123456");
        let (again, fresh) = s
            .request_pairing("telegram", "7", "7", "999999", ttl)
            .await
            .unwrap();
        assert!(!fresh, "the user keeps the code they were told");
        assert_eq!(again.code, "123456");
        assert_eq!(s.pending_pairings("telegram").await.unwrap().len(), 1);
        assert!(!s.is_paired("telegram", "7").await.unwrap());

        assert!(
            s.approve_pairing("telegram", "000000")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            s.approve_pairing("other", "123456")
                .await
                .unwrap()
                .is_none()
        );
        let approved = s
            .approve_pairing("telegram", "123456")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(approved.user_id, "7");
        assert!(s.is_paired("telegram", "7").await.unwrap());
        assert!(!s.is_paired("other", "7").await.unwrap());
        assert!(s.pending_pairings("telegram").await.unwrap().is_empty());
        assert!(
            s.approve_pairing("telegram", "123456")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(s.paired_users("telegram").await.unwrap()[0].user_id, "7");

        assert!(s.unpair("telegram", "7").await.unwrap());
        assert!(!s.unpair("telegram", "7").await.unwrap());
        assert!(!s.is_paired("telegram", "7").await.unwrap());
    }

    #[tokio::test]
    async fn an_expired_code_cannot_be_approved_and_is_replaced() {
        let (_dir, s) = store().await;
        let (_, fresh) = s
            .request_pairing("telegram", "8", "8", "111111", Duration::ZERO)
            .await
            .unwrap();
        assert!(fresh);
        assert!(
            s.approve_pairing("telegram", "111111")
                .await
                .unwrap()
                .is_none()
        );
        let (p, fresh) = s
            .request_pairing("telegram", "8", "8", "222222", Duration::from_secs(60))
            .await
            .unwrap();
        assert!(fresh, "an expired code is replaced by a new one");
        assert_eq!(p.code, "222222");
    }
}
