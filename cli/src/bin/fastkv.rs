//! `fastkv`: run prompts through an engine built by `fastkv-build`.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fastkv::eval::Contender;
use fastkv::{Device, Engine, Method, Overrides, Prompt, Request, Sampling};
use fastkv_cli::{calibration_summary, describe, plot, Bars};

/// Run LLM engines with FastKV (Token-Selective Propagation + GQA-aware KV compression).
#[derive(Parser)]
#[command(
    version,
    after_help = "Environment: RAYON_NUM_THREADS sets the CPU threads; FASTKV_CPU=f32|avx512bf16|amx caps the CPU \
                  path bf16 engines compute on (default: the fastest this CPU has; `fastkv bench` prints it)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, streaming text to stdout.
    Run(Box<RunArgs>),
    /// Serve the engine over HTTP with the OpenAI API — /v1/chat/completions and /v1/completions,
    /// streamed or not, /v1/models, /health, /metrics (Prometheus), /openapi.json — on the batching
    /// engine: every running request shares each decode step, and each request may set its own
    /// compression policy (the `fastkv` object of its body). SIGTERM or Ctrl-C stops accepting
    /// requests and lets running ones finish (--shutdown-timeout).
    Serve(Box<ServeArgs>),
    /// Time TTFT, prefill and decode speed, KV-cache size and peak memory of several methods side by side.
    Bench(Box<BenchArgs>),
    /// Score compression methods on long-context retrieval tasks.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Hide a sentence in a long document of essays and ask about it, once with the engine's FastKV
    /// policy and once with a full KV cache: both answers, their time to first token and KV size.
    Needle(Box<NeedleArgs>),
    /// Choose an engine's KV budget (retain rate), TSP layer ℓ* and TSP rate from probe prompts (essays with
    /// synthetic facts), print the per-layer evidence and store the choice in its engine.json.
    Calibrate(Box<CalibrateArgs>),
    /// Check an engine directory: manifest, file sizes and sha256 checksums.
    Verify {
        /// Engine directory written by fastkv-build.
        #[arg(long)]
        engine: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Engine directory written by fastkv-build.
    #[arg(long)]
    engine: PathBuf,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Most tokens to generate (generation also stops at an EOS token).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Wrap the prompt as one user message in the engine's chat template.
    #[arg(long)]
    chat: bool,
    /// Print one JSON object (text, token ids, metrics) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Write the KV positions each layer kept (per KV head) and the TSP positions to this JSON file.
    #[arg(long)]
    dump_selection: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Compression policy; every value not given comes from the engine's defaults (engine.json).
    #[command(flatten)]
    policy: Overrides,
    #[command(flatten)]
    device: DeviceArg,
}

/// Where the engine runs.
#[derive(Args)]
struct DeviceArg {
    /// Device to run on: cpu, cuda:N (NVIDIA GPU N; needs a build with the `cuda` feature) or tensorrt:N (the
    /// engine's TensorRT plans on GPU N, built by `fastkv-build --target tensorrt`; feature `tensorrt`).
    #[arg(long, default_value = "cpu")]
    device: Device,
}

