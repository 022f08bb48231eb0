//! Runs WASI preview 1 command modules under wasmtime.
//!
//! One [`WasmRuntime`] per process holds the shared [`Engine`] (epoch
//! interruption on, a background thread ticking the epoch while calls run), a [`Linker`] with
//! WASI preview 1, and the compiled modules: in memory, keyed by the SHA-256
//! of the module bytes, and on disk (`Module::serialize`) under a cache
//! folder chosen by the caller, keyed by that hash and the engine's
//! compatibility hash. Each module keeps a pre-linked [`InstancePre`], so a
//! warm call only creates a [`Store`] and instantiates.
//!
//! Every call ([`WasmRuntime::run`]) is contained:
//!
//! - the request's bytes (JSON arguments, for skills) are the module's stdin;
//!   stdout and stderr are captured, at most [`WasmLimits::output_limit`]
//!   bytes each, the rest counted and discarded;
//! - the only file system the module sees is the optional workspace,
//!   preopened **read-only** at `/workspace`; no environment variable is set
//!   and nothing is inherited (no args but the program name, no network);
//! - linear memory is capped ([`WasmLimits::memory_bytes`]); a denied
//!   `memory.grow` returns -1 to the module, and a run that then fails is
//!   reported as [`WasmError::OutOfMemory`];
//! - a wall-clock deadline ([`WasmLimits::timeout`]) and a cancel flag are
//!   checked at every epoch tick; optional fuel ([`WasmConfig::fuel`]) bounds
//!   the instructions executed.
//!
//! The calls are blocking: the WASI preview 1 host functions used here block
//! on a tokio runtime and panic on a runtime worker thread. From async code,
//! use [`WasmRuntime::run_file_async`], which runs on `spawn_blocking`.

use std::collections::HashMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use wasmtime::{
    Config, Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// How often the epoch advances, and so how often the deadline and the
/// cancel flag are checked while a module runs.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Where the workspace appears inside the module.
pub const WORKSPACE_GUEST_PATH: &str = "/workspace";

/// Tables, memories and instances one call may create.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Settings of the runtime, fixed for its life (they shape the engine).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WasmConfig {
    /// Folder for compiled modules; `None` keeps them in memory only. Only
    /// this runtime should write there: files in it are loaded as native code.
    pub cache_dir: Option<PathBuf>,
    /// Fuel (roughly, WebAssembly instructions) each call may use; `None`
    /// turns fuel metering off (it costs some speed).
    pub fuel: Option<u64>,
}

/// Per-call limits, decided by the operator (never by the module's caller's
/// arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WasmLimits {
    /// Linear memory, in bytes, summed over the module's memories.
    pub memory_bytes: u64,
    /// Wall-clock deadline, from the start of instantiation.
    pub timeout: Duration,
    /// Bytes kept per stream (stdout and stderr separately).
    pub output_limit: usize,
}

impl Default for WasmLimits {
    /// 64 MiB, 30 s, 64 KiB per stream.
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            timeout: Duration::from_secs(30),
            output_limit: 64 * 1024,
        }
    }
}

/// One call: what goes in and under which limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WasmRequest {
    /// The module's stdin.
    pub stdin: Vec<u8>,
    /// A host folder preopened read-only at [`WORKSPACE_GUEST_PATH`]; `None`
    /// preopens nothing.
    pub workspace: Option<PathBuf>,
    pub limits: WasmLimits,
}

/// What a call printed, and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WasmOutput {
    /// Captured stdout (lossy UTF-8), at most `output_limit` bytes of it.
    pub stdout: String,
    /// Captured stderr (lossy UTF-8), at most `output_limit` bytes of it.
    pub stderr: String,
    /// Characters of stdout written but not kept (UTF-8 lead bytes counted).
    pub dropped_stdout: u64,
    /// Characters of stderr written but not kept (UTF-8 lead bytes counted).
    pub dropped_stderr: u64,
    /// Wall time from the start of instantiation to the end of the run.
    pub duration: Duration,
}

impl WasmOutput {
    /// Some output was discarded.
    pub fn truncated(&self) -> bool {
        self.dropped_stdout > 0 || self.dropped_stderr > 0
    }
}

