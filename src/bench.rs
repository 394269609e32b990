//! `fastkv bench`: time-to-first-token, prefill and decode speed, KV-cache size and peak memory of several
//! compression methods on one engine, measured side by side in one process (methods interleaved per repeat, so a
//! noisy machine slows them all alike).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eval::Contender;
use crate::policy::Policy;
use crate::prefill::cache_bytes_bound;
use crate::progress::Progress;
use crate::scheduler::{Config, Event, Scheduler, Unobserved};
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

/// `fastkv bench --concurrency`: requests submitted together to the batching engine.
pub struct ConcurrencyConfig {
    /// Prompt length of every request.
    pub length: usize,
    pub contenders: Vec<Contender>,
    /// Requests submitted at once, one run per value.
    pub concurrency: Vec<usize>,
    /// Tokens every request generates (EOS is ignored: each decodes exactly this many).
    pub new_tokens: usize,
    pub scheduler: Config,
}

/// What one concurrency level measured.
#[derive(Clone, Debug, Serialize)]
pub struct ConcurrencyRow {
    pub method: String,
    pub prompt_tokens: usize,
    pub concurrency: usize,
    pub new_tokens: usize,
    pub wall_s: f64,
    /// Generated tokens of all requests per second of the whole run (prefills included).
    pub output_tokens_per_s: f64,
    /// Tokens per second of the batched decode steps alone (their tokens over their time).
    pub decode_tokens_per_s: f64,
    /// Requests per decode step, on average.
    pub mean_batch: f64,
    /// Weight bytes the decode steps read per second (each step reads every weight once): against
    /// the memory bandwidth, how close decode runs to its bound.
    pub weight_gb_per_s: f64,
    pub ttft_s: Percentiles,
    /// Gaps between consecutive tokens of a request, over all requests.
    pub itl_s: Percentiles,
    /// The KV cache one request sets aside (room for its new tokens included), and how many such
    /// requests the engine's cache memory holds at once.
    pub kv_bytes_per_request: usize,
    pub max_concurrency_in_memory: usize,
}

/// Percentiles of a sample (nearest rank).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Percentiles::default();
        }
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
        Percentiles { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: xs[xs.len() - 1] }
    }
}

/// Every request's token times (arrival first), gathered from its stream.
struct Timeline {
    arrived: Instant,
    tokens: Vec<Instant>,
}

