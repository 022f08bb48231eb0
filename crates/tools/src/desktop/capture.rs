//! `screen.capture`: a PNG of the whole screen, one monitor or a region,
//! saved in the workspace. The model gets the path, the size and a short
//! description, never the image bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use openpista_proto::ToolDefinition;
use serde::Deserialize;
use serde_json::json;
use x11rb::connection::Connection;
use x11rb::protocol::randr::ConnectionExt as _;
use x11rb::protocol::xproto::{ConnectionExt as _, ImageFormat, ImageOrder, Screen};
use x11rb::rust_connection::RustConnection;

use super::{DesktopConfig, DesktopEnv, RateLimit, blocking, connect};
use crate::files::{confine, write_file};
use crate::{Tool, ToolContext, ToolError, ToolOutput};

const NAME: &str = "screen.capture";

/// `screen.capture` on the display of a [`DesktopEnv`].
#[derive(Debug)]
pub struct ScreenCapture {
    env: DesktopEnv,
    rate: RateLimit,
}

impl ScreenCapture {
    pub fn new(cfg: DesktopConfig, env: DesktopEnv) -> Self {
        Self {
            env,
            rate: RateLimit::per_minute(cfg.captures_per_minute),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: Option<String>,
    monitor: Option<usize>,
    region: Option<Region>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Region {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

/// A rectangle in screen coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x: i32,
    y: i32,
    w: u32,
    h: u32,
}

#[async_trait]
impl Tool for ScreenCapture {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: NAME.to_owned(),
            description: "Take a screenshot of the desktop (the whole screen, one monitor, or a \
                          region) and save it as a PNG in the workspace. Returns the file's path, \
                          its size and a short description; the image itself is not returned."
                .to_owned(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "Where to save the PNG, relative to the workspace (default screenshots/screen-<time>.png)."},
                    "monitor": {"type": "integer", "minimum": 0, "description": "Capture only this monitor (0 is the first)."},
                    "region": {
                        "type": "object",
                        "description": "Capture only this rectangle, in pixels, relative to the monitor if one is given, else to the screen.",
                        "properties": {
                            "x": {"type": "integer", "minimum": 0},
                            "y": {"type": "integer", "minimum": 0},
                            "width": {"type": "integer", "minimum": 1},
                            "height": {"type": "integer", "minimum": 1}
                        },
                        "required": ["x", "y", "width", "height"],
                        "additionalProperties": false
                    }
                },
                "additionalProperties": false
            }),
        }
    }

    async fn call(
        &self,
        args: serde_json::Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let args: Args = crate::parse_args(NAME, args)?;
        let display = self.env.x11_display()?.to_owned();
        let path = args.path.clone().unwrap_or_else(|| {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            format!("screenshots/screen-{ms}.png")
        });
        if !path.to_ascii_lowercase().ends_with(".png") {
            return Err(ToolError::InvalidArguments {
                tool: NAME.to_owned(),
                reason: format!("path {path:?} must end in .png"),
            });
        }
        let target = confine(&ctx.workspace, &path)?;
        self.rate.take("captures")?;
        blocking(move || {
            let shot = grab(&display, args.monitor, args.region)?;
            let png = encode_png(&shot)?;
            write_file(&target, &png, false)?;
            Ok(ToolOutput::ok(format!(
                "saved a {}x{} PNG ({} bytes) to {}: {}",
                shot.width,
                shot.height,
                png.len(),
                target.display(),
                shot.description
            ))
            .with_images(vec![target.path]))
        })
        .await
    }
}

/// Captured pixels, RGB, row by row.
struct Shot {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
    description: String,
}

fn x_error(display: &str, e: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(format!("the X display {display} failed: {e}"))
}

fn grab(display: &str, monitor: Option<usize>, region: Option<Region>) -> Result<Shot, ToolError> {
    let (conn, screen_num) = connect(display)?;
    let screen = conn
        .setup()
        .roots
        .get(screen_num)
        .ok_or_else(|| ToolError::Failed(format!("the X display {display} has no screen")))?
        .clone();
    let whole = Rect {
        x: 0,
        y: 0,
        w: u32::from(screen.width_in_pixels),
        h: u32::from(screen.height_in_pixels),
    };
    let monitors = monitors(&conn, &screen).unwrap_or_else(|| vec![whole]);
    let (base, what) = match monitor {
        None => (whole, format!("the whole screen of display {display}")),
        Some(i) => match monitors.get(i) {
            Some(m) => (*m, format!("monitor {i} of display {display}")),
            None => {
                return Err(ToolError::InvalidArguments {
                    tool: NAME.to_owned(),
                    reason: format!("there is no monitor {i}; {}", list_monitors(&monitors)),
                });
            }
        },
    };
    let (area, what) = match region {
        None => (base, what),
        Some(r) => {
            let inside = u64::from(r.x) + u64::from(r.width) <= u64::from(base.w)
                && u64::from(r.y) + u64::from(r.height) <= u64::from(base.h);
            if !inside {
                return Err(ToolError::InvalidArguments {
                    tool: NAME.to_owned(),
                    reason: format!(
                        "region {}x{} at ({}, {}) does not fit in {what} ({}x{})",
                        r.width, r.height, r.x, r.y, base.w, base.h
                    ),
                });
            }
            (
                Rect {
                    x: base.x + r.x as i32,
                    y: base.y + r.y as i32,
                    w: r.width,
                    h: r.height,
                },
                format!("a region of {what}"),
            )
        }
    };
    let rgb = get_rgb(&conn, &screen, area).map_err(|e| x_error(display, e))?;
    Ok(Shot {
        width: area.w,
        height: area.h,
        rgb,
        description: format!(
            "{what}, {}x{} at ({}, {}); {}",
            area.w,
            area.h,
            area.x,
            area.y,
            list_monitors(&monitors)
        ),
    })
}