/// Why a module could not be run, or how its run failed. Variants for a run
/// that started carry what it printed until then.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The engine could not be built (unsupported host). Retrying cannot help.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    /// The module file could not be read. Retrying helps only if the file
    /// appears or becomes readable.
    #[error("cannot read module {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid WebAssembly module (or WAT text). Retrying
    /// the same module cannot help.
    #[error("invalid WebAssembly module: {0}")]
    Compile(String),
    /// The module needs imports other than WASI preview 1, or has no
    /// `_start` export: it is not a WASI command. Retrying cannot help.
    #[error("not a WASI preview 1 command module: {0}")]
    Link(String),
    /// The workspace folder could not be preopened. Retrying helps only if
    /// the folder appears.
    #[error("cannot preopen the workspace {path}: {message}")]
    Workspace { path: PathBuf, message: String },
    /// The deadline passed; the module was stopped. The same input will
    /// likely time out again.
    #[error("the module ran past its {timeout:?} deadline and was stopped")]
    DeadlineExceeded {
        timeout: Duration,
        output: Box<WasmOutput>,
    },
    /// The caller cancelled the run; the module was stopped.
    #[error("the run was cancelled")]
    Cancelled { output: Box<WasmOutput> },
    /// The module wanted more linear memory than allowed (growing failed, or
    /// its initial memory is too large) and then failed.
    #[error("the module ran out of memory (limit {limit_bytes} bytes, wanted {wanted_bytes})")]
    OutOfMemory {
        limit_bytes: u64,
        wanted_bytes: u64,
        output: Box<WasmOutput>,
    },
    /// The module used all its fuel.
    #[error("the module used all its fuel ({fuel} units) and was stopped")]
    OutOfFuel { fuel: u64, output: Box<WasmOutput> },
    /// The module trapped (`unreachable`, an out-of-bounds access, a stack
    /// overflow, ...). A bug in the module; retrying cannot help.
    #[error("the module trapped: {message}")]
    Trap {
        message: String,
        output: Box<WasmOutput>,
    },
    /// The module exited with a non-zero code (`proc_exit`).
    #[error("the module exited with code {code}")]
    Exit { code: i32, output: Box<WasmOutput> },
    /// The blocking task running the module failed (a panic in the host).
    /// Not expected; a retry may help.
    #[error("the WebAssembly task failed: {0}")]
    Task(String),
}

impl WasmError {
    /// What the module printed before it failed, if it ran.
    pub fn output(&self) -> Option<&WasmOutput> {
        match self {
            WasmError::DeadlineExceeded { output, .. }
            | WasmError::Cancelled { output }
            | WasmError::OutOfMemory { output, .. }
            | WasmError::OutOfFuel { output, .. }
            | WasmError::Trap { output, .. }
            | WasmError::Exit { output, .. } => Some(output),
            WasmError::Engine(_)
            | WasmError::Read { .. }
            | WasmError::Compile(_)
            | WasmError::Link(_)
            | WasmError::Workspace { .. }
            | WasmError::Task(_) => None,
        }
    }
}

/// Where compiled modules came from, counted since the runtime started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Found in memory.
    pub memory_hits: u64,
    /// Loaded from the disk cache.
    pub disk_hits: u64,
    /// Compiled from the module bytes.
    pub compiles: u64,
}

/// A compiled, pre-linked module, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct WasmModule {
    inner: Arc<Compiled>,
}

impl std::fmt::Debug for WasmModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmModule")
            .field("sha256", &self.inner.key)
            .finish_non_exhaustive()
    }
}

impl WasmModule {
    /// Hex SHA-256 of the module bytes.
    pub fn sha256(&self) -> &str {
        &self.inner.key
    }
}

struct Compiled {
    key: String,
    pre: InstancePre<CallState>,
}

/// The shared engine, linker and module caches. Cheap to clone.
#[derive(Clone)]
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: WasmConfig,
    engine: Engine,
    linker: Linker<CallState>,
    /// Hex hash of the engine's compatibility hash (part of disk cache names).
    compat: String,
    modules: Mutex<HashMap<String, Arc<Compiled>>>,
    /// Module files already hashed: (path, size, mtime) -> content hash.
    files: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    compiles: AtomicU64,
    ticker: Arc<Ticker>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// Wakes the epoch thread only while calls run, so an idle runtime costs
/// nothing.
#[derive(Default)]
struct Ticker {
    /// (calls running, stop requested)
    state: Mutex<(usize, bool)>,
    wake: Condvar,
}

