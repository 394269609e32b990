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
    out.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| {
        let (gate, up) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = g * (1.0 / (1.0 + (-g).exp())) * u;
        }
    });
}
