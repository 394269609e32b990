//! Compression policies: which prompt tokens each layer keeps in its KV cache, and which tokens
//! propagate to the next layer. FastKV's budget formulas and gates follow docs/method.md §4 and §8; the
//! baselines (§12) derive their budgets from the same flags, so one `--retain-rate` or `--kv-budget`
//! compares every method at the same retention.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fraction::Fraction;
use crate::select::Pool;
use crate::spec::ModelSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Keep every KV entry; every layer sees the whole prompt.
    Full,
    /// Token-Selective Propagation + GQA-aware KV compression.
    Fastkv,
    /// SnapKV with FastKV's GQA-aware scoring and Hk-head cache (FastKV without TSP).
    SnapkvGqa,
    /// SnapKV as published: scored and cached per query head (H-head cache).
    Snapkv,
    /// Ada-SnapKV: per-query-head budgets allocated globally from the window scores.
    Adakv,
    /// HeadKV: per-query-head budgets from offline head scores (`--head-scores`).
    Headkv,
    /// SnapKV per query head with a linearly decreasing per-layer budget.
    Pyramidkv,
    /// Attention sinks + the most recent tokens (GQA width).
    Streamingllm,
    /// Heavy hitters: attention accumulated over every prompt row, per query head (O(L²)).
    H2o,
    /// Select tokens at filter layer f, then re-run the model on them with fresh positions.
    Gemfilter,
    /// Layer-wise pruning of the hidden states by a cosine keep schedule.
    Pyramidinfer,
}

impl Method {
    pub const ALL: [Method; 11] = [
        Method::Full,
        Method::Fastkv,
        Method::SnapkvGqa,
        Method::Snapkv,
        Method::Adakv,
        Method::Headkv,
        Method::Pyramidkv,
        Method::Streamingllm,
        Method::H2o,
        Method::Gemfilter,
        Method::Pyramidinfer,
    ];

    /// The method's name in requests and reports (`fastkv`, `snapkv-gqa`, …), as serde spells it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Fastkv => "fastkv",
            Method::SnapkvGqa => "snapkv-gqa",
            Method::Snapkv => "snapkv",
            Method::Adakv => "adakv",
            Method::Headkv => "headkv",
            Method::Pyramidkv => "pyramidkv",
            Method::Streamingllm => "streamingllm",
            Method::H2o => "h2o",
            Method::Gemfilter => "gemfilter",
            Method::Pyramidinfer => "pyramidinfer",
        }
    }

    /// Methods whose caches hold one entry list per query head (H heads) instead of per KV head.
    pub fn per_query_head(self) -> bool {
        matches!(self, Method::Snapkv | Method::Adakv | Method::Headkv | Method::Pyramidkv | Method::H2o)
    }
}

impl std::str::FromStr for Method {
    type Err = Error;

    /// A method by its [`Method::name`], case-insensitively.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        Method::ALL.into_iter().find(|m| m.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let known: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            Error::invalid("method", format!("unknown compression method {s:?} (known: {})", known.join(", ")))
        })
    }
}

/// How big the KV budget C and the TSP length T are.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Budget {
    /// Proportional (paper v3): T = ⌊L·t⌋, C = ⌊L·r⌋ up to ℓ*, ⌊T·(r/t)⌋ after.
    Rate { tsp_rate: f64, retain_rate: f64 },
    /// Constant (paper v1/v2): C = kv_budget in every layer, T = tsp_len.
    Absolute { kv_budget: usize, tsp_len: usize },
}

