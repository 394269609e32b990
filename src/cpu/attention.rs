//! Causal GQA attention with an online softmax over key tiles: no L×L matrix is ever formed, K/V
//! are read per KV head (never expanded to the query heads), and the mask is by position so the same
//! code serves prefill (compacted after TSP), decode over a compressed cache, and sliding windows.

use multiversion::multiversion;
use rayon::prelude::*;

use super::kernels::{axpy, dot_inline as dot};

const QUERY_BLOCK: usize = 16;
const KEY_TILE: usize = 64;

/// Keys and values of one layer, head-major: head `g` holds rows `g*stride .. g*stride+len`.
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Position of every entry, `[Hk, stride]`.
    pub pos: &'a [u32],
    pub len: usize,
    pub stride: usize,
}

pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

/// `out[i, h·D..] = softmax(q_i·Kᵀ/√D) V` for query rows `q` (`[m, H·D]`, positions `q_pos`).
/// With `causal`, the keys are the same sequence as the queries and query row `i` is sequence row
/// `q_offset + i`, so it sees keys `0..=q_offset+i`; otherwise every key is in its past.
pub fn attention(q: &[f32], q_pos: &[u32], q_offset: usize, causal: bool, kv: &KvView, heads: &Heads, out: &mut [f32]) {
    let (h, d) = (heads.n_heads, heads.head_dim);
    let m = q_pos.len();
    let blocks = m.div_ceil(QUERY_BLOCK);
    let tasks: Vec<(usize, usize)> = (0..blocks).flat_map(|b| (0..h).map(move |head| (b, head))).collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(b, head)| {
            let rows = b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(m);
            block(q, q_pos, q_offset, causal, kv, heads, head, rows)
        })
        .collect();
    for (&(b, head), r) in tasks.iter().zip(&results) {
        for (i, row) in r.chunks_exact(d).enumerate() {
            let dst = (b * QUERY_BLOCK + i) * h * d + head * d;
            out[dst..dst + d].copy_from_slice(row);
        }
    }
}

/// One query head over a block of query rows, key tile by key tile.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
#[allow(clippy::too_many_arguments)]
fn block(
    q: &[f32],
    q_pos: &[u32],
    q_offset: usize,
    causal: bool,
    kv: &KvView,
    heads: &Heads,
    head: usize,
    rows: std::ops::Range<usize>,
) -> Vec<f32> {
    let (h, d) = (heads.n_heads, heads.head_dim);
    let g = head / (h / heads.n_kv_heads);
    let scale = 1.0 / (d as f32).sqrt();
    let n = rows.len();
    let (keys, values) = (&kv.k[g * kv.stride * d..], &kv.v[g * kv.stride * d..]);
    let key_pos = &kv.pos[g * kv.stride..g * kv.stride + kv.len];
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = vec![0f32; n];
    let mut acc = vec![0f32; n * d];
    let mut scores = [0f32; KEY_TILE];
    let limit = if causal { (q_offset + rows.end).min(kv.len) } else { kv.len };
    for t0 in (0..limit).step_by(KEY_TILE) {
        let t1 = (t0 + KEY_TILE).min(limit);
        for (r, i) in rows.clone().enumerate() {
            let visible_end = if causal { (q_offset + i + 1).min(t1) } else { t1 };
            if visible_end <= t0 {
                continue;
            }
            let qi = &q[i * h * d + head * d..][..d];
            let p = q_pos[i];
            let mut tile_max = f32::NEG_INFINITY;
            for j in t0..visible_end {
                let too_old = heads.sliding_window.is_some_and(|w| p.saturating_sub(key_pos[j]) as usize >= w);
                let s = if too_old || key_pos[j] > p { f32::NEG_INFINITY } else { dot(qi, &keys[j * d..][..d]) * scale };
                scores[j - t0] = s;
                tile_max = tile_max.max(s);
            }
            if tile_max == f32::NEG_INFINITY {
                continue;
            }
            let new_max = max[r].max(tile_max);
            let acc_r = &mut acc[r * d..][..d];
            if max[r] != f32::NEG_INFINITY && max[r] < new_max {
                let c = (max[r] - new_max).exp();
                sum[r] *= c;
                acc_r.iter_mut().for_each(|a| *a *= c);
            }
            max[r] = new_max;
            for j in t0..visible_end {
                let w = (scores[j - t0] - new_max).exp();
                if w > 0.0 {
                    sum[r] += w;
                    axpy(w, &values[j * d..][..d], acc_r);
                }
            }
        }
    }
    for (r, a) in acc.chunks_exact_mut(d).enumerate() {
        let inv = if sum[r] > 0.0 { 1.0 / sum[r] } else { 0.0 };
        a.iter_mut().for_each(|x| *x *= inv);
    }
    acc
}
