//! What the CUDA tests and benchmarks share (the benchmarks through `#[path]`): how a missing device
//! is reported, and kernel wrappers that allocate their outputs — the library's only write into
//! buffers the caller preallocated.
#![allow(dead_code)]

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use fastkv::cuda::{
    decode_workspace_len, window_scores_workspace_len, AttentionInputs, Element, Gather, Gpu, Keys, LayerKv,
};
use fastkv::select::{Pool, Shape};
use fastkv::{Error, Result};

/// Reports a missing CUDA device (driver, GPU, kernel image, cuBLAS or memory: `reason`): the test
/// prints that it is skipped, except on the GPU run (`FASTKV_REQUIRE_GPU=1`, which
/// scripts/gpu-check.sh exports), where a skip would hide the answer the run exists for: it fails.
pub fn no_cuda_device(reason: &str) {
    if std::env::var_os("FASTKV_REQUIRE_GPU").is_some_and(|v| v == "1") {
        panic!("no CUDA device: {reason} (FASTKV_REQUIRE_GPU=1: this run must not skip)");
    }
    println!("skipped: no CUDA device ({reason})");
}

/// Allocating twins of [`Gpu`]'s `*_into` wrappers.
pub trait Allocating {
    fn gpu(&self) -> &Gpu;

    /// [`Gpu::window_scores_into`] of keys `[Hk, S, D]` and the whole `[H, S]` lse, allocating.
    fn window_scores<T: Element>(
        &self,
        q_window: &CudaSlice<T>,
        keys: &CudaSlice<T>,
        lse: Option<&CudaSlice<f32>>,
        shape: &Shape,
    ) -> Result<CudaSlice<f32>> {
        let Shape { n_heads: h, head_dim: d, seq_len: s, window: w, .. } = *shape;
        if w > s {
            return Err(Error::InvalidArgument {
                field: "shape",
                msg: format!("{shape:?} is not a valid scoring shape"),
            });
        }
        if let Some(l) = lse {
            if l.len() != h * s {
                return Err(Error::InvalidArgument {
                    field: "lse",
                    msg: format!("{} values, expected [{h}, {s}]", l.len()),
                });
            }
        }
        let mut out = self.gpu().zeros::<f32>(h * (s - w))?;
        let mut workspace =
            self.gpu().zeros::<f32>(if lse.is_some() { 1 } else { window_scores_workspace_len(shape)? })?;
        let keys = Keys { data: keys.slice(..), head: s * d, row: d };
        let lse = lse.map(|l| l.slice(s - w..));
        self.gpu().window_scores_into(q_window, &keys, lse, shape, &mut workspace, &mut out)?;
        self.gpu().synchronize()?; // the workspace is freed on return
        Ok(out)
    }

    /// [`Gpu::pool_group_into`], allocating.
    fn pool_group(
        &self,
        s: &CudaSlice<f32>,
        n_heads: usize,
        n_kv_heads: usize,
        n: usize,
        kernel: usize,
        pool: Pool,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.gpu().zeros::<f32>(n_kv_heads * n)?;
        self.gpu().pool_group_into(s, n_heads, n_kv_heads, n, (kernel, pool), &mut out)?;
        Ok(out)
    }

    /// [`Gpu::sum_heads_into`], allocating.
    fn sum_heads(&self, a: &CudaSlice<f32>, n_kv_heads: usize, n: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.gpu().zeros::<f32>(n)?;
        self.gpu().sum_heads_into(a, n_kv_heads, n, &mut out)?;
        Ok(out)
    }

    /// [`Gpu::top_k_into`], allocating.
    fn top_k(&self, scores: &CudaSlice<f32>, rows: usize, n: usize, k: usize, window: usize) -> Result<CudaSlice<u32>> {
        let mut out = self.gpu().zeros::<u32>(rows * (k + window))?;
        self.gpu().top_k_into(scores, (rows, n), k, window, &mut out)?;
        Ok(out)
    }