/// Knobs only some baselines have (docs/method.md §12); the defaults are the published ones.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    /// GemFilter's filter layer f; `None`: ℓ*.
    pub filter_layer: Option<usize>,
    /// StreamingLLM and PyramidInfer: leading (sink) tokens always kept.
    pub sink: usize,
    /// AdaKV's floor α: the share of every head's budget kept out of the global allocation.
    pub ada_alpha: f64,
    /// H2O: the longest prompt accepted (its scores cost O(L²)).
    pub h2o_max_len: usize,
    /// PyramidInfer's ρ; `None`: chosen so the mean cached fraction per layer is the retain rate.
    pub decay_ratio: Option<f64>,
    /// PyramidInfer: ⌊L·ratio⌋ + 1 recent tokens score the context and are always kept.
    pub recent_ratio: f64,
    /// HeadKV's per-head scores (`--head-scores`), loaded once per process.
    #[serde(skip)]
    pub head_scores: Option<&'static HeadScores>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            filter_layer: None,
            sink: 4,
            ada_alpha: 0.2,
            h2o_max_len: 8192,
            decay_ratio: None,
            recent_ratio: 0.01,
            head_scores: None,
        }
    }
}

/// FastKV's published budgets (docs/method.md §7): rates of paper v3, and the absolute budgets of v1/v2
/// used when a request switches an engine with rate defaults to absolute mode.
pub const DEFAULT_TSP_RATE: f64 = 0.2;
pub const DEFAULT_RETAIN_RATE: f64 = 0.1;
pub const DEFAULT_KV_BUDGET: usize = 512;
pub const DEFAULT_TSP_LEN: usize = 2048;

/// Where compression stops paying: a prompt shorter than `prompt_len` tokens is kept whole in
/// every layer (no selection, no TSP), and no layer keeps fewer than `kv_budget` entries per cache
/// head nor propagates fewer tokens. Without it a 48-token prompt at r = 0.1 keeps a handful of
/// entries and decodes nonsense; a server gets short prompts all the time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    pub prompt_len: usize,
    pub kv_budget: usize,
}

impl Floor {
    /// fastkv's default: below 1K tokens prefill is cheap and the cache small, so nothing is lost by
    /// keeping it whole; 128 entries per head keep a 1K–1.3K prompt's budget from falling to a
    /// handful at small rates.
    pub const DEFAULT: Floor = Floor { prompt_len: 1024, kv_budget: 128 };
    /// The paper's budgets as published, which the reference implementations compute.
    pub const NONE: Floor = Floor { prompt_len: 0, kv_budget: 0 };
}

impl Default for Floor {
    fn default() -> Self {
        Floor::DEFAULT
    }
}

/// A complete per-request compression policy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub method: Method,
    /// ℓ*: the last layer that sees the whole prompt (0-based).
    pub tsp_layer: usize,
    pub budget: Budget,
    /// W: the observation window, always kept.
    pub window: usize,
    /// K: the pooling kernel (odd).
    pub kernel: usize,
    pub pool: Pool,
    /// Engines built before floors existed get [`Floor::DEFAULT`].
    #[serde(default)]
    pub floor: Floor,
    #[serde(default)]
    pub params: Params,
}

/// What one prefill layer does with its sequence of `seq_len` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    /// Entries kept per cache head (AdaKV/HeadKV: the base of their per-head allocation); `None`
    /// keeps all `seq_len` in order (no scoring).
    pub kv_budget: Option<usize>,
    /// Tokens propagated past this layer; `Some` only at ℓ* when TSP fires.
    pub tsp_len: Option<usize>,
}

/// HeadKV's per-head importance (docs/method.md §12): a JSON object `"layer-head"` → list of scores; a
/// head's score is the mean of its list, normalised so all N·H heads of the model sum to 1.
#[derive(Debug, PartialEq)]
pub struct HeadScores {
    pub num_layers: usize,
    pub num_heads: usize,
    /// `[N, H]`, summing to 1.
    pub scores: Vec<f64>,
}

