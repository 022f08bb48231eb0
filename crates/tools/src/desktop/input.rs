//! `input.control`: one mouse or keyboard action per call, through enigo's
//! x11rb (XTEST) backend. It acts as the user, so it is a mutating tool; its
//! rate is bounded by `[tools.desktop]`, and each call (one action) is
//! audited by the agent like every tool call.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use enigo::{Axis, Button, Coordinate, Direction, Enigo, Key, Keyboard, Mouse, Settings};
use openpista_proto::ToolDefinition;
use serde::Deserialize;
use serde_json::json;
use x11rb::connection::Connection;

use super::{DesktopConfig, DesktopEnv, RateLimit, blocking, connect};
use crate::{Tool, ToolContext, ToolError, ToolOutput};

const NAME: &str = "input.control";

/// `input.control` on the display of a [`DesktopEnv`].
pub struct InputControl {
    env: DesktopEnv,
    max_text_chars: usize,
    rate: RateLimit,
    /// One enigo connection kept between calls: characters missing from the
    /// keymap are typed through keycodes enigo maps for them, and keeping the
    /// connection keeps those mappings while the application reads the keys.
    /// Dropped after a failure, so the next call reconnects.
    enigo: Arc<Mutex<Option<Enigo>>>,
}

impl std::fmt::Debug for InputControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputControl")
            .field("env", &self.env)
            .field("max_text_chars", &self.max_text_chars)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl InputControl {
    pub fn new(cfg: DesktopConfig, env: DesktopEnv) -> Self {
        Self {
            env,
            max_text_chars: cfg.max_text_chars,
            rate: RateLimit::per_minute(cfg.input_actions_per_minute),
            enigo: Arc::new(Mutex::new(None)),
        }
    }
}

/// One action, as the model asks for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
enum Action {
    Move {
        x: u32,
        y: u32,
    },
    Click {
        x: Option<u32>,
        y: Option<u32>,
        #[serde(default)]
        button: MouseButton,
        #[serde(default = "one")]
        count: u8,
    },
    Type {
        text: String,
    },
    Key {
        keys: String,
    },
    Scroll {
        x: Option<u32>,
        y: Option<u32>,
        amount: i32,
        #[serde(default)]
        horizontal: bool,
    },
}

fn one() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MouseButton {
    #[default]
    Left,
    Middle,
    Right,
}

