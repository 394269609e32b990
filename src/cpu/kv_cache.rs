//! The KV cache of one request: per layer and cache head, K and V with the original position of
//! every entry. A layer caches either its KV heads (full, FastKV, StreamingLLM, …) or one entry list
//! per query head (SnapKV, AdaKV, HeadKV, PyramidKV, H2O as published), and AdaKV/HeadKV heads have
//! different lengths. Each layer is allocated once, for what prefill keeps plus `max_new_tokens`, so
//! decoding appends in place and never copies the cache.
//!
//! Entries are stored in the engine's precision: bf16 for bf16 engines (half the memory and half
//! the bytes decode reads), f32 for f32 engines (exact against an f32 reference). Decode attention
//! streams each cache head's keys and values once, widening in registers, split into chunks across
//! threads whose partial softmaxes are merged (flash-decoding).

use half::bf16;
use rayon::prelude::*;

use super::attention::{exp, softmax_tile, Heads};
use super::gemv::dot_bf16;
use super::isa::Simd;
use super::kernels::{axpy, axpy_bf16, dot, to_bf16};
#[cfg(target_arch = "x86_64")]
use super::simd;

/// Entries per decode-attention task.
const CHUNK: usize = 512;

/// K or V of every cache head, `[heads, cap, D]`.
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Store {
    fn zeros(len: usize, bf16: bool) -> Self {
        if bf16 {
            Store::Bf16(vec![bf16::ZERO; len])
        } else {
            Store::F32(vec![0.0; len])
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Store::F32(s) => s[at..at + src.len()].copy_from_slice(src),
            Store::Bf16(s) => to_bf16(src, &mut s[at..at + src.len()]),
        }
    }

    fn element_bytes(&self) -> usize {
        match self {
            Store::F32(_) => 4,
            Store::Bf16(_) => 2,
        }
    }
}

pub struct LayerCache {
    k: Store,
    v: Store,
    pos: Vec<u32>,
    /// Entries per cache head.
    lens: Vec<usize>,
    cap: usize,
    head_dim: usize,
    /// KV heads of the model: cache head c holds entries of KV head c / (cache heads / n_kv_heads).
    n_kv_heads: usize,
}