impl HeadScores {
    /// Parses `text` (the contents of `path`) for a model of `num_layers` × `num_heads` query heads.
    pub fn parse(path: &Path, text: &str, num_layers: usize, num_heads: usize) -> Result<Self> {
        let map: HashMap<String, Vec<f64>> = serde_json::from_str(text)
            .map_err(|e| Error::bad_file(path, format!("expected {{\"layer-head\": [scores…]}}: {e}")))?;
        let mut scores = vec![f64::NAN; num_layers * num_heads];
        for (key, list) in &map {
            let parsed =
                key.split_once('-').and_then(|(l, h)| Some((l.parse::<usize>().ok()?, h.parse::<usize>().ok()?)));
            let (l, h) = parsed.ok_or_else(|| Error::bad_file(path, format!("key \"{key}\" is not \"layer-head\"")))?;
            if l >= num_layers || h >= num_heads {
                return Err(Error::bad_file(
                    path,
                    format!("head \"{key}\" is outside this model ({num_layers} layers × {num_heads} heads)"),
                ));
            }
            let mean = list.iter().sum::<f64>() / list.len() as f64;
            if list.is_empty() || !mean.is_finite() || list.iter().any(|&s| s < 0.0) {
                return Err(Error::bad_file(path, format!("head \"{key}\" needs a non-empty list of scores ≥ 0")));
            }
            scores[l * num_heads + h] = mean;
        }
        if let Some(i) = scores.iter().position(|s| s.is_nan()) {
            return Err(Error::bad_file(path, format!("head \"{}-{}\" is missing", i / num_heads, i % num_heads)));
        }
        let total: f64 = scores.iter().sum();
        if total <= 0.0 {
            return Err(Error::bad_file(path, "every head score is 0"));
        }
        scores.iter_mut().for_each(|s| *s /= total);
        Ok(HeadScores { num_layers, num_heads, scores })
    }

    /// Reads and parses `path` for `spec`, once per process: policies stay `Copy` by holding a
    /// `'static` reference, and one allocation per distinct (file, model shape) is kept.
    pub fn load(path: &Path, spec: &ModelSpec) -> Result<&'static HeadScores> {
        type Cache = Mutex<HashMap<(PathBuf, usize, usize), &'static HeadScores>>;
        static LOADED: OnceLock<Cache> = OnceLock::new();
        let key = (path.to_path_buf(), spec.num_layers, spec.num_heads);
        let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = loaded.get(&key) {
            return Ok(s);
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let scores: &'static HeadScores = Box::leak(Box::new(Self::parse(path, &text, key.1, key.2)?));
        loaded.insert(key, scores);
        Ok(scores)
    }
}

impl Policy {
    /// FastKV's defaults for a model: ℓ* = N/2 − 1, t = 0.2, r = 0.1, W = 8, K = 7, maxpool, and
    /// fastkv's [`Floor::DEFAULT`] (the paper's budgets with [`Floor::NONE`]).
    pub fn fastkv_default(spec: &ModelSpec) -> Self {
        Policy {
            method: Method::Fastkv,
            tsp_layer: (spec.num_layers / 2).saturating_sub(1),
            budget: Budget::Rate { tsp_rate: DEFAULT_TSP_RATE, retain_rate: DEFAULT_RETAIN_RATE },
            window: 8,
            kernel: 7,
            pool: Pool::Max,
            floor: Floor::DEFAULT,
            params: Params::default(),
        }
    }

    /// Whether this policy changes anything for a `prompt_len`-token prompt: a compressing method,
    /// and a prompt no shorter than the floor.
    pub fn compresses(&self, prompt_len: usize) -> bool {
        self.method != Method::Full && prompt_len >= self.floor.prompt_len
    }

