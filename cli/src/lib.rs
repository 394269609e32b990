//! What the fastkv command-line tools share: progress bars ([`Bars`]), charts ([`plot`]), policies
//! and calibrations in words ([`describe`], [`calibration_summary`]) and errors in the tools' words
//! ([`message`]). The tools are thin: every decision is the library's.

pub mod plot;

use std::io::IsTerminal;
use std::sync::Mutex;

use clap::Args;
use fastkv::engine::Calibration;
use fastkv::progress::Progress;
use fastkv::scheduler::Limits;
use fastkv::{Budget, Method, Policy};
use indicatif::{ProgressBar, ProgressStyle};

/// The batching engine's limits (`fastkv serve`, `fastkv bench --concurrency`).
#[derive(Args, Clone, Debug)]
pub struct SchedulerArgs {
    /// Memory for the KV caches of the requests running at once, with their room for new tokens
    /// (bytes; K, M, G suffixes are powers of 1024) [default: half the memory free after loading]. A
    /// request waits until its cache fits; FastKV's caches are about a tenth of full KV's.
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_memory: Option<usize>,
    /// Requests that may wait for cache memory; beyond them the server answers "busy, retry".
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Most requests decoding at once, sharing every decode step.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Milliseconds a new request's prefill may run before the running requests get a decode step
    /// [default: 1000 for `fastkv serve`, which favours time to first token; for `fastkv bench`, as
    /// long as the last step took, so running streams keep about twice their inter-token latency].
    /// Larger values favour new requests' time to first token and fuller batches over the running
    /// streams' latency.
    #[arg(long)]
    pub prefill_slice_ms: Option<u64>,
}

impl SchedulerArgs {
    /// Refuses limits no engine could run under, naming the flag.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.max_running == 0 {
            anyhow::bail!("invalid --max-running: must be at least 1");
        }
        Ok(())
    }

    /// The limits these flags set, checked.
    pub fn limits(&self) -> anyhow::Result<Limits> {
        self.check()?;
        Ok(Limits {
            kv_cache_memory: self.kv_cache_memory,
            max_waiting: self.max_waiting,
            max_running: self.max_running,
            prefill_slice: self.prefill_slice_ms.map(std::time::Duration::from_millis),
        })
    }
}

/// A byte count: digits with an optional K, M, G or T suffix (powers of 1024; a trailing B or iB is
/// allowed).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().trim_end_matches(['B', 'b']).trim_end_matches('i');
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: f64 = digits.trim().parse().map_err(|_| format!("`{s}` is not a byte count (e.g. 4G, 512M, 1000000)"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("`{s}` is not a byte count"));
    }
    Ok((n * (1u64 << shift) as f64) as usize)
}

/// The library's progress on stderr: a bar on a terminal; elsewhere (a log, CI) one line per
/// counted step, so a long calibration or evaluation shows it is alive, and nothing for byte counts.
pub struct Bars {
    bar: Mutex<Option<(ProgressBar, String, u64)>>,
    terminal: bool,
}

impl Bars {
    pub fn new() -> Self {
        Bars { bar: Mutex::new(None), terminal: std::io::stderr().is_terminal() }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bars {
    fn begin(&self, what: &str, total: u64, bytes: bool) {
        let bar = if self.terminal { ProgressBar::new(total) } else { ProgressBar::hidden() };
        let template = if bytes {
            format!("{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{msg}}")
        } else {
            format!("{{bar:40}} {{pos}}/{{len}} {what}, {{msg}} [{{elapsed}} < {{eta}}]")
        };
        bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
        let what = if bytes { String::new() } else { what.to_string() };
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some((bar, what, total));
    }

    fn advance(&self, steps: u64, note: &str) {
        if let Some((bar, what, total)) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            bar.set_message(note.to_string());
            bar.inc(steps);
            if !self.terminal && !what.is_empty() {
                eprintln!("{}/{total} {what} done ({note})", bar.position());
            }
        }
    }

    fn end(&self) {
        if let Some((bar, ..)) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

/// An error chain in the tools' words: the first library error is shown as the CLI names it
/// (`invalid --kv-budget`, [`fastkv::Error::cli_message`]); its message already includes its sources.
pub fn message(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        if let Some(fe) = cause.downcast_ref::<fastkv::Error>() {
            parts.push(fe.cli_message());
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}

/// A policy in one line: its method and budgets, and the floor below which it compresses nothing.
pub fn describe(p: &Policy) -> String {
    let budget = match (p.method, p.budget) {
        (Method::Full, _) => return "full KV".into(),
        (Method::Fastkv, Budget::Rate { tsp_rate, retain_rate }) => {
            format!("r = {retain_rate}, ℓ* = {}, t = {tsp_rate}", p.tsp_layer)
        }
        (Method::Fastkv, Budget::Absolute { kv_budget, tsp_len }) => {
            format!("C = {kv_budget}, ℓ* = {}, T = {tsp_len}", p.tsp_layer)
        }
        (_, Budget::Rate { retain_rate, .. }) => format!("r = {retain_rate}"),
        (_, Budget::Absolute { kv_budget, .. }) => format!("C = {kv_budget}"),
    };
    format!(
        "{} ({budget}; prompts under {} tokens kept whole, at least {} entries per head)",
        p.method.name(),
        p.floor.prompt_len,
        p.floor.kv_budget
    )
}

/// What a calibration chose and what it gave up, in one line.
pub fn calibration_summary(c: &Calibration) -> String {
    let r = match c.budget {
        Budget::Rate { retain_rate, tsp_rate } => format!("r = {retain_rate}, ℓ* = {}, t = {tsp_rate}", c.tsp_layer),
        Budget::Absolute { kv_budget, tsp_len } => format!("C = {kv_budget}, ℓ* = {}, T = {tsp_len}", c.tsp_layer),
    };
    format!(
        "calibrated {r}: keeps {:.0} % of the KV cache, ideal prefill speed-up {:.2}×; probe answers {:.0} % \
         (full KV {:.0} %, SnapKV-GQA at this budget {:.0} %)",
        100.0 * c.kv_fraction,
        c.ideal_speedup,
        100.0 * c.chosen_score(),
        100.0 * c.full_score,
        100.0 * c.snapkv_gqa_score
    )
}