impl LayerCache {
    /// Stores entries `keep[c]` (indices into the `seq_len` rows of `k`/`v`, head-major
    /// `[Hk, seq_len, D]`) of every cache head c; `None` keeps all rows of every KV head in order.
    /// `bf16` stores them rounded to bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn from_prefill(
        k: &[f32],
        v: &[f32],
        positions: &[u32],
        keep: Option<&[Vec<u32>]>,
        n_kv_heads: usize,
        head_dim: usize,
        extra: usize,
        bf16: bool,
    ) -> Self {
        let seq_len = positions.len();
        let all: Vec<Vec<u32>>;
        let keep = match keep {
            Some(keep) => keep,
            None => {
                all = vec![(0..seq_len as u32).collect(); n_kv_heads];
                &all
            }
        };
        let lens: Vec<usize> = keep.iter().map(Vec::len).collect();
        let cap = lens.iter().max().copied().unwrap_or(0) + extra;
        let d = head_dim;
        let mut c = LayerCache {
            k: Store::zeros(keep.len() * cap * d, bf16),
            v: Store::zeros(keep.len() * cap * d, bf16),
            pos: vec![0; keep.len() * cap],
            lens,
            cap,
            head_dim,
            n_kv_heads,
        };
        let group = keep.len() / n_kv_heads;
        for (h, rows) in keep.iter().enumerate() {
            for (slot, &row) in rows.iter().enumerate() {
                let (src, dst) = (((h / group) * seq_len + row as usize) * d, (h * cap + slot) * d);
                c.k.write(dst, &k[src..src + d]);
                c.v.write(dst, &v[src..src + d]);
                c.pos[h * cap + slot] = positions[row as usize];
            }
        }
        c
    }

    /// Appends one token's K/V (`[Hk·D]` each) at `position` to every cache head. Panics only if
    /// more tokens are appended than were reserved, which the session prevents.
    pub fn push(&mut self, k: &[f32], v: &[f32], position: u32) {
        let d = self.head_dim;
        let group = self.lens.len() / self.n_kv_heads;
        for (h, len) in self.lens.iter_mut().enumerate() {
            assert!(*len < self.cap, "KV cache reserved for fewer tokens than generated");
            let (src, dst) = ((h / group) * d, (h * self.cap + *len) * d);
            self.k.write(dst, &k[src..src + d]);
            self.v.write(dst, &v[src..src + d]);
            self.pos[h * self.cap + *len] = position;
            *len += 1;
        }
    }

    /// Entries of the longest cache head (every head's length unless AdaKV/HeadKV).
    pub fn len(&self) -> usize {
        self.lens.iter().max().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cache heads: the model's KV heads, or its query heads for per-query-head methods.
    pub fn n_heads(&self) -> usize {
        self.lens.len()
    }

    /// Bytes of K and V held, not counting the reserve for tokens not generated yet.
    pub fn bytes(&self) -> usize {
        2 * self.lens.iter().sum::<usize>() * self.head_dim * self.k.element_bytes()
    }

    /// Decode attention of one query row (`q`: `[H·D]` at `position`) over this cache into `out`.
    /// Cache head c serves query heads `c·G .. (c+1)·G`, G = H / cache heads (the GQA group for
    /// KV-head caches, 1 for per-query-head ones), each over its own entries.
    pub fn attend(&self, q: &[f32], position: u32, heads: &Heads, out: &mut [f32]) {
        let (d, group) = (self.head_dim, heads.n_heads / self.lens.len());
        let tasks: Vec<(usize, usize)> =
            (0..self.lens.len()).flat_map(|c| (0..self.lens[c].div_ceil(CHUNK)).map(move |t| (c, t * CHUNK))).collect();
        let partials: Vec<Vec<Partial>> = tasks
            .par_iter()
            .map(|&(c, t0)| {
                let q = &q[c * group * d..(c + 1) * group * d];
                let rows = c * self.cap + t0..c * self.cap + (t0 + CHUNK).min(self.lens[c]);
                match (&self.k, &self.v) {
                    (Store::F32(k), Store::F32(v)) => self.chunk(q, k, v, rows, position, heads.sliding_window),
                    (Store::Bf16(k), Store::Bf16(v)) => self.chunk(q, k, v, rows, position, heads.sliding_window),
                    _ => unreachable!("K and V are stored alike"),
                }
            })
            .collect();
        out.fill(0.0);
        for (c, out) in out.chunks_exact_mut(group * d).enumerate() {
            let mine: Vec<&Vec<Partial>> =
                tasks.iter().zip(&partials).filter(|(t, _)| t.0 == c).map(|(_, p)| p).collect();
            for (g, out) in out.chunks_exact_mut(d).enumerate() {
                let m = mine.iter().map(|p| p[g].max).fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    continue; // no visible entry: zeros, as the prefill attention gives
                }
                let mut sum = 0.0;
                for p in &mine {
                    let w = exp(p[g].max - m);
                    sum += w * p[g].sum;
                    axpy(out, w, &p[g].acc);
                }
                out.iter_mut().for_each(|o| *o /= sum);
            }
        }
    }

    /// Unnormalised softmax · V of each of `q`'s heads over cache entries `rows`.
    fn chunk<T: Entry>(
        &self,
        q: &[f32],
        k: &[T],
        v: &[T],
        rows: std::ops::Range<usize>,
        position: u32,
        window: Option<usize>,
    ) -> Vec<Partial> {
        let d = self.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let visible: Vec<bool> = self.pos[rows.clone()]
            .iter()
            .map(|&p| window.is_none_or(|w| (position.saturating_sub(p) as usize) < w))
            .collect();
        let (k, v) = (&k[rows.start * d..rows.end * d], &v[rows.start * d..rows.end * d]);
        chunk_on(Simd::best(), q, k, v, &visible, d, scale)
    }

    /// Original positions of the entries of cache head `h`.
    pub fn positions(&self, h: usize) -> &[u32] {
        &self.pos[h * self.cap..h * self.cap + self.lens[h]]
    }
}

/// [`LayerCache::chunk`] for any head dimension: each key is read once for all heads of the
/// group, and one dot and one axpy per head and entry.
fn chunk_portable<T: Entry>(q: &[f32], k: &[T], v: &[T], visible: &[bool], d: usize, scale: f32) -> Vec<Partial> {
    let n = visible.len();
    let heads = q.len() / d;
    // scores[g][t]: each key is read once for all heads of the group.
    let mut scores = vec![f32::NEG_INFINITY; heads * n];
    for (t, key) in k.chunks_exact(d).enumerate() {
        if visible[t] {
            for (g, q) in q.chunks_exact(d).enumerate() {
                scores[g * n + t] = T::dot(q, key);
            }
        }
    }
    let mut partials: Vec<Partial> = scores
        .chunks_exact_mut(n)
        .map(|s| {
            let (max, sum) = softmax_tile(s, s.len(), scale, f32::NEG_INFINITY);
            Partial { max, sum, acc: vec![0.0; d] }
        })
        .collect();
    for (t, value) in v.chunks_exact(d).enumerate() {
        if visible[t] {
            for (g, p) in partials.iter_mut().enumerate() {
                T::axpy(&mut p.acc, scores[g * n + t], value);
            }
        }
    }
    partials
}

