//! Local inference through [`LocalProvider`] next to a bare `llama-cpp-2`
//! decode loop on the same model, threads, context parameters and prompt.
//!
//! `cargo bench -p openpista-llm --bench local_inference` runs one warm-up and
//! then interleaved iterations (provider and bare take turns, the order flipping
//! each round, so machine noise hits both), and prints median prompt-processing
//! and generation tok/s with the ratio provider/bare (the median of the
//! per-round ratios). Without `--bench` (e.g.
//! `cargo test --benches`) it does one short round as a smoke test.
//!
//! Both sides pay the same per-request costs: a new llama.cpp context, the
//! prompt decoded in `n_batch` chunks, greedy sampling. "Prompt" time runs from
//! the start of a request to its first sampled token; "generation" time from
//! the first token to the last, over the tokens after the first.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use openpista_llm::local::{self, DEFAULT_MODEL, LocalConfig, LocalProvider};
use openpista_llm::{ChatRequest, LlmEvent, LlmProvider, Sampling, ToolChoice};
use openpista_proto::ChatMessage;

const THREADS: u32 = 2;
const CONTEXT: u32 = 2048;

/// An agent-sized system prompt (a few hundred tokens) and a request that
/// makes even a small model write at length.
const SYSTEM: &str = "You are openpista, a personal assistant that runs on the user's own \
machine. You answer in plain, friendly English. You keep answers focused on what the user \
asked, but when the user asks for a story you write a long one with a beginning, a middle \
and an end, named characters, places with texture, and dialogue. You never mention that you \
are a language model. You do not use markdown headings. When you are unsure about a fact you \
say so instead of guessing. You respect the user's time: no filler, no apologies, no \
repetition. The user lives in a small town by the sea, likes dragons, old maps, lighthouses, \
pistachio ice cream and long walks at dusk, and reads stories aloud to their children before \
bed. Stories for them should be gentle, a little funny, and end well. Use simple words that a \
seven-year-old can follow, short sentences, and vivid sounds and colours.";
const USER: &str = "Write a long story about a dragon named Pista.";

struct Run {
    prompt: Duration,
    generation: Duration,
    /// Tokens generated, the first one included.
    generated: usize,
    text: String,
}

impl Run {
    fn pp_tok_s(&self, prompt_tokens: usize) -> f64 {
        prompt_tokens as f64 / self.prompt.as_secs_f64()
    }

