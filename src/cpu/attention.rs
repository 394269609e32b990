//! Causal GQA prefill attention in f32 with an online softmax over key tiles (FlashAttention's
//! loop on the CPU): no L×L matrix is ever formed, K/V are read per KV head (never expanded to the
//! query heads), and the two products of each tile (Q·Kᵀ and P·V) are small GEMMs. Masking is by
//! index (kept indices after TSP are ascending, so index order is position order) and by position
//! for sliding windows. bf16 engines on CPUs with bf16 units take [`super::tile_attention`]
//! instead; decode attends over the cache in [`super::kv_cache`].

use multiversion::multiversion;
use rayon::prelude::*;

use crate::hostmath::gemm_f32;

/// Query rows (of all heads of a GQA group) per task, and keys per tile. The `gemm` crate packs
/// both operands of every tile product, so a tile of keys and values is packed once per query
/// block: 256 rows instead of 64 cut attention's share of a 4K prefill from 43 % to 39 % (f32
/// path, Xeon, measured).
const QUERY_BLOCK: usize = 256;
const KEY_TILE: usize = 128;

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

/// `out[i, h·D..] = softmax(q_i·Kᵀ/√D) V` for query rows `q` (`[m, H·D]`, positions `q_pos`):
/// the keys are the same sequence as the queries and query row `i` is sequence row `q_offset + i`,
/// so it sees keys `0..=q_offset+i`.
/// Work is split by (query block, KV head): the G query heads of a group share each K/V tile.
pub fn attention(q: &[f32], q_pos: &[u32], q_offset: usize, kv: &KvView, heads: &Heads, out: &mut [f32]) {
    let (h, d, hk) = (heads.n_heads, heads.head_dim, heads.n_kv_heads);
    let group = h / hk;
    let m = q_pos.len();
    let block = QUERY_BLOCK.div_ceil(group).max(1);
    let tasks: Vec<(usize, usize)> = (0..m.div_ceil(block)).flat_map(|b| (0..hk).map(move |g| (b, g))).collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::default, |scratch, &(b, g)| {
            let rows = b * block..((b + 1) * block).min(m);
            Task { q, q_pos, q_offset, kv, heads, g, rows }.run(scratch)
        })
        .collect();
    for (&(b, g), r) in tasks.iter().zip(&results) {
        // Result rows are (head in group, query row), like the packed queries.
        let n = ((b + 1) * block).min(m) - b * block;
        for (k, row) in r.chunks_exact(d).enumerate() {
            let (head, i) = (g * group + k / n, b * block + k % n);
            out[(i * h + head) * d..][..d].copy_from_slice(row);
        }
    }
}

/// Buffers a worker thread reuses from task to task: packed queries, running max and sum, one tile
/// of scores.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    scores: Vec<f32>,
}

/// The query heads of KV head `g` over a block of query rows.
struct Task<'a> {
    q: &'a [f32],
    q_pos: &'a [u32],
    q_offset: usize,
    kv: &'a KvView<'a>,
    heads: &'a Heads,
    g: usize,
    rows: std::ops::Range<usize>,
}

impl Task<'_> {
    fn run(&self, scratch: &mut Scratch) -> Vec<f32> {
        let (h, d) = (self.heads.n_heads, self.heads.head_dim);
        let group = h / self.heads.n_kv_heads;
        let rows = self.rows.len();
        let n = rows * group;
        // Pack the group's queries as [head][row] so one GEMM serves them all.
        let Scratch { q, max, sum, scores } = scratch;
        q.resize(n * d, 0.0);
        for (k, dst) in q.chunks_exact_mut(d).enumerate() {
            let (head, i) = (self.g * group + k / rows, self.rows.start + k % rows);
            dst.copy_from_slice(&self.q[(i * h + head) * d..][..d]);
        }
        let base = self.g * self.kv.stride;
        let (keys, values) = (&self.kv.k[base * d..], &self.kv.v[base * d..]);
        let key_pos = &self.kv.pos[base..base + self.kv.len];
        let scale = 1.0 / (d as f32).sqrt();
        max.clear();
        max.resize(n, f32::NEG_INFINITY);
        sum.clear();
        sum.resize(n, 0.0);
        scores.resize(n * KEY_TILE, 0.0);
        let mut acc = vec![0f32; n * d];
        let first_row = self.q_offset + self.rows.start;
        let limit = (first_row + rows).min(self.kv.len);
        for t0 in (0..limit).step_by(KEY_TILE) {
            let width = (limit - t0).min(KEY_TILE);
            // scores[r, j] = q_r · k_(t0+j), scaled by the softmax
            gemm_f32(n, width, d, scores, KEY_TILE, false, (q, d, 1), (&keys[t0 * d..], 1, d), 1.0, false);
            for r in 0..n {
                let i = r % rows;
                let row = &mut scores[r * KEY_TILE..r * KEY_TILE + width];
                let visible = (first_row + i + 1).saturating_sub(t0).min(width);
                if let Some(w) = self.heads.sliding_window {
                    let p = self.q_pos[self.rows.start + i];
                    for (s, &kp) in row.iter_mut().zip(&key_pos[t0..t0 + width]) {
                        if p.saturating_sub(kp) as usize >= w {
                            *s = f32::NEG_INFINITY;
                        }
                    }
                }
                online_softmax_step(row, visible, scale, &mut max[r], &mut sum[r], &mut acc[r * d..(r + 1) * d]);
            }
            // acc += P · V_tile
            gemm_f32(n, d, width, &mut acc, d, true, (scores, KEY_TILE, 1), (&values[t0 * d..], d, 1), 1.0, false);
        }
        normalize(&mut acc, sum, d);
        acc
    }
}

