//! Desktop tools: `screen.capture` (a PNG of the screen, one monitor or a
//! region, saved in the workspace) and `input.control` (move, click, type,
//! press keys, scroll).
//!
//! Both are off by default and enabled one by one under `[tools.desktop]`.
//! They speak X11 only: capture through `x11rb` (GetImage on the root window,
//! RandR for monitors), input through `enigo`'s x11rb backend (XTEST). A
//! Wayland-only session, a missing `DISPLAY` or an X server that refuses us
//! is answered with a clear error, never a panic.
//!
//! The display comes from [`DesktopEnv`], which the caller fills (the `cli`
//! crate reads `DISPLAY` and `WAYLAND_DISPLAY`); this crate never reads the
//! environment itself. The X libraries are behind the `desktop` cargo feature.

#[cfg(feature = "desktop")]
mod capture;
#[cfg(feature = "desktop")]
mod input;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[cfg(feature = "desktop")]
pub use capture::ScreenCapture;
#[cfg(feature = "desktop")]
pub use input::InputControl;

use crate::{Tool, ToolError};

/// `[tools.desktop]`: which desktop tools exist and how fast they may act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DesktopConfig {
    /// Register `screen.capture`.
    pub screen_capture: bool,
    /// Register `input.control` (a mutating tool: it acts as the user).
    pub input_control: bool,
    /// `screen.capture` calls allowed in any 60-second window.
    pub captures_per_minute: u32,
    /// `input.control` actions allowed in any 60-second window.
    pub input_actions_per_minute: u32,
    /// Characters one `type` action may send.
    pub max_text_chars: usize,
}

impl Default for DesktopConfig {
    fn default() -> Self {
        Self {
            screen_capture: false,
            input_control: false,
            captures_per_minute: 30,
            input_actions_per_minute: 120,
            max_text_chars: 200,
        }
    }
}

/// Where the desktop is, as read from the environment by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesktopEnv {
    /// `DISPLAY`, e.g. `:0`.
    pub display: Option<String>,
    /// `WAYLAND_DISPLAY`, only used to explain why there is no X display.
    pub wayland_display: Option<String>,
}

impl DesktopEnv {
    /// The X display to use, or the clear error why there is none.
    pub fn x11_display(&self) -> Result<&str, ToolError> {
        match (self.display.as_deref(), self.wayland_display.as_deref()) {
            (Some(d), _) if !d.trim().is_empty() => Ok(d),
            (_, Some(w)) if !w.trim().is_empty() => Err(ToolError::Failed(format!(
                "unsupported backend: this is a Wayland-only session (WAYLAND_DISPLAY={w}) \
                 and DISPLAY is not set; the desktop tools speak X11 only (run under Xwayland \
                 with DISPLAY set, or an X11 session)"
            ))),
            _ => Err(ToolError::Failed(
                "no display: DISPLAY is not set, so there is no X server to capture or control \
                 (start openpista from a graphical session, or set DISPLAY, e.g. DISPLAY=:0)"
                    .to_owned(),
            )),
        }
    }
}

/// The desktop tools `cfg` enables, on the display in `env`.
#[cfg(feature = "desktop")]
pub fn desktop_tools(cfg: DesktopConfig, env: DesktopEnv) -> Vec<Arc<dyn Tool>> {
    let mut tools: Vec<Arc<dyn Tool>> = Vec::new();
    if cfg.screen_capture {
        tools.push(Arc::new(ScreenCapture::new(cfg, env.clone())));
    }
    if cfg.input_control {
        tools.push(Arc::new(InputControl::new(cfg, env)));
    }
    tools
}

/// Without the `desktop` feature: an error if the config enables a tool.
#[cfg(not(feature = "desktop"))]
pub fn desktop_tools(cfg: DesktopConfig, _env: DesktopEnv) -> Vec<Arc<dyn Tool>> {
    if cfg.screen_capture || cfg.input_control {
        tracing::warn!(
            "[tools.desktop] enables a desktop tool, but this build has no `desktop` feature"
        );
    }
    Vec::new()
}

