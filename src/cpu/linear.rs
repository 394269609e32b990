//! Weight matrices and the matrix products of the CPU backend. Weights stay memory-mapped in the
//! engine's dtype. Multi-row products (prefill) of bf16 weights run on the CPU's bf16 units
//! ([`bf16_gemm`], AMX or AVX512-BF16 as [`isa::path`] picks) from a copy packed on first use;
//! without them, and for f16, the weights are widened to f32 one block of rows at a time for the
//! `gemm` crate (the widening is O(n·k), the product O(m·n·k)); f32 weights go straight to it.
//! Decode products — one row per request of a step — stream the weights once for all rows
//! ([`gemv`]), each output computed the same whatever the number of rows.

use std::ops::Range;
use std::sync::OnceLock;

use half::slice::HalfFloatSliceExt;

use rayon::prelude::*;

use super::bf16_gemm::{self, PackedB};
use super::gemv::{self, Dot, Weights};
use super::isa;
use crate::error::{Error, Result};
use crate::tensors::{DType, MappedTensor, TensorFile};

/// f32 values widened per GEMM block.
const WIDEN_BLOCK_VALUES: usize = 1 << 20;

/// A `[rows, cols]` weight matrix (`rows` = output features), row-major, in the engine file.
pub struct Linear {
    weights: MappedTensor,
    pub rows: usize,
    pub cols: usize,
    /// Kernel layout of a bf16 weight, built by the first multi-row product on a bf16 path.
    packed: OnceLock<PackedB>,
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

    /// The weights as stored, row-major `[rows, cols]`.
    pub fn data(&self) -> Weights<'_> {
        let bytes = &self.weights.mmap[self.weights.range.clone()];
        match self.weights.dtype {
            DType::F32 => Weights::F32(bytemuck::cast_slice(bytes)),
            DType::F16 => Weights::F16(bytemuck::cast_slice(bytes)),
            DType::Bf16 => Weights::Bf16(bytemuck::cast_slice(bytes)),
        }
    }

    /// Widens rows `r` into `out` (`r.len() * cols` values).
    pub fn rows_f32(&self, r: Range<usize>, out: &mut [f32]) {
        let span = r.start * self.cols..r.end * self.cols;
        match self.data() {
            Weights::F32(w) => out.copy_from_slice(&w[span]),
            Weights::F16(w) => w[span].convert_to_f32_slice(out),
            Weights::Bf16(w) => w[span].convert_to_f32_slice(out),
        }
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ` for a prefill: a GEMM (one row: [`Linear::forward_decode`]).
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), m * self.cols);
        debug_assert_eq!(out.len(), m * self.rows);
        if m == 1 {
            return self.forward_decode(x, 1, out);
        }
        match self.data() {
            Weights::F32(w) => return gemm_xwt(x, m, w, self.rows, self.cols, out, self.rows),
            Weights::Bf16(w) => {
                if let Some(kernel) = bf16_gemm::kernel(isa::path()) {
                    let packed = self.packed.get_or_init(|| PackedB::new(w, self.rows, self.cols));
                    return bf16_gemm::gemm_xwt(kernel, x, m, packed, out, self.rows);
                }
            }
            Weights::F16(_) => {}
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

    /// `out[m, rows] = x[m, cols] · Wᵀ` for the `m` rows of a decode step, one per request: every
    /// weight is read once for all rows, and each output is computed the same whatever `m` is
    /// ([`gemv::products`]).
    pub fn forward_decode(&self, x: &[f32], m: usize, out: &mut [f32]) {
        gemv::products(Dot::for_path(), x, m, self.data(), self.cols, out);
    }
}

/// `out[i, j] = Σ_k x[i, k] · w[j, k]` for `w` of `n` rows; `out` rows are `out_stride` apart.
fn gemm_xwt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32], out_stride: usize) {
    crate::hostmath::gemm_f32(m, n, k, out, out_stride, false, (x, k, 1), (w, 1, k), 1.0, true);
}
