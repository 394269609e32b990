//! Weight matrices and the matrix products of the CPU backend. Weights stay memory-mapped in the
//! engine's dtype. Multi-row products (prefill) of bf16 weights run on the CPU's bf16 units
//! ([`bf16_gemm`], AMX or AVX512-BF16 as [`isa::path`] picks) from a copy packed on first use;
//! without them, and for f16, the weights are widened to f32 one block of rows at a time for the
//! `gemm` crate (the widening is O(n·k), the product O(m·n·k)); f32 weights go straight to it.
//! Single-row products (decode) stream the weights once, widening in registers, f32 accumulation.

use std::ops::Range;
use std::sync::OnceLock;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::bf16_gemm::{self, PackedB};
use super::isa;
use super::kernels::{dot, dot_bf16};
use crate::error::{Error, Result};
use crate::tensors::{DType, MappedTensor, TensorFile};

/// Matrix-vector tasks per thread (two, so a slowed thread's share can move), the interleaved
/// runs of rows each task reads, and f32 values widened per GEMM block.
const MATVEC_TASKS_PER_THREAD: usize = 2;
const MATVEC_STREAMS: usize = 4;
const WIDEN_BLOCK_VALUES: usize = 1 << 20;

/// A `[rows, cols]` weight matrix (`rows` = output features), row-major, in the engine file.
pub struct Linear {
    weights: MappedTensor,
    pub rows: usize,
    pub cols: usize,
    /// Kernel layout of a bf16 weight, built by the first multi-row product on a bf16 path.
    packed: OnceLock<PackedB>,
}

enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl Linear {
    /// Maps tensor `name`, checking it is `[rows, cols]` and aligned for its dtype.
    pub fn load(file: &TensorFile, name: &str, rows: usize, cols: usize) -> Result<Self> {
        let weights = file.mapped_shaped(name, &[rows, cols])?;
        if !(weights.mmap.as_ptr() as usize + weights.range.start).is_multiple_of(weights.dtype.size()) {
            return Err(Error::bad_file(file.path(), format!("tensor `{name}` is not aligned; rebuild the engine")));
        }
        Ok(Linear { weights, rows, cols, packed: OnceLock::new() })
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype
    }

    fn data(&self) -> Rows<'_> {
        let bytes = &self.weights.mmap[self.weights.range.clone()];
        match self.weights.dtype {
            DType::F32 => Rows::F32(bytemuck::cast_slice(bytes)),
            DType::F16 => Rows::F16(bytemuck::cast_slice(bytes)),
            DType::Bf16 => Rows::Bf16(bytemuck::cast_slice(bytes)),
        }
    }

    /// Widens rows `r` into `out` (`r.len() * cols` values).
    pub fn rows_f32(&self, r: Range<usize>, out: &mut [f32]) {
        let span = r.start * self.cols..r.end * self.cols;
        match self.data() {
            Rows::F32(w) => out.copy_from_slice(&w[span]),
            Rows::F16(w) => w[span].convert_to_f32_slice(out),
            Rows::Bf16(w) => w[span].convert_to_f32_slice(out),
        }
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), m * self.cols);
        debug_assert_eq!(out.len(), m * self.rows);
        if m == 1 {
            return self.matvec(x, out);
        }
        match self.data() {
            Rows::F32(w) => return gemm_xwt(x, m, w, self.rows, self.cols, out, self.rows),
            Rows::Bf16(w) => {
                if let Some(kernel) = bf16_gemm::kernel(isa::path()) {
                    let packed = self.packed.get_or_init(|| PackedB::new(w, self.rows, self.cols));
                    return bf16_gemm::gemm_xwt(kernel, x, m, packed, out, self.rows);
                }
            }
            Rows::F16(_) => {}
        }
        let block = (WIDEN_BLOCK_VALUES / self.cols).clamp(16, self.rows.max(16));
        let mut wide = vec![0f32; block.min(self.rows) * self.cols];
        for start in (0..self.rows).step_by(block) {
            let end = (start + block).min(self.rows);
            let wide = &mut wide[..(end - start) * self.cols];
            wide.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(i, row)| self.rows_f32(start + i..start + i + 1, row));
            gemm_xwt(x, m, wide, end - start, self.cols, &mut out[start..], self.rows);
        }
    }

    /// One input row: every weight is read once, widened in registers (no temporary row). Each
    /// task takes a contiguous block of output rows and reads it as [`MATVEC_STREAMS`] runs in
    /// step, since more streams in flight per core read DRAM faster (1 → 4 per thread: 13.4 →
    /// 16.0 GB/s on 2 threads, measured).
    fn matvec(&self, x: &[f32], out: &mut [f32]) {
        let tasks = MATVEC_TASKS_PER_THREAD * rayon::current_num_threads();
        let task_rows = self.rows.div_ceil(tasks).max(1).next_multiple_of(MATVEC_STREAMS);
        out.par_chunks_mut(task_rows).enumerate().for_each(|(b, out)| match self.data() {
            Rows::F32(w) => streamed_rows(out, b * task_rows, self.cols, |r| dot(x, &w[r])),
            Rows::Bf16(w) => streamed_rows(out, b * task_rows, self.cols, |r| dot_bf16(x, &w[r])),
            Rows::F16(w) => streamed_rows(out, b * task_rows, self.cols, |r| dot_f16(x, &w[r])),
        });
    }
}

/// `out[i] = dot(values of row first + i)`, `out` in [`MATVEC_STREAMS`] runs visited in step;
/// `dot` takes the row's range of values.
fn streamed_rows(out: &mut [f32], first: usize, cols: usize, dot: impl Fn(Range<usize>) -> f32) {
    let run = out.len().div_ceil(MATVEC_STREAMS);
    for i in 0..run {
        for r in (i..out.len()).step_by(run) {
            out[r] = dot((first + r) * cols..(first + r + 1) * cols);
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
            dot(x, &wide[..w.len()])
        })
        .sum()
}

/// `out[i, j] = Σ_k x[i, k] · w[j, k]` for `w` of `n` rows; `out` rows are `out_stride` apart.
fn gemm_xwt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32], out_stride: usize) {
    crate::hostmath::gemm_f32(m, n, k, out, out_stride, false, (x, k, 1), (w, 1, k), 1.0, true);
}
