//! One typed, size-checked wrapper per launcher of plugin/ ([`super::ffi`]), on a [`Gpu`]'s stream.
//! The wrappers write into buffers the caller preallocated (outputs and workspaces), never allocate
//! and never synchronise, so a model can run them back to back and capture them in a CUDA graph;
//! they take anything cudarc can hand out a device pointer for — a [`CudaSlice`], or a [`CudaView`]
//! / [`CudaViewMut`](cudarc::driver::CudaViewMut) from `slice(range)` / `slice_mut(range)` to point
//! into the middle of a buffer (the k heads of fused q|k|v rows, one row of a batch). Buffers hold at
//! least the values the shape addresses; layouts are those of [`crate::select`] and the ABI's
//! comments (plugin/fastkv.h).
//!
//! Graph capture: the decode launchers read token ids, positions and cache lengths on the device;
//! cudarc records no events while the context has a single stream (else see
//! `CudaContext::disable_event_tracking`), and [`Gpu::write`] (a pageable copy) stays outside.

use std::ffi::{c_int, c_void};

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use super::ffi::{self, CacheRef};
use super::gpu::{check, expect_len, int, span, Gpu};
use crate::error::{Error, Result};
use crate::select::{Pool, Shape};

/// Activation types of the kernels, with the launchers' `dtype` code.
pub trait Element: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin {
    const DTYPE: c_int;
}
impl Element for half::f16 {
    const DTYPE: c_int = 0;
}
impl Element for half::bf16 {
    const DTYPE: c_int = 1;
}

/// Inputs of causal prefill attention. Element (row i, head h, dim d) of q is at `i·q_row + h·D + d`
/// of `q`, of k and v at `i·kv_row + g·kv_head + d` of `k` / `v` (strides multiples of 8). The fused
/// q|k|v rows of a layer are [`AttentionInputs::fused`]; query row i sits at key row i + n_keys − n_queries.
pub struct AttentionInputs<'a, T> {
    pub q: CudaView<'a, T>,
    pub k: CudaView<'a, T>,
    pub v: CudaView<'a, T>,
    pub q_row: usize,
    pub kv_row: usize,
    pub kv_head: usize,
    pub n_queries: usize,
    pub n_keys: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<SlidingWindow<'a>>,
}

/// A sliding window masked by original positions: key j is hidden from query i when
/// `q_pos[i] − k_pos[j] ≥ size` (positions ascending, as after TSP).
pub struct SlidingWindow<'a> {
    pub size: usize,
    pub q_pos: CudaView<'a, u32>,
    pub k_pos: CudaView<'a, u32>,
}

impl<'a, T> AttentionInputs<'a, T> {
    /// Self-attention over the first `rows` fused rows `[rows, (H + 2·Hk)·D]` of `qkv`, no window.
    pub fn fused(qkv: &'a CudaSlice<T>, rows: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        let (h, hk, d) = (n_heads, n_kv_heads, head_dim);
        let width = (h + 2 * hk) * d;
        // Views start inside the buffer even when it is too small; the length checks report that.
        let at = |o: usize| qkv.slice(o.min(qkv.len())..);
        AttentionInputs {
            q: at(0),
            k: at(h * d),
            v: at((h + hk) * d),
            q_row: width,
            kv_row: width,
            kv_head: d,
            n_queries: rows,
            n_keys: rows,
            n_heads: h,
            n_kv_heads: hk,
            head_dim: d,
            window: None,
        }
    }
}

/// One layer's KV cache on the device: K and V `[Hk, capacity, D]`, the original position of every
/// entry `[Hk, capacity]` and the number of entries `len` (`[1]`, read and advanced on the device).
pub struct LayerKv<T> {
    pub k: CudaSlice<T>,
    pub v: CudaSlice<T>,
    pub pos: CudaSlice<u32>,
    pub len: CudaSlice<u32>,
    pub n_kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

/// Keys of the window scoring: element (j, g, d) at `g·head + j·row + d` of `data`.
pub struct Keys<'a, T> {
    pub data: CudaView<'a, T>,
    pub head: usize,
    pub row: usize,
}

