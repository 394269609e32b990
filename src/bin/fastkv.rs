//! `fastkv`: run prompts through an engine built by `fastkv-build`.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fastkv::select::Pool;
use fastkv::{Budget, Engine, Method, Policy, Prompt, Request, Sampling};

/// Run LLM engines with FastKV (Token-Selective Propagation + GQA-aware KV compression).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, streaming text to stdout.
    Run(Box<RunArgs>),
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
    #[command(flatten)]
    policy: PolicyArgs,
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

/// Compression policy; every value not given comes from the engine's defaults (engine.json).
#[derive(Args)]
struct PolicyArgs {
    /// `full` keeps every KV entry; `fastkv` applies TSP and KV compression.
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// ℓ*: the last layer that sees the whole prompt (0-based).
    #[arg(long)]
    tsp_layer: Option<usize>,
    /// Fraction of prompt tokens propagated past ℓ* (rate mode).
    #[arg(long, conflicts_with_all = ["kv_budget", "tsp_len"])]
    tsp_rate: Option<f64>,
    /// Fraction of KV entries each layer keeps (rate mode).
    #[arg(long, conflicts_with_all = ["kv_budget", "tsp_len"])]
    retain_rate: Option<f64>,
    /// KV entries kept per layer and KV head, window included (absolute mode).
    #[arg(long)]
    kv_budget: Option<usize>,
    /// Tokens propagated past ℓ*, window included (absolute mode).
    #[arg(long)]
    tsp_len: Option<usize>,
    /// Observation window W: the last W prompt tokens score the others and are always kept.
    #[arg(long)]
    window: Option<usize>,
    /// Pooling kernel K (odd).
    #[arg(long)]
    kernel: Option<usize>,
    /// Pooling of window scores before the group sum.
    #[arg(long, value_enum)]
    pool: Option<Pool>,
}

impl PolicyArgs {
    fn apply(&self, mut p: Policy) -> Policy {
        p.method = self.method.unwrap_or(p.method);
        p.tsp_layer = self.tsp_layer.unwrap_or(p.tsp_layer);
        p.window = self.window.unwrap_or(p.window);
        p.kernel = self.kernel.unwrap_or(p.kernel);
        p.pool = self.pool.unwrap_or(p.pool);
        p.budget = match (p.budget, self.kv_budget.is_some() || self.tsp_len.is_some()) {
            // Absolute mode: the paper's v1/v2 CLI defaults fill what is not given.
            (_, true) => {
                Budget::Absolute { kv_budget: self.kv_budget.unwrap_or(512), tsp_len: self.tsp_len.unwrap_or(2048) }
            }
            (Budget::Rate { tsp_rate, retain_rate }, false) => Budget::Rate {
                tsp_rate: self.tsp_rate.unwrap_or(tsp_rate),
                retain_rate: self.retain_rate.unwrap_or(retain_rate),
            },
            (Budget::Absolute { .. }, false) => {
                Budget::Rate { tsp_rate: self.tsp_rate.unwrap_or(0.2), retain_rate: self.retain_rate.unwrap_or(0.1) }
            }
        };
        p
    }
}

fn run(args: &RunArgs) -> Result<()> {
    let engine = Engine::open(&args.engine)?;
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
    req.policy = Some(args.policy.apply(engine.default_policy()));
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

fn verify(engine: &std::path::Path) -> Result<()> {
    let manifest = fastkv::engine::Manifest::read(engine)?;
    manifest.check_files(engine, true)?;
    Engine::open(engine)?;
    println!("{}: ok ({} files, checksums match)", engine.display(), manifest.files.len());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Verify { engine } => verify(engine),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