/// Submits `count` copies of `prompt` under `policy` together and waits for them all: their
/// timelines, in submission order.
fn submit_all(
    scheduler: &Scheduler,
    prompt: &[u32],
    policy: Policy,
    new_tokens: usize,
    count: usize,
) -> Result<Vec<Timeline>> {
    let streams: Vec<(Instant, crate::scheduler::Stream)> = (0..count)
        .map(|_| {
            let mut req = Request::new(Prompt::Tokens(prompt.to_vec()));
            req.max_new_tokens = new_tokens;
            req.policy = Some(policy);
            req.ignore_eos = true;
            Ok((Instant::now(), scheduler.submit_stream(req)?))
        })
        .collect::<Result<_>>()?;
    std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|(arrived, stream)| {
                s.spawn(move || -> Result<Timeline> {
                    let mut tokens = Vec::new();
                    for event in stream {
                        match event {
                            Event::Token(_) => tokens.push(Instant::now()),
                            Event::Done(_) => return Ok(Timeline { arrived, tokens }),
                            Event::Failed(e) => return Err(e),
                        }
                    }
                    Err(Error::ShuttingDown)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a stream reader panicked")).collect()
    })
}

/// Runs every contender at every concurrency on its own batching engine, `cfg.concurrency[i]`
/// requests of `cfg.length` tokens submitted at once, after one unmeasured warm-up request.
pub fn concurrency(
    engine: &Arc<Engine>,
    text: &str,
    cfg: &ConcurrencyConfig,
    progress: &dyn Progress,
) -> Result<Vec<ConcurrencyRow>> {
    let ids = engine.text.encode(text, false)?;
    if ids.is_empty() {
        return Err(Error::invalid("prompt_file", "the text has no tokens"));
    }
    let prompt: Vec<u32> = ids.iter().copied().cycle().take(cfg.length).collect();
    let mut rows = Vec::new();
    progress.begin("concurrency runs", (cfg.contenders.len() * cfg.concurrency.len()) as u64, false);
    for contender in &cfg.contenders {
        for &n in &cfg.concurrency {
            let scheduler = Scheduler::start(engine.clone(), cfg.scheduler, Arc::new(Unobserved));
            submit_all(&scheduler, &prompt, contender.policy, 2, 1)?;
            let before = scheduler.stats();
            let start = Instant::now();
            let timelines = submit_all(&scheduler, &prompt, contender.policy, cfg.new_tokens, n)?;
            let wall_s = start.elapsed().as_secs_f64();
            let after = scheduler.stats();
            let decoded = (after.decoded_tokens - before.decoded_tokens) as f64;
            let decode_s = after.decode_seconds - before.decode_seconds;
            let steps = (after.decode_steps - before.decode_steps).max(1) as f64;
            let generated: usize = timelines.iter().map(|t| t.tokens.len()).sum();
            let ttft =
                timelines.iter().filter_map(|t| t.tokens.first().map(|f| (*f - t.arrived).as_secs_f64())).collect();
            let itl = timelines.iter().flat_map(|t| t.tokens.windows(2).map(|w| (w[1] - w[0]).as_secs_f64())).collect();
            let element = engine.backend.kv_element_bytes();
            let per_request = cache_bytes_bound(engine.spec(), &contender.policy, cfg.length, cfg.new_tokens, element);
            rows.push(ConcurrencyRow {
                method: contender.name.clone(),
                prompt_tokens: cfg.length,
                concurrency: n,
                new_tokens: cfg.new_tokens,
                wall_s,
                output_tokens_per_s: generated as f64 / wall_s,
                decode_tokens_per_s: if decode_s > 0.0 { decoded / decode_s } else { 0.0 },
                mean_batch: decoded / steps,
                weight_gb_per_s: if decode_s > 0.0 {
                    steps * (engine.spec().decode_weights() * engine.manifest.dtype.size()) as f64 / decode_s / 1e9
                } else {
                    0.0
                },
                ttft_s: Percentiles::of(ttft),
                itl_s: Percentiles::of(itl),
                kv_bytes_per_request: per_request,
                max_concurrency_in_memory: cfg.scheduler.kv_cache_memory / per_request.max(1),
            });
            progress.advance(1, &format!("{} × {n}", contender.name));
        }
    }
    progress.end();
    Ok(rows)
}

/// `fastkv bench --concurrency C --arrivals K`: what new long prompts do to running streams.
pub struct ArrivalsConfig {
    /// The running streams: how many, of what prompt length.
    pub streams: usize,
    pub length: usize,
    /// The prompts that arrive while they run: how many, of what length (submitted together).
    pub arrivals: usize,
    pub arrival_length: usize,
    pub policy: Policy,
    pub method: String,
    /// How long the streams are measured before the arrivals.
    pub baseline: Duration,
    pub scheduler: Config,
}

/// The running streams' inter-token latency without and with arrivals.
#[derive(Clone, Debug, Serialize)]
pub struct ArrivalsRow {
    pub method: String,
    pub streams: usize,
    pub prompt_tokens: usize,
    pub arrivals: usize,
    pub arrival_tokens: usize,
    /// Gaps between the streams' tokens before the arrivals, and while the arrivals were prefilled
    /// (from their submission until the last one's first token).
    pub itl_without_s: Percentiles,
    pub itl_with_s: Percentiles,
    pub p99_ratio: f64,
    pub arrival_ttft_s: Percentiles,
}

/// Runs [`ArrivalsConfig`]: the streams start, are measured for `baseline`, then the arrivals are
/// submitted together and the streams measured until the last arrival's first token.
pub fn arrivals(engine: &Arc<Engine>, text: &str, cfg: &ArrivalsConfig) -> Result<ArrivalsRow> {
    use std::sync::Mutex;
    let ids = engine.text.encode(text, false)?;
    if ids.is_empty() {
        return Err(Error::invalid("prompt_file", "the text has no tokens"));
    }
    let prompt = |n: usize| -> Vec<u32> { ids.iter().copied().cycle().take(n).collect() };
    let scheduler = Scheduler::start(engine.clone(), cfg.scheduler, Arc::new(Unobserved));
    let request = |n: usize, new: usize| {
        let mut req = Request::new(Prompt::Tokens(prompt(n)));
        req.max_new_tokens = new;
        req.policy = Some(cfg.policy);
        req.ignore_eos = true;
        req
    };
    // Each stream's token times, recorded by a reader thread as the tokens arrive.
    let times: Vec<Arc<Mutex<Vec<Instant>>>> = (0..cfg.streams).map(|_| Arc::default()).collect();
    let max_new = engine.spec().max_position_embeddings.saturating_sub(cfg.length).max(1);
    let streams: Vec<crate::scheduler::Stream> =
        (0..cfg.streams).map(|_| scheduler.submit_stream(request(cfg.length, max_new))).collect::<Result<_>>()?;
    let tickets: Vec<_> = streams.iter().map(|s| s.ticket().clone()).collect();
    let readers: Vec<_> = streams
        .into_iter()
        .zip(&times)
        .map(|(stream, t)| {
            let t = t.clone();
            std::thread::spawn(move || {
                for event in stream {
                    if let Event::Token(_) = event {
                        t.lock().unwrap().push(Instant::now());
                    }
                }
            })
        })
        .collect();
    let all_started = || times.iter().all(|t| !t.lock().unwrap().is_empty());
    while !all_started() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let gaps = |from: Instant, to: Instant| -> Vec<f64> {
        times
            .iter()
            .flat_map(|t| {
                let t = t.lock().unwrap();
                t.windows(2)
                    .filter(|w| w[0] >= from && w[1] <= to)
                    .map(|w| (w[1] - w[0]).as_secs_f64())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let quiet = Instant::now();
    std::thread::sleep(cfg.baseline);
    let busy = Instant::now();
    let arrivals: Vec<_> =
        (0..cfg.arrivals).map(|_| scheduler.submit_stream(request(cfg.arrival_length, 1))).collect::<Result<_>>()?;
    let mut ttft = Vec::new();
    for stream in arrivals {
        let out = stream.finish()?;
        ttft.push(out.metrics.ttft_s);
    }
    let done = Instant::now();
    tickets.iter().for_each(|t| t.cancel());
    readers.into_iter().for_each(|r| r.join().expect("a stream reader panicked"));
    let (without, with) = (Percentiles::of(gaps(quiet, busy)), Percentiles::of(gaps(busy, done)));
    Ok(ArrivalsRow {
        method: cfg.method.clone(),
        streams: cfg.streams,
        prompt_tokens: cfg.length,
        arrivals: cfg.arrivals,
        arrival_tokens: cfg.arrival_length,
        p99_ratio: with.p99 / without.p99,
        itl_without_s: without,
        itl_with_s: with,
        arrival_ttft_s: Percentiles::of(ttft),
    })
}

/// The table `fastkv bench --concurrency` prints.
pub fn format_concurrency(rows: &[ConcurrencyRow]) -> String {
    let mut out = format!(
        "{:<12} {:>6} {:>5} {:>11} {:>11} {:>7} {:>17} {:>17} {:>9} {:>8}\n",
        "method",
        "tokens",
        "conc",
        "output t/s",
        "decode t/s",
        "batch",
        "TTFT p50/p99 s",
        "ITL p50/p99 ms",
        "KV MB/req",
        "fit"
    );
    for r in rows {
        out += &format!(
            "{:<12} {:>6} {:>5} {:>11.1} {:>11.1} {:>7.1} {:>8.1} {:>8.2} / {:>6.2} {:>8.1} / {:>6.1} {:>9.1} {:>8}\n",
            r.method,
            r.prompt_tokens,
            r.concurrency,
            r.output_tokens_per_s,
            r.decode_tokens_per_s,
            r.mean_batch,
            r.weight_gb_per_s,
            r.ttft_s.p50,
            r.ttft_s.p99,
            1e3 * r.itl_s.p50,
            1e3 * r.itl_s.p99,
            r.kv_bytes_per_request as f64 / 1e6,
            r.max_concurrency_in_memory,
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