    /// Rejects values no prompt could make sense of, naming the flag.
    pub fn validate(&self, spec: &ModelSpec) -> Result<()> {
        if self.tsp_layer >= spec.num_layers {
            return Err(Error::invalid(
                "tsp_layer",
                format!("{} is not a layer of this model (0..{})", self.tsp_layer, spec.num_layers),
            ));
        }
        if self.window == 0 {
            return Err(Error::invalid("window", "must be at least 1"));
        }
        if self.kernel == 0 || self.kernel.is_multiple_of(2) {
            return Err(Error::invalid("kernel", format!("{} must be odd and positive", self.kernel)));
        }
        let in_range = |x: f64| x > 0.0 && x <= 1.0;
        match self.budget {
            Budget::Rate { tsp_rate, retain_rate } => {
                if !in_range(tsp_rate) {
                    return Err(Error::invalid("tsp_rate", format!("{tsp_rate} is not in (0, 1]")));
                }
                if !in_range(retain_rate) {
                    return Err(Error::invalid("retain_rate", format!("{retain_rate} is not in (0, 1]")));
                }
            }
            Budget::Absolute { kv_budget, tsp_len } => {
                if kv_budget == 0 {
                    return Err(Error::invalid("kv_budget", "must be at least 1"));
                }
                if tsp_len == 0 {
                    return Err(Error::invalid("tsp_len", "must be at least 1"));
                }
            }
        }
        let p = &self.params;
        if let Some(f) = p.filter_layer.filter(|&f| f >= spec.num_layers) {
            return Err(Error::invalid(
                "filter_layer",
                format!("{f} is not a layer of this model (0..{})", spec.num_layers),
            ));
        }
        if !(0.0..=1.0).contains(&p.ada_alpha) {
            return Err(Error::invalid("ada_alpha", format!("{} is not in [0, 1]", p.ada_alpha)));
        }
        if p.h2o_max_len == 0 {
            return Err(Error::invalid("h2o_max_len", "must be at least 1"));
        }
        if let Some(rho) = p.decay_ratio.filter(|&r| !(0.0..=1.0).contains(&r)) {
            return Err(Error::invalid("decay_ratio", format!("{rho} is not in [0, 1]")));
        }
        if !(0.0..1.0).contains(&p.recent_ratio) {
            return Err(Error::invalid("recent_ratio", format!("{} is not in [0, 1)", p.recent_ratio)));
        }
        if self.method == Method::Headkv {
            match p.head_scores {
                None => return Err(Error::invalid("head_scores", "HeadKV needs a head-score JSON file")),
                Some(s) if (s.num_layers, s.num_heads) != (spec.num_layers, spec.num_heads) => {
                    return Err(Error::invalid(
                        "head_scores",
                        format!(
                            "scores are for {} layers × {} heads, the model has {} × {}",
                            s.num_layers, s.num_heads, spec.num_layers, spec.num_heads
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Rejects a prompt this policy cannot run (H2O above `--h2o-max-len`).
    pub fn check_prompt(&self, prompt_len: usize) -> Result<()> {
        let max = self.params.h2o_max_len;
        if self.method == Method::H2o && prompt_len > max {
            return Err(Error::invalid(
                "h2o_max_len",
                format!("H2O's O(L²) scores are limited to {max} tokens; the prompt has {prompt_len}"),
            ));
        }
        Ok(())
    }

    /// T for a prompt of `prompt_len` tokens, never below the window or the floor.
    pub fn tsp_len(&self, prompt_len: usize) -> usize {
        let t = match self.budget {
            Budget::Rate { tsp_rate, .. } => Fraction::nearest(tsp_rate).floor_mul(prompt_len),
            Budget::Absolute { tsp_len, .. } => tsp_len,
        };
        t.max(self.window).max(self.floor.kv_budget)
    }

    /// C of `layer` before the gate (docs/method.md §4), never below the floor; rates are exact
    /// fractions ([`Fraction`]). Only FastKV rescales the rate after ℓ*; the other methods keep ⌊L·r⌋
    /// (or `kv_budget`) in every layer.
    pub fn kv_budget(&self, layer: usize, prompt_len: usize) -> usize {
        let c = match self.budget {
            Budget::Rate { tsp_rate, retain_rate } if self.method == Method::Fastkv && layer > self.tsp_layer => {
                let ratio = Fraction::nearest(retain_rate).over(Fraction::nearest(tsp_rate));
                ratio.floor_mul(self.tsp_len(prompt_len))
            }
            Budget::Rate { retain_rate, .. } => Fraction::nearest(retain_rate).floor_mul(prompt_len),
            Budget::Absolute { kv_budget, .. } => kv_budget,
        };
        c.max(self.floor.kv_budget)
    }

    /// PyramidKV's C of `layer` in a model of `num_layers`: with B' = C − W, the scored budget falls
    /// linearly from 2B' − ⌊B'/20⌋ at layer 0 to ⌊B'/20⌋ at the last layer (integer steps).
    pub fn pyramid_budget(&self, layer: usize, num_layers: usize, prompt_len: usize) -> usize {
        let base = self.kv_budget(layer, prompt_len).saturating_sub(self.window);
        let (min, max) = (base / 20, 2 * base - base / 20);
        let step = if num_layers > 1 { (max - min) / (num_layers - 1) } else { 0 };
        max - layer * step + self.window
    }

    /// HeadKV's scored entries per query head of `layer` for a layer budget `c` over `seq_len`
    /// tokens: B' = C − W, pool = ⌊B'/β⌋·N·H (β = 1.2), head h keeps `round(score_h·pool + B' −
    /// ⌊B'/β⌋)` (ties to even, as torch), at most all S − W; the window comes on top.
    pub fn head_budgets(&self, layer: usize, c: usize, seq_len: usize) -> Result<Vec<usize>> {
        let scores = self.params.head_scores.filter(|s| layer < s.num_layers);
        let scores =
            scores.ok_or_else(|| Error::invalid("head_scores", format!("no HeadKV scores for layer {layer}")))?;
        let base = c.saturating_sub(self.window) as f64;
        let small = (base / 1.2).floor();
        let pool = small * scores.scores.len() as f64;
        let row = &scores.scores[layer * scores.num_heads..(layer + 1) * scores.num_heads];
        Ok(row
            .iter()
            .map(|s| ((s * pool + base - small).round_ties_even() as usize).min(seq_len - self.window))
            .collect())
    }

    /// PyramidInfer's ρ: `--decay-ratio`, else the ρ whose compounded schedule caches on average the
    /// retain fraction (C/L) of the prompt per layer (0 when even ρ = 0 keeps more).
    pub fn decay_ratio(&self, num_layers: usize, prompt_len: usize) -> f64 {
        if let Some(rho) = self.params.decay_ratio {
            return rho;
        }
        let target = self.kv_budget(0, prompt_len) as f64 / prompt_len as f64;
        if target >= 1.0 {
            return 1.0;
        }
        let mean_cached = |rho: f64| {
            let mut frac = 1.0;
            let mut total = 0.0;
            for l in 0..num_layers {
                total += frac;
                frac *= pyramid_keep_ratio(rho, l, num_layers);
            }
            total / num_layers as f64
        };
        if mean_cached(0.0) >= target {
            return 0.0;
        }
        let (mut lo, mut hi) = (0.0, 1.0);
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if mean_cached(mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    /// PyramidInfer: context tokens (of `context` scored ones) that layer `layer` passes on: ⌊ρ_ℓ·n⌋,
    /// but at least min(64, n).
    pub fn pyramid_keep(&self, layer: usize, num_layers: usize, prompt_len: usize, context: usize) -> usize {
        let ratio = pyramid_keep_ratio(self.decay_ratio(num_layers, prompt_len), layer, num_layers);
        ((ratio * context as f64) as usize).max(context.min(64)).min(context)
    }

    /// PyramidInfer's recent tokens: ⌊L·recent_ratio⌋ + 1, never above L.
    pub fn recent_len(&self, prompt_len: usize) -> usize {
        ((prompt_len as f64 * self.params.recent_ratio) as usize + 1).min(prompt_len)
    }

    /// GemFilter's filter layer f (default ℓ*).
    pub fn filter_layer(&self) -> usize {
        self.params.filter_layer.unwrap_or(self.tsp_layer)
    }

    /// The plan of `layer` (of `num_layers`) when it sees `seq_len` tokens of a `prompt_len`-token
    /// prompt, with the gates of docs/method.md §8: a sequence shorter than C (or no longer than W) is stored
    /// whole and never propagates; TSP fires only for FastKV at ℓ* and only if it shrinks the
    /// sequence. GemFilter and PyramidInfer cache whole sequences (they shrink what enters a layer).
    /// A prompt below the floor is whole everywhere.
    pub fn plan(&self, layer: usize, num_layers: usize, prompt_len: usize, seq_len: usize) -> LayerPlan {
        let whole = LayerPlan { kv_budget: None, tsp_len: None };
        if !self.compresses(prompt_len) {
            return whole;
        }
        let c = match self.method {
            Method::Full | Method::Gemfilter | Method::Pyramidinfer => return whole,
            Method::Pyramidkv => self.pyramid_budget(layer, num_layers, prompt_len),
            _ => self.kv_budget(layer, prompt_len),
        };
        if seq_len < c || seq_len <= self.window {
            return whole;
        }
        let t = self.tsp_len(prompt_len);
        let tsp = self.method == Method::Fastkv && layer == self.tsp_layer && seq_len > t;
        LayerPlan { kv_budget: Some(c.max(self.window)), tsp_len: tsp.then_some(t) }
    }
}

/// Changes to a policy that a request asks for — CLI flags (the struct is the CLI's flag group),
/// Triton parameters, the `fastkv` object of a `fastkv serve` request body (the struct's fields),
/// `fastkv eval`'s contenders — merged by one rule, [`Overrides::apply`], so every front end gives
/// the same policy for the same request. Unset fields keep the base policy's value.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Compression method; the baselines take their budget from --retain-rate / --kv-budget.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub method: Option<Method>,
    /// ℓ*: the last layer that sees the whole prompt (0-based).
    #[cfg_attr(feature = "clap", arg(long))]
    pub tsp_layer: Option<usize>,
    /// Fraction of prompt tokens propagated past ℓ* (rate mode; an absolute-mode engine switches to
    /// rates with the unset one at FastKV's default: t = 0.2, r = 0.1).
    #[cfg_attr(feature = "clap", arg(long, conflicts_with_all = ["kv_budget", "tsp_len"]))]
    pub tsp_rate: Option<f64>,
    /// Fraction of KV entries each layer keeps (rate mode).
    #[cfg_attr(feature = "clap", arg(long, conflicts_with_all = ["kv_budget", "tsp_len"]))]
    pub retain_rate: Option<f64>,
    /// KV entries kept per layer and cache head, window included (absolute mode; a rate-mode
    /// engine switches to absolute budgets with the unset one at the paper's v1/v2 default: C = 512,
    /// T = 2048).
    #[cfg_attr(feature = "clap", arg(long))]
    pub kv_budget: Option<usize>,
    /// Tokens propagated past ℓ*, window included (absolute mode).
    #[cfg_attr(feature = "clap", arg(long))]
    pub tsp_len: Option<usize>,
    /// Observation window W: the last W prompt tokens score the others and are always kept.
    #[cfg_attr(feature = "clap", arg(long))]
    pub window: Option<usize>,
    /// Pooling kernel K (odd).
    #[cfg_attr(feature = "clap", arg(long))]
    pub kernel: Option<usize>,
    /// Pooling of window scores before the group sum.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub pool: Option<Pool>,
    /// Prompts shorter than this many tokens are not compressed at all (0: every prompt is)
    /// [default: the engine's, 1024 unless built otherwise].
    #[cfg_attr(feature = "clap", arg(long))]
    pub min_prompt_len: Option<usize>,
    /// No layer keeps fewer KV entries per cache head, nor TSP fewer tokens [default: the
    /// engine's, 128 unless built otherwise].
    #[cfg_attr(feature = "clap", arg(long))]
    pub min_kv_budget: Option<usize>,
    /// HeadKV: JSON file of per-head scores, {"layer-head": [scores…]}. Never read from a request
    /// body: a server's clients name no files on its machine.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip)]
    pub head_scores: Option<PathBuf>,
    /// GemFilter: the layer whose last-query scores select the tokens [default: ℓ*].
    #[cfg_attr(feature = "clap", arg(long))]
    pub filter_layer: Option<usize>,
    /// StreamingLLM / PyramidInfer: leading tokens always kept [default: 4].
    #[cfg_attr(feature = "clap", arg(long))]
    pub sink: Option<usize>,
    /// AdaKV: share α of each head's budget kept out of the global allocation [default: 0.2].
    #[cfg_attr(feature = "clap", arg(long))]
    pub ada_alpha: Option<f64>,
    /// H2O: refuse prompts longer than this (its scores are O(L²)) [default: 8192].
    #[cfg_attr(feature = "clap", arg(long))]
    pub h2o_max_len: Option<usize>,
    /// PyramidInfer: final keep ratio ρ of the cosine schedule [default: matches the retain rate].
    #[cfg_attr(feature = "clap", arg(long))]
    pub decay_ratio: Option<f64>,
    /// PyramidInfer: fraction of the prompt (+1 token) that scores the context and is always kept
    /// [default: 0.01].
    #[cfg_attr(feature = "clap", arg(long))]
    pub recent_ratio: Option<f64>,
}

impl Overrides {
    /// `base` with these changes, checked against the model. A budget stays in the base's mode
    /// unless the other mode's fields are given; fields of the new mode that are not given take the
    /// published defaults ([`DEFAULT_TSP_RATE`], [`DEFAULT_KV_BUDGET`], …). Rate and absolute
    /// fields together are an error.
    pub fn apply(&self, base: Policy, spec: &ModelSpec) -> Result<Policy> {
        let absolute = self.kv_budget.is_some() || self.tsp_len.is_some();
        let rates = self.tsp_rate.is_some() || self.retain_rate.is_some();
        if absolute && rates {
            return Err(Error::invalid(
                "kv_budget",
                "an absolute budget (kv_budget / tsp_len) cannot be combined with rates (tsp_rate / retain_rate)",
            ));
        }
        let budget = match base.budget {
            Budget::Absolute { kv_budget, tsp_len } if !rates => Budget::Absolute {
                kv_budget: self.kv_budget.unwrap_or(kv_budget),
                tsp_len: self.tsp_len.unwrap_or(tsp_len),
            },
            Budget::Rate { .. } if absolute => Budget::Absolute {
                kv_budget: self.kv_budget.unwrap_or(DEFAULT_KV_BUDGET),
                tsp_len: self.tsp_len.unwrap_or(DEFAULT_TSP_LEN),
            },
            Budget::Rate { tsp_rate, retain_rate } => Budget::Rate {
                tsp_rate: self.tsp_rate.unwrap_or(tsp_rate),
                retain_rate: self.retain_rate.unwrap_or(retain_rate),
            },
            Budget::Absolute { .. } => Budget::Rate {
                tsp_rate: self.tsp_rate.unwrap_or(DEFAULT_TSP_RATE),
                retain_rate: self.retain_rate.unwrap_or(DEFAULT_RETAIN_RATE),
            },
        };
        let b = base.params;
        let params = Params {
            filter_layer: self.filter_layer.or(b.filter_layer),
            sink: self.sink.unwrap_or(b.sink),
            ada_alpha: self.ada_alpha.unwrap_or(b.ada_alpha),
            h2o_max_len: self.h2o_max_len.unwrap_or(b.h2o_max_len),
            decay_ratio: self.decay_ratio.or(b.decay_ratio),
            recent_ratio: self.recent_ratio.unwrap_or(b.recent_ratio),
            head_scores: match &self.head_scores {
                Some(path) => Some(HeadScores::load(path, spec)?),
                None => b.head_scores,
            },
        };
        let policy = Policy {
            method: self.method.unwrap_or(base.method),
            tsp_layer: self.tsp_layer.unwrap_or(base.tsp_layer),
            budget,
            window: self.window.unwrap_or(base.window),
            kernel: self.kernel.unwrap_or(base.kernel),
            pool: self.pool.unwrap_or(base.pool),
            floor: Floor {
                prompt_len: self.min_prompt_len.unwrap_or(base.floor.prompt_len),
                kv_budget: self.min_kv_budget.unwrap_or(base.floor.kv_budget),
            },
            params,
        };
        policy.validate(spec)?;
        Ok(policy)
    }
}

/// PyramidInfer's cosine schedule: ρ_ℓ = (1−ρ)·(cos(πℓ/N)+1)/2 + ρ, the share of the current context
/// layer ℓ passes on (1 at layer 0, falling towards ρ).
pub fn pyramid_keep_ratio(rho: f64, layer: usize, num_layers: usize) -> f64 {
    (1.0 - rho) * ((std::f64::consts::PI * layer as f64 / num_layers as f64).cos() + 1.0) / 2.0 + rho
}
