//! WASM sandbox on the real wasmtime: modules written in WAT that loop
//! forever, allocate too much, write where they must not, look outside the
//! workspace, print too much, or behave.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use openpista_sandbox::wasm::{
    WasmConfig, WasmError, WasmLimits, WasmOutput, WasmRequest, WasmRuntime,
};
use tokio_util::sync::CancellationToken;

const IMPORTS: &str = r#"
 (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
"#;

/// Echoes stdin (up to 4 KiB) to stdout and writes "note" to stderr.
const ECHO: &str = r#"
 (memory (export "memory") 1)
 (data (i32.const 512) "note")
 (func (export "_start")
   (i32.store (i32.const 32) (i32.const 4096))
   (i32.store (i32.const 36) (i32.const 4096))
   (if (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 48))
     (then (call $exit (i32.const 3))))
   (i32.store (i32.const 64) (i32.const 4096))
   (i32.store (i32.const 68) (i32.load (i32.const 48)))
   (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 80)))
   (i32.store (i32.const 64) (i32.const 512))
   (i32.store (i32.const 68) (i32.const 4))
   (drop (call $fd_write (i32.const 2) (i32.const 64) (i32.const 1) (i32.const 80))))
"#;

fn module(body: &str) -> String {
    format!("(module {IMPORTS} {body})")
}

/// Opens `path` relative to `fd` with the given flags and rights; exits with
/// the errno if that fails, else copies up to 4 KiB of the file to stdout.
fn open_and_cat(fd: u32, path: &str, oflags: u32, rights: u64, dirflags: u32) -> String {
    let len = path.len();
    module(&format!(
        r#"
 (memory (export "memory") 1)
 (data (i32.const 256) "{path}")
 (func (export "_start") (local $err i32)
   (local.set $err (call $path_open (i32.const {fd}) (i32.const {dirflags}) (i32.const 256)
     (i32.const {len}) (i32.const {oflags}) (i64.const {rights}) (i64.const 0) (i32.const 0)
     (i32.const 16)))
   (if (local.get $err) (then (call $exit (local.get $err))))
   (i32.store (i32.const 32) (i32.const 4096))
   (i32.store (i32.const 36) (i32.const 4096))
   (local.set $err (call $fd_read (i32.load (i32.const 16)) (i32.const 32) (i32.const 1)
     (i32.const 48)))
   (if (local.get $err) (then (call $exit (i32.add (i32.const 100) (local.get $err)))))
   (i32.store (i32.const 64) (i32.const 4096))
   (i32.store (i32.const 68) (i32.load (i32.const 48)))
   (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 80))))
"#
    ))
}

const O_CREAT: u32 = 1;
const O_TRUNC: u32 = 8;
const RIGHT_FD_READ: u64 = 1 << 1;
const RIGHT_FD_WRITE: u64 = 1 << 6;
const LOOKUP_SYMLINK_FOLLOW: u32 = 1;

fn runtime() -> WasmRuntime {
    WasmRuntime::new(WasmConfig::default()).expect("engine")
}

fn request(stdin: &[u8], workspace: Option<&Path>) -> WasmRequest {
    WasmRequest {
        stdin: stdin.to_vec(),
        workspace: workspace.map(Path::to_path_buf),
        limits: WasmLimits::default(),
    }
}

fn run(rt: &WasmRuntime, wat: &str, req: &WasmRequest) -> Result<WasmOutput, WasmError> {
    let m = rt.load(wat.as_bytes()).expect("module compiles");
    rt.run(&m, req, None)
}

fn exit_code(r: Result<WasmOutput, WasmError>) -> i32 {
    match r {
        Err(WasmError::Exit { code, .. }) => code,
        other => panic!("expected a non-zero exit, got {other:?}"),
    }
}

/// A workspace with `data.txt` ("workspace data") in it.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("data.txt"), "workspace data").expect("write");
    dir
}