fn list_monitors(monitors: &[Rect]) -> String {
    let list: Vec<String> = monitors
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{i}: {}x{} at ({}, {})", m.w, m.h, m.x, m.y))
        .collect();
    format!("monitors: {}", list.join(", "))
}

/// The active monitors through RandR 1.5, or `None` when the server lacks it.
fn monitors(conn: &RustConnection, screen: &Screen) -> Option<Vec<Rect>> {
    conn.randr_query_version(1, 5).ok()?.reply().ok()?;
    let reply = conn
        .randr_get_monitors(screen.root, true)
        .ok()?
        .reply()
        .ok()?;
    let list: Vec<Rect> = reply
        .monitors
        .iter()
        .map(|m| Rect {
            x: i32::from(m.x),
            y: i32::from(m.y),
            w: u32::from(m.width),
            h: u32::from(m.height),
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

/// Reads `area` of the root window and converts it to RGB using the
/// server's pixmap format and the root visual's colour masks.
fn get_rgb(conn: &RustConnection, screen: &Screen, area: Rect) -> Result<Vec<u8>, String> {
    let (Ok(x), Ok(y), Ok(w), Ok(h)) = (
        i16::try_from(area.x),
        i16::try_from(area.y),
        u16::try_from(area.w),
        u16::try_from(area.h),
    ) else {
        return Err("the area is larger than X11 allows".to_owned());
    };
    let reply = conn
        .get_image(ImageFormat::Z_PIXMAP, screen.root, x, y, w, h, !0)
        .map_err(|e| e.to_string())?
        .reply()
        .map_err(|e| e.to_string())?;
    let setup = conn.setup();
    let format = setup
        .pixmap_formats
        .iter()
        .find(|f| f.depth == reply.depth)
        .ok_or_else(|| format!("no pixmap format for depth {}", reply.depth))?;
    let visual = screen
        .allowed_depths
        .iter()
        .flat_map(|d| d.visuals.iter())
        .find(|v| v.visual_id == screen.root_visual)
        .ok_or("the root visual is not listed")?;
    let bpp = usize::from(format.bits_per_pixel);
    if !matches!(bpp, 16 | 24 | 32) {
        return Err(format!(
            "unsupported pixel format: {bpp} bits per pixel (16, 24 and 32 are supported)"
        ));
    }
    let bytes_pp = bpp / 8;
    let pad = usize::from(format.scanline_pad).max(8);
    let stride = (usize::from(w) * bpp).div_ceil(pad) * pad / 8;
    let need = stride * usize::from(h);
    if reply.data.len() < need {
        return Err(format!(
            "the server sent {} bytes of image, {need} were expected",
            reply.data.len()
        ));
    }
    let lsb = setup.image_byte_order == ImageOrder::LSB_FIRST;
    let channels = [visual.red_mask, visual.green_mask, visual.blue_mask].map(Channel::new);
    let mut rgb = Vec::with_capacity(usize::from(w) * usize::from(h) * 3);
    for row in reply.data.chunks(stride).take(usize::from(h)) {
        for px in row.chunks_exact(bytes_pp).take(usize::from(w)) {
            let mut value: u32 = 0;
            for (i, b) in px.iter().enumerate() {
                let shift = if lsb { i } else { bytes_pp - 1 - i };
                value |= u32::from(*b) << (8 * shift);
            }
            for c in &channels {
                rgb.push(c.read(value));
            }
        }
    }
    Ok(rgb)
}

/// One colour channel of a TrueColor visual.
#[derive(Debug, Clone, Copy)]
struct Channel {
    mask: u32,
    shift: u32,
    max: u32,
}

impl Channel {
    fn new(mask: u32) -> Self {
        let shift = if mask == 0 { 0 } else { mask.trailing_zeros() };
        Self {
            mask,
            shift,
            max: mask.checked_shr(shift).unwrap_or(0),
        }
    }

    fn read(&self, value: u32) -> u8 {
        if self.max == 0 {
            return 0;
        }
        let v = (value & self.mask) >> self.shift;
        ((u64::from(v) * 255 + u64::from(self.max) / 2) / u64::from(self.max)) as u8
    }
}

fn encode_png(shot: &Shot) -> Result<Vec<u8>, ToolError> {
    let fail = |e: png::EncodingError| ToolError::Failed(format!("cannot encode the PNG: {e}"));
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, shot.width, shot.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(fail)?;
        writer.write_image_data(&shot.rgb).map_err(fail)?;
        writer.finish().map_err(fail)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_scale_masks_to_eight_bits() {
        let red = Channel::new(0x00ff_0000);
        assert_eq!(red.read(0x00ab_cdef), 0xab);
        let five = Channel::new(0xf800); // RGB565 red
        assert_eq!(five.read(0xf800), 255);
        assert_eq!(five.read(0), 0);
        assert_eq!(Channel::new(0).read(0xffff_ffff), 0);
    }
}
