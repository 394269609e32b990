//! FastKV's token selection on plain host slices (fastkv-spec §3): window attention scores, per
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

use crate::cpu::kernels::gemm_f32;

/// Pooling of per-head window scores along the key axis (stride 1, padding K/2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
        if s.n_heads == 0 || s.n_kv_heads == 0 || s.head_dim == 0 || s.n_heads % s.n_kv_heads != 0 {
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
    shape.check()?;
    let Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w } = *shape;
    check_len("q_window", q_window, h * w * d)?;
    check_len("keys", keys, hk * s * d)?;
    let (g_size, n) = (h / hk, s - w);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; h * n];
    if n == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(g_size * n).enumerate().for_each(|(g, group_out)| {
        let rows = g_size * w;
        let q = &q_window[g * rows * d..(g + 1) * rows * d];
        let k = &keys[g * s * d..(g + 1) * s * d];
        let mut logits = vec![0f32; rows * s];
        gemm_f32(rows, s, d, &mut logits, s, false, (q, d, 1), (k, 1, d), scale, false);
        for (r, row) in logits.chunks_exact_mut(s).enumerate() {
            // Window key n+t sees window query i only if it is not in i's future (t ≤ i).
            row[n + r % w + 1..].fill(f32::NEG_INFINITY);
        }
        for (r, row) in logits.chunks_exact_mut(s).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|x| *x = (*x - max).exp());
            let inv = (1.0 / row.iter().map(|&e| e as f64).sum::<f64>()) as f32;
            let dst = &mut group_out[(r / w) * n..(r / w + 1) * n];
            for (o, &e) in dst.iter_mut().zip(&row[..n]) {
                *o += e * inv;
            }
        }
    });
    Ok(out)
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
    if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(SelectError::Shape(format!("{n_heads} query heads cannot be grouped over {n_kv_heads} KV heads")));
    }
    if kernel == 0 || kernel % 2 == 0 {
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
