//! Causal prefill attention on the CPU's bf16 units: FlashAttention's loop (online softmax over
//! key tiles, no L×L matrix) with Q·Kᵀ and P·V as 32×32 blocks of [`bf16_gemm`]'s kernels (AMX or
//! AVX512-BF16). Q, K, V and the probabilities are rounded to bf16 and accumulated in f32, as
//! PyTorch's bf16 SDPA does; the f32 path ([`super::attention`]) stays for f32 engines.
//!
//! Each KV head's keys are packed once per layer as a kernel B operand (keys are its columns) and
//! its values transposed into one (head dimensions are its columns, key pairs its k), so every
//! query block reads them in the kernels' layout. Work is split by (32 query rows, KV head): the query
//! heads of a GQA group share every key tile while it is in cache.

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use super::attention::{normalize, online_softmax_step, Heads};
use super::bf16_gemm::{store_a_row, Aligned, Kernel, PackedB, BLOCK, TILE_K};
use super::kernels::to_bf16;

/// Keys per softmax tile: eight 32-key kernel blocks (four measured slower).
const KEY_TILE: usize = 8 * BLOCK;

/// Every KV head's keys and values in the kernels' layout: keys as a B operand (keys are its
/// columns), values transposed into one (head dimensions are its columns, key pairs its k).
pub struct Packed(Vec<(PackedB, PackedB)>);

/// Packs `k`, `v` (`[Hk, S, D]` head-major) once for every query block of a layer.
pub fn pack(k: &[f32], v: &[f32], seq: usize, heads: &Heads) -> Packed {
    let d = heads.head_dim;
    Packed(
        (0..heads.n_kv_heads)
            .into_par_iter()
            .map(|g| {
                let (k, v) = (&k[g * seq * d..(g + 1) * seq * d], &v[g * seq * d..(g + 1) * seq * d]);
                let keys = PackedB::from_rows(seq, d, |j, row| to_bf16(&k[j * d..(j + 1) * d], row));
                let values = PackedB::from_rows(d, seq, |j, row| {
                    row.iter_mut().zip(v[j..].iter().step_by(d)).for_each(|(o, &x)| *o = bf16::from_f32(x))
                });
                (keys, values)
            })
            .collect(),
    )
}

/// `out[i, h·D..] = softmax(q_i·Kᵀ/√D) V` over keys `0..=i` (and within the sliding window by
/// `pos`), for `q` `[S, H·D]` token-major and `k`, `v` `[Hk, S, D]` head-major.
pub fn attention(kernel: Kernel, q: &[f32], k: &[f32], v: &[f32], pos: &[u32], heads: &Heads, out: &mut [f32]) {
    attend(kernel, &pack(k, v, pos.len(), heads), q, pos, heads, 0..pos.len(), out)
}

/// [`attention`] of the query rows `rows` alone (`rows.start` a multiple of 32) over the packed keys
/// and values: a prefill can take a layer's attention a block of rows at a time. `out` is the whole
/// `[S, H·D]`; only the rows asked for are written, each exactly as a whole call writes it.
pub fn attend(
    kernel: Kernel,
    packed: &Packed,
    q: &[f32],
    pos: &[u32],
    heads: &Heads,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let (h, hk, d, seq) = (heads.n_heads, heads.n_kv_heads, heads.head_dim, pos.len());
    debug_assert!(rows.start.is_multiple_of(BLOCK) && rows.end <= seq);
    // Later query blocks see more keys: start them first so the pool ends evenly.
    let (group, dp) = (h / hk, d.div_ceil(TILE_K) * TILE_K);
    let tasks: Vec<(usize, usize)> =
        (rows.start / BLOCK..rows.end.div_ceil(BLOCK)).rev().flat_map(|b| (0..hk).map(move |g| (b, g))).collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(b, g)| {
            let (keys, values) = &packed.0[g];
            Block { kernel, q, pos, heads, keys, values, first_head: g * group, i0: b * BLOCK }.run()
        })
        .collect();
    for (&(b, g), acc) in tasks.iter().zip(&results) {
        for (k, acc) in acc.chunks_exact(BLOCK * dp).enumerate() {
            let head = g * group + k;
            for (r, row) in acc.chunks_exact(dp).take(rows.end.min(seq) - b * BLOCK).enumerate() {
                out[((b * BLOCK + r) * h + head) * d..][..d].copy_from_slice(&row[..d]);
            }
        }
    }
}

/// 32 query rows from `i0` of every query head of one KV head (a GQA group, heads from
/// `first_head`): each tile of keys and values is read once for the whole group.
struct Block<'a> {
    kernel: Kernel,
    q: &'a [f32],
    pos: &'a [u32],
    heads: &'a Heads,
    keys: &'a PackedB,
    values: &'a PackedB,
    first_head: usize,
    i0: usize,
}

