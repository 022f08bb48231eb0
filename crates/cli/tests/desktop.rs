//! The desktop tools through the real binary: off by default, registered by
//! `[tools.desktop]`, on the display named by `DISPLAY`, and a clear error
//! when there is none.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use openpista_testkit::xvfb::Xvfb;

fn openpista(home: &Path, args: &[&str], display: Option<&str>) -> common::Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openpista"));
    cmd.args(args)
        .env("OPENPISTA_HOME", home)
        .env_remove("OPENPISTA_WORKSPACE")
        .env_remove("RUST_LOG")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = display {
        cmd.env("DISPLAY", d);
    }
    common::wait_output(cmd.spawn().expect("run openpista"))
}

#[test]
fn desktop_tools_are_off_until_configured_and_use_display() {
    let x = Xvfb::start(&[]);
    let home = tempfile::tempdir().unwrap();

    let out = openpista(home.path(), &["tools", "list"], Some(x.display()));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(!out.stdout.contains("screen.capture"), "{out:#?}");
    assert!(!out.stdout.contains("input.control"), "{out:#?}");

    std::fs::write(
        home.path().join("config.toml"),
        "[tools.desktop]\nscreen_capture = true\ninput_control = true\n",
    )
    .unwrap();
    let out = openpista(home.path(), &["tools", "list"], Some(x.display()));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("screen.capture"), "{out:#?}");
    assert!(out.stdout.contains("input.control"), "{out:#?}");

    let args = r#"{"path":"shot.png","region":{"x":0,"y":0,"width":32,"height":16}}"#;
    let out = openpista(
        home.path(),
        &["tools", "call", "screen.capture", "--args", args],
        Some(x.display()),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("saved a 32x16 PNG"), "{out:#?}");
    let ws = home.path().join("workspace");
    let png = std::fs::read(ws.join("shot.png")).unwrap_or_else(|e| panic!("{e}: {out:#?}"));
    assert_eq!(&png[1..4], b"PNG");

    let out = openpista(
        home.path(),
        &["tools", "call", "screen.capture", "--args", "{}"],
        None,
    );
    assert_ne!(out.code, Some(0), "{out:#?}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("no display: DISPLAY is not set"), "{out:#?}");
}

fn scripted_home(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("replies.toml"),
        "[[reply]]\ntext = \"Moving.\"\ntool_calls = [{ name = \"input.control\", arguments = { action = \"move\", x = 33, y = 44 } }]\n\
         [[reply]]\ntext = \"Done.\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[llm]\nprovider = \"scripted\"\n\n[llm.scripted]\nfile = \"replies.toml\"\n\n\
             [tools.desktop]\ninput_control = true\n{extra}"
        ),
    )
    .unwrap();
    dir
}

/// A client that stays connected, as a desktop session's clients do (an X
/// server with no client left resets, and the pointer with it).
struct Client {
    conn: x11rb::rust_connection::RustConnection,
    root: u32,
}

impl Client {
    fn new(x: &Xvfb) -> Client {
        use x11rb::connection::Connection as _;
        let (conn, n) = x11rb::connect(Some(x.display())).unwrap();
        let root = conn.setup().roots[n].root;
        Client { conn, root }
    }

    fn pointer(&self) -> (i16, i16) {
        use x11rb::protocol::xproto::ConnectionExt as _;
        let p = self.conn.query_pointer(self.root).unwrap().reply().unwrap();
        (p.root_x, p.root_y)
    }
}

/// The audit rows of the `tool_call`s, as JSON.
fn tool_call_audit(home: &Path) -> Vec<serde_json::Value> {
    let out = openpista(home, &["audit", "--json", "--limit", "100"], None);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    rows.into_iter()
        .filter(|r| r["action"] == "tool_call")
        .collect()
}

#[test]
fn input_control_asks_first_and_each_action_is_audited() {
    let x = Xvfb::start(&[]);
    let client = Client::new(&x);
    let start = client.pointer();
    assert_ne!(start, (33, 44));

    // Default [approvals]: a mutating tool asks; no answer means deny.
    let h = scripted_home("");
    let out = openpista(
        h.path(),
        &["run", "-e", "move the mouse"],
        Some(x.display()),
    );
    // Asked on a terminal; with no terminal (or CI set) nobody can answer,
    // which is said and means deny.
    assert!(
        out.stderr.contains("approve input.control") || out.stderr.contains("nobody is asked"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("<- input.control denied"), "{out:#?}");
    assert_eq!(client.pointer(), start, "a denied action must not run");
    let rows = tool_call_audit(h.path());
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["detail"]["tool"], "input.control");
    assert_eq!(rows[0]["detail"]["outcome"], "denied");

    // Allowed by the operator: it runs, and the audit row records it.
    let h = scripted_home("\n[approvals.tools]\n\"input.control\" = \"allow\"\n");
    let out = openpista(
        h.path(),
        &["run", "-e", "move the mouse"],
        Some(x.display()),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(client.pointer(), (33, 44), "{out:#?}");
    let rows = tool_call_audit(h.path());
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["detail"]["tool"], "input.control");
    assert_eq!(rows[0]["detail"]["outcome"], "ok");
    let digest = rows[0]["detail"]["args_sha256"].as_str().unwrap();
    assert_eq!(digest.len(), 64, "{rows:#?}");
}
