//! Decode products: the few activation rows of a decode step — one per request in the batch — times a
//! weight matrix, reading every weight from memory once for all of them (decode is bound by memory
//! bandwidth: a step costs about what its weights weigh). Each output is computed with exactly the
//! same arithmetic whatever the number of rows, so a request's tokens do not depend on what else
//! shares its step ([`crate::scheduler`]).
//!
//! How a row meets a weight row ([`Dot`]) is fixed per CPU path: on the bf16 paths (AMX,
//! AVX512-BF16) activations rounded to bf16 meet the bf16 weights in `vdpbf16ps`, two products per
//! f32 lane and no widening, as the bf16 prefill GEMMs and PyTorch's bf16 matmul compute; on the f32
//! path the weights are widened in registers against f32 activations. Registers are blocked over
//! both sides — up to four weight rows (the four streams a task reads) by up to four activation
//! rows — so each loaded vector feeds several products; each product keeps one accumulator, summed
//! across its lanes at the end, whatever block it was computed in.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::isa::{self, Simd};
use super::kernels::{self, round_bf16, widen_bf16};
#[cfg(target_arch = "x86_64")]
use super::simd::{self, Lanes};

/// Weight rows per register block: the interleaved runs of rows each task reads, since more streams
/// in flight per core read DRAM faster (1 → 4 per thread: 13.4 → 16.0 GB/s on 2 Xeon threads).
pub const W_BLOCK: usize = 4;
/// Tasks per thread: two, so a slowed thread's share can move.
const TASKS_PER_THREAD: usize = 2;

/// How a bf16 weight row meets an activation row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dot {
    /// f32 activations, weights widened in registers with these instructions.
    Widen(Simd),
    /// Activations rounded to bf16, pairs multiplied into f32 lanes by `vdpbf16ps`.
    Pairs,
}

impl Dot {
    /// The dot of this CPU's path: [`Dot::Pairs`] on the bf16 paths, else widening with the widest
    /// instructions the CPU has.
    pub fn for_path() -> Dot {
        match isa::path() {
            isa::Path::Amx | isa::Path::Avx512Bf16 => Dot::Pairs,
            isa::Path::F32 => Dot::Widen(Simd::best()),
        }
    }

    /// The dots this CPU can run (tests and benchmarks check each).
    pub fn available() -> Vec<Dot> {
        let pairs = isa::Path::Avx512Bf16.available().then_some(Dot::Pairs);
        pairs.into_iter().chain(Simd::available().map(Dot::Widen)).collect()
    }

    /// Activation rows per register block: as many as the registers hold beside a weight block (AVX2
    /// has 16 vector registers, AVX-512 32).
    fn x_block(self) -> usize {
        match self {
            Dot::Pairs | Dot::Widen(Simd::Avx512) => 4,
            Dot::Widen(Simd::Avx2) => 2,
            Dot::Widen(Simd::Portable) => 1,
        }
    }
}

