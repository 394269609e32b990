//! Small element-wise kernels of the CPU backend, compiled for AVX-512 and AVX2 as well as the
//! baseline and picked at run time, so one binary is fast everywhere.

use multiversion::multiversion;
use rayon::prelude::*;

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
