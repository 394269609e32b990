//! `fastkv bench`: time-to-first-token, prefill and decode speed, KV-cache size and peak memory of several
//! compression methods on one engine, measured side by side in one process (methods interleaved per repeat, so a
//! noisy machine slows them all alike).

use std::ops::ControlFlow;

use serde::Serialize;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eval::Contender;
use crate::progress::Progress;
use crate::session::{Prompt, Request};

pub struct BenchConfig {
    pub lengths: Vec<usize>,
    pub contenders: Vec<Contender>,
    /// Untimed runs per (method, length) before the timed ones.
    pub warmup: usize,
    pub repeats: usize,
    /// Most tokens decoded after the prompt (fewer if the model emits EOS; decode speed needs ≥ 2).
    pub new_tokens: usize,
}

/// One timed run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Run {
    pub ttft_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub kv_cache_bytes: usize,
    /// Peak resident memory of the process during the run (Linux; `None` elsewhere).
    pub peak_rss_bytes: Option<u64>,
}

/// Median and spread of one statistic over the repeats.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Stat {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Stat { median, min: v.first().copied().unwrap_or(f64::NAN), max: v.last().copied().unwrap_or(f64::NAN) }
    }
}

/// Everything measured for one (method, length).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub method: String,
    pub length: usize,
    pub ttft_s: Stat,
    pub prefill_tokens_per_s: Stat,
    pub decode_tokens_per_s: Stat,
    pub kv_cache_bytes: usize,
    pub peak_rss_bytes: Option<u64>,
    pub runs: Vec<Run>,
}

/// Runs the benchmark: for each length, `warmup` then `repeats` rounds, each round running every method once,
/// reporting each run to `progress`.
pub fn run(engine: &Engine, text: &str, cfg: &BenchConfig, progress: &dyn Progress) -> Result<Vec<Row>> {
    if cfg.repeats == 0 {
        return Err(Error::invalid("repeats", "must be at least 1"));
    }
    let rounds = (cfg.warmup + cfg.repeats) * cfg.contenders.len() * cfg.lengths.len();
    progress.begin("runs", rounds as u64, false);
    // Prompts of exactly `length` tokens: the text's tokens (encoded once) repeated.
    let ids = engine.text.encode(text, false)?;
    if ids.is_empty() {
        return Err(Error::invalid("prompt_file", "the text has no tokens"));
    }
    let mut rows = Vec::new();
    for &length in &cfg.lengths {
        let prompt: Vec<u32> = ids.iter().copied().cycle().take(length).collect();
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); cfg.contenders.len()];
        for round in 0..cfg.warmup + cfg.repeats {
            for (c, contender) in cfg.contenders.iter().enumerate() {
                let run = run_once(engine, &prompt, contender, cfg.new_tokens)?;
                if round >= cfg.warmup {
                    runs[c].push(run);
                }
                progress.advance(1, &format!("{} @ {length} tokens", contender.name));
            }
        }
        for (contender, runs) in cfg.contenders.iter().zip(runs) {
            rows.push(Row {
                method: contender.name.clone(),
                length,
                ttft_s: Stat::of(runs.iter().map(|r| r.ttft_s)),
                prefill_tokens_per_s: Stat::of(runs.iter().map(|r| r.prefill_tokens_per_s)),
                decode_tokens_per_s: Stat::of(runs.iter().map(|r| r.decode_tokens_per_s)),
                kv_cache_bytes: runs[0].kv_cache_bytes,
                peak_rss_bytes: runs.iter().filter_map(|r| r.peak_rss_bytes).max(),
                runs,
            });
        }
    }
    progress.end();
    Ok(rows)
}

fn run_once(engine: &Engine, prompt: &[u32], contender: &Contender, new_tokens: usize) -> Result<Run> {
    let mut req = Request::new(Prompt::Tokens(prompt.to_vec()));
    req.max_new_tokens = new_tokens;
    req.policy = Some(contender.policy);
    reset_peak_rss();
    let out = engine.generate(&req, |_| ControlFlow::Continue(()))?;
    let m = out.metrics;
    Ok(Run {
        ttft_s: m.ttft_s,
        prefill_tokens_per_s: m.prefill_tokens_per_s,
        decode_tokens_per_s: m.decode_tokens_per_s,
        kv_cache_bytes: m.kv_cache_bytes,
        peak_rss_bytes: peak_rss(),
    })
}

/// Resets the kernel's peak-RSS mark of this process (Linux: `5` → /proc/self/clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory since the last reset (Linux `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The table `fastkv bench` prints: medians with min–max spread, and ratios to the first method.
pub fn format_table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<14} {:>7} {:>22} {:>8} {:>12} {:>10} {:>10} {:>10}\n",
        "method", "tokens", "TTFT s (min–max)", "speedup", "prefill t/s", "decode t/s", "KV MB", "peak MB"
    );
    for r in rows {
        let base = rows.iter().find(|b| b.length == r.length).expect("a row of the same length exists");
        let mb = |b: usize| b as f64 / 1e6;
        out += &format!(
            "{:<14} {:>7} {:>8.3} ({:.3}–{:.3}) {:>7.2}× {:>12.0} {:>10.1} {:>10.1} {:>10}\n",
            r.method,
            r.length,
            r.ttft_s.median,
            r.ttft_s.min,
            r.ttft_s.max,
            base.ttft_s.median / r.ttft_s.median,
            r.prefill_tokens_per_s.median,
            r.decode_tokens_per_s.median,
            mb(r.kv_cache_bytes),
            r.peak_rss_bytes.map_or("-".into(), |b| format!("{:.0}", mb(b as usize))),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Stat;

    #[test]
    fn stat_is_median_and_range() {
        assert_eq!(Stat::of([3.0, 1.0, 2.0]), Stat { median: 2.0, min: 1.0, max: 3.0 });
        assert_eq!(Stat::of([4.0, 1.0, 2.0, 3.0]), Stat { median: 2.5, min: 1.0, max: 4.0 });
    }
}