    /// `dst[b, r, :] = src[b, idx[b, r], :]`: `src` `[batches, src_rows, row]`, `idx` `[batches,
    /// count]` → `[batches, count, row]` (K/V into a cache; hidden rows and positions with batches = 1).
    fn gather<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &CudaSlice<T>,
        batches: usize,
        src_rows: usize,
        row: usize,
        idx: &CudaSlice<u32>,
        count: usize,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.gpu().zeros::<T>(batches * count * row)?;
        let g = Gather {
            batches,
            count,
            row,
            src_rows,
            src_batch: src_rows * row,
            src_row: row,
            idx_batch: count,
            dst_batch: count * row,
            dst_row: row,
        };
        self.gpu().gather_into(src, idx, &g, &mut out)?;
        Ok(out)
    }

    /// [`Gpu::rms_norm_into`] of all of `x`, allocating.
    fn rms_norm<T: Element>(&self, x: &CudaSlice<T>, w: &CudaSlice<T>, heads: usize, eps: f32) -> Result<CudaSlice<T>> {
        let width = w.len() * heads;
        if width == 0 || !x.len().is_multiple_of(width) {
            return Err(Error::InvalidArgument {
                field: "x",
                msg: format!("{} values are not rows of {heads}×{}", x.len(), w.len()),
            });
        }
        let mut out = self.gpu().zeros::<T>(x.len())?;
        self.gpu().rms_norm_into(x, w, (x.len() / width, heads), eps, &mut out)?;
        Ok(out)
    }

    /// [`Gpu::swiglu_into`] of all of `gate_up`, allocating.
    fn swiglu<T: Element>(&self, gate_up: &CudaSlice<T>, inter: usize) -> Result<CudaSlice<T>> {
        if inter == 0 || !gate_up.len().is_multiple_of(2 * inter) {
            return Err(Error::InvalidArgument {
                field: "inter",
                msg: format!("{} values are not rows of 2×{inter}", gate_up.len()),
            });
        }
        let rows = gate_up.len() / (2 * inter);
        let mut out = self.gpu().zeros::<T>(rows * inter)?;
        self.gpu().swiglu_into(gate_up, rows, inter, &mut out)?;
        Ok(out)
    }

    /// Causal GQA prefill attention, no window: q `[S, H, D]`, k/v `[S, Hk, D]` → (out `[S, H, D]`,
    /// natural-log normalisers `[H, S]`).
    fn flash_attention<T: Element>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let s = q.len() / (n_heads * head_dim).max(1);
        let a = AttentionInputs {
            q: q.slice(..),
            k: k.slice(..),
            v: v.slice(..),
            q_row: n_heads * head_dim,
            kv_row: n_kv_heads * head_dim,
            kv_head: head_dim,
            n_queries: s,
            n_keys: s,
            n_heads,
            n_kv_heads,
            head_dim,
            window: None,
        };
        let mut out = self.gpu().zeros::<T>(q.len())?;
        let mut lse = self.gpu().zeros::<f32>(n_heads * s)?;
        self.gpu().flash_attention_into(&a, &mut out, n_heads * head_dim, Some(&mut lse))?;
        Ok((out, lse))
    }

    /// [`Gpu::decode_attention_into`], allocating its output and workspace.
    fn decode_attention<T: Element>(
        &self,
        q: &CudaSlice<T>,
        cache: &LayerKv<T>,
        n_heads: usize,
        window: Option<(usize, CudaView<'_, u32>)>,
    ) -> Result<CudaSlice<T>> {
        let d = cache.head_dim;
        let mut workspace = self.gpu().zeros::<f32>(decode_workspace_len(n_heads, cache.capacity, d)?)?;
        let mut out = self.gpu().zeros::<T>(n_heads * d)?;
        self.gpu().decode_attention_into(q, cache, n_heads, window, &mut out, &mut workspace)?;
        self.gpu().synchronize()?; // the workspace is freed on return
        Ok(out)
    }
}

impl Allocating for Gpu {
    fn gpu(&self) -> &Gpu {
        self
    }
}