/// [`LayerCache::chunk`] with the instructions `simd`, which this CPU must run
/// ([`Simd::available`]): the SIMD kernel for head dims 64 and 128, else [`chunk_portable`].
fn chunk_on<T: Entry>(simd: Simd, q: &[f32], k: &[T], v: &[T], visible: &[bool], d: usize, scale: f32) -> Vec<Partial> {
    assert!(k.len() >= visible.len() * d && v.len() >= visible.len() * d, "chunk: K/V shorter than the chunk");
    // SAFETY (every arm): `simd` is available; `k` and `v` hold the entries.
    #[cfg(target_arch = "x86_64")]
    match (simd, d) {
        (Simd::Avx512, 64) => return unsafe { chunk_avx512::<T, 4>(q, k, v, visible, scale) },
        (Simd::Avx512, 128) => return unsafe { chunk_avx512::<T, 8>(q, k, v, visible, scale) },
        (Simd::Avx2, 64) => return unsafe { chunk_avx2::<T, 8>(q, k, v, visible, scale) },
        (Simd::Avx2, 128) => return unsafe { chunk_avx2::<T, 16>(q, k, v, visible, scale) },
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd; // elsewhere every kind runs the portable loop
    chunk_portable(q, k, v, visible, d, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chunk_avx512<T: Entry, const R: usize>(
    q: &[f32],
    k: &[T],
    v: &[T],
    visible: &[bool],
    scale: f32,
) -> Vec<Partial> {
    chunk_simd::<simd::Avx512, T, R>(q, k, v, visible, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<T: Entry, const R: usize>(
    q: &[f32],
    k: &[T],
    v: &[T],
    visible: &[bool],
    scale: f32,
) -> Vec<Partial> {
    chunk_simd::<simd::Avx2, T, R>(q, k, v, visible, scale)
}

/// [`LayerCache::chunk`] for head dimension R·N, N lanes per register: a key is widened into R
/// registers once and dotted with every head's query; each head's P·V accumulates in R registers
/// over the chunk; keys are prefetched a few entries ahead, values for the second pass. That is a
/// few dozen instructions per entry where a dot and an axpy call per head, each with its own
/// reduction or accumulator round trip, took a few hundred (SmolLM2 full-KV decode after 4K tokens
/// on 2 Xeon cores: 43 → 56.5 tok/s with AVX-512; with AVX2 alone 30 → 40, alternated 5×).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn chunk_simd<L: simd::Lanes, T: Entry, const R: usize>(
    q: &[f32],
    k: &[T],
    v: &[T],
    visible: &[bool],
    scale: f32,
) -> Vec<Partial> {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    const AHEAD: usize = 8;
    let (n, d) = (visible.len(), R * L::N);
    let heads = q.len() / d;
    let (q, k, v) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
    // No closures below (`array::from_fn`, `map`): a closure is its own function, without this
    // one's `#[target_feature]`, and where it did not inline, each intrinsic in it became a call
    // (AVX2 decode 2–7× slower, measured).
    let line_bytes = (0..d * size_of::<T>()).step_by(64);
    let mut scores = vec![f32::NEG_INFINITY; heads * n];
    for t in 0..n {
        // The key a few entries ahead into L1; this entry's value into L2 for the P·V pass (a
        // chunk's values outgrow L1 at d = 128; at d = 64, L1 and L2 measured the same).
        for b in line_bytes.clone() {
            _mm_prefetch::<_MM_HINT_T0>(k.wrapping_add((t + AHEAD) * d).cast::<i8>().wrapping_add(b));
            _mm_prefetch::<_MM_HINT_T1>(v.wrapping_add(t * d).cast::<i8>().wrapping_add(b));
        }
        if !visible[t] {
            continue;
        }
        let mut key = [L::zero(); R];
        for (j, key) in key.iter_mut().enumerate() {
            *key = T::load::<L>(k.add(t * d + L::N * j));
        }
        for g in 0..heads {
            let q = q.add(g * d);
            let mut acc = L::zero();
            for (j, key) in key.iter().enumerate() {
                acc = L::mul_add(L::load(q.add(L::N * j)), *key, acc);
            }
            scores[g * n + t] = L::sum(acc);
        }
    }
    let mut partials = Vec::with_capacity(heads);
    for s in scores.chunks_exact_mut(n) {
        let (max, sum) = softmax_tile(s, n, scale, f32::NEG_INFINITY);
        let mut acc = [L::zero(); R];
        for (t, &p) in s.iter().enumerate() {
            if p != 0.0 {
                let p = L::splat(p);
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = L::mul_add(p, T::load::<L>(v.add(t * d + L::N * j)), *acc);
                }
            }
        }
        let mut out = vec![0f32; d];
        for (j, acc) in acc.iter().enumerate() {
            L::store(out.as_mut_ptr().add(L::N * j), *acc);
        }
        partials.push(Partial { max, sum, acc: out });
    }
    partials
}

/// One query head's softmax state over a chunk of entries: max score, Σ exp, Σ exp · V.
struct Partial {
    max: f32,
    sum: f32,
    acc: Vec<f32>,
}

/// A cache element: the vector products decode needs, in f32.
trait Entry: Copy + Send + Sync {
    fn dot(q: &[f32], k: &[Self]) -> f32;
    fn axpy(acc: &mut [f32], p: f32, v: &[Self]);
    /// `L::N` entries from `p` as f32 lanes; inlined into SIMD kernels only.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load<L: simd::Lanes>(p: *const Self) -> L::V;
}

impl Entry for f32 {
    fn dot(q: &[f32], k: &[f32]) -> f32 {
        dot(q, k)
    }
    fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
        axpy(acc, p, v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: simd::Lanes>(p: *const f32) -> L::V {
        L::load(p)
    }
}

impl Entry for bf16 {
    fn dot(q: &[f32], k: &[bf16]) -> f32 {
        dot_bf16(q, k)
    }
    fn axpy(acc: &mut [f32], p: f32, v: &[bf16]) {
        axpy_bf16(acc, p, v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: simd::Lanes>(p: *const bf16) -> L::V {
        L::load_bf16(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every decode-attention kernel this CPU runs — head dims 64 and 128 take the SIMD ones, 40 the
    /// portable loop — over f32 and bf16 entries (the same bf16-exact values), some hidden, against
    /// an f64 softmax.
    #[test]
    fn every_kernel_matches_an_f64_softmax() {
        let (heads, n) = (3, 300);
        let visible: Vec<bool> = (0..n).map(|t| t % 7 != 3).collect();
        for d in [64, 128, 40] {
            let scale = 1.0 / (d as f32).sqrt();
            let values =
                |f: fn(f32) -> f32| -> Vec<f32> { (0..n * d).map(|x| bf16::from_f32(f(x as f32)).to_f32()).collect() };
            let (k, v) = (values(|x| (0.37 * x).sin()), values(|x| (0.11 * x).cos()));
            let q: Vec<f32> = (0..heads * d).map(|x| (0.9 * x as f32).cos()).collect();
            let want: Vec<Vec<f64>> =
                q.chunks_exact(d).map(|q| softmax_reference(q, &k, &v, &visible, scale)).collect();
            let (k16, v16): (Vec<bf16>, Vec<bf16>) =
                (k.iter().map(|&x| bf16::from_f32(x)).collect(), v.iter().map(|&x| bf16::from_f32(x)).collect());
            for simd in Simd::available() {
                let runs = [
                    ("f32", chunk_on(simd, &q, &k, &v, &visible, d, scale)),
                    ("bf16", chunk_on(simd, &q, &k16, &v16, &visible, d, scale)),
                ];
                for (entry, partials) in runs {
                    assert_eq!(partials.len(), heads, "{simd:?} d {d} {entry}");
                    for (g, (p, want)) in partials.iter().zip(&want).enumerate() {
                        for (x, (&got, &want)) in p.acc.iter().zip(want).enumerate() {
                            let got = got as f64 / p.sum as f64;
                            assert!((got - want).abs() < 1e-5, "{simd:?} d {d} {entry} head {g}[{x}]: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// softmax(scale · q·k) · v over the visible entries, in f64.
    fn softmax_reference(q: &[f32], k: &[f32], v: &[f32], visible: &[bool], scale: f32) -> Vec<f64> {
        let d = q.len();
        let dot = |t: usize| q.iter().zip(&k[t * d..][..d]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
        let scores: Vec<(usize, f64)> =
            (0..visible.len()).filter(|&t| visible[t]).map(|t| (t, scale as f64 * dot(t))).collect();
        let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
        let mut out = vec![0f64; d];
        let mut sum = 0.0;
        for &(t, s) in &scores {
            let p = (s - m).exp();
            sum += p;
            out.iter_mut().zip(&v[t * d..][..d]).for_each(|(o, &v)| *o += p * v as f64);
        }
        out.iter().map(|o| o / sum).collect()
    }
}