impl Block<'_> {
    /// The group's output, head after head: 32 rows each, padded to a multiple of 32 values.
    fn run(&self) -> Vec<f32> {
        let (h, d, seq) = (self.heads.n_heads, self.heads.head_dim, self.pos.len());
        let group = h / self.heads.n_kv_heads;
        let rows = BLOCK.min(seq - self.i0);
        let dp = d.div_ceil(TILE_K) * TILE_K;
        let mut a = Aligned::zeros(group * BLOCK * dp);
        for (k, a) in a.as_mut_slice().chunks_exact_mut(BLOCK * dp).enumerate() {
            for r in 0..rows {
                store_a_row(a, r, &self.q[((self.i0 + r) * h + self.first_head + k) * d..][..d]);
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        let (mut max, mut sum) = (vec![f32::NEG_INFINITY; group * BLOCK], vec![0f32; group * BLOCK]);
        // Rows of `dp`, so P · V accumulates into it 32 columns at a time (V's padding columns are 0).
        let mut acc = vec![0f32; group * BLOCK * dp];
        let mut scores = vec![0f32; BLOCK * KEY_TILE];
        let mut p = Aligned::zeros(BLOCK * KEY_TILE);
        let limit = self.i0 + rows; // causal: no row sees a key after it
        for t0 in (0..limit).step_by(KEY_TILE) {
            let n_blocks = (limit - t0).min(KEY_TILE).div_ceil(BLOCK);
            let width = n_blocks * BLOCK;
            for k in 0..group {
                let a = &a.as_slice()[k * BLOCK * dp..];
                for kb in 0..n_blocks {
                    let dst = &mut scores[kb * BLOCK..];
                    let b = self.keys.block(t0 / BLOCK + kb);
                    // SAFETY: the kernel's path is available (the caller's contract); `a` is a block
                    // of `dp / 32` chunks, `b` two column tiles of `k_tiles` tiles, `dst` 32 rows of KEY_TILE.
                    unsafe {
                        (self.kernel)(
                            a.as_ptr(),
                            b.as_ptr(),
                            self.keys.stride(),
                            self.keys.k_tiles,
                            dst.as_mut_ptr(),
                            KEY_TILE,
                            false,
                        )
                    };
                }
                for r in 0..BLOCK {
                    let i = self.i0 + r;
                    let row = &mut scores[r * KEY_TILE..][..width];
                    // Causal: keys after row i; padding rows see nothing; the window hides keys too far back.
                    let visible = if r < rows { (i + 1).saturating_sub(t0).min(width) } else { 0 };
                    if let Some(w) = self.heads.sliding_window {
                        let last = i.min(seq - 1);
                        let first = self.pos[..=last].partition_point(|&p| self.pos[last] - p >= w as u32);
                        row[..first.saturating_sub(t0).min(width)].fill(f32::NEG_INFINITY);
                    }
                    let (state, acc) = (k * BLOCK + r, &mut acc[(k * BLOCK + r) * dp..][..dp]);
                    online_softmax_step(row, visible, scale, &mut max[state], &mut sum[state], acc);
                    store_a_row(p.as_mut_slice(), r, row);
                }
                // acc += P · V over this tile's keys, 32 head dimensions at a time.
                for db in 0..dp / BLOCK {
                    let b = &self.values.block(db)[t0 / 2 * TILE_K..];
                    // SAFETY: as above; `p` is a block of `n_blocks` chunks, `b` starts at key pair
                    // t0/2 of two column tiles that hold every key pair, and `acc` has 32 rows of `dp`.
                    unsafe {
                        (self.kernel)(
                            p.as_slice().as_ptr(),
                            b.as_ptr(),
                            self.values.stride(),
                            n_blocks,
                            acc[(k * BLOCK * dp) + db * BLOCK..].as_mut_ptr(),
                            dp,
                            true,
                        )
                    };
                }
            }
        }
        normalize(&mut acc, &sum, dp);
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention::{attention as f32_attention, KvView};
    use crate::cpu::bf16_gemm::{kernel, tests::emulated_block};
    use crate::cpu::isa::Path;

    /// Every available kernel (and the emulated one everywhere) against the f32 attention on the
    /// same bf16-rounded inputs, for GQA with 1 and 3 query heads per KV head, lengths that are
    /// not multiples of 32 or 128, and a sliding window.
    #[test]
    fn tile_attention_matches_f32_attention() {
        let mut kernels: Vec<(&str, Kernel)> = vec![("emulated", emulated_block)];
        kernels.extend(Path::ALL.into_iter().filter(|p| p.available()).filter_map(|p| Some((p.name(), kernel(p)?))));
        for (h, hk, d, seq, window) in
            [(2, 2, 32, 1, None), (6, 2, 64, 45, None), (3, 1, 64, 300, Some(100)), (4, 2, 96, 161, None)]
        {
            let round = |x: f32| bf16::from_f32(x).to_f32();
            let val = |i: usize, m: usize| round(((i * m % 113) as f32 - 56.0) / 40.0);
            let q: Vec<f32> = (0..seq * h * d).map(|i| val(i, 37)).collect();
            let k: Vec<f32> = (0..hk * seq * d).map(|i| val(i, 53)).collect();
            let v: Vec<f32> = (0..hk * seq * d).map(|i| val(i, 71)).collect();
            let pos: Vec<u32> = (0..seq as u32).map(|p| 3 * p).collect();
            let heads = Heads { n_heads: h, n_kv_heads: hk, head_dim: d, sliding_window: window.map(|w| 3 * w) };
            let all_pos: Vec<u32> = (0..hk).flat_map(|_| pos.iter().copied()).collect();
            let kv = KvView { k: &k, v: &v, pos: &all_pos, len: seq, stride: seq };
            let mut want = vec![0f32; seq * h * d];
            f32_attention(&q, &pos, 0, &kv, &heads, &mut want);
            for (name, kernel) in &kernels {
                let mut got = vec![f32::NAN; seq * h * d];
                attention(*kernel, &q, &k, &v, &pos, &heads, &mut got);
                // Only the probabilities are rounded beyond the inputs: ≤ 2^-8 relative each.
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 2e-2, "{name} (h {h}, hk {hk}, d {d}, seq {seq}, window {window:?}): max error {err}");
            }
        }
    }
}