    fn tg_tok_s(&self) -> f64 {
        self.generated.saturating_sub(1) as f64 / self.generation.as_secs_f64()
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (rounds, max_tokens) = if bench { (9, 64) } else { (1, 8) };

    let path = model_path();
    let cfg = LocalConfig {
        context_size: CONTEXT,
        threads: THREADS,
        temperature: 0.0,
        // The bare loop is plain greedy; the penalty sampler is not what we measure.
        repeat_penalty: 1.0,
        max_tokens,
        ..LocalConfig::default()
    };
    let batch_size = cfg.batch_size;
    let provider = LocalProvider::load(&path, cfg, |_| true).expect("model loads");
    let request = ChatRequest {
        messages: vec![ChatMessage::system(SYSTEM), ChatMessage::user(USER)],
        tools: Default::default(),
        tool_choice: ToolChoice::None,
        sampling: Sampling {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ..Sampling::default()
        },
    };
    let prompt = provider.render_prompt(&request).expect("prompt renders");
    let tokens = provider.tokenize(&prompt);
    let (n_ctx, threads) = provider.runtime();

    println!("llama.cpp system info: {}", local::system_info().trim());
    println!(
        "model {}, threads {threads}, n_ctx {n_ctx}, n_batch {batch_size}, prompt {} tokens, \
         up to {max_tokens} generated, greedy",
        path.file_name().unwrap_or_default().to_string_lossy(),
        tokens.len()
    );
    println!(
        "{} ({rounds} interleaved round(s) after 1 warm-up)",
        if bench { "bench" } else { "smoke run" }
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let via_provider = || rt.block_on(provider_run(&provider, &request));
    let bare = || bare_run(&provider, &tokens, batch_size, max_tokens as usize);

    // Warm-up: page the weights in, settle the CPU clocks, check both agree.
    let (w_prov, w_bare) = (via_provider(), bare());
    assert_eq!(
        w_prov.text, w_bare.text,
        "provider and bare loop must produce the same greedy text"
    );

    let mut prov_runs = Vec::with_capacity(rounds);
    let mut bare_runs = Vec::with_capacity(rounds);
    for round in 0..rounds {
        if round % 2 == 0 {
            prov_runs.push(via_provider());
            bare_runs.push(bare());
        } else {
            bare_runs.push(bare());
            prov_runs.push(via_provider());
        }
    }

    let n = tokens.len();
    for (round, (b, p)) in bare_runs.iter().zip(&prov_runs).enumerate() {
        println!(
            "  round {round}: prompt tok/s bare {:.1} provider {:.1}, \
             generation tok/s bare {:.1} provider {:.1} ({} tokens)",
            b.pp_tok_s(n),
            p.pp_tok_s(n),
            b.tg_tok_s(),
            p.tg_tok_s(),
            p.generated
        );
    }
    let med = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    // The ratio is the median of per-round ratios: each pair ran back to back,
    // so a slow patch on the machine slows both sides of the same pair.
    let paired = |f: &dyn Fn(&Run) -> f64| {
        median(
            bare_runs
                .iter()
                .zip(&prov_runs)
                .map(|(b, p)| f(p) / f(b))
                .collect(),
        )
    };
    let pp_ratio = paired(&|r| r.pp_tok_s(n));
    let tg_ratio = paired(&|r| r.tg_tok_s());
    println!(
        "{:<20} {:>12} {:>12} {:>15}",
        "median", "bare", "provider", "provider/bare"
    );
    for (name, b, p, ratio) in [
        (
            "prompt tok/s",
            med(&bare_runs, &|r| r.pp_tok_s(n)),
            med(&prov_runs, &|r| r.pp_tok_s(n)),
            pp_ratio,
        ),
        (
            "generation tok/s",
            med(&bare_runs, &|r| r.tg_tok_s()),
            med(&prov_runs, &|r| r.tg_tok_s()),
            tg_ratio,
        ),
    ] {
        println!("{name:<20} {b:>12.1} {p:>12.1} {ratio:>15.3}");
    }
    let verdict = if pp_ratio >= 0.95 && tg_ratio >= 0.95 {
        "PASS"
    } else {
        "BELOW"
    };
    println!("target >= 0.95: {verdict} (prompt {pp_ratio:.3}, generation {tg_ratio:.3})");
}

/// One request through the provider: from `stream()` to the first text delta,
/// then to `Done`.
async fn provider_run(provider: &LocalProvider, request: &ChatRequest) -> Run {
    let start = Instant::now();
    let mut stream = provider.stream(request.clone()).await.expect("stream");
    let mut first = None;
    let mut text = String::new();
    let mut generated = 0;
    while let Some(event) = stream.next().await {
        match event.expect("generation") {
            LlmEvent::TextDelta(t) => {
                first.get_or_insert_with(Instant::now);
                text.push_str(&t);
            }
            LlmEvent::ToolCallDelta { .. } => panic!("no tools were offered"),
            LlmEvent::Done { usage, .. } => generated = usage.completion_tokens as usize,
        }
    }
    let end = Instant::now();
    let first = first.expect("at least one text delta");
    Run {
        prompt: first - start,
        generation: end - first,
        generated,
        text,
    }
}

/// The same work with `llama-cpp-2` alone: a fresh context with the provider's
/// parameters, the prompt in `n_batch` chunks, then greedy decoding one token at
/// a time. Detokenizing happens after the clock stops.
fn bare_run(
    provider: &LocalProvider,
    tokens: &[LlamaToken],
    batch_size: u32,
    max_tokens: usize,
) -> Run {
    let model = provider.model();
    let (n_ctx, threads) = provider.runtime();
    let start = Instant::now();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(batch_size.max(32))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let backend = local::backend().expect("backend");
    let mut ctx = model.new_context(backend, params).expect("context");
    let n_batch = ctx.n_batch().max(1) as usize;
    let mut batch = LlamaBatch::new(n_batch, 1);
    let last = tokens.len() - 1;
    for (chunk_idx, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (j, tok) in chunk.iter().enumerate() {
            let pos = chunk_idx * n_batch + j;
            batch.add(*tok, pos as i32, &[0], pos == last).unwrap();
        }
        ctx.decode(&mut batch).unwrap();
    }
    let mut sampler = LlamaSampler::greedy();
    let mut token = sampler.sample(&ctx, batch.n_tokens() - 1);
    let first = Instant::now();
    let mut out = Vec::with_capacity(max_tokens);
    let mut n_past = tokens.len();
    while !model.vocab().is_eog(token) {
        out.push(token);
        if out.len() >= max_tokens {
            break;
        }
        batch.clear();
        batch.add(token, n_past as i32, &[0], true).unwrap();
        n_past += 1;
        ctx.decode(&mut batch).unwrap();
        // `sample` also accepts the token.
        token = sampler.sample(&ctx, 0);
    }
    let end = Instant::now();

    let mut bytes = Vec::new();
    for &t in &out {
        model
            .vocab()
            .token_to_piece_into(t, &mut bytes, false, None);
    }
    Run {
        prompt: first - start,
        generation: end - first,
        generated: out.len(),
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        (xs[mid - 1] + xs[mid]) / 2.0
    }
}

fn model_path() -> PathBuf {
    let dir = std::env::var_os("OPENPISTA_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".local/share/openpista/models")
        });
    let path = dir.join(DEFAULT_MODEL);
    assert!(
        path.is_file(),
        "the benchmark model is missing at {}; {}",
        path.display(),
        local::FETCH_HINT.replace("MODELS_DIR", &dir.display().to_string())
    );
    path
}
