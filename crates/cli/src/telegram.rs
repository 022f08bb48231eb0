//! `openpista telegram pair|list|unpair`: who may talk to the agent from
//! Telegram besides `[channels.telegram] allowed_users`. Pairings live in
//! the database, so a running daemon sees them at the user's next message.

use std::process::ExitCode;

use anyhow::Result;
use openpista_channels::telegram::TELEGRAM;

use openpista_channels::{ChannelAdapter as _, Outbound};
use openpista_memory::Store;

use crate::TelegramCommand;
use crate::config::{Env, Loaded};
use crate::wiring;

/// What a newly paired user is told.
pub const PAIRED_NOTICE: &str = "You're approved: send me a message.";

/// Runs one `telegram` subcommand.
pub async fn telegram(loaded: &Loaded, env: &Env, cmd: TelegramCommand) -> Result<ExitCode> {
    let store = wiring::store(loaded).await?;
    match cmd {
        TelegramCommand::Pair { code } => {
            let code = code.trim();
            match store.approve_pairing(TELEGRAM, code).await? {
                Some(p) => {
                    println!(
                        "paired Telegram user {} (chat {}); they can talk to the agent now",
                        p.user_id, p.conversation
                    );
                    tell_paired(loaded, env, store, &p.conversation).await;
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!(
                        "error: no pending pairing code {code:?} (codes expire after \
                         channels.telegram.pairing_ttl_secs; `openpista telegram list` shows the live ones)"
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
        TelegramCommand::List { json } => {
            let paired = store.paired_users(TELEGRAM).await?;
            let pending = store.pending_pairings(TELEGRAM).await?;
            let allowed = &loaded.config.channels.telegram.allowed_users;
            if json {
                let v = serde_json::json!({
                    "allowed_users": allowed,
                    "paired": paired.iter().map(|p| serde_json::json!({
                        "user_id": p.user_id, "paired_at": p.paired_at.to_rfc3339(),
                    })).collect::<Vec<_>>(),
                    "pending": pending.iter().map(|p| serde_json::json!({
                        "user_id": p.user_id, "chat_id": p.conversation, "code": p.code,
                        "expires_at": p.expires_at.to_rfc3339(),
                    })).collect::<Vec<_>>(),
                });
                println!("{v:#}");
                return Ok(ExitCode::SUCCESS);
            }
            println!("allowed (config): {allowed:?}");
            println!("paired:");
            for p in &paired {
                println!("  {}  since {}", p.user_id, p.paired_at.to_rfc3339());
            }
            println!("pending:");
            for p in &pending {
                println!(
                    "  {}  code {}  chat {}  expires {}",
                    p.user_id,
                    p.code,
                    p.conversation,
                    p.expires_at.to_rfc3339()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TelegramCommand::Unpair { user_id } => {
            if store.unpair(TELEGRAM, &user_id.to_string()).await? {
                println!("unpaired Telegram user {user_id}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: Telegram user {user_id} is not paired");
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// Tells the paired user, when Telegram is enabled and has a token here;
/// a failure only warns (the pairing itself is done).
async fn tell_paired(loaded: &Loaded, env: &Env, store: Store, chat: &str) {
    let adapter = match wiring::telegram(loaded, env, store) {
        Ok(Some(adapter)) => adapter,
        Ok(None) => return,
        Err(e) => {
            eprintln!("warning: the user was not told ({e:#})");
            return;
        }
    };
    let out = Outbound {
        conversation: chat.to_owned(),
        text: PAIRED_NOTICE.to_owned(),
    };
    if let Err(e) = adapter.replier().send(&out).await {
        eprintln!("warning: the user was not told: {e}");
    }
}
