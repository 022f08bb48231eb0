//! The terminal as a channel: lines from a reader (stdin) become
//! [`Inbound`] messages of one conversation, `cli`; answers, the streamed
//! reply so far and [`Outbound`] messages are written to a writer (stdout).
//!
//! Each non-empty line is a message; `/new`, `/cancel` and `/status` are the
//! commands Telegram has; `/quit` or the end of input stops reading. Lines
//! are answered in order; `/cancel` and `/status` are answered at once, so
//! they reach a running turn. After `/quit` or the end of input, [`run`]
//! waits for the lines already read to be answered (unless `shutdown`
//! fires), then returns.
//!
//! Not here: approval prompts (a turn's approval requests time out, which
//! denies them; `openpista repl` asks for them) and tool event lines.
//!
//! [`run`]: ChannelAdapter::run

use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{ChannelAdapter, ChannelError, Draft, Inbound, InboundHandler, InboundKind, Outbound};

/// The channel's name, its only conversation and session key.
pub const CLI: &str = "cli";
/// What an unknown `/command` answers.
pub const UNKNOWN_COMMAND: &str = "Unknown command. Try /new, /cancel, /status or /quit.";
/// What a line that is not UTF-8 answers.
pub const NOT_UTF8: &str = "Sorry, that line is not valid UTF-8.";

/// The production adapter: stdin and stdout.
pub type StdioAdapter = CliAdapter<tokio::io::BufReader<tokio::io::Stdin>, tokio::io::Stdout>;

/// Reads messages from `R`, writes answers to `W`.
pub struct CliAdapter<R, W> {
    input: Arc<Mutex<Option<R>>>,
    out: CliReplier<W>,
    user: String,
}

impl<R, W> std::fmt::Debug for CliAdapter<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliAdapter")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Writes [`Outbound`] messages (and the adapter's answers) to the writer.
pub struct CliReplier<W> {
    out: Arc<Mutex<Writer<W>>>,
}

impl<W> Clone for CliReplier<W> {
    fn clone(&self) -> Self {
        Self {
            out: self.out.clone(),
        }
    }
}

impl<W> std::fmt::Debug for CliReplier<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliReplier").finish_non_exhaustive()
    }
}

struct Writer<W> {
    w: W,
    /// Nothing is written on the current line yet.
    at_line_start: bool,
}

impl StdioAdapter {
    /// Reads stdin and writes stdout, as `user`.
    pub fn stdio(user: impl Into<String>) -> Self {
        Self::new(
            tokio::io::BufReader::new(tokio::io::stdin()),
            tokio::io::stdout(),
            user,
        )
    }
}

