//! The CUDA kernels of plugin/ from Rust: a device context that reports a missing driver or device
//! as [`Error::NoCudaDevice`] (instead of cudarc's panic), and one typed, size-checked wrapper per
//! `extern "C"` launcher. Buffers are cudarc [`CudaSlice`]s; every launch is enqueued on the
//! context's stream. Layouts are those of [`crate::select`] and the launchers' comments.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use crate::error::{Error, Result};
use crate::select::{Pool, Shape};

/// Device code of every kernel (sm_80, sm_90 SASS + compute_90 PTX), as build.rs compiled it.
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fastkv_kernels.fatbin"));

type Stream = *mut c_void;

#[rustfmt::skip]
extern "C" {
    fn cudaGetErrorString(e: c_int) -> *const c_char;
    fn fastkv_window_scores_workspace(n_heads: c_int, seq_len: c_int, window: c_int) -> i64;
    fn fastkv_window_scores(q: u64, keys: u64, key_head_stride: i64, key_row_stride: i64, lse: u64, lse_stride: c_int,
        workspace: u64, scores: u64, n_heads: c_int, n_kv_heads: c_int, head_dim: c_int, seq_len: c_int,
        window: c_int, dtype: c_int, s: Stream) -> c_int;
    fn fastkv_pool_group(s: u64, n_heads: c_int, n_kv_heads: c_int, n: c_int, kernel: c_int, max_pool: c_int,
        out: u64, st: Stream) -> c_int;
    fn fastkv_sum_heads(a: u64, n_kv_heads: c_int, n: c_int, out: u64, s: Stream) -> c_int;
    fn fastkv_top_k(scores: u64, rows: c_int, n: c_int, k: c_int, window: c_int, out: u64, out_stride: c_int,
        s: Stream) -> c_int;
    fn fastkv_gather_rows(src: u64, src_batch: i64, src_row: i64, src_rows: i64, idx: u64, idx_batch: i64,
        count: c_int, batches: c_int, dst: u64, dst_batch: i64, dst_row: i64, row_bytes: c_int, s: Stream) -> c_int;
    fn fastkv_rope(x: u64, row_stride: i64, rows: c_int, n_heads: c_int, head_dim: c_int, pos: u64, inv_freq: u64,
        dtype: c_int, s: Stream) -> c_int;
    fn fastkv_rms_norm(x: u64, x_stride: i64, out: u64, out_stride: i64, w: u64, rows: c_int, heads: c_int, n: c_int,
        eps: f32, dtype: c_int, s: Stream) -> c_int;
    fn fastkv_swiglu(gate_up: u64, rows: i64, inter: c_int, out: u64, dtype: c_int, s: Stream) -> c_int;
    fn fastkv_flash_attention(q: u64, q_row: i64, k: u64, v: u64, kv_row: i64, kv_head: i64, out: u64, lse: u64,
        n_queries: c_int, n_keys: c_int, n_heads: c_int, n_kv_heads: c_int, head_dim: c_int, dtype: c_int,
        s: Stream) -> c_int;
    fn fastkv_decode_workspace(n_heads: c_int, len: c_int) -> i64;
    fn fastkv_decode_attention(q: u64, k: u64, v: u64, kv_row: i64, kv_head: i64, out: u64, workspace: u64,
        len: c_int, n_heads: c_int, n_kv_heads: c_int, head_dim: c_int, dtype: c_int, s: Stream) -> c_int;
}

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

/// One GPU's primary context and the stream every wrapper enqueues on.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

fn driver(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(e.to_string())
}

fn check(name: &str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr(cudaGetErrorString(code)) }.to_string_lossy();
    Err(Error::Cuda(format!("{name}: {msg} ({code})")))
}

fn int(flag: &'static str, v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::invalid(flag, format!("{v} does not fit a 32-bit launch argument")))
}

/// Device buffers hold at least one value (see [`Device::zeros`]), so sizes are checked as minimums.
fn expect_len(flag: &'static str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        return Err(Error::invalid(flag, format!("device buffer has {len} values, needs {needed}")));
    }
    Ok(())
}