/// One step of a query row's online softmax over key tiles: turns `row` (the tile's raw scores,
/// of which the first `visible` are unmasked) into exp(scale·s − m) with the new running max m,
/// rescales the row's running sum and output `acc` when m grew, and adds the tile's sum; the
/// caller then adds P·V to `acc`.
pub(super) fn online_softmax_step(
    row: &mut [f32],
    visible: usize,
    scale: f32,
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
) {
    let (new_max, tile_sum) = softmax_tile(row, visible, scale, *max);
    if *max != f32::NEG_INFINITY && *max < new_max {
        let c = (*max - new_max).exp();
        *sum *= c;
        acc.iter_mut().for_each(|a| *a *= c);
    }
    *max = new_max;
    *sum += tile_sum;
}

/// Divides each `d`-wide row of `acc` by its softmax sum; a row that saw no key stays 0.
pub(super) fn normalize(acc: &mut [f32], sum: &[f32], d: usize) {
    for (a, &s) in acc.chunks_exact_mut(d).zip(sum) {
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        a.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Turns one row of raw scores into exp(scale·s − m) in place, with m = max(running max, the
/// scaled row's max), in two passes (scale and max, then exp and sum); returns (m, Σ exp). Entries
/// from `visible` on, and masked entries (−∞) before it, become exactly 0, so a fully masked row
/// adds nothing. Max and sum run over 16 lanes folded as a tree (a serial float fold keeps the
/// compiler from vectorising; on 128-key rows the serial 16-lane folds cost as much as the loops).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn softmax_tile(row: &mut [f32], visible: usize, scale: f32, running_max: f32) -> (f32, f32) {
    let (live, masked) = row.split_at_mut(visible);
    masked.fill(0.0);
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = live.chunks_exact_mut(16);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, s)| {
            *s *= scale;
            *l = max(*l, *s);
        });
    }
    let mut tile_max = fold_lanes(lanes, max);
    for s in chunks.into_remainder() {
        *s *= scale;
        tile_max = max(tile_max, *s);
    }
    let m = max(running_max, tile_max);
    if m == f32::NEG_INFINITY {
        live.fill(0.0);
        return (m, 0.0);
    }
    let mut sums = [0f32; 16];
    let mut chunks = live.chunks_exact_mut(16);
    for c in &mut chunks {
        sums.iter_mut().zip(c).for_each(|(l, s)| {
            *s = exp(*s - m);
            *l += *s;
        });
    }
    let mut tile_sum = fold_lanes(sums, |a, b| a + b);
    for s in chunks.into_remainder() {
        *s = exp(*s - m);
        tile_sum += *s;
    }
    (m, tile_sum)
}

/// The larger of two scores, as one `maxps` (`f32::max`'s NaN rule costs a compare and a blend
/// per vector; scores are never NaN).
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `op` over 16 lanes as a tree of halves (four vector steps).
#[inline(always)]
fn fold_lanes(lanes: [f32; 16], op: impl Fn(f32, f32) -> f32) -> f32 {
    let eight: [f32; 8] = std::array::from_fn(|i| op(lanes[i], lanes[i + 8]));
    let four: [f32; 4] = std::array::from_fn(|i| op(eight[i], eight[i + 4]));
    op(op(four[0], four[2]), op(four[1], four[3]))
}

/// e^x for x ≤ 0 to 1e-6 relative: 2^n · p(r) with n = round(x·log2 e), p a degree-6 Taylor
/// polynomial on the remainder (|r| ≤ ln2/2, Horner in fused multiply-adds), and 0 below −87.
/// Written so it vectorises: adding 1.5·2^23 rounds to the integer n in the low mantissa bits, from
/// which 2^n is built with integer ops (a libm `expf`, `f32::round` or a saturating `as i32` each
/// keep the loop scalar).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let t = xc.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    // Cody–Waite: ln 2 in two parts, the first exact in a few bits, so n·LN2_HI has no rounding.
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, xc));
    let p = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0].iter().fold(1.0f32 / 720.0, |p, &c| p.mul_add(r, c));
    let scale = f32::from_bits(t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        scale * p
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm() {
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let (got, want) = (super::exp(x), x.exp());
            let ok = if x < -87.0 { got == 0.0 } else { (got - want).abs() <= 1e-6 * want };
            assert!(ok, "exp({x}) = {got}, libm {want}");
        }
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }
}
