//! Gateway throughput: N concurrent QUIC clients, each sending M messages in
//! sequence to its own session, against the production `QuicServer` with the
//! scripted provider (reply "ok") and a real SQLite store in a temp dir.
//!
//! `cargo bench --workspace --bench gateway` runs 20 clients x 50 messages,
//! three times; `-- --full` runs 100 x 100; `--clients N --messages M
//! --reps R` override. Without `--bench` (as `cargo test` runs it) it is a
//! 2 x 2 smoke run. Reports messages/s, p50/p99 round trip (send -> final),
//! whether every message and reply reached SQLite, and peak RSS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use openpista_agent::{Agent, AgentConfig, AgentParts};
use openpista_client::{Client, Event, Trust};
use openpista_gateway::{Gateway, GatewayConfig, QuicServer, SendRequest, TlsIdentity};
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::{Store, StoreOptions};
use openpista_proto::{AgentEvent, Role, SessionId};
use openpista_tools::builtin_registry;

const TOKEN: &str = "bench-token";
const TARGET_RATE: f64 = 5_000.0;
const TARGET_P99_MS: f64 = 5.0;

struct Options {
    clients: usize,
    messages: usize,
    reps: usize,
}

fn options() -> anyhow::Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let full = args.iter().any(|a| a == "--full");
    let mut o = match (bench, full) {
        (_, true) => Options {
            clients: 100,
            messages: 100,
            reps: 3,
        },
        (true, false) => Options {
            clients: 20,
            messages: 50,
            reps: 3,
        },
        (false, false) => Options {
            clients: 2,
            messages: 2,
            reps: 1,
        },
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || -> anyhow::Result<usize> {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            Ok(v.parse::<usize>()?.max(1))
        };
        match a.as_str() {
            "--clients" => o.clients = value()?,
            "--messages" => o.messages = value()?,
            "--reps" => o.reps = value()?,
            _ => {}
        }
    }
    Ok(o)
}