impl Ticker {
    /// Ticks `engine`'s epoch every [`EPOCH_TICK`] while calls run; returns
    /// when stopped or when the engine is gone.
    fn run(&self, engine: &wasmtime::EngineWeak) {
        loop {
            {
                let mut state = lock(&self.state);
                while state.0 == 0 && !state.1 {
                    state = self
                        .wake
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if state.1 {
                    return;
                }
            }
            std::thread::sleep(EPOCH_TICK);
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        }
    }

    fn stop(&self) {
        lock(&self.state).1 = true;
        self.wake.notify_all();
    }

    /// Marks a call as running until the guard is dropped.
    fn running(self: &Arc<Self>) -> RunningCall {
        lock(&self.state).0 += 1;
        self.wake.notify_all();
        RunningCall(self.clone())
    }
}

/// One running call, for the [`Ticker`].
struct RunningCall(Arc<Ticker>);

impl Drop for RunningCall {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.0 = state.0.saturating_sub(1);
    }
}

impl WasmRuntime {
    /// Builds the engine and the linker and starts the epoch ticker thread
    /// (it stops when the last clone of the runtime is dropped).
    pub fn new(config: WasmConfig) -> Result<Self, WasmError> {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        cfg.consume_fuel(config.fuel.is_some());
        let engine = Engine::new(&cfg).map_err(|e| WasmError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut CallState| &mut s.wasi)
            .map_err(|e| WasmError::Engine(e.to_string()))?;
        let compat = {
            let mut h = Sha256Hasher(Sha256::new());
            std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
            hex(&h.0.finalize()[..16])
        };
        let ticker = Arc::new(Ticker::default());
        let weak = engine.weak();
        let thread_ticker = ticker.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".to_owned())
            .spawn(move || thread_ticker.run(&weak))
            .map_err(|e| WasmError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                engine,
                linker,
                compat,
                modules: Mutex::new(HashMap::new()),
                files: Mutex::new(HashMap::new()),
                memory_hits: AtomicU64::new(0),
                disk_hits: AtomicU64::new(0),
                compiles: AtomicU64::new(0),
                ticker,
            }),
        })
    }

    /// The runtime's settings.
    pub fn config(&self) -> &WasmConfig {
        &self.inner.config
    }

    /// Where modules came from so far.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            memory_hits: self.inner.memory_hits.load(Ordering::Relaxed),
            disk_hits: self.inner.disk_hits.load(Ordering::Relaxed),
            compiles: self.inner.compiles.load(Ordering::Relaxed),
        }
    }

    /// A compiled module for `bytes` (binary WebAssembly or WAT text): from
    /// memory, else from the disk cache, else compiled (and stored in both).
    /// Blocking: compiling takes milliseconds to seconds.
    pub fn load(&self, bytes: &[u8]) -> Result<WasmModule, WasmError> {
        let key = hex(&Sha256::digest(bytes));
        self.load_keyed(key, bytes)
    }

    /// Like [`Self::load`] for a file. A file seen before with the same size
    /// and modification time is not read or hashed again.
    pub fn load_file(&self, path: &Path) -> Result<WasmModule, WasmError> {
        let read_err = |source| WasmError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mtime = meta.modified().map_err(read_err)?;
        let known = lock(&self.inner.files)
            .get(path)
            .filter(|(len, t, _)| *len == meta.len() && *t == mtime)
            .map(|(_, _, key)| key.clone());
        if let Some(key) = known
            && let Some(module) = self.cached(&key)
        {
            return Ok(module);
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        let key = hex(&Sha256::digest(&bytes));
        lock(&self.inner.files).insert(path.to_path_buf(), (meta.len(), mtime, key.clone()));
        self.load_keyed(key, &bytes)
    }

    fn cached(&self, key: &str) -> Option<WasmModule> {
        let hit = lock(&self.inner.modules).get(key).cloned()?;
        self.inner.memory_hits.fetch_add(1, Ordering::Relaxed);
        Some(WasmModule { inner: hit })
    }

    fn load_keyed(&self, key: String, bytes: &[u8]) -> Result<WasmModule, WasmError> {
        if let Some(module) = self.cached(&key) {
            return Ok(module);
        }
        let inner = &self.inner;
        let disk = inner
            .config
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{key}-{}.cwasm", inner.compat)));
        let mut module = None;
        if let Some(file) = disk.as_ref().filter(|f| f.is_file()) {
            // Read into memory rather than mapped (`deserialize_file`): a
            // file changed in place later cannot fault the process.
            // SAFETY: the file is in the operator's cache folder, written by
            // `store_on_disk` from `Module::serialize` of this engine
            // configuration (its name carries the compatibility hash, and
            // wasmtime checks it again). Whoever can write that folder can
            // already run code as this user.
            let loaded = std::fs::read(file)
                .map_err(wasmtime::Error::new)
                .and_then(|bytes| unsafe { Module::deserialize(&inner.engine, bytes) });
            match loaded {
                Ok(m) => {
                    inner.disk_hits.fetch_add(1, Ordering::Relaxed);
                    module = Some(m);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring a bad cached module");
                }
            }
        }
        let module = match module {
            Some(m) => m,
            None => {
                let m = Module::new(&inner.engine, bytes)
                    .map_err(|e| WasmError::Compile(error_text(&e)))?;
                inner.compiles.fetch_add(1, Ordering::Relaxed);
                if let Some(file) = &disk {
                    store_on_disk(&m, file);
                }
                m
            }
        };
        if module.get_export("_start").is_none() {
            return Err(WasmError::Link("no `_start` export".to_owned()));
        }
        let pre = inner
            .linker
            .instantiate_pre(&module)
            .map_err(|e| WasmError::Link(error_text(&e)))?;
        let compiled = Arc::new(Compiled {
            key: key.clone(),
            pre,
        });
        let compiled = lock(&inner.modules).entry(key).or_insert(compiled).clone();
        Ok(WasmModule { inner: compiled })
    }

    /// Runs `module`'s `_start` once under `request`'s limits. Blocking; call
    /// it off the async runtime's worker threads. Setting `cancel` stops the
    /// run at the next epoch tick.
    pub fn run(
        &self,
        module: &WasmModule,
        request: &WasmRequest,
        cancel: Option<&Arc<AtomicBool>>,
    ) -> Result<WasmOutput, WasmError> {
        let limits = request.limits;
        let stdout = Capture::new(limits.output_limit);
        let stderr = Capture::new(limits.output_limit);
        let mut wasi = WasiCtxBuilder::new();
        // This already is a blocking thread: do file I/O on it.
        wasi.allow_blocking_current_thread(true)
            .stdin(MemoryInputPipe::new(request.stdin.clone()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg("main");
        if let Some(dir) = &request.workspace {
            wasi.preopened_dir(dir, WORKSPACE_GUEST_PATH, FsPerms::ReadOnly)
                .map_err(|e| WasmError::Workspace {
                    path: dir.clone(),
                    message: error_text(&e),
                })?;
        }
        let _running = self.inner.ticker.running();
        let started = Instant::now();
        let state = CallState {
            wasi: wasi.build_p1(),
            limiter: Limiter {
                memory_bytes: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
                denied: None,
            },
            deadline: started + limits.timeout,
            cancel: cancel.cloned(),
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            if state
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(wasmtime::Error::new(Interrupted::Cancelled));
            }
            if Instant::now() >= state.deadline {
                return Err(wasmtime::Error::new(Interrupted::Deadline));
            }
            Ok(UpdateDeadline::Continue(1))
        });
        if let Some(fuel) = self.inner.config.fuel {
            store
                .set_fuel(fuel)
                .map_err(|e| WasmError::Engine(error_text(&e)))?;
        }
        let result = module
            .inner
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .and_then(|start| start.call(&mut store, ()));
        let denied = store.data().limiter.denied;
        drop(store);
        let (stdout, dropped_stdout) = stdout.finish();
        let (stderr, dropped_stderr) = stderr.finish();
        let output = Box::new(WasmOutput {
            duration: started.elapsed(),
            stdout,
            stderr,
            dropped_stdout,
            dropped_stderr,
        });
        let Err(e) = result else {
            return Ok(*output);
        };
        if let Some(exit) = e.downcast_ref::<I32Exit>() {
            let code = exit.0;
            if code == 0 {
                return Ok(*output);
            }
            if let Some(wanted) = denied {
                return Err(out_of_memory(limits.memory_bytes, wanted, output));
            }
            return Err(WasmError::Exit { code, output });
        }
        match e.downcast_ref::<Interrupted>() {
            Some(Interrupted::Deadline) => {
                return Err(WasmError::DeadlineExceeded {
                    timeout: limits.timeout,
                    output,
                });
            }
            Some(Interrupted::Cancelled) => return Err(WasmError::Cancelled { output }),
            None => {}
        }
        if let Some(wanted) = denied {
            return Err(out_of_memory(limits.memory_bytes, wanted, output));
        }
        if let (Some(Trap::OutOfFuel), Some(fuel)) =
            (e.downcast_ref::<Trap>(), self.inner.config.fuel)
        {
            return Err(WasmError::OutOfFuel { fuel, output });
        }
        Err(WasmError::Trap {
            message: error_text(&e),
            output,
        })
    }

    /// Loads `path` and runs it on a blocking thread. When `cancel` fires (or
    /// this future is dropped) the module is stopped at the next epoch tick.
    pub async fn run_file_async(
        &self,
        path: PathBuf,
        request: WasmRequest,
        cancel: CancellationToken,
    ) -> Result<WasmOutput, WasmError> {
        let flag = Arc::new(AtomicBool::new(false));
        // Stops the module if this future is dropped.
        let _stop_on_drop = StopOnDrop(flag.clone());
        let runtime = self.clone();
        let task_flag = flag.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            let module = runtime.load_file(&path)?;
            runtime.run(&module, &request, Some(&task_flag))
        });
        let joined = tokio::select! {
            joined = &mut task => joined,
            () = cancel.cancelled() => {
                flag.store(true, Ordering::Relaxed);
                task.await
            }
        };
        joined.map_err(|e| WasmError::Task(e.to_string()))?
    }
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn out_of_memory(limit: u64, wanted: usize, output: Box<WasmOutput>) -> WasmError {
    WasmError::OutOfMemory {
        limit_bytes: limit,
        wanted_bytes: u64::try_from(wanted).unwrap_or(u64::MAX),
        output,
    }
}