#[test]
fn a_good_module_reads_its_arguments_and_its_output_is_returned() {
    let rt = runtime();
    let out = run(&rt, &module(ECHO), &request(br#"{"x":1}"#, None)).expect("runs");
    assert_eq!(out.stdout, r#"{"x":1}"#);
    assert_eq!(out.stderr, "note");
    assert!(!out.truncated());
}

#[test]
fn an_infinite_loop_stops_at_the_deadline() {
    let rt = runtime();
    let wat = r#"(module (func (export "_start") (loop $l (br $l))))"#;
    let mut req = request(b"", None);
    req.limits.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let r = run(&rt, wat, &req);
    assert!(
        matches!(r, Err(WasmError::DeadlineExceeded { timeout, .. }) if timeout == req.limits.timeout),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "did not hang");
    // The runtime is still usable afterwards.
    let out = run(&rt, &module(ECHO), &request(b"again", None)).expect("runs");
    assert_eq!(out.stdout, "again");
}

#[test]
fn a_100_mb_allocation_fails_cleanly_as_out_of_memory() {
    let rt = runtime();
    // memory.grow returns -1 when denied; the module then exits with 12.
    let grow = |pages: u32| {
        module(&format!(
            r#"(memory (export "memory") 1)
 (func (export "_start")
   (if (i32.eq (memory.grow (i32.const {pages})) (i32.const -1))
     (then (call $exit (i32.const 12)))))"#
        ))
    };
    let r = run(&rt, &grow(1600), &request(b"", None));
    match r {
        Err(WasmError::OutOfMemory {
            limit_bytes,
            wanted_bytes,
            ..
        }) => {
            assert_eq!(limit_bytes, 64 << 20);
            assert_eq!(wanted_bytes, 1601 * 65536);
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    // 10 MB fits under the 64 MiB cap.
    run(&rt, &grow(160), &request(b"", None)).expect("10 MB is allowed");
    // A module whose initial memory is too large does not start.
    let big = r#"(module (memory 1600) (func (export "_start")))"#;
    let r = run(&rt, big, &request(b"", None));
    assert!(matches!(r, Err(WasmError::OutOfMemory { .. })), "{r:?}");
}

#[test]
fn a_write_into_the_read_only_workspace_fails() {
    let rt = runtime();
    let ws = workspace();
    let req = request(b"", Some(ws.path()));
    // Reading works: the preopen is there (fd 3).
    let out = run(&rt, &open_and_cat(3, "data.txt", 0, RIGHT_FD_READ, 0), &req).expect("read");
    assert_eq!(out.stdout, "workspace data");
    // Creating a file fails.
    let code = exit_code(run(
        &rt,
        &open_and_cat(3, "new.txt", O_CREAT, RIGHT_FD_WRITE, 0),
        &req,
    ));
    assert!(code > 0 && code < 100, "errno expected, got {code}");
    assert!(!ws.path().join("new.txt").exists());
    // Truncating an existing one fails and leaves it as it was.
    let code = exit_code(run(
        &rt,
        &open_and_cat(3, "data.txt", O_TRUNC, RIGHT_FD_WRITE, 0),
        &req,
    ));
    assert!(code > 0 && code < 100, "errno expected, got {code}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("data.txt")).expect("read"),
        "workspace data"
    );
}

#[test]
fn nothing_outside_the_workspace_is_readable() {
    let rt = runtime();
    let ws = workspace();
    let outside = tempfile::tempdir().expect("temp dir");
    std::fs::write(outside.path().join("secret.txt"), "secret").expect("write");
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), ws.path().join("link"))
        .expect("symlink");
    let req = request(b"", Some(ws.path()));
    let secret_rel = format!(
        "../{}/secret.txt",
        outside.path().file_name().unwrap().to_string_lossy()
    );
    let attempts = [
        (3, "/etc/passwd".to_owned(), 0),
        (3, "../../../../etc/passwd".to_owned(), 0),
        (3, secret_rel, 0),
        (3, "link".to_owned(), LOOKUP_SYMLINK_FOLLOW),
        // No other descriptor is preopened.
        (4, "etc/passwd".to_owned(), 0),
        (5, "etc/passwd".to_owned(), 0),
    ];
    for (fd, path, dirflags) in attempts {
        let r = run(
            &rt,
            &open_and_cat(fd, &path, 0, RIGHT_FD_READ, dirflags),
            &req,
        );
        let code = exit_code(r);
        assert!(
            code > 0 && code < 100,
            "{fd} {path}: errno expected, got {code}"
        );
    }
    // Without a workspace, fd 3 is not open either.
    let code = exit_code(run(
        &rt,
        &open_and_cat(3, "data.txt", 0, RIGHT_FD_READ, 0),
        &request(b"", None),
    ));
    assert!(code > 0 && code < 100, "errno expected, got {code}");
}

#[test]
fn the_environment_is_empty() {
    let rt = runtime();
    // Exits with 10 + the number of environment variables.
    let wat = module(
        r#"(memory (export "memory") 1)
 (func (export "_start")
   (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
   (call $exit (i32.add (i32.const 10) (i32.load (i32.const 0)))))"#,
    );
    assert_eq!(exit_code(run(&rt, &wat, &request(b"", None))), 10);
}

#[test]
fn output_past_the_cap_is_counted_and_dropped() {
    let rt = runtime();
    // Writes "0123456789" 1000 times.
    let wat = module(
        r#"(memory (export "memory") 1)
 (data (i32.const 256) "0123456789")
 (func (export "_start") (local $i i32)
   (i32.store (i32.const 64) (i32.const 256))
   (i32.store (i32.const 68) (i32.const 10))
   (loop $l
     (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 80)))
     (local.set $i (i32.add (local.get $i) (i32.const 1)))
     (br_if $l (i32.lt_u (local.get $i) (i32.const 1000)))))"#,
    );
    let mut req = request(b"", None);
    req.limits.output_limit = 95;
    let out = run(&rt, &wat, &req).expect("runs");
    assert_eq!(out.stdout.len(), 95);
    assert!(out.stdout.starts_with("0123456789"));
    assert_eq!(out.dropped_stdout, 10_000 - 95);
    assert!(out.truncated());
}

#[test]
fn traps_fuel_and_bad_modules_are_clear_errors() {
    let rt = runtime();
    let r = run(
        &rt,
        r#"(module (func (export "_start") unreachable))"#,
        &request(b"", None),
    );
    match r {
        Err(WasmError::Trap { message, .. }) => {
            assert!(message.contains("unreachable"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(matches!(rt.load(b"not wasm"), Err(WasmError::Compile(_))));
    assert!(matches!(
        rt.load(br#"(module (func (export "main")))"#),
        Err(WasmError::Link(_))
    ));
    assert!(matches!(
        rt.load(br#"(module (import "env" "evil" (func)) (func (export "_start")))"#),
        Err(WasmError::Link(_))
    ));

    let fueled = WasmRuntime::new(WasmConfig {
        fuel: Some(100_000),
        ..WasmConfig::default()
    })
    .expect("engine");
    let r = run(
        &fueled,
        r#"(module (func (export "_start") (loop $l (br $l))))"#,
        &request(b"", None),
    );
    assert!(
        matches!(r, Err(WasmError::OutOfFuel { fuel: 100_000, .. })),
        "{r:?}"
    );
    let out = run(&fueled, &module(ECHO), &request(b"fuel ok", None)).expect("runs");
    assert_eq!(out.stdout, "fuel ok");
}

#[test]
fn compiled_modules_are_cached_in_memory_and_on_disk() {
    let cache = tempfile::tempdir().expect("temp dir");
    let config = WasmConfig {
        cache_dir: Some(cache.path().join("wasm")),
        fuel: None,
    };
    let wat = module(ECHO);
    let a = WasmRuntime::new(config.clone()).expect("engine");
    let m1 = a.load(wat.as_bytes()).expect("compiles");
    let m2 = a.load(wat.as_bytes()).expect("cached");
    assert_eq!(m1.sha256(), m2.sha256());
    let s = a.cache_stats();
    assert_eq!((s.compiles, s.memory_hits, s.disk_hits), (1, 1, 0));
    let files: Vec<_> = std::fs::read_dir(cache.path().join("wasm"))
        .expect("cache dir")
        .flatten()
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");

    // A new runtime (a restarted process) loads it from disk.
    let b = WasmRuntime::new(config).expect("engine");
    let m = b.load(wat.as_bytes()).expect("from disk");
    let s = b.cache_stats();
    assert_eq!((s.compiles, s.memory_hits, s.disk_hits), (0, 0, 1));
    let out = b.run(&m, &request(b"cached", None), None).expect("runs");
    assert_eq!(out.stdout, "cached");

    // A corrupt cache file is ignored and replaced.
    let file = files[0].path();
    std::fs::write(&file, b"garbage").expect("write");
    let c = WasmRuntime::new(WasmConfig {
        cache_dir: Some(cache.path().join("wasm")),
        fuel: None,
    })
    .expect("engine");
    let m = c.load(wat.as_bytes()).expect("recompiled");
    assert_eq!(c.cache_stats().compiles, 1);
    assert_eq!(
        c.run(&m, &request(b"fixed", None), None)
            .expect("runs")
            .stdout,
        "fixed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_runs_from_a_file_and_stop_on_cancel() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let echo = dir.path().join("echo.wat");
    std::fs::write(&echo, module(ECHO)).expect("write");
    let out = rt
        .run_file_async(echo.clone(), request(b"hi", None), CancellationToken::new())
        .await
        .expect("runs");
    assert_eq!(out.stdout, "hi");
    // The second call finds the file's module in memory.
    rt.run_file_async(echo, request(b"hi", None), CancellationToken::new())
        .await
        .expect("runs");
    assert_eq!(rt.cache_stats().memory_hits, 1);

    let spin = dir.path().join("spin.wat");
    std::fs::write(
        &spin,
        r#"(module (func (export "_start") (loop $l (br $l))))"#,
    )
    .expect("write");
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let r = rt.run_file_async(spin, request(b"", None), cancel).await;
    assert!(matches!(r, Err(WasmError::Cancelled { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "did not hang");

    let missing = rt
        .run_file_async(
            dir.path().join("missing.wasm"),
            request(b"", None),
            CancellationToken::new(),
        )
        .await;
    assert!(
        matches!(missing, Err(WasmError::Read { .. })),
        "{missing:?}"
    );
}

#[test]
fn a_cancel_flag_set_before_the_run_stops_it() {
    let rt = runtime();
    let m = rt
        .load(br#"(module (func (export "_start") (loop $l (br $l))))"#)
        .expect("compiles");
    let flag = Arc::new(AtomicBool::new(true));
    let r = rt.run(&m, &request(b"", None), Some(&flag));
    assert!(matches!(r, Err(WasmError::Cancelled { .. })), "{r:?}");
}

#[test]
fn concurrent_calls_share_one_engine_and_keep_their_own_limits() {
    let rt = runtime();
    let echo = rt.load(module(ECHO).as_bytes()).expect("compiles");
    let spin = rt
        .load(br#"(module (func (export "_start") (loop $l (br $l))))"#)
        .expect("compiles");
    let started = Instant::now();
    std::thread::scope(|s| {
        let spinner = s.spawn(|| {
            let mut req = request(b"", None);
            req.limits.timeout = Duration::from_millis(500);
            rt.run(&spin, &req, None)
        });
        let echoes: Vec<_> = (0..4)
            .map(|i| {
                let (rt, echo) = (&rt, &echo);
                s.spawn(move || rt.run(echo, &request(format!("call {i}").as_bytes(), None), None))
            })
            .collect();
        for (i, h) in echoes.into_iter().enumerate() {
            let out = h.join().expect("thread").expect("runs");
            assert_eq!(out.stdout, format!("call {i}"));
        }
        let r = spinner.join().expect("thread");
        assert!(
            matches!(r, Err(WasmError::DeadlineExceeded { .. })),
            "{r:?}"
        );
    });
    assert!(started.elapsed() < Duration::from_secs(30), "did not hang");
    // After all calls ended, a new one still gets its deadline enforced.
    let mut req = request(b"", None);
    req.limits.timeout = Duration::from_millis(100);
    let r = rt.run(&spin, &req, None);
    assert!(
        matches!(r, Err(WasmError::DeadlineExceeded { .. })),
        "{r:?}"
    );
}