/// At most `max` events in any window of `window`: a sliding log of the
/// recent events' times.
/// Only the desktop tools use it; its unit test runs without the feature too.
#[derive(Debug)]
#[cfg_attr(not(feature = "desktop"), allow(dead_code))]
pub(crate) struct RateLimit {
    max: u32,
    window: Duration,
    recent: Mutex<VecDeque<Instant>>,
}

#[cfg_attr(not(feature = "desktop"), allow(dead_code))]
impl RateLimit {
    pub(crate) fn per_minute(max: u32) -> Self {
        Self {
            max,
            window: Duration::from_secs(60),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// Takes one slot, or says when the next one frees up.
    pub(crate) fn take(&self, what: &str) -> Result<(), ToolError> {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            recent.pop_front();
        }
        if recent.len() >= self.max as usize {
            let wait = recent
                .front()
                .map(|t| self.window.saturating_sub(now.duration_since(*t)))
                .unwrap_or(self.window);
            return Err(ToolError::Denied(format!(
                "rate limit: at most {} {what} per minute ([tools.desktop]); try again in {} s",
                self.max,
                wait.as_secs() + 1
            )));
        }
        recent.push_back(now);
        Ok(())
    }
}

/// Opens an X connection, turning each failure into a clear error.
#[cfg(feature = "desktop")]
pub(crate) fn connect(
    display: &str,
) -> Result<(x11rb::rust_connection::RustConnection, usize), ToolError> {
    use x11rb::errors::ConnectError;
    check_display_name(display)?;
    x11rb::connect(Some(display)).map_err(|e| match e {
        ConnectError::SetupAuthenticate(a) => ToolError::Failed(format!(
            "no permission: the X server on {display} refused us ({}); check XAUTHORITY or `xhost`",
            String::from_utf8_lossy(&a.reason).trim()
        )),
        ConnectError::SetupFailed(f) => ToolError::Failed(format!(
            "no permission: the X server on {display} refused the connection ({}); check \
             XAUTHORITY or `xhost`",
            String::from_utf8_lossy(&f.reason).trim()
        )),
        ConnectError::DisplayParsingError(p) => {
            ToolError::Failed(format!("the display name {display:?} is not valid: {p}"))
        }
        ConnectError::IoError(io) => ToolError::Failed(format!(
            "cannot reach the X display {display}: {io} (is an X server running there?)"
        )),
        other => ToolError::Failed(format!(
            "cannot connect to the X display {display}: {other}"
        )),
    })
}

/// Refuses display numbers whose TCP port (6000 + n) would not fit in 16
/// bits: x11rb 0.13 panics on them.
#[cfg(feature = "desktop")]
fn check_display_name(display: &str) -> Result<(), ToolError> {
    let number = display
        .rsplit_once(':')
        .map(|(_, n)| n.split('.').next().unwrap_or_default());
    match number.map(str::parse::<u32>) {
        Some(Ok(n)) if n <= u32::from(u16::MAX) - 6000 => Ok(()),
        _ => Err(ToolError::Failed(format!(
            "the display name {display:?} is not valid (expected e.g. :0 or host:0.0)"
        ))),
    }
}

/// Runs blocking X work off the async runtime.
#[cfg(feature = "desktop")]
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ToolError::Failed(format!("the desktop task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_display_and_wayland_only_are_explained() {
        let none = DesktopEnv::default();
        let e = none.x11_display().unwrap_err().to_string();
        assert!(e.contains("no display") && e.contains("DISPLAY"), "{e}");
        let wayland = DesktopEnv {
            display: None,
            wayland_display: Some("wayland-0".into()),
        };
        let e = wayland.x11_display().unwrap_err().to_string();
        assert!(e.contains("Wayland-only") && e.contains("X11"), "{e}");
        let x = DesktopEnv {
            display: Some(":3".into()),
            wayland_display: Some("wayland-0".into()),
        };
        assert_eq!(x.x11_display().unwrap(), ":3");
    }

    #[test]
    fn rate_limit_refuses_past_the_budget() {
        let rl = RateLimit::per_minute(2);
        rl.take("actions").unwrap();
        rl.take("actions").unwrap();
        let e = rl.take("actions").unwrap_err();
        assert!(matches!(e, ToolError::Denied(_)));
        assert!(
            e.to_string().contains("at most 2 actions per minute"),
            "{e}"
        );
    }
}