/// Why the epoch callback stopped a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Interrupted {
    #[error("deadline exceeded")]
    Deadline,
    #[error("cancelled")]
    Cancelled,
}

/// The store's data for one call.
struct CallState {
    wasi: WasiP1Ctx,
    limiter: Limiter,
    deadline: Instant,
    cancel: Option<Arc<AtomicBool>>,
}

/// Caps linear memory; remembers the largest denied request.
struct Limiter {
    memory_bytes: usize,
    denied: Option<usize>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes && maximum.is_none_or(|m| desired <= m);
        if !allowed {
            self.denied = Some(self.denied.unwrap_or(0).max(desired));
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|m| desired <= m))
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// A capped, shared in-memory output stream: keeps the first `limit`
/// bytes and counts the rest, never failing the module's writes.
#[derive(Clone)]
struct Capture {
    inner: Arc<Mutex<Captured>>,
    limit: usize,
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    /// Characters not kept.
    dropped: u64,
    /// Some bytes were not kept.
    cut: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Captured::default())),
            limit,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = lock(&self.inner);
        let room = self.limit.saturating_sub(c.kept.len()).min(bytes.len());
        let (keep, rest) = bytes.split_at(room);
        c.kept.extend_from_slice(keep);
        c.dropped += crate::count_chars(rest);
        c.cut |= !rest.is_empty();
    }

    /// The kept text (lossy UTF-8) and the characters dropped.
    fn finish(&self) -> (String, u64) {
        let c = lock(&self.inner);
        let mut kept = c.kept.clone();
        let mut dropped = c.dropped;
        if c.cut {
            // The cut may have split a character: drop its incomplete start.
            crate::trim_incomplete_tail(&mut kept, &mut dropped);
        }
        (String::from_utf8_lossy(&kept).into_owned(), dropped)
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Writes `module` to `file` atomically (a temp file in the same folder,
/// then a rename). Failures are logged: the cache is an optimisation.
fn store_on_disk(module: &Module, file: &Path) {
    let result = (|| -> Result<(), String> {
        let dir = file.parent().ok_or("no parent folder")?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let bytes = module.serialize().map_err(|e| error_text(&e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(|e| e.to_string())?;
        tmp.persist(file).map_err(|e| e.to_string())?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(file = %file.display(), error = %e, "cannot cache a compiled module");
    }
}

/// An error and its causes, on one line.
fn error_text(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `Hash` input into SHA-256, so the hash is stable across processes.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_limit_and_counts_the_rest() {
        let c = Capture::new(4);
        c.push(b"01");
        c.push(b"23456789");
        assert_eq!(c.finish(), ("0123".to_owned(), 6));
    }

    #[test]
    fn capture_drops_a_split_character() {
        let c = Capture::new(2);
        c.push("aé".as_bytes());
        assert_eq!(c.finish(), ("a".to_owned(), 1));
        let c = Capture::new(1);
        c.push("ééé".as_bytes());
        assert_eq!(c.finish(), (String::new(), 3));
    }

    #[test]
    fn limiter_denies_and_remembers() {
        let mut l = Limiter {
            memory_bytes: 1 << 20,
            denied: None,
        };
        assert!(l.memory_growing(0, 1 << 20, None).unwrap());
        assert!(!l.memory_growing(1 << 20, 2 << 20, None).unwrap());
        assert_eq!(l.denied, Some(2 << 20));
        assert!(!l.memory_growing(0, 1024, Some(512)).unwrap());
    }
}