/// A weight matrix, row-major `[rows, cols]`, in its stored type.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// `out[m, rows] = x[m, cols] · Wᵀ` for the `m` activation rows of a decode step: each task takes a
/// contiguous block of weight rows and reads it as [`W_BLOCK`] runs in step, computing every
/// activation row's dot with the [`W_BLOCK`] weight rows at hand while they are in cache.
pub fn products(dot: Dot, x: &[f32], m: usize, w: Weights, cols: usize, out: &mut [f32]) {
    if m == 0 {
        return;
    }
    let rows = out.len() / m;
    debug_assert_eq!(x.len(), m * cols);
    debug_assert_eq!(out.len(), m * rows);
    // Dot::Pairs reads the activations rounded to bf16.
    let rounded: Option<Vec<bf16>> = match (w, dot) {
        (Weights::Bf16(_), Dot::Pairs) => Some(x.iter().map(|&v| round_bf16(v)).collect()),
        _ => None,
    };
    let tasks = TASKS_PER_THREAD * rayon::current_num_threads();
    let task_rows = rows.div_ceil(tasks).max(1).next_multiple_of(W_BLOCK);
    let scatter = Scatter(out.as_mut_ptr());
    (0..rows.div_ceil(task_rows)).into_par_iter().for_each(|t| {
        let mut dots = vec![0f32; m * W_BLOCK];
        for_blocks(t * task_rows..((t + 1) * task_rows).min(rows), |block, n| {
            let block = &block[..n];
            match (w, &rounded) {
                (Weights::Bf16(w), Some(xb)) => pairs_rows(xb, m, cols, w, block, &mut dots),
                (Weights::Bf16(w), _) => widen_rows(dot, x, m, cols, w, block, &mut dots),
                (Weights::F32(w), _) => {
                    each_row(m, block, &mut dots, |b, r| kernels::dot(&x[b * cols..][..cols], &w[r * cols..][..cols]))
                }
                (Weights::F16(w), _) => {
                    each_row(m, block, &mut dots, |b, r| dot_f16(&x[b * cols..][..cols], &w[r * cols..][..cols]))
                }
            }
            for b in 0..m {
                for (j, &r) in block.iter().enumerate() {
                    // SAFETY: each task writes only its own weight rows r of each of the m outputs.
                    unsafe { scatter.write(b * rows + r, dots[b * W_BLOCK + j]) };
                }
            }
        });
    });
}

/// Σ a·w for f32 `a` and bf16 `w`, by [`Dot::Widen`] with the widest instructions this CPU has:
/// decode attention's dot over a bf16 cache, where its own kernel does not run.
pub fn dot_bf16(a: &[f32], w: &[bf16]) -> f32 {
    let k = a.len().min(w.len());
    let mut out = [0f32; W_BLOCK];
    widen_rows(Dot::Widen(Simd::best()), &a[..k], 1, k, &w[..k], &[0], &mut out);
    out[0]
}

/// Visits the rows of `block` in [`W_BLOCK`] runs in step: `visit(rows, n)` gets the next row of
/// each run (`n` of them: the last runs may be done).
fn for_blocks(block: Range<usize>, mut visit: impl FnMut(&[usize; W_BLOCK], usize)) {
    let run = block.len().div_ceil(W_BLOCK);
    for i in 0..run {
        let mut rows = [0; W_BLOCK];
        let mut n = 0;
        for r in (block.start + i..block.end).step_by(run) {
            rows[n] = r;
            n += 1;
        }
        visit(&rows, n);
    }
}

/// `dots[b·W_BLOCK + j] = f(b, block[j])` for every activation row b < m.
fn each_row(m: usize, block: &[usize], dots: &mut [f32], f: impl Fn(usize, usize) -> f32) {
    for b in 0..m {
        for (j, &r) in block.iter().enumerate() {
            dots[b * W_BLOCK + j] = f(b, r);
        }
    }
}

/// The output of [`products`], written by tasks that each own a block of its rows.
struct Scatter(*mut f32);

// SAFETY: tasks write disjoint elements (their own weight rows), and the writes end before the
// parallel section returns.
unsafe impl Send for Scatter {}
unsafe impl Sync for Scatter {}

