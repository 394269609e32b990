//! Small element-wise kernels of the CPU backend, compiled for AVX-512 and AVX2 as well as the
//! baseline and picked at run time, so one binary is fast everywhere.

use multiversion::multiversion;
use rayon::prelude::*;

use super::isa::Simd;
#[cfg(target_arch = "x86_64")]
use super::simd;

/// Σ a·b with sixteen independent accumulators (vectorised for the best instruction set of this
/// CPU, picked at run time).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a·w for bf16 `w`, widened in registers (a bf16 is the top half of an f32): the decode
/// matvec of bf16 weights and decode attention over a bf16 cache. On x86-64 with AVX-512 or
/// AVX2+FMA, four independent accumulators and a tree reduction; elsewhere [`dot`]'s order.
pub fn dot_bf16(a: &[f32], w: &[half::bf16]) -> f32 {
    dot_bf16_on(Simd::best(), a, w)
}

/// [`dot_bf16`] with the instructions `simd`, which this CPU must run ([`Simd::available`]).
fn dot_bf16_on(simd: Simd, a: &[f32], w: &[half::bf16]) -> f32 {
    match simd {
        // SAFETY (both): `simd` is available, so the instructions are present.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { dot_bf16_avx512(a, w) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { dot_bf16_avx2(a, w) },
        _ => dot_bf16_portable(a, w),
    }
}

/// bf16 values ahead of the one being read that [`prefetch_ahead`] asks for: decode reads weight
/// rows from DRAM, and the hardware prefetchers alone kept too few lines in flight (SmolLM2 decode
/// after 512 tokens 53 → 66–75 tok/s on 2 Xeon cores; 256 and 4 096 values ahead were slower).
#[cfg(target_arch = "x86_64")]
const PREFETCH_VALUES: usize = 512;

/// Asks for the two cache lines [`PREFETCH_VALUES`] after `w` (64 bf16); a hint, which never
/// faults, so it may point past the end of the slice.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(w: *const half::bf16) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let line = w.wrapping_add(PREFETCH_VALUES).cast::<i8>();
    // SAFETY: prefetching is a hint without architectural effect; any address is allowed.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(line);
        _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(64));
    }
}

/// [`dot_bf16`] on AVX-512 (the portable loop's one accumulator, its lanes summed one after
/// another, made 64-wide dots 2–3× slower, in L1; measured).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_bf16_avx512(a: &[f32], w: &[half::bf16]) -> f32 {
    dot_bf16_simd::<simd::Avx512>(a, w)
}

/// [`dot_bf16_avx512`] in 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(a: &[f32], w: &[half::bf16]) -> f32 {
    dot_bf16_simd::<simd::Avx2>(a, w)
}

/// The body of both: four accumulators over steps of 4 registers, then one register at a time,
/// then scalars; the accumulators summed as a tree.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_bf16_simd<L: simd::Lanes>(a: &[f32], w: &[half::bf16]) -> f32 {
    let n = a.len().min(w.len());
    let (a, w) = (a.as_ptr(), w.as_ptr());
    let mut acc = [L::zero(); 4];
    let mut i = 0;
    while i + 4 * L::N <= n {
        if i % 64 == 0 {
            prefetch_ahead(w.wrapping_add(i));
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = L::mul_add(L::load(a.add(i + L::N * j)), L::load_bf16(w.add(i + L::N * j)), *acc);
        }
        i += 4 * L::N;
    }
    while i + L::N <= n {
        acc[0] = L::mul_add(L::load(a.add(i)), L::load_bf16(w.add(i)), acc[0]);
        i += L::N;
    }
    let mut sum = L::sum(L::add(L::add(acc[0], acc[1]), L::add(acc[2], acc[3])));
    for i in i..n {
        sum += *a.add(i) * widen_bf16(*w.add(i));
    }
    sum
}