impl DeviceArg {
    fn open(&self, engine: &std::path::Path) -> fastkv::Result<Engine> {
        Engine::open_on(engine, self.device)
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Engine directory written by fastkv-build.
    #[arg(long)]
    engine: PathBuf,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/* (also from FASTKV_API_KEY).
    #[arg(long, env = "FASTKV_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model name clients send in `model` [default: the engine directory's name].
    #[arg(long)]
    served_model_name: Option<String>,
    /// `max_tokens` of a request that sends none. Each request sets aside KV cache for its new
    /// tokens, so this bounds what a request without a limit reserves.
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
    /// Largest request body accepted (bytes; K, M, G suffixes); larger ones get 413.
    #[arg(long, default_value = "16M", value_parser = fastkv_cli::parse_bytes)]
    max_body_bytes: usize,
    /// Seconds running requests may take to finish after SIGTERM / Ctrl-C before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Seconds of silence in a stream after which an SSE comment goes out, so that proxies keep a
    /// long prefill's connection open (0: never). Some clients mis-parse comments: vLLM 0.32's
    /// `vllm bench serve` loses the rest of a stream after one.
    #[arg(long, default_value_t = 15)]
    sse_keep_alive: u64,
    /// The policy of requests that send no `fastkv` object (e.g. --method full), over the engine's.
    #[command(flatten)]
    policy: Overrides,
    #[command(flatten)]
    scheduler: fastkv_cli::SchedulerArgs,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct NeedleArgs {
    /// Engine directory written by fastkv-build.
    #[arg(long)]
    engine: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Where the sentence sits: 0 = start of the document, 1 = end.
    #[arg(long, default_value_t = 0.5)]
    depth: f64,
    /// Essays to hide the sentence in (scripts/models.sh installs them).
    #[arg(long, default_value = fastkv::eval::haystack::ESSAYS)]
    haystack: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct CalibrateArgs {
    /// Engine directory written by fastkv-build.
    #[arg(long)]
    engine: PathBuf,
    /// Essays to hide the probe facts in (scripts/models.sh installs them).
    #[arg(long, default_value = fastkv::eval::haystack::ESSAYS)]
    haystack: PathBuf,
    /// Probe prompts (each costs one full prefill).
    #[arg(long, default_value_t = 8)]
    probes: usize,
    /// Probe length in tokens (capped at the model's context).
    #[arg(long, default_value_t = 2048)]
    probe_tokens: usize,
    /// Seed of the probes' facts (same seed, same probes, same choice).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Retain rates r to choose the KV budget from (comma-separated; one value fixes it).
    #[arg(long, value_delimiter = ',', default_values_t = fastkv::calibrate::RETAIN_RATES)]
    retain_rates: Vec<f64>,
    /// TSP rates t to choose from (comma-separated; one value fixes it).
    #[arg(long, value_delimiter = ',', default_values_t = fastkv::calibrate::TSP_RATES)]
    tsp_rates: Vec<f64>,
    /// Also draw the budget's trade-off (answer score against the KV cache kept) as SVG or PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the evidence and the choice without changing engine.json.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the k most likely tokens; 0 = no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling (same seed, same output).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run(args: &RunArgs) -> Result<()> {
    let engine = args.device.open(&args.engine)?;
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("{}: cannot read prompt file", f.display()))?
        }
        (None, None) => unreachable!("clap requires one of --prompt / --prompt-file"),
    };
    let mut req = Request::new(if args.chat { Prompt::Chat(text) } else { Prompt::Text(text) });
    req.max_new_tokens = args.max_new_tokens;
    req.sampling = Sampling {
        temperature: args.sampling.temperature,
        top_k: args.sampling.top_k,
        top_p: args.sampling.top_p,
        seed: args.sampling.seed,
    };
    req.policy = Some(args.policy.apply(engine.default_policy(), engine.spec())?);
    req.record_selection = args.dump_selection.is_some();
    let mut stdout = std::io::stdout().lock();
    let out = engine.generate(&req, |t| {
        if !args.json {
            // A closed stdout (e.g. `| head`) stops generation instead of failing.
            if write!(stdout, "{}", t.text).and_then(|_| stdout.flush()).is_err() {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if let (Some(path), Some(sel)) = (&args.dump_selection, &out.selection) {
        let json = serde_json::to_string(sel)?;
        std::fs::write(path, json).with_context(|| format!("{}: cannot write selection dump", path.display()))?;
    }
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        let m = &out.metrics;
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated ({:?}); TTFT {:.3} s; prefill {:.0} tok/s; decode {:.1} tok/s; KV cache {:.2} MB of {:.2} MB full]",
            m.prompt_tokens,
            m.generated_tokens,
            out.finish_reason,
            m.ttft_s,
            m.prefill_tokens_per_s,
            m.decode_tokens_per_s,
            m.kv_cache_bytes as f64 / 1e6,
            m.kv_cache_bytes_full as f64 / 1e6,
        );
    }
    Ok(())
}

/// `fastkv serve`'s prefill slice when --prefill-slice-ms is not given: a server's users wait for their first
/// token, so a new prompt's prefill runs up to a second before the streams get a step, as vLLM's and
/// llama-server's schedulers also favour prefill (docs/serving.md#measured).
const SERVE_PREFILL_SLICE: std::time::Duration = std::time::Duration::from_secs(1);

fn serve(args: &ServeArgs) -> Result<()> {
    let mut limits = args.scheduler.limits()?;
    limits.prefill_slice = limits.prefill_slice.or(Some(SERVE_PREFILL_SLICE));
    let options = fastkv_server::Options {
        engine: args.engine.clone(),
        device: args.device.device,
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        served_model_name: args.served_model_name.clone(),
        policy: args.policy.clone(),
        limits,
        default_max_tokens: args.default_max_tokens,
        max_body_bytes: args.max_body_bytes,
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout),
        keep_alive: (args.sse_keep_alive > 0).then(|| std::time::Duration::from_secs(args.sse_keep_alive)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(fastkv_server::serve(options))
}

fn needle(args: &NeedleArgs) -> Result<()> {
    use fastkv::eval::{haystack::Haystack, niah};
    let engine = args.device.open(&args.engine)?;
    let haystack = Haystack::load(&args.haystack, &engine, args.tokens)?;
    let needle = niah::Needle::default();
    let sample =
        niah::samples(&engine, &haystack, std::slice::from_ref(&needle), &[args.tokens], &[args.depth])?.remove(0);
    println!("{} prompt tokens; hidden at depth {}: \"{}\"", sample.prompt.len(), args.depth, needle.sentence);
    println!("Q: {}\n", needle.question);
    let fastkv = engine.default_policy();
    let origin = match (&engine.manifest.calibration, &engine.manifest.preset) {
        (Some(c), _) => calibration_summary(c),
        (None, Some(name)) => format!("from the {name} preset"),
        (None, None) => "FastKV's defaults, not calibrated".into(),
    };
    println!("FastKV policy: {}\n  {origin}\n", describe(&fastkv));
    // A first prefill on cold caches (weights paged in, threads started) would count against the
    // method that runs first: warm up on the prompt's first 512 tokens.
    let mut warm = Request::new(Prompt::Tokens(sample.prompt[..sample.prompt.len().min(512)].to_vec()));
    warm.max_new_tokens = 1;
    engine.generate(&warm, |_| ControlFlow::Continue(()))?;
    for (name, policy) in [("FastKV", fastkv), ("full KV", engine.full_policy())] {
        let mut req = Request::new(Prompt::Tokens(sample.prompt.clone()));
        req.max_new_tokens = sample.max_new_tokens;
        req.policy = Some(policy);
        let out = engine.generate(&req, |_| ControlFlow::Continue(()))?;
        let m = &out.metrics;
        let found = fastkv::eval::string_match_all(&out.text, &sample.answers) == 1.0;
        println!(
            "{name}\n  A: {}{}\n  {}; TTFT {:.2} s; KV cache {:.1} MB ({:.1} % of full)\n",
            needle.answer_prefix,
            out.text.trim_end(),
            if found { "found the needle" } else { "missed the needle" },
            m.ttft_s,
            m.kv_cache_bytes as f64 / 1e6,
            100.0 * m.kv_cache_bytes as f64 / m.kv_cache_bytes_full as f64,
        );
    }
    Ok(())
}

fn calibrate(args: &CalibrateArgs) -> Result<()> {
    use fastkv::calibrate::{self, Grid, Probes};
    if let Some(path) = &args.plot {
        plot::check_path(path)?;
    }
    let engine = args.device.open(&args.engine)?;
    let probes =
        Probes { haystack: args.haystack.clone(), count: args.probes, tokens: args.probe_tokens, seed: args.seed };
    let grid = Grid { retain_rates: args.retain_rates.clone(), tsp_rates: args.tsp_rates.clone() };
    let c = calibrate::calibrate(&engine, &probes, &grid, &Bars::new())?;
    let spec = engine.spec();
    let before = engine.default_policy();
    println!(
        "the KV budget on {} probes of {} tokens (answers: share of the code right, greedy; full KV {:.1} %)",
        c.probes,
        c.probe_tokens,
        100.0 * c.full_score
    );
    println!("  retain r  KV kept  SnapKV-GQA");
    let chosen_r = match c.budget {
        fastkv::Budget::Rate { retain_rate, .. } => Some(retain_rate),
        fastkv::Budget::Absolute { .. } => None,
    };
    for b in &c.budgets {
        let mark = if Some(b.retain_rate) == chosen_r { '*' } else { ' ' };
        println!(
            "  {mark}{:>7}  {:>5.1} %  {:>8.1} %",
            b.retain_rate,
            100.0 * b.kv_fraction,
            100.0 * b.snapkv_gqa_score
        );
    }
    print!("\nrecall of the probe facts' tokens after TSP (ideal prefill speed-up) at that budget\nlayer");
    for cand in &c.candidates {
        print!("  {:>18}", budget_name(&cand.budget));
    }
    println!();
    for layer in 0..spec.num_layers - 1 {
        print!("{layer:>5}");
        for cand in &c.candidates {
            let policy = fastkv::Policy { tsp_layer: layer, budget: cand.budget, ..before };
            let mark = if layer == c.tsp_layer && cand.budget == c.budget { '*' } else { ' ' };
            let speedup = calibrate::ideal_speedup(spec, &policy, c.probe_tokens);
            print!("  {mark}{:>6.1} % ({speedup:>4.2}×)", 100.0 * cand.recall[layer]);
        }
        println!();
    }
    println!("\nanswers of the fastest candidates (SnapKV-GQA at that budget {:.1} %)", 100.0 * c.snapkv_gqa_score);
    for v in &c.verified {
        let policy = fastkv::Policy { tsp_layer: v.tsp_layer, budget: v.budget, ..before };
        let speedup = calibrate::ideal_speedup(spec, &policy, c.probe_tokens);
        println!("  ℓ = {:>2}, {:<8} ({speedup:.2}×): {:.1} %", v.tsp_layer, budget_name(&v.budget), 100.0 * v.score);
    }
    println!(
        "\ncriterion: the smallest r whose SnapKV-GQA answers are at most {tol:.0} points below full KV's, then of \
         the {} fastest (ℓ*, t) with recall ≥ {:.0} %, the fastest that answers at most {tol:.0} points below \
         SnapKV-GQA's (else the best answering)\n{}\nwas: {}",
        calibrate::VERIFIED,
        100.0 * c.min_recall,
        calibration_summary(&c),
        describe(&before),
        tol = 100.0 * calibrate::TOLERANCE,
    );
    if let Some(path) = &args.plot {
        let series = |name: &str, points: Vec<(f64, f64)>| (name.to_string(), points);
        let kv = |b: &fastkv::engine::BudgetScore| 100.0 * b.kv_fraction;
        let lines = [
            series("full KV", c.budgets.iter().map(|b| (kv(b), 100.0 * c.full_score)).collect()),
            series("SnapKV-GQA", c.budgets.iter().map(|b| (kv(b), 100.0 * b.snapkv_gqa_score)).collect()),
            series("FastKV (chosen)", vec![(100.0 * c.kv_fraction, 100.0 * c.chosen_score())]),
        ];
        let title = format!("{}: probe answers against the KV cache kept", args.engine.display());
        plot::lines(path, &title, "KV cache kept (% of full)", "answer score (%)", &lines)?;
        println!("wrote {}", path.display());
    }
    if !args.dry_run {
        let mut manifest = engine.manifest.clone();
        manifest.set_calibration(c);
        manifest.write(&args.engine)?;
        println!("wrote {}", args.engine.join(fastkv::engine::MANIFEST).display());
    }
    Ok(())
}

fn budget_name(budget: &fastkv::policy::Budget) -> String {
    match budget {
        fastkv::policy::Budget::Rate { tsp_rate, .. } => format!("t = {tsp_rate}"),
        fastkv::policy::Budget::Absolute { tsp_len, .. } => format!("T = {tsp_len}"),
    }
}

fn verify(engine: &std::path::Path) -> Result<()> {
    let manifest = fastkv::engine::Manifest::read(engine)?;
    manifest.check_files(engine, true)?;
    Engine::open(engine)?;
    println!("{}: ok ({} files, checksums match)", engine.display(), manifest.files.len());
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    /// Engine directory written by fastkv-build.
    #[arg(long)]
    engine: PathBuf,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "2048,8192,16384")]
    lengths: Vec<usize>,
    #[command(flatten)]
    methods: MethodsArgs,
    /// Untimed runs of each method and length first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs of each method and length (the table shows medians and min–max).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Tokens to decode after each prompt, for decode speed.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Text whose tokens, repeated, make the prompts.
    #[arg(long, default_value = "examples/long_prompt.txt")]
    prompt_file: PathBuf,
    /// Also write every run as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw median TTFT per length and method to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Instead of one request at a time: submit this many requests at once to the batching engine
    /// (one run per value, per length and method; each request decodes exactly --new-tokens) and
    /// report output and batched-decode tokens/s, TTFT and inter-token latency percentiles, and how
    /// many such requests the cache memory holds.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// With --concurrency C: while C streams of --lengths tokens decode, submit this many prompts of
    /// --arrival-tokens at once and compare the streams' inter-token latency with and without them.
    #[arg(long, requires = "concurrency")]
    arrivals: Option<usize>,
    /// Prompt length of the --arrivals.
    #[arg(long, default_value_t = 4096)]
    arrival_tokens: usize,
    #[command(flatten)]
    scheduler: fastkv_cli::SchedulerArgs,
    #[command(flatten)]
    device: DeviceArg,
}

/// Which methods to compare, at which KV retain rates.
#[derive(Args)]
struct MethodsArgs {
    /// Compression methods to compare (in `bench`, the first is the baseline of the speed-up column).
    /// Default: full,fastkv for bench; full,fastkv,snapkv-gqa for eval.
    #[arg(long, value_enum, value_delimiter = ',')]
    methods: Vec<Method>,
    /// KV retain rates r to run every compressing method at (rate mode; TSP rate stays the engine's).
    #[arg(long, value_delimiter = ',')]
    retain_rates: Vec<f64>,
    /// TSP layers ℓ* to run FastKV at (0-based; default: the engine's).
    #[arg(long, value_delimiter = ',')]
    tsp_layers: Vec<usize>,
}

impl MethodsArgs {
    /// The contenders, of `defaults` where no method is given.
    fn contenders(&self, engine: &Engine, defaults: &[Method]) -> fastkv::Result<Vec<Contender>> {
        let methods = if self.methods.is_empty() { defaults } else { &self.methods };
        fastkv::eval::contenders(engine, methods, &self.retain_rates, &self.tsp_layers)
    }
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Needle in a haystack: a sentence hidden at several depths of essay contexts of several lengths.
    Niah(Box<NiahArgs>),
    /// RULER-style synthetic tasks: multi-key / multi-value needles, variable tracking, common words.
    Ruler(Box<RulerArgs>),
}

/// What every eval needs: the engine, the haystack, the methods and where results go.
#[derive(Args)]
struct EvalArgs {
    /// Engine directory written by fastkv-build.
    #[arg(long)]
    engine: PathBuf,
    /// Essays to hide needles in: a folder of .txt files, a .txt file or a RULER .json (scripts/models.sh installs them).
    #[arg(long, default_value = fastkv::eval::haystack::ESSAYS)]
    haystack: PathBuf,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
    lengths: Vec<usize>,
    #[command(flatten)]
    methods: MethodsArgs,
    /// Write every answer and score as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw one score heat map per method to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct NiahArgs {
    #[command(flatten)]
    common: EvalArgs,
    /// Needle depths, 0 = start of the context, 1 = end.
    #[arg(long, value_delimiter = ',', default_value = "0,0.11,0.22,0.33,0.44,0.56,0.67,0.78,0.89,1")]
    depths: Vec<f64>,
    /// How many of the built-in needles to hide, one per sample (1–4; the first is the original test's).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=4))]
    needles: u8,
}

#[derive(Args)]
struct RulerArgs {
    #[command(flatten)]
    common: EvalArgs,
    /// Tasks to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = fastkv::eval::ruler::Task::ALL)]
    tasks: Vec<fastkv::eval::ruler::Task>,
    /// Samples per task and length.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Seed of the generated tasks (same seed, same prompts).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn bench(args: &BenchArgs) -> Result<()> {
    if let Some(path) = &args.plot {
        plot::check_path(path)?;
    }
    let engine = args.device.open(&args.engine)?;
    let text = std::fs::read_to_string(&args.prompt_file)
        .with_context(|| format!("{}: cannot read prompt file", args.prompt_file.display()))?;
    if !args.concurrency.is_empty() {
        return bench_concurrency(args, engine, &text);
    }
    let cfg = fastkv::bench::BenchConfig {
        lengths: args.lengths.clone(),
        contenders: args.methods.contenders(&engine, &[Method::Full, Method::Fastkv])?,
        warmup: args.warmup,
        repeats: args.repeats,
        new_tokens: args.new_tokens,
    };
    let rows = fastkv::bench::run(&engine, &text, &cfg, &Bars::new())?;
    if args.device.device == fastkv::Device::Cpu {
        println!("cpu path: {}", fastkv::cpu::isa::describe());
    }
    print!("{}", fastkv::bench::format_table(&rows));
    if let Some(path) = &args.json {
        write_json(path, &rows)?;
    }
    if let Some(path) = &args.plot {
        let groups: Vec<String> = args.lengths.iter().map(|l| format!("{l} tokens")).collect();
        let series: Vec<String> = cfg.contenders.iter().map(|c| c.name.clone()).collect();
        let values: Vec<Vec<f64>> = series
            .iter()
            .map(|m| {
                let ttft = |&l: &usize| rows.iter().find(|r| &r.method == m && r.length == l).map(|r| r.ttft_s.median);
                args.lengths.iter().map(|l| ttft(l).unwrap_or(f64::NAN)).collect()
            })
            .collect();
        plot::grouped_bars(path, "time to first token", "TTFT (s)", &groups, &series, &values)?;
    }
    Ok(())
}

fn bench_concurrency(args: &BenchArgs, engine: Engine, text: &str) -> Result<()> {
    if args.concurrency.contains(&0) {
        anyhow::bail!("invalid --concurrency: every value must be at least 1");
    }
    let contenders = args.methods.contenders(&engine, &[Method::Full, Method::Fastkv])?;
    let scheduler = args.scheduler.limits()?.config(&engine);
    let engine = std::sync::Arc::new(engine);
    if let Some(arrivals) = args.arrivals {
        let mut rows = Vec::new();
        for c in &contenders {
            for (&streams, &length) in args.concurrency.iter().zip(args.lengths.iter().cycle()) {
                let cfg = fastkv::bench::ArrivalsConfig {
                    streams,
                    length,
                    arrivals,
                    arrival_length: args.arrival_tokens,
                    policy: c.policy,
                    method: c.name.clone(),
                    baseline: std::time::Duration::from_secs(3),
                    scheduler,
                };
                let r = fastkv::bench::arrivals(&engine, text, &cfg)?;
                println!(
                    "{}: {streams} streams of {length} tokens; {arrivals} prompts of {} tokens arrive: stream ITL p50/p99 \
                     {:.1}/{:.1} ms without, {:.1}/{:.1} ms with ({:.2}× p99); arrivals' TTFT p50/max {:.2}/{:.2} s",
                    r.method,
                    r.arrival_tokens,
                    1e3 * r.itl_without_s.p50,
                    1e3 * r.itl_without_s.p99,
                    1e3 * r.itl_with_s.p50,
                    1e3 * r.itl_with_s.p99,
                    r.p99_ratio,
                    r.arrival_ttft_s.p50,
                    r.arrival_ttft_s.max,
                );
                rows.push(r);
            }
        }
        if let Some(path) = &args.json {
            write_json(path, &rows)?;
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    for &length in &args.lengths {
        let cfg = fastkv::bench::ConcurrencyConfig {
            length,
            contenders: contenders.clone(),
            concurrency: args.concurrency.clone(),
            new_tokens: args.new_tokens,
            scheduler,
        };
        rows.extend(fastkv::bench::concurrency(&engine, text, &cfg, &Bars::new())?);
    }
    if args.device.device == fastkv::Device::Cpu {
        println!("cpu path: {}", fastkv::cpu::isa::describe());
    }
    println!("KV cache memory: {:.1} MB", scheduler.kv_cache_memory as f64 / 1e6);
    print!("{}", fastkv::bench::format_concurrency(&rows));
    if let Some(path) = &args.json {
        write_json(path, &rows)?;
    }
    Ok(())
}

fn eval(cmd: &EvalCommand) -> Result<()> {
    use fastkv::eval::{haystack::Haystack, mean_table, niah, ruler};
    let common = match cmd {
        EvalCommand::Niah(a) => &a.common,
        EvalCommand::Ruler(a) => &a.common,
    };
    if let Some(path) = &common.plot {
        plot::check_path(path)?;
    }
    let engine = common.device.open(&common.engine)?;
    let longest = common.lengths.iter().copied().max().unwrap_or(0);
    let haystack = Haystack::load(&common.haystack, &engine, longest)?;
    let contenders = common.methods.contenders(&engine, &[Method::Full, Method::Fastkv, Method::SnapkvGqa])?;
    let (samples, x, y): (_, _, fn(&fastkv::eval::Score) -> String) = match cmd {
        EvalCommand::Niah(a) => {
            let needles = &niah::Needle::all()[..a.needles as usize];
            let samples = niah::samples(&engine, &haystack, needles, &common.lengths, &a.depths)?;
            (samples, "depth", |s| format!("{:.2}", s.depth.unwrap_or(0.0)))
        }
        EvalCommand::Ruler(a) => {
            let mut samples = Vec::new();
            for &task in &a.tasks {
                samples.extend(ruler::samples(&engine, &haystack, task, &common.lengths, a.samples, a.seed)?);
            }
            (samples, "task", |s| s.task.clone())
        }
    };
    let scores = fastkv::eval::run(&engine, &samples, &contenders, &Bars::new())?;
    for (label, key) in [("tokens", (|s: &fastkv::eval::Score| s.length.to_string()) as fn(&_) -> _), (x, y)] {
        let (rows, methods, cells) = mean_table(&scores, key);
        println!("{}", fastkv::eval::format_table(label, &rows, &methods, &cells));
    }
    print!("{}", fastkv::eval::summary(&scores, &contenders));
    if let Some(path) = &common.json {
        write_json(path, &scores)?;
    }
    if let Some(path) = &common.plot {
        plot::heatmaps(path, "prompt tokens", x, &fastkv::eval::grids(&scores, y))?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON, via a temporary file so a failure leaves nothing half-written.
fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<()> {
    let tmp = path.with_extension("json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n")
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("{}: cannot write JSON", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench(args),
        Command::Eval(cmd) => eval(cmd),
        Command::Needle(args) => needle(args),
        Command::Calibrate(args) => calibrate(args),
        Command::Verify { engine } => verify(engine),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", fastkv_cli::message(&e));
            ExitCode::FAILURE
        }
    }
}