impl Scatter {
    /// # Safety
    /// `i` is in bounds and no other task writes it.
    unsafe fn write(&self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// Runs `$kernel::<XR, WR>($args…)` for run-time `$xr` and `$wr` in 1..=4 (each block size is its
/// own monomorphic kernel, so its accumulators stay in registers).
macro_rules! blocked {
    ($kernel:ident, $xr:expr, $wr:expr, ($($arg:expr),*)) => {
        match ($xr, $wr) {
            (1, 1) => $kernel::<1, 1>($($arg),*), (1, 2) => $kernel::<1, 2>($($arg),*),
            (1, 3) => $kernel::<1, 3>($($arg),*), (1, _) => $kernel::<1, 4>($($arg),*),
            (2, 1) => $kernel::<2, 1>($($arg),*), (2, 2) => $kernel::<2, 2>($($arg),*),
            (2, 3) => $kernel::<2, 3>($($arg),*), (2, _) => $kernel::<2, 4>($($arg),*),
            (3, 1) => $kernel::<3, 1>($($arg),*), (3, 2) => $kernel::<3, 2>($($arg),*),
            (3, 3) => $kernel::<3, 3>($($arg),*), (3, _) => $kernel::<3, 4>($($arg),*),
            (_, 1) => $kernel::<4, 1>($($arg),*), (_, 2) => $kernel::<4, 2>($($arg),*),
            (_, 3) => $kernel::<4, 3>($($arg),*), (_, _) => $kernel::<4, 4>($($arg),*),
        }
    };
}

/// Dots of f32 rows `x` (`[m, k]`) with the bf16 weight rows `block` of `w`, widening the weights.
fn widen_rows(dot: Dot, x: &[f32], m: usize, k: usize, w: &[bf16], block: &[usize], dots: &mut [f32]) {
    let xb = dot.x_block();
    let mut wp = [std::ptr::null(); W_BLOCK];
    for (p, &r) in wp.iter_mut().zip(block) {
        *p = w[r * k..(r + 1) * k].as_ptr();
    }
    let (wr, x) = (block.len(), x.as_ptr());
    for b0 in (0..m).step_by(xb) {
        let xr = xb.min(m - b0);
        // SAFETY: x holds m rows of k values and each of the wr weight pointers k values (sliced
        // above); `dots` holds m rows of W_BLOCK; the kernel's instructions are available.
        unsafe {
            let (x, out) = (x.add(b0 * k), dots.as_mut_ptr().add(b0 * W_BLOCK));
            match dot {
                #[cfg(target_arch = "x86_64")]
                Dot::Widen(Simd::Avx512) => blocked!(widen_avx512, xr, wr, (x, k, &wp, out)),
                #[cfg(target_arch = "x86_64")]
                Dot::Widen(Simd::Avx2) => blocked!(widen_avx2, xr, wr, (x, k, &wp, out)),
                _ => widen_portable(x, xr, k, &wp[..wr], out),
            }
        }
    }
}

/// Dots of bf16 rows `x` (`[m, k]`) with the bf16 weight rows `block` of `w` by `vdpbf16ps`.
fn pairs_rows(x: &[bf16], m: usize, k: usize, w: &[bf16], block: &[usize], dots: &mut [f32]) {
    let mut wp = [std::ptr::null(); W_BLOCK];
    for (p, &r) in wp.iter_mut().zip(block) {
        *p = w[r * k..(r + 1) * k].as_ptr();
    }
    let (wr, x) = (block.len(), x.as_ptr());
    for b0 in (0..m).step_by(Dot::Pairs.x_block()) {
        let xr = Dot::Pairs.x_block().min(m - b0);
        // SAFETY: as in `widen_rows`; Pairs is only chosen (and tested) where AVX512-BF16 runs.
        unsafe {
            let (x, out) = (x.add(b0 * k), dots.as_mut_ptr().add(b0 * W_BLOCK));
            #[cfg(target_arch = "x86_64")]
            blocked!(pairs, xr, wr, (x, k, &wp, out));
            #[cfg(not(target_arch = "x86_64"))]
            pairs_portable(x, xr, k, &wp[..wr], out);
        }
    }
}

/// Σ x·w for f16 weights, widened a stack chunk at a time (f16 → f32 needs F16C, which `half`
/// uses for slices).
fn dot_f16(x: &[f32], w: &[f16]) -> f32 {
    let mut wide = [0f32; 256];
    x.chunks(256)
        .zip(w.chunks(256))
        .map(|(x, w)| {
            w.convert_to_f32_slice(&mut wide[..w.len()]);
            kernels::dot(x, &wide[..w.len()])
        })
        .sum()
}

/// bf16 values ahead of the one being read that the kernels prefetch: decode reads weight rows from
/// DRAM, and the hardware prefetchers alone kept too few lines in flight (SmolLM2 decode after 512
/// tokens 53 → 66–75 tok/s on 2 Xeon cores; 256 and 4 096 values ahead were slower).
#[cfg(target_arch = "x86_64")]
const PREFETCH_VALUES: usize = 512;

/// Asks for the cache line [`PREFETCH_VALUES`] after `w`; a hint, which never faults, so it may
/// point past the end of the row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(w: *const bf16) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: prefetching is a hint without architectural effect; any address is allowed.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH_VALUES).cast::<i8>()) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512<const XR: usize, const WR: usize>(
    x: *const f32,
    k: usize,
    w: &[*const bf16; W_BLOCK],
    out: *mut f32,
) {
    widen::<simd::Avx512, XR, WR>(x, k, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_avx2<const XR: usize, const WR: usize>(
    x: *const f32,
    k: usize,
    w: &[*const bf16; W_BLOCK],
    out: *mut f32,
) {
    widen::<simd::Avx2, XR, WR>(x, k, w, out)
}

/// XR f32 rows of k values from `x` against WR bf16 weight rows: one accumulator per product over
/// steps of one register, the lanes summed ([`Lanes::sums16`]), then the scalar tail;
/// `out[r·W_BLOCK + j]`. No closures
/// here: a closure is a function of its own, compiled without the caller's target features, and its
/// intrinsics would become calls.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen<L: Lanes, const XR: usize, const WR: usize>(
    x: *const f32,
    k: usize,
    w: &[*const bf16; W_BLOCK],
    out: *mut f32,
) {
    let mut acc = [[L::zero(); WR]; XR];
    let mut wv = [L::zero(); WR];
    let mut i = 0;
    while i + L::N <= k {
        if i % 32 == 0 {
            for &p in &w[..WR] {
                prefetch_ahead(p.wrapping_add(i));
            }
        }
        for j in 0..WR {
            wv[j] = L::load_bf16(w[j].add(i));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = L::load(x.add(r * k + i));
            for j in 0..WR {
                acc[j] = L::mul_add(xv, wv[j], acc[j]);
            }
        }
        i += L::N;
    }
    let mut all = [L::zero(); 16];
    for (r, acc) in acc.iter().enumerate() {
        all[r * W_BLOCK..r * W_BLOCK + WR].copy_from_slice(acc);
    }
    let sums = L::sums16(&all);
    for r in 0..XR {
        for j in 0..WR {
            let mut sum = sums[r * W_BLOCK + j];
            for t in i..k {
                sum += *x.add(r * k + t) * widen_bf16(*w[j].add(t));
            }
            *out.add(r * W_BLOCK + j) = sum;
        }
    }
}

/// XR bf16 rows of k values from `x` against WR bf16 weight rows by `vdpbf16ps`: one accumulator
/// per product over steps of 32 values, the tail through masked loads (zeros add nothing), the lanes
/// summed ([`Lanes::sums16`]); `out[r·W_BLOCK + j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs<const XR: usize, const WR: usize>(x: *const bf16, k: usize, w: &[*const bf16; W_BLOCK], out: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); WR]; XR];
    let mut wv = [_mm512_setzero_ps(); WR];
    let mut i = 0;
    while i < k {
        // Whole steps load plainly; the last, partial one through a mask.
        let mask: __mmask32 = if k - i >= 32 { !0 } else { (1u32 << (k - i)) - 1 };
        for j in 0..WR {
            prefetch_ahead(w[j].wrapping_add(i));
            wv[j] = match mask {
                u32::MAX => _mm512_loadu_ps(w[j].add(i).cast()),
                _ => _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, w[j].add(i).cast())),
            };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv: __m512bh = match mask {
                u32::MAX => std::mem::transmute::<__m512, __m512bh>(_mm512_loadu_ps(x.add(r * k + i).cast())),
                _ => std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, x.add(r * k + i).cast())),
            };
            for j in 0..WR {
                acc[j] = _mm512_dpbf16_ps(acc[j], xv, std::mem::transmute::<__m512, __m512bh>(wv[j]));
            }
        }
        i += 32;
    }
    let mut all = [_mm512_setzero_ps(); 16];
    for (r, acc) in acc.iter().enumerate() {
        all[r * W_BLOCK..r * W_BLOCK + WR].copy_from_slice(acc);
    }
    let sums = <simd::Avx512 as Lanes>::sums16(&all);
    for r in 0..XR {
        std::ptr::copy_nonoverlapping(sums.as_ptr().add(r * W_BLOCK), out.add(r * W_BLOCK), WR);
    }
}