/// [`dot_bf16`] where neither intrinsic version runs: x86-64 without AVX2+FMA, and NEON.
#[multiversion(targets("aarch64+neon"))]
fn dot_bf16_portable(a: &[f32], w: &[half::bf16]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cw) = (a.chunks_exact(16), w.chunks_exact(16));
    let (ra, rw) = (ca.remainder(), cw.remainder());
    for (x, y) in ca.zip(cw) {
        for i in 0..16 {
            acc[i] += x[i] * widen_bf16(y[i]);
        }
    }
    let mut tail = 0f32;
    for (x, &y) in ra.iter().zip(rw) {
        tail += x * widen_bf16(y);
    }
    acc.iter().sum::<f32>() + tail
}

/// acc += p · v.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, &v)| *a += p * v);
}

/// acc += p · v for bf16 `v`, widened in registers.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn axpy_bf16(acc: &mut [f32], p: f32, v: &[half::bf16]) {
    acc.iter_mut().zip(v).for_each(|(a, &v)| *a += p * widen_bf16(v));
}

/// `dst = bf16(src)` by [`round_bf16`].
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn to_bf16(src: &[f32], dst: &mut [half::bf16]) {
    dst.iter_mut().zip(src).for_each(|(d, &x)| *d = round_bf16(x));
}

/// `w` as f32, exactly: a bf16 is the top half of an f32 (a shift, so loops of it vectorise).
#[inline(always)]
pub fn widen_bf16(w: half::bf16) -> f32 {
    f32::from_bits((w.to_bits() as u32) << 16)
}

/// `x` rounded to bf16, to nearest even like `half::bf16::from_f32` (NaN stays NaN), but
/// branch-free so loops of it vectorise (`half` converts bf16 slices one scalar at a time).
#[inline(always)]
pub fn round_bf16(x: f32) -> half::bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    half::bf16::from_bits(if x.is_nan() { nan } else { rounded })
}

/// RMSNorm of every `weight.len()`-wide row of `x` into `out`, as HF computes it in f32
/// (mean of squares accumulated in f64 to match torch's pairwise sum closely).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let n = weight.len();
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| rms_norm_row(x, weight, eps, o));
}

pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let mean = (x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64) as f32;
    let inv = 1.0 / (mean + eps as f32).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// `gate_up` rows are `[gate | up]` of width 2·`inter`; writes silu(gate)·up into rows of width `inter`.
pub fn swiglu(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    out.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| swiglu_row(gu, o));
}

/// silu(g)·u with the sigmoid from e^−|g| (the vectorised exp takes x ≤ 0).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn swiglu_row(gate_up: &[f32], out: &mut [f32]) {
    let (gate, up) = gate_up.split_at(out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let e = super::attention::exp(-g.abs());
        let sigmoid = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        *o = g * sigmoid * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bf16 dot this CPU can run against an f64 reference, on lengths around the 8-, 16-, 32-
    /// and 64-wide steps.
    #[test]
    fn dot_bf16_matches_f64_reference() {
        for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 576, 1000] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
            let w: Vec<half::bf16> =
                (0..n).map(|i| half::bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 41.0)).collect();
            let want: f64 = a.iter().zip(&w).map(|(&a, w)| a as f64 * w.to_f64()).sum();
            for simd in Simd::available() {
                let got = dot_bf16_on(simd, &a, &w);
                assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{simd:?}, n = {n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn to_bf16_rounds_like_half() {
        let mut bits: Vec<u32> = (0..1u32 << 16).map(|i| i.wrapping_mul(0x9e37_79b9) ^ (i << 7)).collect();
        bits.extend([0, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x7f80_0001, 0x3f80_8000, 0x3f81_8000]);
        bits.extend([0x0000_0001, 0x807f_ffff, 0x7f7f_ffff, 0x3f80_7fff]);
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut got = vec![half::bf16::ZERO; x.len()];
        to_bf16(&x, &mut got);
        for (&x, g) in x.iter().zip(&got) {
            let want = half::bf16::from_f32(x);
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{x:e}: {g} vs {want}");
        }
    }
}