#[async_trait]
impl Tool for InputControl {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: NAME.to_owned(),
            description: format!(
                "Control the desktop's mouse and keyboard, one action per call: \
                 move (x, y), click (optional x, y; button left|middle|right; count 1-3), \
                 type (text, at most {} characters), key (a key or combination such as \
                 \"Return\", \"ctrl+c\", \"alt+F4\"), scroll (amount: positive is down or right; \
                 optional x, y; horizontal). Coordinates are screen pixels from the top-left.",
                self.max_text_chars
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "action": {"type": "string", "enum": ["move", "click", "type", "key", "scroll"]},
                    "x": {"type": "integer", "minimum": 0},
                    "y": {"type": "integer", "minimum": 0},
                    "button": {"type": "string", "enum": ["left", "middle", "right"]},
                    "count": {"type": "integer", "minimum": 1, "maximum": 3},
                    "text": {"type": "string"},
                    "keys": {"type": "string", "minLength": 1, "maxLength": 100},
                    "amount": {"type": "integer", "minimum": -50, "maximum": 50},
                    "horizontal": {"type": "boolean"}
                },
                "required": ["action"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(
        &self,
        args: serde_json::Value,
        _ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let invalid = |reason: String| ToolError::InvalidArguments {
            tool: NAME.to_owned(),
            reason,
        };
        let action: Action = serde_json::from_value(args).map_err(|e| invalid(e.to_string()))?;
        let keys = match &action {
            Action::Type { text } => {
                let n = text.chars().count();
                if n > self.max_text_chars {
                    return Err(invalid(format!(
                        "text is {n} characters; at most {} may be typed per call",
                        self.max_text_chars
                    )));
                }
                if text.contains('\0') {
                    return Err(invalid("text contains a NUL character".to_owned()));
                }
                Vec::new()
            }
            Action::Key { keys } => parse_keys(keys).map_err(invalid)?,
            Action::Click { x, y, .. } | Action::Scroll { x, y, .. }
                if x.is_some() != y.is_some() =>
            {
                return Err(invalid("give both x and y, or neither".to_owned()));
            }
            _ => Vec::new(),
        };
        let display = self.env.x11_display()?.to_owned();
        self.rate.take("input actions")?;
        let enigo = self.enigo.clone();
        blocking(move || {
            let mut slot = enigo.lock().unwrap_or_else(|p| p.into_inner());
            let done = perform(&display, &mut slot, action, keys);
            if done.is_err() {
                *slot = None;
            }
            done
        })
        .await
    }
}

fn perform(
    display: &str,
    slot: &mut Option<Enigo>,
    action: Action,
    keys: Vec<Key>,
) -> Result<ToolOutput, ToolError> {
    // Our own connection first: it gives the clear errors and the screen
    // size. It stays open until the action is done: an X server with no
    // client left resets, which would cut enigo's connection as it opens.
    let (conn, screen_num) = connect(display)?;
    let (width, height) = match conn.setup().roots.get(screen_num) {
        Some(screen) => (
            u32::from(screen.width_in_pixels),
            u32::from(screen.height_in_pixels),
        ),
        None => {
            return Err(ToolError::Failed(format!(
                "the X display {display} has no screen"
            )));
        }
    };
    let check = |x: u32, y: u32| -> Result<(i32, i32), ToolError> {
        if x >= width || y >= height {
            return Err(ToolError::InvalidArguments {
                tool: NAME.to_owned(),
                reason: format!("({x}, {y}) is off the screen, which is {width}x{height}"),
            });
        }
        Ok((x as i32, y as i32))
    };
    let enigo = match slot {
        Some(e) => e,
        None => {
            let settings = Settings {
                x11_display: Some(display.to_owned()),
                ..Settings::default()
            };
            let e = Enigo::new(&settings).map_err(|e| {
                ToolError::Failed(format!(
                    "cannot control input on the X display {display}: {e} (the XTEST extension \
                     is needed)"
                ))
            })?;
            slot.insert(e)
        }
    };
    let fail = |e: enigo::InputError| ToolError::Failed(format!("the input action failed: {e}"));
    let done = match action {
        Action::Move { x, y } => {
            let (x, y) = check(x, y)?;
            enigo.move_mouse(x, y, Coordinate::Abs).map_err(fail)?;
            format!("moved the pointer to ({x}, {y})")
        }
        Action::Click {
            x,
            y,
            button,
            count,
        } => {
            let at = match (x, y) {
                (Some(x), Some(y)) => {
                    let (x, y) = check(x, y)?;
                    enigo.move_mouse(x, y, Coordinate::Abs).map_err(fail)?;
                    format!(" at ({x}, {y})")
                }
                _ => " at the pointer".to_owned(),
            };
            let b = match button {
                MouseButton::Left => Button::Left,
                MouseButton::Middle => Button::Middle,
                MouseButton::Right => Button::Right,
            };
            let count = count.clamp(1, 3);
            for _ in 0..count {
                enigo.button(b, Direction::Click).map_err(fail)?;
            }
            let name = format!("{button:?}").to_ascii_lowercase();
            let times = if count == 1 {
                String::new()
            } else {
                format!(" {count} times")
            };
            format!("clicked {name}{times}{at}")
        }
        Action::Type { text } => {
            enigo.text(&text).map_err(fail)?;
            format!("typed {} characters", text.chars().count())
        }
        Action::Key { keys: combo } => {
            let (mods, last) = keys.split_at(keys.len().saturating_sub(1));
            for m in mods {
                enigo.key(*m, Direction::Press).map_err(fail)?;
            }
            let pressed = last
                .first()
                .map(|k| enigo.key(*k, Direction::Click))
                .unwrap_or(Ok(()));
            // Release the modifiers even when the key failed.
            for m in mods.iter().rev() {
                enigo.key(*m, Direction::Release).map_err(fail)?;
            }
            pressed.map_err(fail)?;
            format!("pressed {combo}")
        }
        Action::Scroll {
            x,
            y,
            amount,
            horizontal,
        } => {
            if let (Some(x), Some(y)) = (x, y) {
                let (x, y) = check(x, y)?;
                enigo.move_mouse(x, y, Coordinate::Abs).map_err(fail)?;
            }
            let axis = if horizontal {
                Axis::Horizontal
            } else {
                Axis::Vertical
            };
            enigo.scroll(amount, axis).map_err(fail)?;
            let dir = match (horizontal, amount >= 0) {
                (false, true) => "down",
                (false, false) => "up",
                (true, true) => "right",
                (true, false) => "left",
            };
            format!("scrolled {dir} by {}", amount.unsigned_abs())
        }
    };
    // enigo buffers its requests; a round trip sends them and waits until the
    // server has acted on them, before the connection closes on drop.
    enigo.location().map_err(fail)?;
    drop(conn);
    Ok(ToolOutput::ok(done))
}

/// Parses `"ctrl+shift+t"` into modifiers followed by one key.
fn parse_keys(combo: &str) -> Result<Vec<Key>, String> {
    let parts: Vec<&str> = combo.split('+').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        // "+" alone or "ctrl++" means the plus key.
        if combo.trim() == "+" {
            return Ok(vec![Key::Unicode('+')]);
        }
        return Err(format!("{combo:?} has an empty key name"));
    }
    parts.iter().map(|p| key_named(p)).collect()
}