/// A batched row gather, in elements of the gathered type: `dst[b·dst_batch + r·dst_row ..][..row] =
/// src[b·src_batch + idx[b·idx_batch + r]·src_row ..][..row]` for b < batches, r < count (indices
/// ≥ src_rows are skipped). K/V of fused rows into a cache: src_batch = D, src_row = width, dst_batch =
/// capacity·D, dst_row = row = D, idx_batch = the budget.
#[derive(Clone, Copy, Debug)]
pub struct Gather {
    pub batches: usize,
    pub count: usize,
    pub row: usize,
    pub src_rows: usize,
    pub src_batch: usize,
    pub src_row: usize,
    pub idx_batch: usize,
    pub dst_batch: usize,
    pub dst_row: usize,
}

/// f32 values of workspace [`Gpu::decode_attention_into`] needs for a cache of `capacity` entries.
pub fn decode_workspace_len(n_heads: usize, capacity: usize, head_dim: usize) -> Result<usize> {
    let (h, c, d) = (int("heads", n_heads)?, int("capacity", capacity)?, int("head_dim", head_dim)?);
    // SAFETY: pure size computation.
    Ok(unsafe { ffi::fastkv_decode_workspace(h, c, d) }.max(1) as usize)
}

/// f32 values of workspace [`Gpu::decode_attention_batch_into`] needs for `batch` caches of at most `capacity` entries.
pub fn decode_batch_workspace_len(batch: usize, n_heads: usize, capacity: usize, head_dim: usize) -> Result<usize> {
    let (b, h) = (int("batch", batch)?, int("heads", n_heads)?);
    let (c, d) = (int("capacity", capacity)?, int("head_dim", head_dim)?);
    // SAFETY: pure size computation.
    Ok(unsafe { ffi::fastkv_decode_batch_workspace(b, h, c, d) }.max(1) as usize)
}

impl<T> LayerKv<T> {
    /// This cache as a row of a batched decode step's table (its device addresses, taken on `gpu`'s stream).
    pub fn cache_ref(&self, gpu: &Gpu) -> CacheRef {
        let at = |p: *const u8| p as u64;
        CacheRef {
            k: at(gpu.ptr(&self.k)),
            v: at(gpu.ptr(&self.v)),
            pos: at(gpu.ptr(&self.pos)),
            len: at(gpu.ptr(&self.len)),
            capacity: self.capacity as i64,
        }
    }
}

/// f32 values of workspace [`Gpu::window_scores_into`] needs when it has no lse to reuse.
pub fn window_scores_workspace_len(shape: &Shape) -> Result<usize> {
    let (h, s, w) = (int("heads", shape.n_heads)?, int("seq_len", shape.seq_len)?, int("window", shape.window)?);
    // SAFETY: pure size computation.
    Ok(unsafe { ffi::fastkv_window_scores_workspace(h, s, w) }.max(1) as usize)
}

impl Gpu {
    /// An empty cache of `capacity` entries per KV head (len 0 on the device).
    pub fn kv_cache<T: Element>(&self, n_kv_heads: usize, capacity: usize, head_dim: usize) -> Result<LayerKv<T>> {
        let n = n_kv_heads * capacity;
        Ok(LayerKv {
            k: self.zeros(n * head_dim)?,
            v: self.zeros(n * head_dim)?,
            pos: self.zeros(n)?,
            len: self.zeros(1)?,
            n_kv_heads,
            capacity,
            head_dim,
        })
    }