/// [`widen`] where no intrinsic version runs (x86-64 without AVX2+FMA, and NEON): sixteen lane
/// accumulators per product, vectorised by the compiler.
///
/// # Safety
/// `x` holds `xr` rows of k values, each weight pointer k values, `out` `xr` rows of [`W_BLOCK`].
unsafe fn widen_portable(x: *const f32, xr: usize, k: usize, w: &[*const bf16], out: *mut f32) {
    for r in 0..xr {
        let x = std::slice::from_raw_parts(x.add(r * k), k);
        for (j, &w) in w.iter().enumerate() {
            let w = std::slice::from_raw_parts(w, k);
            let mut acc = [0f32; 16];
            let (cx, cw) = (x.chunks_exact(16), w.chunks_exact(16));
            let (rx, rw) = (cx.remainder(), cw.remainder());
            for (x, y) in cx.zip(cw) {
                for i in 0..16 {
                    acc[i] += x[i] * widen_bf16(y[i]);
                }
            }
            let tail: f32 = rx.iter().zip(rw).map(|(x, &y)| x * widen_bf16(y)).sum();
            *out.add(r * W_BLOCK + j) = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// [`pairs`] without AVX512-BF16, where it is never chosen (the decode of a bf16 path needs it).
///
/// # Safety
/// As [`widen_portable`], with bf16 rows.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn pairs_portable(x: *const bf16, xr: usize, k: usize, w: &[*const bf16], out: *mut f32) {
    for r in 0..xr {
        for (j, &w) in w.iter().enumerate() {
            let sum = (0..k).map(|t| widen_bf16(*x.add(r * k + t)) * widen_bf16(*w.add(t))).sum();
            *out.add(r * W_BLOCK + j) = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrices(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<bf16>) {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
        let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 41.0)).collect();
        (x, w)
    }

    /// Every dot this CPU runs against an f64 reference (on the bf16-rounded activations for
    /// [`Dot::Pairs`]), on lengths around its steps and every block shape.
    #[test]
    fn every_dot_matches_an_f64_reference() {
        for k in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 576, 1000] {
            let (m, n) = (6, 11);
            let (x, w) = matrices(m, n, k);
            for dot in Dot::available() {
                let mut out = vec![0f32; m * n];
                products(dot, &x, m, Weights::Bf16(&w), k, &mut out);
                for b in 0..m {
                    for r in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| {
                                let xv = x[b * k + t];
                                let xv = if dot == Dot::Pairs { bf16::from_f32(xv).to_f64() } else { xv as f64 };
                                xv * w[r * k + t].to_f64()
                            })
                            .sum();
                        let got = out[b * n + r] as f64;
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{dot:?}, k = {k}, [{b}, {r}]");
                    }
                }
            }
        }
    }

    /// A row's products are the same bits alone and beside any other rows, in any position of a
    /// block: what makes a request's decode independent of its batch.
    #[test]
    fn a_row_is_computed_the_same_in_any_batch() {
        let (m, n, k) = (9, 13, 576 + 40);
        let (x, w) = matrices(m, n, k);
        for dot in Dot::available() {
            let mut together = vec![0f32; m * n];
            products(dot, &x, m, Weights::Bf16(&w), k, &mut together);
            for b in 0..m {
                let mut alone = vec![0f32; n];
                products(dot, &x[b * k..(b + 1) * k], 1, Weights::Bf16(&w), k, &mut alone);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&alone), bits(&together[b * n..(b + 1) * n]), "{dot:?}: row {b}");
            }
        }
    }

    #[test]
    fn dot_bf16_matches_an_f64_reference() {
        for k in [0, 1, 15, 16, 17, 64, 65, 576] {
            let (x, w) = matrices(1, 1, k);
            let want: f64 = x.iter().zip(&w).map(|(&a, w)| a as f64 * w.to_f64()).sum();
            let got = dot_bf16(&x, &w) as f64;
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "k = {k}: {got} vs {want}");
        }
    }
}