impl<R, W> CliAdapter<R, W>
where
    R: AsyncBufRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Reads lines from `input` and writes to `output`; messages come from
    /// `user` (the local user's name).
    pub fn new(input: R, output: W, user: impl Into<String>) -> Self {
        Self {
            input: Arc::new(Mutex::new(Some(input))),
            out: CliReplier {
                out: Arc::new(Mutex::new(Writer {
                    w: output,
                    at_line_start: true,
                })),
            },
            user: user.into(),
        }
    }

    fn inbound(&self, kind: InboundKind) -> Inbound {
        Inbound {
            channel: CLI.to_owned(),
            conversation: CLI.to_owned(),
            session_key: CLI.to_owned(),
            user: self.user.clone(),
            kind,
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> CliReplier<W> {
    /// Writes `out`'s text on a line of its own.
    pub async fn send(&self, out: &Outbound) -> Result<(), ChannelError> {
        self.line(&out.text).await
    }

    /// Writes `text` on a line of its own.
    async fn line(&self, text: &str) -> Result<(), ChannelError> {
        let mut out = self.out.lock().await;
        let lead = if out.at_line_start { "" } else { "\n" };
        let text = format!("{lead}{}\n", text.trim_end_matches('\n'));
        out.at_line_start = true;
        write(&mut out.w, &text).await
    }

    /// Continues the current line with `text`.
    async fn more(&self, text: &str) -> Result<(), ChannelError> {
        if text.is_empty() {
            return Ok(());
        }
        let mut out = self.out.lock().await;
        out.at_line_start = text.ends_with('\n');
        write(&mut out.w, text).await
    }

    async fn line_logged(&self, text: &str) {
        if let Err(e) = self.line(text).await {
            tracing::warn!(error = %e, "cli: cannot write the answer");
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, text: &str) -> Result<(), ChannelError> {
    let res = async {
        w.write_all(text.as_bytes()).await?;
        w.flush().await
    }
    .await;
    res.map_err(|e| ChannelError::Platform {
        channel: CLI,
        message: e.to_string(),
    })
}

#[async_trait]
impl<R, W> ChannelAdapter for CliAdapter<R, W>
where
    R: AsyncBufRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Replier = CliReplier<W>;

    fn name(&self) -> &'static str {
        CLI
    }

    fn replier(&self) -> Self::Replier {
        self.out.clone()
    }

    async fn run(
        &self,
        handler: Arc<dyn InboundHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), ChannelError> {
        let Some(input) = self.input.lock().await.take() else {
            return Err(ChannelError::InvalidSetting(
                "the CLI adapter's input is already being read".into(),
            ));
        };
        let tracker = TaskTracker::new();
        // Text and `/new`, handled one at a time in order.
        let (queue, mut queued) = mpsc::unbounded_channel::<Inbound>();
        {
            let handler = handler.clone();
            let out = self.out.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                loop {
                    let inbound = tokio::select! {
                        _ = stop.cancelled() => break,
                        i = queued.recv() => match i { Some(i) => i, None => break },
                    };
                    answer(&*handler, inbound, &out).await;
                }
            });
        }
        let mut input = input;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let read = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = input.read_until(b'\n', &mut buf) => r,
            };
            match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cli: cannot read input; no longer reading");
                    break;
                }
            }
            let Ok(line) = std::str::from_utf8(&buf) else {
                self.out.line_logged(NOT_UTF8).await;
                continue;
            };
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            let kind = match command(text) {
                Some("quit") => break,
                Some("new") => InboundKind::NewSession,
                Some("cancel") => InboundKind::Cancel,
                Some("status") => InboundKind::Status,
                Some(_) => {
                    self.out.line_logged(UNKNOWN_COMMAND).await;
                    continue;
                }
                None => InboundKind::Text(text.to_owned()),
            };
            let inbound = self.inbound(kind);
            if matches!(inbound.kind, InboundKind::Cancel | InboundKind::Status) {
                let handler = handler.clone();
                let out = self.out.clone();
                tracker.spawn(async move {
                    let text = handler.handle(inbound, Draft::none()).await;
                    out.line_logged(&text).await;
                });
            } else if queue.send(inbound).is_err() {
                break;
            }
        }
        drop(queue);
        tracker.close();
        tokio::select! {
            _ = tracker.wait() => {}
            _ = shutdown.cancelled() => {}
        }
        Ok(())
    }
}

/// Handles one queued message, printing the reply as it streams: the new
/// part of the draft as it grows, then the rest of the final text.
async fn answer<W: AsyncWrite + Unpin + Send + 'static>(
    handler: &dyn InboundHandler,
    inbound: Inbound,
    out: &CliReplier<W>,
) {
    let (tx, mut rx) = watch::channel(String::new());
    let printer = {
        let out = out.clone();
        tokio::spawn(async move {
            let mut shown = String::new();
            while rx.changed().await.is_ok() {
                let now = rx.borrow_and_update().clone();
                let res = match now.strip_prefix(shown.as_str()) {
                    Some(rest) => out.more(rest).await,
                    // Started over (a tool round): a fresh line.
                    None => match out.line("").await {
                        Ok(()) => out.more(&now).await,
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = res {
                    tracing::warn!(error = %e, "cli: cannot write the reply so far");
                }
                shown = now;
            }
            shown
        })
    };
    let text = handler.handle(inbound, Draft::new(tx, None)).await;
    let shown = printer.await.unwrap_or_default();
    let res = match text.strip_prefix(shown.as_str()) {
        Some(rest) if !shown.is_empty() => match out.more(rest.trim_end_matches('\n')).await {
            Ok(()) => out.more("\n").await,
            Err(e) => Err(e),
        },
        _ => out.line(&text).await,
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "cli: cannot write the answer");
    }
}

/// The command name of `/cmd ...`, if `text` is a command.
fn command(text: &str) -> Option<&str> {
    text.strip_prefix('/')?.split_whitespace().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_recognised() {
        assert_eq!(command("/quit"), Some("quit"));
        assert_eq!(command("/new please"), Some("new"));
        assert_eq!(command("hello /new"), None);
        assert_eq!(command("/"), None);
    }
}