fn key_named(name: &str) -> Result<Key, String> {
    let mut chars = name.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        return Ok(Key::Unicode(c));
    }
    let lower = name.to_ascii_lowercase();
    let key = match lower.as_str() {
        "ctrl" | "control" => Key::Control,
        "shift" => Key::Shift,
        "alt" => Key::Alt,
        "super" | "meta" | "win" | "cmd" => Key::Meta,
        "return" | "enter" => Key::Return,
        "tab" => Key::Tab,
        "escape" | "esc" => Key::Escape,
        "backspace" => Key::Backspace,
        "delete" | "del" => Key::Delete,
        "home" => Key::Home,
        "end" => Key::End,
        "pageup" | "page_up" => Key::PageUp,
        "pagedown" | "page_down" => Key::PageDown,
        "up" => Key::UpArrow,
        "down" => Key::DownArrow,
        "left" => Key::LeftArrow,
        "right" => Key::RightArrow,
        "space" => Key::Space,
        "f1" => Key::F1,
        "f2" => Key::F2,
        "f3" => Key::F3,
        "f4" => Key::F4,
        "f5" => Key::F5,
        "f6" => Key::F6,
        "f7" => Key::F7,
        "f8" => Key::F8,
        "f9" => Key::F9,
        "f10" => Key::F10,
        "f11" => Key::F11,
        "f12" => Key::F12,
        _ => {
            return Err(format!(
                "unknown key {name:?}: use a single character or one of ctrl, shift, alt, super, \
                 Return, Tab, Escape, BackSpace, Delete, Home, End, PageUp, PageDown, Up, Down, \
                 Left, Right, Space, F1-F12"
            ));
        }
    };
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_combinations_parse_or_explain() {
        assert_eq!(
            parse_keys("ctrl+shift+t").unwrap(),
            vec![Key::Control, Key::Shift, Key::Unicode('t')]
        );
        assert_eq!(parse_keys("Return").unwrap(), vec![Key::Return]);
        assert_eq!(parse_keys("+").unwrap(), vec![Key::Unicode('+')]);
        assert!(parse_keys("ctrl+").unwrap_err().contains("empty key name"));
        assert!(parse_keys("hyper").unwrap_err().contains("unknown key"));
    }
}
