//! Durable memory for openpista: sessions, their messages, the tools they
//! ran, the audit trail, cron jobs and channel pairings, in one SQLite file.
//!
//! Every turn is written here as it happens, so a restarted process (or a
//! crashed one) picks the conversation up where it was. Writes that belong
//! together are one transaction; the schema lives in the workspace's
//! `migrations/` directory and is brought up to date when a [`Store`] opens.
//! Timestamps are stored as unix milliseconds (UTC).
//!
//! This crate is storage only: it does not decide what to remember, trim
//! histories, read the environment or know about channels beyond a name.

mod audit;
mod cron;
mod error;
mod invocations;
mod messages;
mod pairing;
mod quotas;
mod sessions;
mod store;
mod writer;

use std::path::{Path, PathBuf, is_separator};

pub use audit::{AuditEntry, AuditRecord, AuditReport, GENESIS_HASH, sha256_hex};
pub use cron::{CronJob, CronRun, FinishedRun, MissedPolicy, NewCronJob, RunOutcome, RunTrigger};
pub use error::MemoryError;
pub use invocations::ToolInvocation;
pub use messages::{Appended, AuditFn, HistoryVersion, StoredMessage};
pub use pairing::{PairedUser, PendingPairing};
pub use sessions::{SessionRecord, SessionSummary};
pub use store::{DEFAULT_BUSY_TIMEOUT, Store, StoreOptions};

/// Expands a leading `~` (alone or followed by a separator) to `home`.
///
/// Other paths, `~user/...` forms, and every path when `home` is `None` are
/// returned unchanged. The caller supplies `home`; this crate reads no
/// environment.
pub fn expand_tilde(path: &str, home: Option<&Path>) -> PathBuf {
    let Some(home) = home else {
        return PathBuf::from(path);
    };
    match path.strip_prefix('~') {
        Some("") => home.to_path_buf(),
        Some(rest) if rest.starts_with(is_separator) => {
            home.join(rest.trim_start_matches(is_separator))
        }
        _ => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_expands_only_at_the_start() {
        let home = Path::new("/home/pat");
        assert_eq!(expand_tilde("~", Some(home)), PathBuf::from("/home/pat"));
        assert_eq!(
            expand_tilde("~/.openpista/memory.db", Some(home)),
            PathBuf::from("/home/pat/.openpista/memory.db")
        );
        assert_eq!(
            expand_tilde("~//x", Some(home)),
            PathBuf::from("/home/pat/x")
        );
        assert_eq!(
            expand_tilde("/var/db/~/x", Some(home)),
            PathBuf::from("/var/db/~/x")
        );
        assert_eq!(expand_tilde("~bob/x", Some(home)), PathBuf::from("~bob/x"));
        assert_eq!(expand_tilde("rel/x", Some(home)), PathBuf::from("rel/x"));
        assert_eq!(expand_tilde("~/x", None), PathBuf::from("~/x"));
    }
}