impl Device {
    /// Device `ordinal`, or [`Error::NoCudaDevice`] without a driver or such a device. Also loads
    /// [`FATBIN`] once through the driver, so a GPU the build has no code for fails here, clearly.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether libcuda can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoCudaDevice("the NVIDIA driver (libcuda) is not installed".into()));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoCudaDevice(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoCudaDevice(format!("device {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        // SAFETY: FATBIN is a complete fatbin image that outlives the call; the module is unloaded at once.
        unsafe {
            let module = cudarc::driver::result::module::load_data(FATBIN.as_ptr() as *const c_void)
                .map_err(|e| Error::Cuda(format!("the embedded kernels do not load on device {ordinal}: {e}")))?;
            cudarc::driver::result::module::unload(module).map_err(driver)?;
        }
        let stream = ctx.default_stream();
        Ok(Device { ctx, stream })
    }

    fn raw(&self) -> Stream {
        self.stream.cu_stream() as Stream
    }

    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(0);
        }
        self.stream.clone_htod(host).map_err(driver)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(driver)
    }

    /// `len` zeros; at least one value, since the driver allocates no empty buffers.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len.max(1)).map_err(driver)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        // The returned guard only records events when cudarc manages cross-stream sync; all our
        // work is on one stream, so the raw pointer is used right away.
        s.device_ptr(&self.stream).0
    }

    /// FastKV window scores `[H, S−W]` of `q_window` `[H, W, D]` against `keys` `[Hk, S, D]`. With
    /// `lse` (the `[H, S]` normalisers `flash_attention` wrote for the same q), one pass; else two.
    pub fn window_scores<T: Element>(
        &self,
        q_window: &CudaSlice<T>,
        keys: &CudaSlice<T>,
        lse: Option<&CudaSlice<f32>>,
        shape: &Shape,
    ) -> Result<CudaSlice<f32>> {
        let Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w } = *shape;
        if h == 0 || hk == 0 || h % hk != 0 || w == 0 || w > s {
            return Err(Error::invalid("shape", format!("{shape:?} is not a valid scoring shape")));
        }
        expect_len("q_window", q_window.len(), h * w * d)?;
        expect_len("keys", keys.len(), hk * s * d)?;
        let (hi, si, wi) = (int("heads", h)?, int("seq_len", s)?, int("window", w)?);
        let out = self.zeros::<f32>(h * (s - w))?;
        let (lse_ptr, workspace) = match lse {
            Some(l) => {
                if l.len() != h * s {
                    return Err(Error::invalid("lse", format!("{} values, expected [{h}, {s}]", l.len())));
                }
                (self.ptr(l) + 4 * (s - w) as u64, None)
            }
            // SAFETY: pure size computation.
            None => (0, Some(self.zeros::<f32>(unsafe { fastkv_window_scores_workspace(hi, si, wi) } as usize)?)),
        };
        let ws = workspace.as_ref().map_or(0, |b| self.ptr(b));
        // SAFETY: every buffer was checked to hold the shape's values; the launcher checks the rest.
        check("fastkv_window_scores", unsafe {
            fastkv_window_scores(
                self.ptr(q_window),
                self.ptr(keys),
                (s * d) as i64,
                d as i64,
                lse_ptr,
                si,
                ws,
                self.ptr(&out),
                hi,
                int("kv_heads", hk)?,
                int("head_dim", d)?,
                si,
                wi,
                T::DTYPE,
                self.raw(),
            )
        })?;
        self.synchronize()?; // the workspace is freed on return
        Ok(out)
    }

    /// Pooled group scores `[Hk, n]` of window scores `s` `[H, n]` (`select::pool_group_scores`).
    pub fn pool_group(
        &self,
        s: &CudaSlice<f32>,
        n_heads: usize,
        n_kv_heads: usize,
        n: usize,
        kernel: usize,
        pool: Pool,
    ) -> Result<CudaSlice<f32>> {
        expect_len("scores", s.len(), n_heads * n)?;
        let out = self.zeros::<f32>(n_kv_heads * n)?;
        // SAFETY: sizes checked above; the launcher validates heads and kernel.
        check("fastkv_pool_group", unsafe {
            fastkv_pool_group(
                self.ptr(s),
                int("heads", n_heads)?,
                int("kv_heads", n_kv_heads)?,
                int("n", n)?,
                int("kernel", kernel)?,
                (pool == Pool::Max) as c_int,
                self.ptr(&out),
                self.raw(),
            )
        })?;
        Ok(out)
    }

    /// The TSP score `[n]`: group scores `[Hk, n]` summed over KV heads.
    pub fn sum_heads(&self, a: &CudaSlice<f32>, n_kv_heads: usize, n: usize) -> Result<CudaSlice<f32>> {
        expect_len("group scores", a.len(), n_kv_heads * n)?;
        let out = self.zeros::<f32>(n)?;
        // SAFETY: sizes checked above.
        check("fastkv_sum_heads", unsafe {
            fastkv_sum_heads(self.ptr(a), int("kv_heads", n_kv_heads)?, int("n", n)?, self.ptr(&out), self.raw())
        })?;
        Ok(out)
    }

    /// For every row of `scores` `[rows, n]`: its top `k` indices ascending, then `n..n+window`;
    /// `[rows, k + window]`. KV selection (`select::kv_indices`, as a set) and TSP
    /// (`select::tsp_indices`, exactly) both come out of it.
    pub fn top_k(
        &self,
        scores: &CudaSlice<f32>,
        rows: usize,
        n: usize,
        k: usize,
        window: usize,
    ) -> Result<CudaSlice<u32>> {
        expect_len("scores", scores.len(), rows * n)?;
        if k > n {
            return Err(Error::invalid("k", format!("{k} exceeds the {n} candidates")));
        }
        let out = self.zeros::<u32>(rows * (k + window))?;
        // SAFETY: sizes checked above.
        check("fastkv_top_k", unsafe {
            fastkv_top_k(
                self.ptr(scores),
                int("rows", rows)?,
                int("n", n)?,
                int("k", k)?,
                int("window", window)?,
                self.ptr(&out),
                int("k + window", k + window)?,
                self.raw(),
            )
        })?;
        Ok(out)
    }

    /// `dst[b, r, :] = src[b, idx[b, r], :]`: `src` `[batches, src_rows, row]`, `idx` `[batches,
    /// count]` → `[batches, count, row]` (K/V into a cache; hidden rows and positions with batches = 1).
    pub fn gather<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &CudaSlice<T>,
        batches: usize,
        src_rows: usize,
        row: usize,
        idx: &CudaSlice<u32>,
        count: usize,
    ) -> Result<CudaSlice<T>> {
        expect_len("src", src.len(), batches * src_rows * row)?;
        expect_len("indices", idx.len(), batches * count)?;
        let out = self.zeros::<T>(batches * count * row)?;
        let e = std::mem::size_of::<T>();
        // SAFETY: sizes checked above; indices past src_rows are skipped by the kernel.
        check("fastkv_gather_rows", unsafe {
            fastkv_gather_rows(
                self.ptr(src),
                (src_rows * row * e) as i64,
                (row * e) as i64,
                src_rows as i64,
                self.ptr(idx),
                count as i64,
                int("count", count)?,
                int("batches", batches)?,
                self.ptr(&out),
                (count * row * e) as i64,
                (row * e) as i64,
                int("row bytes", row * e)?,
                self.raw(),
            )
        })?;
        Ok(out)
    }

    /// RoPE in place on the first `n_heads` heads of every row of `x` (`[pos.len(), row_stride]`).
    pub fn rope<T: Element>(
        &self,
        x: &mut CudaSlice<T>,
        row_stride: usize,
        n_heads: usize,
        head_dim: usize,
        pos: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
    ) -> Result<()> {
        let rows = pos.len();
        expect_len("x", x.len(), rows * row_stride)?;
        expect_len("inv_freq", inv_freq.len(), head_dim / 2)?;
        if n_heads * head_dim > row_stride {
            return Err(Error::invalid("n_heads", format!("{n_heads}×{head_dim} exceeds the row ({row_stride})")));
        }
        // SAFETY: sizes checked above.
        check("fastkv_rope", unsafe {
            fastkv_rope(
                self.ptr(x),
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

    /// RMSNorm of every `n`-wide segment of `x` (`[rows, heads·n]`) with weight `w` (`[n]`):
    /// heads = 1 for the layer norms, heads = H and n = D for Qwen3's per-head q/k norm.
    pub fn rms_norm<T: Element>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        heads: usize,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let (n, width) = (w.len(), w.len() * heads);
        if width == 0 || x.len() % width != 0 {
            return Err(Error::invalid("x", format!("{} values are not rows of {heads}×{n}", x.len())));
        }
        let rows = x.len() / width;
        let out = self.zeros::<T>(x.len())?;
        // SAFETY: sizes checked above.
        check("fastkv_rms_norm", unsafe {
            fastkv_rms_norm(
                self.ptr(x),
                width as i64,
                self.ptr(&out),
                width as i64,
                self.ptr(w),
                int("rows", rows)?,
                int("heads", heads)?,
                int("n", n)?,
                eps,
                T::DTYPE,
                self.raw(),
            )
        })?;
        Ok(out)
    }

    /// silu(gate)·up of `gate_up` rows `[gate | up]` (`[rows, 2·inter]`) → `[rows, inter]`.
    pub fn swiglu<T: Element>(&self, gate_up: &CudaSlice<T>, inter: usize) -> Result<CudaSlice<T>> {
        if inter == 0 || gate_up.len() % (2 * inter) != 0 {
            return Err(Error::invalid("inter", format!("{} values are not rows of 2×{inter}", gate_up.len())));
        }
        let rows = gate_up.len() / (2 * inter);
        let out = self.zeros::<T>(rows * inter)?;
        // SAFETY: sizes checked above.
        check("fastkv_swiglu", unsafe {
            fastkv_swiglu(self.ptr(gate_up), rows as i64, int("inter", inter)?, self.ptr(&out), T::DTYPE, self.raw())
        })?;
        Ok(out)
    }

    /// Causal GQA prefill attention, D = 128: q `[S, H, D]`, k/v `[S, Hk, D]` → (out `[S, H, D]`,
    /// natural-log normalisers `[H, S]`).
    pub fn flash_attention<T: Element>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let s = q.len() / (n_heads * head_dim).max(1);
        expect_len("q", q.len(), s * n_heads * head_dim)?;
        expect_len("k", k.len(), s * n_kv_heads * head_dim)?;
        expect_len("v", v.len(), s * n_kv_heads * head_dim)?;
        let out = self.zeros::<T>(q.len())?;
        let lse = self.zeros::<f32>(n_heads * s)?;
        // SAFETY: sizes checked above; the launcher validates heads and head_dim.
        check("fastkv_flash_attention", unsafe {
            fastkv_flash_attention(
                self.ptr(q),
                (n_heads * head_dim) as i64,
                self.ptr(k),
                self.ptr(v),
                (n_kv_heads * head_dim) as i64,
                head_dim as i64,
                self.ptr(&out),
                self.ptr(&lse),
                int("seq_len", s)?,
                int("seq_len", s)?,
                int("heads", n_heads)?,
                int("kv_heads", n_kv_heads)?,
                int("head_dim", head_dim)?,
                T::DTYPE,
                self.raw(),
            )
        })?;
        Ok((out, lse))
    }

    /// One decode step: q `[H, D]` against the first `len` entries of a cache `[Hk, capacity, D]`.
    pub fn decode_attention<T: Element>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        n_kv_heads: usize,
        capacity: usize,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        let d = 128;
        let h = q.len() / d;
        expect_len("q", q.len(), h * d)?;
        expect_len("k", k.len(), n_kv_heads * capacity * d)?;
        expect_len("v", v.len(), n_kv_heads * capacity * d)?;
        if len == 0 || len > capacity {
            return Err(Error::invalid("len", format!("{len} entries in a cache of {capacity}")));
        }
        let (hi, li) = (int("heads", h)?, int("len", len)?);
        // SAFETY: pure size computation.
        let workspace = self.zeros::<f32>(unsafe { fastkv_decode_workspace(hi, li) } as usize)?;
        let out = self.zeros::<T>(h * d)?;
        // SAFETY: sizes checked above; the launcher validates the group size.
        check("fastkv_decode_attention", unsafe {
            fastkv_decode_attention(
                self.ptr(q),
                self.ptr(k),
                self.ptr(v),
                d as i64,
                (capacity * d) as i64,
                self.ptr(&out),
                self.ptr(&workspace),
                li,
                hi,
                int("kv_heads", n_kv_heads)?,
                d as c_int,
                T::DTYPE,
                self.raw(),
            )
        })?;
        self.synchronize()?; // the workspace is freed on return
        Ok(out)
    }
}
