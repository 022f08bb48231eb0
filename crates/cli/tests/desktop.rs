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
