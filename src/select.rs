//! FastKV's token selection on plain host slices (docs/method.md §3): window attention scores, per
//! query-head pooling, GQA group sums, per-KV-head cache indices and TSP indices.
//!
//! This is the one reference implementation of the selection math: the CPU backend calls it, and
//! the CUDA kernels and TensorRT plugins are tested against it. Layouts are row-major and fixed:
//! `q_window` is `[H, W, D]` (the last W query rows of every query head, RoPE applied), `keys` is
//! `[Hk, S, D]`, window scores are `[H, S−W]`, group scores `[Hk, S−W]`. Query head `h` reads KV
//! head `h / (H/Hk)`. Ties are broken deterministically: higher score first, then lower index.
//! Softmax runs in f32 on max-subtracted logits with its normaliser summed in f64.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::hostmath::gemm_f32;

/// Pooling of per-head window scores along the key axis (stride 1, padding K/2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// Max over the kernel; padding never wins.
    Max,
    /// Mean over the kernel with zero padding, always divided by K (PyTorch `count_include_pad`).
    Avg,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("{what} has {actual} values, expected {expected}")]
    Length { what: &'static str, expected: usize, actual: usize },
    #[error("{0}")]
    Shape(String),
}

type Result<T> = std::result::Result<T, SelectError>;

/// Sizes of one layer's scoring problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub seq_len: usize,
    pub window: usize,
}

impl Shape {
    fn check(&self) -> Result<()> {
        let s = self;
        if s.n_heads == 0 || s.n_kv_heads == 0 || s.head_dim == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return Err(SelectError::Shape(format!(
                "{} query heads cannot be grouped over {} KV heads of dim {}",
                s.n_heads, s.n_kv_heads, s.head_dim
            )));
        }
        if s.window == 0 {
            return Err(SelectError::Shape("the observation window must hold at least one query".into()));
        }
        if s.window > s.seq_len {
            return Err(SelectError::Shape(format!("window {} is longer than the sequence ({})", s.window, s.seq_len)));
        }
        Ok(())
    }

    /// Scored (non-window) positions.
    pub fn candidates(&self) -> usize {
        self.seq_len - self.window
    }
}

fn check_len(what: &'static str, slice: &[f32], expected: usize) -> Result<()> {
    if slice.len() != expected {
        return Err(SelectError::Length { what, expected, actual: slice.len() });
    }
    Ok(())
}

/// `s[h, j] = Σ_{window rows i} softmax_j(q_i·k_j/√D)` for the `S−W` non-window keys; the
/// softmax runs over all S keys with the causal mask only inside the W×W tail block. Each KV head's
/// keys are walked once for the G·W query rows of its group.
pub fn window_scores(q_window: &[f32], keys: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    accumulate_scores(q_window, shape.window, keys, shape, None)
}

/// H2O's heavy-hitter scores: `s[h, j] = Σ_i softmax_j(q_i·k_j/√D)` over **every** prompt row i
/// (`q_all`: `[H, S, D]`), causally masked, for the `S−W` non-window keys. O(S²) work.
pub fn h2o_scores(q_all: &[f32], keys: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    accumulate_scores(q_all, shape.seq_len, keys, shape, None)
}

/// PyramidInfer's context scores: the last R = `shape.window` rows (`q_recent`: `[H, R, D]`) are
/// the recent queries, weighted linearly from 1.0 (oldest) to 1.2 (newest); `s[h, j]` for the
/// `S−R` context keys. The mean over heads and rows that the paper takes ranks identically.
pub fn recent_scores(q_recent: &[f32], keys: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    let r = shape.window;
    let weights: Vec<f32> = (0..r).map(|i| 1.0 + 0.2 * i as f32 / (r - 1).max(1) as f32).collect();
    accumulate_scores(q_recent, r, keys, shape, Some(&weights))
}

/// Query rows scored per GEMM: bounds the logits buffer when every prompt row scores (H2O).
const ROW_CHUNK: usize = 256;

