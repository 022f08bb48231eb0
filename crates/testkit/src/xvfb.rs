//! A private X server for the desktop tool tests: Xvfb (Debian's `xvfb`),
//! 640x480 at 24 bits, no TCP. The server picks a free display number
//! (`-displayfd`) and is killed when the handle drops.

use std::io::{BufRead, BufReader, PipeReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running Xvfb, killed on drop.
pub struct Xvfb {
    child: Child,
    display: String,
    // Kept open: Xvfb wrote its display number here.
    _out: BufReader<PipeReader>,
}

impl Xvfb {
    /// Starts Xvfb with `extra` arguments and waits until it accepts clients.
    /// Panics with an install hint when Xvfb is missing.
    pub fn start(extra: &[&str]) -> Xvfb {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let spawned = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "640x480x24",
                "-nolisten",
                "tcp",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start Xvfb ({e}): install it with `apt-get install xvfb` \
                 (scripts/test.sh does this)"
            ),
        };
        let mut out = BufReader::new(reader);
        let (tx, rx) = mpsc::channel();
        let reader_thread = std::thread::spawn(move || {
            let mut line = String::new();
            let r = out.read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
            out
        });
        let number = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(n)) if !n.trim().is_empty() => n.trim().to_owned(),
            other => panic!("Xvfb did not report its display number: {other:?}"),
        };
        let out = reader_thread.join().expect("reader thread");
        Xvfb {
            child,
            display: format!(":{number}"),
            _out: out,
        }
    }

    /// The display name, e.g. `:1`.
    pub fn display(&self) -> &str {
        &self.display
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
