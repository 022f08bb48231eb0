//! WASM skill call: cold (compile + instantiate + run) vs warm (a cached,
//! pre-linked module: new Store + instantiate + run) vs a naive call (new
//! Linker + Store + instantiate + run per call on an already compiled
//! module), all on the same module and input, in the same run.
//!
//! The module is `skills/hello-wasm/hello.wasm` when it is built (see
//! scripts/common.sh), else a small WAT echo module (printed). Without
//! `--bench` (as in `cargo test --benches`) it does a short smoke run.
//!
//! ```sh
//! cargo bench --workspace --bench wasm
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use openpista_sandbox::wasm::{WasmConfig, WasmLimits, WasmRequest, WasmRuntime};
use wasmtime::{Config, Engine, Linker, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

const ECHO_WAT: &str = r#"(module
 (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start")
   (i32.store (i32.const 32) (i32.const 4096))
   (i32.store (i32.const 36) (i32.const 4096))
   (drop (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 48)))
   (i32.store (i32.const 64) (i32.const 4096))
   (i32.store (i32.const 68) (i32.load (i32.const 48)))
   (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 80)))))"#;

const ARGS: &[u8] = br#"{"name":"bench"}"#;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (cold_rounds, warm_rounds) = if full { (15, 2000) } else { (2, 20) };

    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../skills/hello-wasm/hello.wasm");
    let (label, bytes) = match std::fs::read(&hello) {
        Ok(b) => ("skills/hello-wasm/hello.wasm", b),
        Err(_) => {
            println!(
                "note: {} is not built (scripts/common.sh builds it); using a WAT echo module",
                hello.display()
            );
            ("WAT echo module", ECHO_WAT.as_bytes().to_vec())
        }
    };
    let workspace = tempfile::tempdir().expect("temp dir");
    std::fs::write(workspace.path().join("a.txt"), "a").expect("write");
    let request = WasmRequest {
        stdin: ARGS.to_vec(),
        workspace: Some(workspace.path().to_path_buf()),
        limits: WasmLimits::default(),
    };
    println!(
        "module: {label} ({} bytes); stdin {} bytes; workspace preopened",
        bytes.len(),
        ARGS.len()
    );

    // Cold: a fresh runtime (engine) without a disk cache, then compile + run.
    let mut cold = Vec::new();
    let mut expected = String::new();
    for _ in 0..cold_rounds {
        let rt = WasmRuntime::new(WasmConfig::default()).expect("engine");
        let t = Instant::now();
        let m = rt.load(&bytes).expect("compiles");
        let out = rt.run(&m, &request, None).expect("runs");
        cold.push(t.elapsed());
        expected = out.stdout;
    }

    // Disk-cache hit: a fresh runtime that finds the compiled module on disk.
    let cache = tempfile::tempdir().expect("temp dir");
    let disk_config = WasmConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        fuel: None,
    };
    let seed = WasmRuntime::new(disk_config.clone()).expect("engine");
    seed.load(&bytes).expect("compiles");
    let mut disk = Vec::new();
    for _ in 0..cold_rounds {
        let rt = WasmRuntime::new(disk_config.clone()).expect("engine");
        let t = Instant::now();
        let m = rt.load(&bytes).expect("loads");
        let out = rt.run(&m, &request, None).expect("runs");
        disk.push(t.elapsed());
        assert_eq!(out.stdout, expected);
        assert_eq!(rt.cache_stats().disk_hits, 1);
    }

    // Warm vs naive, alternating (order flipped every round).
    let rt = WasmRuntime::new(WasmConfig::default()).expect("engine");
    let module = rt.load(&bytes).expect("compiles");
    let naive = Naive::new(&bytes);
    assert_eq!(
        naive.call(workspace.path()),
        expected,
        "both sides print the same"
    );
    let mut warm = Vec::new();
    let mut plain = Vec::new();
    let mut ratios = Vec::new();
    for i in 0..warm_rounds {
        let w = || {
            let t = Instant::now();
            let out = rt.run(&module, &request, None).expect("runs");
            let d = t.elapsed();
            debug_assert_eq!(out.stdout, expected);
            d
        };
        let n = || {
            let t = Instant::now();
            let out = naive.call(workspace.path());
            let d = t.elapsed();
            debug_assert_eq!(out, expected);
            d
        };
        let (dw, dn) = if i % 2 == 0 {
            let dw = w();
            (dw, n())
        } else {
            let dn = n();
            (w(), dn)
        };
        warm.push(dw);
        plain.push(dn);
        ratios.push(dw.as_secs_f64() / dn.as_secs_f64());
    }

    let cold_m = median(&mut cold);
    let disk_m = median(&mut disk);
    let warm_m = median(&mut warm);
    let naive_m = median(&mut plain);
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[ratios.len() / 2];
    println!("rounds: cold {cold_rounds}, warm/naive {warm_rounds}");
    println!("{:<48} {:>12}", "call", "median");
    println!(
        "{:<48} {:>12}",
        "cold (new engine, compile, instantiate, run)",
        fmt(cold_m)
    );
    println!(
        "{:<48} {:>12}",
        "disk cache (new engine, deserialize, run)",
        fmt(disk_m)
    );
    println!(
        "{:<48} {:>12}",
        "naive (new Linker + Store + instantiate, run)",
        fmt(naive_m)
    );
    println!(
        "{:<48} {:>12}",
        "warm (cached InstancePre: Store + instantiate)",
        fmt(warm_m)
    );
    println!(
        "warm/naive {ratio:.2} (median of per-round ratios); cold/warm {:.0}; disk/warm {:.0}",
        cold_m.as_secs_f64() / warm_m.as_secs_f64(),
        disk_m.as_secs_f64() / warm_m.as_secs_f64()
    );
    println!(
        "target warm < 100 µs median: {}",
        if warm_m < Duration::from_micros(100) {
            "PASS"
        } else {
            "ABOVE"
        }
    );
}

/// The naive way: a new Linker, Store and instance per call.
struct Naive {
    engine: Engine,
    module: Module,
}

impl Naive {
    fn new(bytes: &[u8]) -> Self {
        let engine = Engine::new(&Config::new()).expect("engine");
        let module = Module::new(&engine, bytes).expect("compiles");
        Self { engine, module }
    }

    fn call(&self, workspace: &Path) -> String {
        let mut linker: Linker<WasiP1Ctx> = Linker::new(&self.engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| s).expect("link");
        let stdout = MemoryOutputPipe::new(1 << 16);
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_blocking_current_thread(true)
            .stdin(MemoryInputPipe::new(ARGS))
            .stdout(stdout.clone())
            .arg("main");
        wasi.preopened_dir(workspace, "/workspace", wasmtime_wasi::FsPerms::ReadOnly)
            .expect("preopen");
        let mut store = Store::new(&self.engine, wasi.build_p1());
        let instance = linker
            .instantiate(&mut store, &self.module)
            .expect("instantiate");
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .expect("_start");
        if let Err(e) = start.call(&mut store, ())
            && e.downcast_ref::<wasmtime_wasi::I32Exit>()
                .is_none_or(|x| x.0 != 0)
        {
            panic!("naive call failed: {e:?}");
        }
        drop(store);
        String::from_utf8_lossy(&stdout.contents()).into_owned()
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}
