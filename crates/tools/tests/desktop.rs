//! `screen.capture` and `input.control` on a real X server: each test starts
//! its own Xvfb (the server picks a free display number), draws or listens
//! with a window of its own through x11rb, and stops the server at the end.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use common::ctx;
use openpista_proto::ToolOutcome;
use openpista_testkit::xvfb::Xvfb;
use openpista_tools::desktop::{DesktopConfig, DesktopEnv, desktop_tools};
use openpista_tools::{ToolRegistry, ToolResult};
use serde_json::json;
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{
    ChangeWindowAttributesAux, ConnectionExt as _, CreateWindowAux, EventMask, InputFocus,
    KeyButMask, Screen, Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;

trait XvfbExt {
    fn env(&self) -> DesktopEnv;
    fn connect(&self) -> (RustConnection, Screen);
}

impl XvfbExt for Xvfb {
    fn env(&self) -> DesktopEnv {
        DesktopEnv {
            display: Some(self.display().to_owned()),
            wayland_display: None,
        }
    }

    fn connect(&self) -> (RustConnection, Screen) {
        let (conn, n) = x11rb::connect(Some(self.display())).expect("connect to Xvfb");
        let screen = conn.setup().roots[n].clone();
        (conn, screen)
    }
}

fn enabled() -> DesktopConfig {
    DesktopConfig {
        screen_capture: true,
        input_control: true,
        ..DesktopConfig::default()
    }
}

fn registry(cfg: DesktopConfig, env: DesktopEnv) -> ToolRegistry {
    let mut reg = ToolRegistry::new();
    for tool in desktop_tools(cfg, env) {
        reg.register(tool).unwrap();
    }
    reg
}

async fn call(reg: &ToolRegistry, ws: &Path, name: &str, args: serde_json::Value) -> ToolResult {
    reg.call(name, &args.to_string(), &ctx(ws)).await
}

/// A mapped, unmanaged window with a solid background.
fn window(
    conn: &RustConnection,
    screen: &Screen,
    x: i16,
    y: i16,
    w: u16,
    h: u16,
    rgb: u32,
) -> Window {
    let win = conn.generate_id().unwrap();
    conn.create_window(
        screen.root_depth,
        win,
        screen.root,
        x,
        y,
        w,
        h,
        0,
        WindowClass::INPUT_OUTPUT,
        screen.root_visual,
        &CreateWindowAux::new()
            .background_pixel(rgb)
            .override_redirect(1)
            .event_mask(EventMask::KEY_PRESS | EventMask::BUTTON_PRESS),
    )
    .unwrap();
    conn.map_window(win).unwrap();
    win
}

fn sync(conn: &RustConnection) {
    conn.get_input_focus().unwrap().reply().unwrap();
}

fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn pixel(img: &(u32, u32, Vec<u8>), x: u32, y: u32) -> [u8; 3] {
    let i = ((y * img.0 + x) * 3) as usize;
    [img.2[i], img.2[i + 1], img.2[i + 2]]
}

const RED: [u8; 3] = [255, 0, 0];
const BLUE: [u8; 3] = [0, 0, 255];
const GREEN: [u8; 3] = [0, 255, 0];

#[tokio::test]
async fn capture_shows_the_screen_and_a_region_as_drawn() {
    let x = Xvfb::start(&[]);
    let (conn, screen) = x.connect();
    conn.change_window_attributes(
        screen.root,
        &ChangeWindowAttributesAux::new().background_pixel(0xff0000),
    )
    .unwrap();
    conn.clear_area(false, screen.root, 0, 0, 0, 0).unwrap();
    window(&conn, &screen, 100, 50, 80, 60, 0x0000ff);
    window(&conn, &screen, 300, 200, 40, 40, 0x00ff00);
    sync(&conn);

    let ws = tempfile::tempdir().unwrap();
    let reg = registry(enabled(), x.env());

    let r = call(
        &reg,
        ws.path(),
        "screen.capture",
        json!({"path": "shots/full.png"}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("640x480"), "{}", r.content);
    assert!(r.content.contains("shots/full.png"), "{}", r.content);
    assert!(r.content.contains("whole screen"), "{}", r.content);
    let bytes = std::fs::metadata(ws.path().join("shots/full.png"))
        .unwrap()
        .len();
    assert!(
        r.content.contains(&format!("({bytes} bytes)")),
        "{}",
        r.content
    );
    // The image stays in the file: the model gets a short line.
    assert!(r.content.len() < 400, "{}", r.content);
    let full = decode_png(&ws.path().join("shots/full.png"));
    assert_eq!((full.0, full.1), (640, 480));
    assert_eq!(pixel(&full, 5, 5), RED);
    assert_eq!(pixel(&full, 639, 479), RED);
    assert_eq!(pixel(&full, 100, 50), BLUE);
    assert_eq!(pixel(&full, 179, 109), BLUE);
    assert_eq!(pixel(&full, 180, 110), RED);
    assert_eq!(pixel(&full, 320, 220), GREEN);

    // A region straddling the blue window's top-left corner.
    let r = call(
        &reg,
        ws.path(),
        "screen.capture",
        json!({"path": "region.png", "region": {"x": 90, "y": 40, "width": 30, "height": 20}}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(r.content.contains("30x20"), "{}", r.content);
    let region = decode_png(&ws.path().join("region.png"));
    assert_eq!((region.0, region.1), (30, 20));
    assert_eq!(pixel(&region, 9, 9), RED);
    assert_eq!(pixel(&region, 10, 10), BLUE);
    assert_eq!(pixel(&region, 29, 19), BLUE);
    assert_eq!(pixel(&region, 0, 19), RED);

    // Monitor 0 of a one-monitor Xvfb is the whole screen; a default path is made.
    let r = call(&reg, ws.path(), "screen.capture", json!({"monitor": 0})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(
        r.content.contains("monitor 0") && r.content.contains("screenshots/"),
        "{}",
        r.content
    );
    let r = call(&reg, ws.path(), "screen.capture", json!({"monitor": 3})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(
        r.content.contains("no monitor 3") && r.content.contains("640x480"),
        "{}",
        r.content
    );

    // Off-screen regions, paths outside the workspace and non-PNG names are refused.
    let r = call(
        &reg,
        ws.path(),
        "screen.capture",
        json!({"region": {"x": 600, "y": 0, "width": 100, "height": 10}}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(r.content.contains("does not fit"), "{}", r.content);
    let r = call(
        &reg,
        ws.path(),
        "screen.capture",
        json!({"path": "../out.png"}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{}", r.content);
    let r = call(
        &reg,
        ws.path(),
        "screen.capture",
        json!({"path": "/tmp/out.png"}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{}", r.content);
    let r = call(&reg, ws.path(), "screen.capture", json!({"path": "a.txt"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
}

#[tokio::test]
async fn capture_of_one_monitor_shows_that_monitor() {
    use x11rb::protocol::randr::{ConnectionExt as _, MonitorInfo};
    let x = Xvfb::start(&[]);
    let (conn, screen) = x.connect();
    conn.change_window_attributes(
        screen.root,
        &ChangeWindowAttributesAux::new().background_pixel(0xff0000),
    )
    .unwrap();
    conn.clear_area(false, screen.root, 0, 0, 0, 0).unwrap();
    window(&conn, &screen, 300, 200, 40, 40, 0x00ff00);
    // A second monitor: the right half of the screen.
    conn.randr_query_version(1, 5).unwrap().reply().unwrap();
    let name = conn
        .intern_atom(false, b"RIGHT-HALF")
        .unwrap()
        .reply()
        .unwrap()
        .atom;
    conn.randr_set_monitor(
        screen.root,
        MonitorInfo {
            name,
            primary: false,
            automatic: false,
            x: 320,
            y: 0,
            width: 320,
            height: 480,
            width_in_millimeters: 80,
            height_in_millimeters: 120,
            outputs: Vec::new(),
        },
    )
    .unwrap();
    sync(&conn);

    let ws = tempfile::tempdir().unwrap();
    let reg = registry(enabled(), x.env());
    // Find the monitor by its place in the list the tool reports.
    let r = call(&reg, ws.path(), "screen.capture", json!({"monitor": 9})).await;
    assert!(r.content.contains("320x480 at (320, 0)"), "{}", r.content);
    let index = (0..9)
        .find(|i| r.content.contains(&format!("{i}: 320x480 at (320, 0)")))
        .expect("the right-half monitor is listed");

    let r = call(
        &reg,
        ws.path(),
        "screen.capture",
        json!({"monitor": index, "path": "right.png"}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert!(
        r.content.contains(&format!("monitor {index}")),
        "{}",
        r.content
    );
    let right = decode_png(&ws.path().join("right.png"));
    assert_eq!((right.0, right.1), (320, 480));
    assert_eq!(pixel(&right, 0, 0), RED);
    // The green square spans screen x 300..340: local x 0..20.
    assert_eq!(pixel(&right, 0, 210), GREEN);
    assert_eq!(pixel(&right, 19, 239), GREEN);
    assert_eq!(pixel(&right, 20, 210), RED);

    // A region is relative to the monitor.
    let r = call(
        &reg,
        ws.path(),
        "screen.capture",
        json!({"monitor": index, "path": "corner.png", "region": {"x": 10, "y": 230, "width": 20, "height": 20}}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    let corner = decode_png(&ws.path().join("corner.png"));
    assert_eq!(pixel(&corner, 0, 0), GREEN);
    assert_eq!(pixel(&corner, 9, 9), GREEN);
    assert_eq!(pixel(&corner, 10, 10), RED);
}

/// What the listening window saw.
#[derive(Debug, PartialEq)]
enum Seen {
    Char(char),
    Button { button: u8, x: i16, y: i16 },
}

/// A window covering (50, 50)-(450, 350) that has the keyboard focus and
/// reports the characters typed into it (decoded with the server's current
/// keymap) and the buttons pressed on it.
fn listening_window(display: String) -> (mpsc::Receiver<Seen>, Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let (conn, n) = x11rb::connect(Some(&display)).unwrap();
        let screen = conn.setup().roots[n].clone();
        let win = window(&conn, &screen, 50, 50, 400, 300, 0xffffff);
        sync(&conn);
        conn.set_input_focus(InputFocus::PARENT, win, x11rb::CURRENT_TIME)
            .unwrap();
        let min = conn.setup().min_keycode;
        let count = conn.setup().max_keycode - min + 1;
        let load = |conn: &RustConnection| {
            conn.get_keyboard_mapping(min, count)
                .unwrap()
                .reply()
                .unwrap()
        };
        let mut map = load(&conn);
        sync(&conn);
        ready_tx.send(()).unwrap();
        while !stop2.load(Ordering::Relaxed) {
            let Some(event) = conn.poll_for_event().unwrap() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            match event {
                Event::MappingNotify(_) => map = load(&conn),
                Event::KeyPress(k) => {
                    let per = usize::from(map.keysyms_per_keycode);
                    let base = usize::from(k.detail - min) * per;
                    let shift = k.state.contains(KeyButMask::SHIFT);
                    let plain = map.keysyms.get(base).copied().unwrap_or(0);
                    let shifted = map.keysyms.get(base + 1).copied().unwrap_or(0);
                    let sym = if shift && shifted != 0 {
                        shifted
                    } else {
                        plain
                    };
                    let c = match sym {
                        0xff0d => Some('\n'),
                        0x20..=0x7e | 0xa0..=0xff => char::from_u32(sym),
                        s if s & 0xff00_0000 == 0x0100_0000 => char::from_u32(s & 0x00ff_ffff),
                        _ => None, // modifiers and other keys
                    };
                    if let Some(c) = c {
                        let _ = tx.send(Seen::Char(c));
                    }
                }
                Event::ButtonPress(b) => {
                    let _ = tx.send(Seen::Button {
                        button: b.detail,
                        x: b.root_x,
                        y: b.root_y,
                    });
                }
                _ => {}
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the listening window did not come up");
    (rx, stop)
}

fn next(rx: &mpsc::Receiver<Seen>) -> Seen {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the window saw nothing within 30 s")
}

fn typed(rx: &mpsc::Receiver<Seen>, n: usize) -> String {
    (0..n)
        .map(|_| match next(rx) {
            Seen::Char(c) => c,
            other => panic!("expected a character, saw {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn input_types_into_a_window_and_clicks_where_asked() {
    let x = Xvfb::start(&[]);
    let (rx, stop) = listening_window(x.display().to_owned());
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(enabled(), x.env());
    let act = |args: serde_json::Value| call(&reg, ws.path(), "input.control", args);

    let r = act(json!({"action": "type", "text": "hello world 42"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(r.content, "typed 14 characters");
    assert_eq!(typed(&rx, 14), "hello world 42");

    let r = act(json!({"action": "type", "text": "Hi!"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(typed(&rx, 3), "Hi!");

    let r = act(json!({"action": "key", "keys": "Return"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(r.content, "pressed Return");
    assert_eq!(typed(&rx, 1), "\n");
    let r = act(json!({"action": "key", "keys": "shift+q"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(typed(&rx, 1), "Q");

    let r = act(json!({"action": "click", "x": 120, "y": 90})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(r.content, "clicked left at (120, 90)");
    assert_eq!(
        next(&rx),
        Seen::Button {
            button: 1,
            x: 120,
            y: 90
        }
    );
    let r = act(json!({"action": "click", "x": 400, "y": 300, "button": "right"})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(
        next(&rx),
        Seen::Button {
            button: 3,
            x: 400,
            y: 300
        }
    );

    let r = act(json!({"action": "scroll", "x": 200, "y": 200, "amount": 2})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    assert_eq!(r.content, "scrolled down by 2");
    assert_eq!(
        next(&rx),
        Seen::Button {
            button: 5,
            x: 200,
            y: 200
        }
    );
    assert_eq!(
        next(&rx),
        Seen::Button {
            button: 5,
            x: 200,
            y: 200
        }
    );

    let r = act(json!({"action": "move", "x": 10, "y": 470})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    let (conn, screen) = x.connect();
    let p = conn.query_pointer(screen.root).unwrap().reply().unwrap();
    assert_eq!((p.root_x, p.root_y), (10, 470));

    // Bad input is refused before anything happens.
    let r = act(json!({"action": "click", "x": 640, "y": 10})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(r.content.contains("off the screen"), "{}", r.content);
    let r = act(json!({"action": "click", "x": 10})).await;
    assert!(r.content.contains("both x and y"), "{}", r.content);
    let r = act(json!({"action": "key", "keys": "ctrl+hyper"})).await;
    assert!(r.content.contains("unknown key"), "{}", r.content);
    let long = "a".repeat(DesktopConfig::default().max_text_chars + 1);
    let r = act(json!({"action": "type", "text": long})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);
    assert!(r.content.contains("at most 200"), "{}", r.content);
    let r = act(json!({"action": "wave"})).await;
    assert_eq!(r.outcome, ToolOutcome::Error, "{}", r.content);

    // Nothing else reached the window.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.try_recv().ok(), None);
    stop.store(true, Ordering::Relaxed);
}

#[tokio::test]
async fn input_rate_is_bounded_by_config() {
    let x = Xvfb::start(&[]);
    let ws = tempfile::tempdir().unwrap();
    let cfg = DesktopConfig {
        input_actions_per_minute: 2,
        captures_per_minute: 1,
        ..enabled()
    };
    let reg = registry(cfg, x.env());
    for _ in 0..2 {
        let r = call(
            &reg,
            ws.path(),
            "input.control",
            json!({"action": "move", "x": 1, "y": 1}),
        )
        .await;
        assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    }
    let r = call(
        &reg,
        ws.path(),
        "input.control",
        json!({"action": "move", "x": 1, "y": 1}),
    )
    .await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{}", r.content);
    assert!(
        r.content.contains("at most 2 input actions per minute"),
        "{}",
        r.content
    );
    let r = call(&reg, ws.path(), "screen.capture", json!({})).await;
    assert_eq!(r.outcome, ToolOutcome::Ok, "{}", r.content);
    let r = call(&reg, ws.path(), "screen.capture", json!({})).await;
    assert_eq!(r.outcome, ToolOutcome::Denied, "{}", r.content);
    assert!(
        r.content.contains("at most 1 captures per minute"),
        "{}",
        r.content
    );
}

#[tokio::test]
async fn both_tools_are_off_by_default() {
    let x = Xvfb::start(&[]);
    let reg = registry(DesktopConfig::default(), x.env());
    assert!(reg.is_empty(), "{reg:?}");
    let only_capture = registry(
        DesktopConfig {
            screen_capture: true,
            ..DesktopConfig::default()
        },
        x.env(),
    );
    assert!(only_capture.contains("screen.capture") && !only_capture.contains("input.control"));
}

#[tokio::test]
async fn without_a_usable_display_both_tools_say_why() {
    let ws = tempfile::tempdir().unwrap();
    let cases = [
        (DesktopEnv::default(), "no display: DISPLAY is not set"),
        (
            DesktopEnv {
                display: None,
                wayland_display: Some("wayland-0".into()),
            },
            "unsupported backend: this is a Wayland-only session",
        ),
        (
            DesktopEnv {
                display: Some(":59000".into()),
                wayland_display: None,
            },
            "cannot reach the X display :59000",
        ),
        (
            DesktopEnv {
                display: Some(":64999".into()),
                wayland_display: None,
            },
            "the display name \":64999\" is not valid",
        ),
        (
            DesktopEnv {
                display: Some("nonsense".into()),
                wayland_display: None,
            },
            "is not valid",
        ),
    ];
    for (env, want) in cases {
        let reg = registry(enabled(), env);
        for (tool, args) in [
            ("screen.capture", json!({})),
            ("input.control", json!({"action": "move", "x": 1, "y": 1})),
        ] {
            let r = call(&reg, ws.path(), tool, args).await;
            assert_eq!(r.outcome, ToolOutcome::Error, "{tool}: {}", r.content);
            assert!(r.content.contains(want), "{tool}: {}", r.content);
        }
    }
    assert_eq!(std::fs::read_dir(ws.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn an_x_server_that_refuses_us_is_no_permission() {
    // The server knows one cookie, which we do not have.
    let auth = tempfile::NamedTempFile::new().unwrap();
    let made = Command::new("xauth")
        .arg("-f")
        .arg(auth.path())
        .args(["add", ":0", ".", "0123456789abcdef0123456789abcdef"])
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run xauth ({e}): install it with `apt-get install xauth`")
        });
    assert!(made.success());
    let x = Xvfb::start(&["-auth", auth.path().to_str().unwrap()]);
    let ws = tempfile::tempdir().unwrap();
    let reg = registry(enabled(), x.env());
    for (tool, args) in [
        ("screen.capture", json!({})),
        ("input.control", json!({"action": "move", "x": 1, "y": 1})),
    ] {
        let r = call(&reg, ws.path(), tool, args).await;
        assert_eq!(r.outcome, ToolOutcome::Error, "{tool}: {}", r.content);
        assert!(r.content.contains("no permission"), "{tool}: {}", r.content);
    }
}