/// `s[h, j] = Σ_r weight_r · softmax_j(q_r·k_j/√D)` for the first `S−W` keys, where the `rows`
/// query rows of each head (`[H, rows, D]`) are the last rows of the sequence: row r sees keys
/// `0..=S−rows+r`.
fn accumulate_scores(
    q_rows: &[f32],
    rows: usize,
    keys: &[f32],
    shape: &Shape,
    weights: Option<&[f32]>,
) -> Result<Vec<f32>> {
    shape.check()?;
    let Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w } = *shape;
    if rows < w || rows > s {
        return Err(SelectError::Shape(format!("{rows} query rows cannot score a window of {w} in {s} tokens")));
    }
    check_len("queries", q_rows, h * rows * d)?;
    check_len("keys", keys, hk * s * d)?;
    let (g_size, n) = (h / hk, s - w);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; h * n];
    if n == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(g_size * n).enumerate().for_each(|(g, group_out)| {
        let q = &q_rows[g * g_size * rows * d..(g + 1) * g_size * rows * d];
        let k = &keys[g * s * d..(g + 1) * s * d];
        let mut logits = vec![0f32; ROW_CHUNK.min(g_size * rows) * s];
        for first in (0..g_size * rows).step_by(ROW_CHUNK) {
            let m = ROW_CHUNK.min(g_size * rows - first);
            gemm_f32(m, s, d, &mut logits, s, false, (&q[first * d..], d, 1), (k, 1, d), scale, false);
            for (t, row) in logits.chunks_exact_mut(s).take(m).enumerate() {
                let (head, r) = ((first + t) / rows, (first + t) % rows);
                // Sequence row s−rows+r sees only keys up to itself.
                row[s - rows + r + 1..].fill(f32::NEG_INFINITY);
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|x| *x = (*x - max).exp());
                let inv = (1.0 / row.iter().map(|&e| e as f64).sum::<f64>()) as f32;
                let inv = weights.map_or(inv, |wt| inv * wt[r]);
                let dst = &mut group_out[head * n..(head + 1) * n];
                for (o, &e) in dst.iter_mut().zip(&row[..n]) {
                    *o += e * inv;
                }
            }
        }
    });
    Ok(out)
}

/// GemFilter's raw scores: `q_last·k_j` of the last query row (`[H, D]`) against every key of its
/// KV head — no softmax, no 1/√D — `[H, S]`.
pub fn last_query_scores(q_last: &[f32], keys: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    shape.check()?;
    let Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, .. } = *shape;
    check_len("q_last", q_last, h * d)?;
    check_len("keys", keys, hk * s * d)?;
    let g_size = h / hk;
    let mut out = vec![0f32; h * s];
    out.par_chunks_mut(s).enumerate().for_each(|(head, row)| {
        let k = &keys[(head / g_size) * s * d..(head / g_size + 1) * s * d];
        gemm_f32(1, s, d, row, s, false, (&q_last[head * d..], d, 1), (k, 1, d), 1.0, false);
    });
    Ok(out)
}

/// GemFilter's kernel: avgpool 5 (docs/method.md §12).
pub const GEMFILTER_KERNEL: usize = 5;

/// GemFilter's selection: raw scores (`[H, S]`) summed over heads, avgpool 5, the top `k`
/// positions, ascending.
pub fn gemfilter_indices(raw: &[f32], n_heads: usize, seq_len: usize, k: usize) -> Result<Vec<u32>> {
    let total = pool_group_scores(raw, n_heads, 1, seq_len, GEMFILTER_KERNEL, Pool::Avg)?;
    let mut idx = top_k(&total, k);
    idx.sort_unstable();
    Ok(idx)
}

/// Pools every query head's scores (`s`: `[H, n]`) with `kernel`, then sums the heads of each GQA
/// group: `[Hk, n]`. Pooling per head before the sum matters for max pooling.
pub fn pool_group_scores(
    s: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    n: usize,
    kernel: usize,
    pool: Pool,
) -> Result<Vec<f32>> {
    if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(SelectError::Shape(format!("{n_heads} query heads cannot be grouped over {n_kv_heads} KV heads")));
    }
    if kernel == 0 || kernel.is_multiple_of(2) {
        return Err(SelectError::Shape(format!("pooling kernel {kernel} must be odd and positive")));
    }
    check_len("scores", s, n_heads * n)?;
    let (g_size, half) = (n_heads / n_kv_heads, kernel / 2);
    let mut out = vec![0f32; n_kv_heads * n];
    if n == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(n).enumerate().for_each(|(g, a)| {
        for head in s.chunks_exact(n).skip(g * g_size).take(g_size) {
            for (j, acc) in a.iter_mut().enumerate() {
                let span = &head[j.saturating_sub(half)..(j + half + 1).min(n)];
                *acc += match pool {
                    Pool::Max => span.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    Pool::Avg => span.iter().sum::<f32>() / kernel as f32,
                };
            }
        }
    });
    Ok(out)
}

/// Window scores then pooled group scores: what every FastKV layer computes.
pub fn group_scores(q_window: &[f32], keys: &[f32], shape: &Shape, kernel: usize, pool: Pool) -> Result<Vec<f32>> {
    let s = window_scores(q_window, keys, shape)?;
    pool_group_scores(&s, shape.n_heads, shape.n_kv_heads, shape.candidates(), kernel, pool)
}

/// Indices of the `k` largest scores, higher score first, lower index first among equals; NaN
/// ranks below every number. Average O(n + k log k).
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(scores.len());
    let key = |i: u32| {
        let x = scores[i as usize];
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x
        }
    };
    let order = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

fn check_budget(what: &'static str, budget: usize, window: usize, seq_len: usize) -> Result<()> {
    if budget < window || budget > seq_len {
        return Err(SelectError::Shape(format!(
            "{what} {budget} must lie between the window ({window}) and the sequence ({seq_len})"
        )));
    }
    Ok(())
}

