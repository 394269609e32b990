//! Weight matrices and the matrix products of the CPU backend. Weights stay memory-mapped in the
//! engine's dtype; f32 GEMMs go straight to the `gemm` crate, bf16/f16 weights are widened one
//! block of rows at a time (the widening is O(n·k), the product O(m·n·k)), and single-row products
//! (decode) stream the weights once with f32 accumulation. On CPUs with AMX-BF16 and `FASTKV_AMX=1`,
//! bf16 GEMMs run on the tile unit instead (`super::amx`), from a copy of the weight packed on first use.

use std::ops::Range;
use std::sync::OnceLock;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::amx;
use crate::error::{Error, Result};
use crate::tensors::{DType, MappedTensor, TensorFile};

/// Rows handled per matrix-vector task, and f32 values widened per GEMM block.
const MATVEC_ROWS: usize = 64;
const WIDEN_BLOCK_VALUES: usize = 1 << 20;

/// A `[rows, cols]` weight matrix (`rows` = output features), row-major, in the engine file.
pub struct Linear {
    weights: MappedTensor,
    pub rows: usize,
    pub cols: usize,
    /// AMX tile layout of a bf16 weight, built by the first multi-row product on an AMX CPU.
    packed: OnceLock<amx::PackedB>,
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
        if (weights.mmap.as_ptr() as usize + weights.range.start) % weights.dtype.size() != 0 {
            return Err(Error::bad_file(file.path(), format!("tensor `{name}` is not aligned; rebuild the engine")));
        }
        Ok(Linear { weights, rows, cols, packed: OnceLock::new() })
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
            Rows::Bf16(w) if amx::enabled() => {
                let packed = self.packed.get_or_init(|| amx::PackedB::new(w, self.rows, self.cols));
                return amx::gemm_xwt(x, m, packed, out, self.rows);
            }
            _ => {}
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

    /// One input row: every weight is read once, in parallel blocks of output rows.
    fn matvec(&self, x: &[f32], out: &mut [f32]) {
        let cols = self.cols;
        out.par_chunks_mut(MATVEC_ROWS).enumerate().for_each_init(
            || vec![0f32; cols],
            |row, (b, out)| {
                let start = b * MATVEC_ROWS;
                for (i, o) in out.iter_mut().enumerate() {
                    self.rows_f32(start + i..start + i + 1, row);
                    *o = super::kernels::dot(x, row);
                }
            },
        );
    }
}

/// `out[i, j] = Σ_k x[i, k] · w[j, k]` for `w` of `n` rows; `out` rows are `out_stride` apart.
fn gemm_xwt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32], out_stride: usize) {
    crate::hostmath::gemm_f32(m, n, k, out, out_stride, false, (x, k, 1), (w, 1, k), 1.0, true);
}