struct Rep {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    stored: u64,
    expected: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One fresh server, store and set of clients.
async fn rep(o: &Options, max_batch: usize, quic: bool) -> anyhow::Result<Rep> {
    let dir = tempfile::tempdir()?;
    let store = Store::open_with(
        &dir.path().join("db.sqlite"),
        &StoreOptions::default().with_max_batch(max_batch),
    )
    .await?;
    let script = "on_exhausted = \"repeat_last\"\n[[reply]]\ntext = \"ok\"\n";
    let llm = Arc::new(ScriptedProvider::new(Script::from_toml(script)?));
    let workspace = dir.path().join("ws");
    std::fs::create_dir_all(&workspace)?;
    let tools = builtin_registry(Default::default(), Default::default(), Vec::new())?;
    let agent = Agent::new(AgentParts {
        llm,
        tools: Arc::new(tools),
        store: store.clone(),
        config: AgentConfig::default(),
        workspace,
        skills_context: String::new(),
    });
    let cfg = GatewayConfig {
        bind: "127.0.0.1:0".into(),
        max_connections: o.clients + 8,
        messages_per_minute: 1_000_000,
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(agent, &cfg);
    let tls = TlsIdentity::load_or_generate(&dir.path().join("tls"))?;
    let server = QuicServer::bind(gateway.clone(), &cfg, tls, Some(TOKEN.into()))?;
    let trust = Trust::Fingerprint(server.fingerprint().to_owned());

    let mut clients = Vec::with_capacity(o.clients);
    if quic {
        for _ in 0..o.clients {
            clients.push(
                Client::connect(server.local_addr(), Some(TOKEN.into()), trust.clone()).await?,
            );
        }
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..o.clients {
        let messages = o.messages;
        let client = clients.pop();
        let gateway = gateway.clone();
        tasks.spawn(async move {
            let mut session: Option<SessionId> = None;
            let mut times = Vec::with_capacity(messages);
            for m in 0..messages {
                let t0 = Instant::now();
                let text = format!("client {c} message {m}");
                // Over QUIC through the SDK, or straight into the in-process
                // gateway (same sessions, store and agent; no network, no TLS).
                let events: Vec<AgentEvent> = match &client {
                    Some(client) => client
                        .send(session.as_ref(), &text)
                        .await?
                        .collect_all()
                        .await?
                        .into_iter()
                        .filter_map(|e| match e {
                            Event::Agent(ev) => Some(ev),
                            _ => None,
                        })
                        .collect(),
                    None => {
                        gateway
                            .send(SendRequest {
                                session_id: session.clone(),
                                text,
                                idempotency_key: None,
                                channel: "bench".into(),
                                create_missing: false,
                            })
                            .await?
                            .collect()
                            .await
                    }
                };
                times.push(t0.elapsed());
                if session.is_none()
                    && let Some(AgentEvent::Accepted { session_id, .. }) = events.first()
                {
                    session = Some(session_id.clone());
                }
                match events.last() {
                    Some(AgentEvent::Final { .. }) => {}
                    other => bail!("client {c} message {m} ended with {other:?}"),
                }
            }
            if let Some(client) = client {
                client.close().await;
            }
            anyhow::Ok(times)
        });
    }
    let mut times = Vec::with_capacity(o.clients * o.messages);
    while let Some(r) = tasks.join_next().await {
        times.extend(r??);
    }
    let elapsed = start.elapsed();
    server.shutdown(Duration::from_secs(5)).await;
    if !gateway.shutdown(Duration::from_secs(30)).await {
        bail!("turns still running after 30 s");
    }

    let mut stored = 0u64;
    let sessions = store.list_sessions(o.clients + 1).await?;
    for s in &sessions {
        let rows = store.recent_messages(&s.id, o.messages * 4 + 8).await?;
        stored += rows
            .iter()
            .filter(|r| matches!(r.message.role, Role::User | Role::Assistant))
            .count() as u64;
    }
    store.close().await;
    times.sort();
    Ok(Rep {
        rate: times.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&times, 0.50),
        p99_ms: percentile(&times, 0.99),
        stored,
        expected: 2 * (o.clients * o.messages) as u64,
    })
}

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc == 0 { usage.ru_maxrss } else { -1 }
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "gateway: {} clients x {} messages, {} rep(s), {} worker threads",
        o.clients,
        o.messages,
        o.reps,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // Each rep runs, one after the other under the same load: the production
    // path (QUIC + group commit), the same with group commit off (every write
    // its own transaction and fsync), and the in-process gateway (same store
    // and agent, no QUIC), so the ratios are measured side by side.
    let mut reps = Vec::new();
    let mut singles = Vec::new();
    let mut inprocs = Vec::new();
    for i in 0..o.reps {
        for (label, max_batch, quic, into) in [
            ("group commit", 256usize, true, &mut reps),
            ("one commit per write", 1, true, &mut singles),
            ("in-process, no QUIC", 256, false, &mut inprocs),
        ] {
            let r = rt.block_on(rep(&o, max_batch, quic))?;
            println!(
                "  rep {} {label:<21}: {:>7.0} msg/s  p50 {:>6.2} ms  p99 {:>6.2} ms  stored {}/{}",
                i + 1,
                r.rate,
                r.p50_ms,
                r.p99_ms,
                r.stored,
                r.expected
            );
            into.push(r);
        }
    }
    let lost = reps
        .iter()
        .chain(&singles)
        .chain(&inprocs)
        .any(|r| r.stored != r.expected);
    let rate = median(reps.iter().map(|r| r.rate).collect());
    let p50 = median(reps.iter().map(|r| r.p50_ms).collect());
    let p99 = median(reps.iter().map(|r| r.p99_ms).collect());
    let single_rate = median(singles.iter().map(|r| r.rate).collect());
    let single_p99 = median(singles.iter().map(|r| r.p99_ms).collect());
    let inproc_rate = median(inprocs.iter().map(|r| r.rate).collect());
    let inproc_p99 = median(inprocs.iter().map(|r| r.p99_ms).collect());
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "median of {} rep(s), production path (QUIC, group commit):",
        reps.len()
    );
    println!(
        "  round trips/s   {rate:>9.0}   target > {TARGET_RATE:.0}   met: {}",
        yes_no(rate > TARGET_RATE)
    );
    println!("  p50 round trip  {p50:>9.2} ms");
    println!(
        "  p99 round trip  {p99:>9.2} ms   target < {TARGET_P99_MS} ms   met: {}",
        yes_no(p99 < TARGET_P99_MS)
    );
    println!(
        "  one commit per write: {single_rate:.0} msg/s, p99 {single_p99:.2} ms; \
         group commit throughput ratio {:.2}x",
        rate / single_rate.max(f64::MIN_POSITIVE)
    );
    println!(
        "  in-process gateway (same store and agent, no QUIC): {inproc_rate:.0} msg/s, \
         p99 {inproc_p99:.2} ms; QUIC / in-process throughput {:.2}",
        rate / inproc_rate.max(f64::MIN_POSITIVE)
    );
    println!(
        "  zero lost: {}   (user + assistant rows in SQLite == 2 x messages, every rep)",
        yes_no(!lost)
    );
    println!(
        "  peak RSS {} KiB (whole process: server, clients and SQLite in one process)",
        peak_rss_kib()
    );
    println!(
        "  daemon idle RSS / ready time: cargo bench -p openpista-cli --bench daemon --profile release"
    );
    if lost {
        bail!("messages were lost");
    }
    Ok(())
}