/// Cache entries of every KV head (`[Hk, budget]`): the top `budget − W` positions of its group
/// scores (descending), then the W window positions in order.
pub fn kv_indices(
    group_scores: &[f32],
    n_kv_heads: usize,
    seq_len: usize,
    window: usize,
    budget: usize,
) -> Result<Vec<u32>> {
    check_budget("KV budget", budget, window, seq_len)?;
    let n = seq_len - window;
    check_len("group scores", group_scores, n_kv_heads * n)?;
    let mut out = Vec::with_capacity(n_kv_heads * budget);
    for g in 0..n_kv_heads {
        out.extend(top_k(&group_scores[g * n..(g + 1) * n], budget - window));
        out.extend(n as u32..seq_len as u32);
    }
    Ok(out)
}

/// Token-Selective Propagation: the top `tsp_len − W` positions of the group scores summed over KV
/// heads, plus the window, ascending — exactly `tsp_len` indices.
pub fn tsp_indices(
    group_scores: &[f32],
    n_kv_heads: usize,
    seq_len: usize,
    window: usize,
    tsp_len: usize,
) -> Result<Vec<u32>> {
    check_budget("TSP length", tsp_len, window, seq_len)?;
    let n = seq_len - window;
    check_len("group scores", group_scores, n_kv_heads * n)?;
    let mut total = vec![0f32; n];
    for head in group_scores.chunks_exact(n.max(1)).take(n_kv_heads) {
        total.iter_mut().zip(head).for_each(|(t, a)| *t += a);
    }
    let mut idx = top_k(&total, tsp_len - window);
    idx.sort_unstable();
    idx.extend(n as u32..seq_len as u32);
    Ok(idx)
}

/// Ada-SnapKV's allocation over per-head scores `[H, n]`: the top H·`base` scores over all heads
/// compete globally; head h won n_h of them and keeps `round(n_h·(1−α) + α·base)` (ties to even, as
/// torch), at most n. The window is not included.
pub fn ada_budgets(scores: &[f32], n_heads: usize, n: usize, base: usize, alpha: f64) -> Result<Vec<usize>> {
    check_len("head scores", scores, n_heads * n)?;
    let mut won = vec![0usize; n_heads];
    for i in top_k(scores, n_heads * base) {
        won[i as usize / n.max(1)] += 1;
    }
    Ok(won
        .into_iter()
        .map(|w| ((w as f64 * (1.0 - alpha) + alpha * base as f64).round_ties_even() as usize).min(n))
        .collect())
}

/// Cache entries of every head for ragged budgets: head h keeps the top `budgets[h]` of its scores
/// (`[heads, S−W]`, descending), then the W window positions in order.
pub fn head_indices(scores: &[f32], seq_len: usize, window: usize, budgets: &[usize]) -> Result<Vec<Vec<u32>>> {
    let n = seq_len
        .checked_sub(window)
        .ok_or_else(|| SelectError::Shape(format!("window {window} is longer than the sequence ({seq_len})")))?;
    check_len("head scores", scores, budgets.len() * n)?;
    Ok(budgets
        .iter()
        .enumerate()
        .map(|(h, &b)| {
            let mut idx = top_k(&scores[h * n..(h + 1) * n], b);
            idx.extend(n as u32..seq_len as u32);
            idx
        })
        .collect())
}

/// StreamingLLM: the first min(`sink`, `budget`) positions and the most recent rest of `budget`,
/// ascending.
pub fn streaming_indices(seq_len: usize, sink: usize, budget: usize) -> Vec<u32> {
    let budget = budget.min(seq_len);
    let sinks = sink.min(budget);
    (0..sinks as u32).chain((seq_len - (budget - sinks)) as u32..seq_len as u32).collect()
}

/// PyramidInfer's propagated positions: the `sink` first tokens, the top `keep` of the context
/// scores (`scores[j]` for the `n` keys before the recent rows, sinks excluded from the ranking)
/// and the `seq_len − n` recent tokens, ascending.
pub fn pyramidinfer_indices(scores: &[f32], seq_len: usize, sink: usize, keep: usize) -> Vec<u32> {
    let n = scores.len();
    let sinks = sink.min(n);
    let mut idx: Vec<u32> = top_k(&scores[sinks..], keep).into_iter().map(|i| i + sinks as u32).collect();
    idx.sort_unstable();
    (0..sinks as u32).chain(idx).chain(n as u32..seq_len as u32).collect()
}

/// The last `rows` query rows of every head of token-major `q` (`[S, H·D]`), as `[H, rows, D]`: the
/// layout the scoring functions take.
pub fn last_rows_per_head(q: &[f32], seq: usize, n_heads: usize, head_dim: usize, rows: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n_heads * rows * head_dim);
    for h in 0..n_heads {
        for i in seq - rows..seq {
            out.extend_from_slice(&q[(i * n_heads + h) * head_dim..][..head_dim]);
        }
    }
    out
}