    /// FastKV window scores `[H, S−W]` of `q_window` `[H, W, D]` against `keys` into `out`. With `lse`
    /// (the `[H, S]` normalisers `flash_attention` wrote for the same q, viewed from row S−W on: its
    /// window rows), one pass; else two, through `workspace` ([`window_scores_workspace_len`]).
    pub fn window_scores_into<T: Element>(
        &self,
        q_window: &impl DevicePtr<T>,
        keys: &Keys<'_, T>,
        lse: Option<CudaView<'_, f32>>,
        shape: &Shape,
        workspace: &mut impl DevicePtrMut<f32>,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w } = *shape;
        if h == 0 || hk == 0 || h % hk != 0 || w == 0 || w > s {
            return Err(Error::invalid("shape", format!("{shape:?} is not a valid scoring shape")));
        }
        expect_len("q_window", q_window.len(), h * w * d)?;
        expect_len("keys", keys.data.len(), span(&[(hk, keys.head), (s, keys.row)], d))?;
        expect_len("scores", out.len(), h * (s - w))?;
        let lse_ptr = match &lse {
            Some(l) => {
                expect_len("lse", l.len(), span(&[(h, s)], w))?;
                self.ptr(l)
            }
            None => {
                expect_len("workspace", workspace.len(), window_scores_workspace_len(shape)?)?;
                std::ptr::null()
            }
        };
        let si = int("seq_len", s)?;
        // SAFETY: every buffer was checked to hold the shape's values; the launcher checks the rest.
        check("fastkv_window_scores", unsafe {
            ffi::fastkv_window_scores(
                self.ptr(q_window),
                self.ptr(&keys.data),
                keys.head as i64,
                keys.row as i64,
                lse_ptr,
                si,
                self.ptr_mut(workspace),
                self.ptr_mut(out),
                int("heads", h)?,
                int("kv_heads", hk)?,
                int("head_dim", d)?,
                si,
                int("window", w)?,
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// Pooled group scores `[Hk, n]` of window scores `s` `[H, n]` (`select::pool_group_scores`).
    pub fn pool_group_into(
        &self,
        s: &impl DevicePtr<f32>,
        n_heads: usize,
        n_kv_heads: usize,
        n: usize,
        (kernel, pool): (usize, Pool),
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        expect_len("scores", s.len(), n_heads * n)?;
        expect_len("group scores", out.len(), n_kv_heads * n)?;
        // SAFETY: sizes checked above; the launcher validates heads and kernel.
        check("fastkv_pool_group", unsafe {
            ffi::fastkv_pool_group(
                self.ptr(s),
                int("heads", n_heads)?,
                int("kv_heads", n_kv_heads)?,
                int("n", n)?,
                int("kernel", kernel)?,
                (pool == Pool::Max) as c_int,
                self.ptr_mut(out),
                self.raw(),
            )
        })
    }

    /// The TSP score `[n]`: group scores `[Hk, n]` summed over KV heads.
    pub fn sum_heads_into(
        &self,
        a: &impl DevicePtr<f32>,
        n_kv_heads: usize,
        n: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        expect_len("group scores", a.len(), n_kv_heads * n)?;
        expect_len("sum", out.len(), n)?;
        // SAFETY: sizes checked above.
        check("fastkv_sum_heads", unsafe {
            ffi::fastkv_sum_heads(
                self.ptr(a),
                int("kv_heads", n_kv_heads)?,
                int("n", n)?,
                self.ptr_mut(out),
                self.raw(),
            )
        })
    }

    /// For every row of `scores` `[rows, n]`: its top `k` indices ascending, then `n..n+window`, into
    /// `out` `[rows, k + window]`. KV selection (`select::kv_indices`, as a set) and TSP
    /// (`select::tsp_indices`, exactly) both come out of it.
    pub fn top_k_into(
        &self,
        scores: &impl DevicePtr<f32>,
        (rows, n): (usize, usize),
        k: usize,
        window: usize,
        out: &mut impl DevicePtrMut<u32>,
    ) -> Result<()> {
        expect_len("scores", scores.len(), rows * n)?;
        expect_len("indices", out.len(), rows * (k + window))?;
        if k > n {
            return Err(Error::invalid("k", format!("{k} exceeds the {n} candidates")));
        }
        // SAFETY: sizes checked above.
        check("fastkv_top_k", unsafe {
            ffi::fastkv_top_k(
                self.ptr(scores),
                int("rows", rows)?,
                int("n", n)?,
                int("k", k)?,
                int("window", window)?,
                self.ptr_mut(out),
                int("k + window", k + window)?,
                self.raw(),
            )
        })
    }

    /// The batched row gather `g` (see [`Gather`]) from `src` into `dst`.
    pub fn gather_into<T: DeviceRepr>(
        &self,
        src: &impl DevicePtr<T>,
        idx: &impl DevicePtr<u32>,
        g: &Gather,
        dst: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        expect_len("src", src.len(), span(&[(g.batches, g.src_batch), (g.src_rows, g.src_row)], g.row))?;
        expect_len("indices", idx.len(), span(&[(g.batches, g.idx_batch)], g.count))?;
        expect_len("dst", dst.len(), span(&[(g.batches, g.dst_batch), (g.count, g.dst_row)], g.row))?;
        let e = std::mem::size_of::<T>();
        // SAFETY: sizes checked above; indices past src_rows are skipped by the kernel.
        check("fastkv_gather_rows", unsafe {
            ffi::fastkv_gather_rows(
                self.ptr(src),
                (g.src_batch * e) as i64,
                (g.src_row * e) as i64,
                g.src_rows as i64,
                self.ptr(idx),
                g.idx_batch as i64,
                int("count", g.count)?,
                int("batches", g.batches)?,
                self.ptr_mut(dst),
                (g.dst_batch * e) as i64,
                (g.dst_row * e) as i64,
                int("row bytes", g.row * e)?,
                self.raw(),
            )
        })
    }

    /// RoPE in place on the first `n_heads` heads of every row of `x` (`[pos.len(), row_stride]`).
    pub fn rope<T: Element>(
        &self,
        x: &mut impl DevicePtrMut<T>,
        row_stride: usize,
        n_heads: usize,
        head_dim: usize,
        pos: &impl DevicePtr<u32>,
        inv_freq: &impl DevicePtr<f32>,
    ) -> Result<()> {
        let rows = pos.len();
        expect_len("x", x.len(), span(&[(rows, row_stride)], n_heads * head_dim))?;
        expect_len("inv_freq", inv_freq.len(), head_dim / 2)?;
        if n_heads * head_dim > row_stride {
            return Err(Error::invalid("n_heads", format!("{n_heads}×{head_dim} exceeds the row ({row_stride})")));
        }
        // SAFETY: sizes checked above.
        check("fastkv_rope", unsafe {
            ffi::fastkv_rope(
                self.ptr_mut(x),
                row_stride as i64,
                int("rows", rows)?,
                int("heads", n_heads)?,
                int("head_dim", head_dim)?,
                self.ptr(pos),
                self.ptr(inv_freq),
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// RMSNorm of every `n`-wide segment (n = `w.len()`) of the first `rows` rows `[rows, heads·n]` of
    /// `x` into `out` (same layout): heads = 1 for the layer norms, heads = H and n = D for Qwen3's
    /// per-head q/k norm.
    pub fn rms_norm_into<T: Element>(
        &self,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        (rows, heads): (usize, usize),
        eps: f32,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let width = w.len() * heads;
        expect_len("x", x.len(), rows * width)?;
        expect_len("out", out.len(), rows * width)?;
        // SAFETY: both buffers hold rows × width values.
        unsafe { self.rms_norm_rows::<T>((self.ptr(x), self.ptr_mut(out), width), w, (rows, heads), eps) }
    }

    /// RMSNorm in place of the first `heads` segments of `w.len()` values of every row of `x`, rows
    /// `row_stride` apart: Qwen3's per-head q/k norm on the fused q|k|v rows.
    pub fn rms_norm_heads_in_place<T: Element>(
        &self,
        x: &mut impl DevicePtrMut<T>,
        row_stride: usize,
        w: &impl DevicePtr<T>,
        (rows, heads): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        expect_len("x", x.len(), span(&[(rows, row_stride)], heads * w.len()))?;
        let p = self.ptr_mut(x);
        // SAFETY: x spans the rows; the kernel normalises each segment in place.
        unsafe { self.rms_norm_rows::<T>((p as *const c_void, p, row_stride), w, (rows, heads), eps) }
    }

    /// `fastkv_rms_norm` from `x` to `out`, both with rows `stride` apart.
    ///
    /// # Safety
    /// Both pointers must address `rows` rows of `heads · w.len()` values, `stride` apart.
    unsafe fn rms_norm_rows<T: Element>(
        &self,
        (x, out, stride): (*const c_void, *mut c_void, usize),
        w: &impl DevicePtr<T>,
        (rows, heads): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        let n = w.len();
        check("fastkv_rms_norm", unsafe {
            ffi::fastkv_rms_norm(
                x,
                stride as i64,
                out,
                stride as i64,
                self.ptr(w),
                int("rows", rows)?,
                int("heads", heads)?,
                int("n", n)?,
                eps,
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// silu(gate)·up of the first `rows` rows `[gate | up]` (`[rows, 2·inter]`) into `out` `[rows, inter]`.
    pub fn swiglu_into<T: Element>(
        &self,
        gate_up: &impl DevicePtr<T>,
        rows: usize,
        inter: usize,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        expect_len("gate_up", gate_up.len(), rows * 2 * inter)?;
        expect_len("out", out.len(), rows * inter)?;
        // SAFETY: sizes checked above.
        check("fastkv_swiglu", unsafe {
            ffi::fastkv_swiglu(
                self.ptr(gate_up),
                rows as i64,
                int("inter", inter)?,
                self.ptr_mut(out),
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// Causal GQA prefill attention (D ∈ {16, 32, 64, 128}, optional sliding window) into `out` (row
    /// i, head h at `i·out_row + h·D`) and, when given, the natural-log normalisers `lse` `[H, n_queries]`.
    pub fn flash_attention_into<T: Element>(
        &self,
        a: &AttentionInputs<'_, T>,
        out: &mut impl DevicePtrMut<T>,
        out_row: usize,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let (h, hk, d, m, n) = (a.n_heads, a.n_kv_heads, a.head_dim, a.n_queries, a.n_keys);
        expect_len("q", a.q.len(), span(&[(m, a.q_row)], h * d))?;
        let kv = span(&[(n, a.kv_row), (hk, a.kv_head)], d);
        expect_len("k", a.k.len(), kv)?;
        expect_len("v", a.v.len(), kv)?;
        expect_len("out", out.len(), span(&[(m, out_row)], h * d))?;
        let lse_ptr = match lse {
            Some(l) => {
                expect_len("lse", l.len(), h * m)?;
                self.ptr_mut(l)
            }
            None => std::ptr::null_mut(),
        };
        let (window, q_pos, k_pos) = match &a.window {
            Some(w) => {
                expect_len("q_pos", w.q_pos.len(), m)?;
                expect_len("k_pos", w.k_pos.len(), n)?;
                (int("window", w.size)?, self.ptr(&w.q_pos), self.ptr(&w.k_pos))
            }
            None => (0, std::ptr::null(), std::ptr::null()),
        };
        // SAFETY: sizes checked above; the launcher validates heads, head_dim and alignment.
        check("fastkv_flash_attention", unsafe {
            ffi::fastkv_flash_attention(
                self.ptr(&a.q),
                a.q_row as i64,
                self.ptr(&a.k),
                self.ptr(&a.v),
                a.kv_row as i64,
                a.kv_head as i64,
                self.ptr_mut(out),
                out_row as i64,
                lse_ptr,
                q_pos,
                k_pos,
                window,
                int("n_queries", m)?,
                int("n_keys", n)?,
                int("heads", h)?,
                int("kv_heads", hk)?,
                int("head_dim", d)?,
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// One decode step, graph-friendly: q `[H, D]` (the start of the token's fused row) against the
    /// first `*cache.len` entries of `cache` (the length is read on the device; the launch is sized by
    /// the capacity), into `out` `[H, D]`. `window`: (size, the query's position `[1]` on the device),
    /// masking entries by `cache.pos`. `workspace`: [`decode_workspace_len`]`(H, capacity, D)` values.
    pub fn decode_attention_into<T: Element>(
        &self,
        q: &impl DevicePtr<T>,
        cache: &LayerKv<T>,
        n_heads: usize,
        window: Option<(usize, CudaView<'_, u32>)>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (hk, cap, d) = (cache.n_kv_heads, cache.capacity, cache.head_dim);
        expect_len("q", q.len(), n_heads * d)?;
        expect_len("out", out.len(), n_heads * d)?;
        expect_len("cache k", cache.k.len(), hk * cap * d)?;
        expect_len("cache v", cache.v.len(), hk * cap * d)?;
        expect_len("cache positions", cache.pos.len(), hk * cap)?;
        expect_len("workspace", workspace.len(), decode_workspace_len(n_heads, cap, d)?)?;
        let (size, q_pos) = match &window {
            Some((size, p)) => {
                expect_len("q_pos", p.len(), 1)?;
                (int("window", *size)?, self.ptr(p))
            }
            None => (0, std::ptr::null()),
        };
        // SAFETY: sizes checked above; the launcher validates head_dim and the group size.
        check("fastkv_decode_attention", unsafe {
            ffi::fastkv_decode_attention(
                self.ptr(q),
                self.ptr(&cache.k),
                self.ptr(&cache.v),
                self.ptr(&cache.pos),
                self.ptr(&cache.len),
                int("capacity", cap)?,
                q_pos,
                size,
                self.ptr_mut(out),
                self.ptr_mut(workspace),
                int("heads", n_heads)?,
                int("kv_heads", hk)?,
                int("head_dim", d)?,
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// [`Gpu::decode_attention_into`] for every request of a batch at once: request b's q at row b of `q` (rows
    /// `q_row` apart), its cache row b of `caches` (one layer's table), its output row b of `out` (`[H, D]` rows),
    /// its position `window.1[b]` when a window masks. The launch is sized by `max_capacity`, so one captured
    /// step serves every batch of this size. `workspace`:
    /// [`decode_batch_workspace_len`]`(batch, H, max_capacity, D)` values.
    ///
    /// # Safety
    /// Every row of `caches` is padding (capacity 0) or the [`LayerKv::cache_ref`] of a live cache of `n_kv_heads`
    /// heads of `head_dim` whose capacity is at most `max_capacity`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode_attention_batch_into<T: Element>(
        &self,
        q: &impl DevicePtr<T>,
        q_row: usize,
        caches: &impl DevicePtr<CacheRef>,
        max_capacity: usize,
        (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
        window: Option<(usize, CudaView<'_, u32>)>,
        out: &mut impl DevicePtrMut<T>,
        workspace: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let batch = caches.len();
        let row = n_heads * head_dim;
        expect_len("q", q.len(), span(&[(batch, q_row)], row))?;
        expect_len("out", out.len(), batch * row)?;
        expect_len("workspace", workspace.len(), decode_batch_workspace_len(batch, n_heads, max_capacity, head_dim)?)?;
        let (size, q_pos) = match window {
            Some((size, p)) => {
                expect_len("q_pos", p.len(), batch)?;
                (int("window", size)?, self.ptr(&p))
            }
            None => (0, std::ptr::null()),
        };
        // SAFETY: sizes checked above, the caches by the caller; the launcher validates the rest.
        check("fastkv_decode_attention_batch", unsafe {
            ffi::fastkv_decode_attention_batch(
                self.ptr(q),
                q_row as i64,
                self.ptr(caches),
                int("batch", batch)?,
                int("capacity", max_capacity)?,
                q_pos,
                size,
                self.ptr_mut(out),
                row as i64,
                self.ptr_mut(workspace),
                int("heads", n_heads)?,
                int("kv_heads", n_kv_heads)?,
                int("head_dim", head_dim)?,
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// `out[r, :] = f32(table[ids[r], :])` for every id in `ids` (table `[V, dim]`, V = len / dim; ids
    /// ≥ V give zero rows) into `out` `[ids.len(), dim]` f32.
    pub fn embed_into<T: Element>(
        &self,
        ids: &impl DevicePtr<u32>,
        table: &impl DevicePtr<T>,
        dim: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let rows = ids.len();
        if dim == 0 || table.len() < dim {
            return Err(Error::invalid("dim", format!("{} table values are not rows of {dim}", table.len())));
        }
        expect_len("out", out.len(), rows * dim)?;
        // SAFETY: sizes checked above; the kernel reads only rows below table.len() / dim.
        check("fastkv_embed", unsafe {
            ffi::fastkv_embed(
                self.ptr(ids),
                int("rows", rows)?,
                self.ptr(table),
                int("vocab", table.len() / dim)?,
                int("dim", dim)?,
                self.ptr_mut(out),
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// RMSNorm of the first `rows` f32 rows of `x` (`[rows, n]`, n = `w.len()`) into T rows of `out`:
    /// `T(w · (x / √(mean(x²) + eps)))` — the f32 residual stream into a GEMM input.
    pub fn rms_norm_f32_into<T: Element>(
        &self,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<T>,
        rows: usize,
        eps: f32,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let n = w.len();
        expect_len("x", x.len(), rows * n)?;
        expect_len("out", out.len(), rows * n)?;
        // SAFETY: sizes checked above.
        check("fastkv_rms_norm_f32", unsafe {
            ffi::fastkv_rms_norm_f32(
                self.ptr(x),
                n as i64,
                self.ptr_mut(out),
                n as i64,
                self.ptr(w),
                int("rows", rows)?,
                int("n", n)?,
                eps,
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// `x[i] += f32(y[i])` for the first `n` values: a sublayer's output into the f32 residual stream.
    pub fn add_residual_into<T: Element>(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        y: &impl DevicePtr<T>,
        n: usize,
    ) -> Result<()> {
        expect_len("x", x.len(), n)?;
        expect_len("y", y.len(), n)?;
        // SAFETY: sizes checked above; one row of n values.
        check("fastkv_add_residual", unsafe {
            ffi::fastkv_add_residual(self.ptr_mut(x), 0, self.ptr(y), 0, 1, int("n", n)?, T::DTYPE, self.raw())
        })
    }

    /// `y[r, c] += b[c]` on the first `rows` rows of `y` (`[rows, b.len()]`): Qwen2's q/k/v bias.
    pub fn add_bias_into<T: Element>(
        &self,
        y: &mut impl DevicePtrMut<T>,
        b: &impl DevicePtr<T>,
        rows: usize,
    ) -> Result<()> {
        let cols = b.len();
        expect_len("y", y.len(), rows * cols)?;
        // SAFETY: sizes checked above.
        check("fastkv_add_bias", unsafe {
            ffi::fastkv_add_bias(
                self.ptr_mut(y),
                cols as i64,
                self.ptr(b),
                rows as i64,
                int("cols", cols)?,
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// Decode append, graph-safe: K and V of the fused row `qkv` (`[(H + 2·Hk)·D]`) into slot
    /// `*cache.len` of `cache`, `cache.pos[g, slot] = *pos`, then `*cache.len += 1` — all on the device
    /// (a full cache drops the token and keeps its length).
    pub fn kv_append<T: Element>(
        &self,
        qkv: &impl DevicePtr<T>,
        n_heads: usize,
        cache: &mut LayerKv<T>,
        pos: &impl DevicePtr<u32>,
    ) -> Result<()> {
        let (hk, cap, d) = (cache.n_kv_heads, cache.capacity, cache.head_dim);
        expect_len("qkv", qkv.len(), (n_heads + 2 * hk) * d)?;
        expect_len("cache k", cache.k.len(), hk * cap * d)?;
        expect_len("cache v", cache.v.len(), hk * cap * d)?;
        expect_len("cache positions", cache.pos.len(), hk * cap)?;
        expect_len("pos", pos.len(), 1)?;
        // SAFETY: sizes checked above.
        check("fastkv_kv_append", unsafe {
            ffi::fastkv_kv_append(
                self.ptr(qkv),
                int("heads", n_heads)?,
                int("kv_heads", hk)?,
                int("head_dim", d)?,
                self.ptr_mut(&mut cache.k),
                self.ptr_mut(&mut cache.v),
                self.ptr_mut(&mut cache.pos),
                int("capacity", cap)?,
                self.ptr_mut(&mut cache.len),
                self.ptr(pos),
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// [`Gpu::kv_append`] for every request of a batch at once: row b of `qkv` (rows `qkv_row` apart) into the
    /// cache of row b of `caches` (one layer's table) at position `pos[b]`.
    ///
    /// # Safety
    /// As [`Gpu::decode_attention_batch_into`]'s.
    pub unsafe fn kv_append_batch<T: Element>(
        &self,
        qkv: &impl DevicePtr<T>,
        qkv_row: usize,
        caches: &impl DevicePtr<CacheRef>,
        (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
        pos: &impl DevicePtr<u32>,
    ) -> Result<()> {
        let batch = caches.len();
        expect_len("qkv", qkv.len(), span(&[(batch, qkv_row)], (n_heads + 2 * n_kv_heads) * head_dim))?;
        expect_len("pos", pos.len(), batch)?;
        // SAFETY: sizes checked above, the caches by the caller.
        check("fastkv_kv_append_batch", unsafe {
            ffi::fastkv_kv_append_batch(
                self.ptr(qkv),
                qkv_row as i64,
                self.ptr(caches),
                int("batch", batch)?,
                int("heads", n_heads)?,
                int("kv_heads", n_kv_heads)?,
                int("head_dim", head_dim)?,
                self.ptr(pos),
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// The window queries `[H, W, D]` FastKV scores: q heads of the last W of the `shape.seq_len`
    /// fused rows of `qkv` (rows `row_stride` apart) into `out`.
    pub fn pack_window_into<T: Element>(
        &self,
        qkv: &impl DevicePtr<T>,
        row_stride: usize,
        shape: &Shape,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let Shape { n_heads: h, head_dim: d, seq_len: s, window: w, .. } = *shape;
        expect_len("qkv", qkv.len(), span(&[(s, row_stride)], h * d))?;
        expect_len("out", out.len(), h * w * d)?;
        // SAFETY: sizes checked above; the launcher checks window ≤ seq_len.
        check("fastkv_pack_window", unsafe {
            ffi::fastkv_pack_window(
                self.ptr(qkv),
                row_stride as i64,
                int("seq_len", s)?,
                int("window", w)?,
                int("heads", h)?,
                int("head_dim", d)?,
                self.ptr_mut(out),
                T::DTYPE,
                self.raw(),
            )
        })
    }

    /// `x[i] += by` for every value of `x`, on the device (the decode position inside a captured step).
    pub fn increment(&self, x: &mut impl DevicePtrMut<u32>, by: u32) -> Result<()> {
        let n = int("n", x.len())?;
        // SAFETY: the launch touches exactly the values of x.
        check("fastkv_increment", unsafe { ffi::fastkv_increment(self.ptr_mut(x), n, by, self.raw()) })
    }

    /// `out[0]` = the first index of the largest of the first `n` values of `x` (greedy sampling on
    /// the device, `sampling::argmax` for NaN-free logits).
    pub fn argmax_into(&self, x: &impl DevicePtr<f32>, n: usize, out: &mut impl DevicePtrMut<u32>) -> Result<()> {
        expect_len("x", x.len(), n)?;
        expect_len("out", out.len(), 1)?;
        // SAFETY: sizes checked above.
        check("fastkv_argmax", unsafe { ffi::fastkv_argmax(self.ptr(x), int("n", n)?, self.ptr_mut(out), self.raw()) })
    }
}
