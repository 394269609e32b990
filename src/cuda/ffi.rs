//! The `extern "C"` launchers of plugin/*.cu, as the kernel ABI plugin/fastkv.h declares them (where
//! each is documented). tests/kernel_abi.rs checks this block against the header, so the two cannot
//! drift; the safe wrappers are in [`super::kernels`].

use std::ffi::{c_char, c_int, c_void};

/// A `cudaStream_t`.
pub type Stream = *mut c_void;

/// `FastkvCacheRef`: one request's layer cache in a batched decode step (device addresses; capacity 0 marks a
/// padding row).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheRef {
    pub k: u64,
    pub v: u64,
    pub pos: u64,
    pub len: u64,
    pub capacity: i64,
}

// SAFETY: plain old data, the layout of the C struct (five 8-byte fields), valid as zeros (a padding row).
unsafe impl cudarc::driver::DeviceRepr for CacheRef {}
unsafe impl cudarc::driver::ValidAsZeroBits for CacheRef {}
const _: () = assert!(std::mem::size_of::<CacheRef>() == 40);

#[rustfmt::skip]
extern "C" {
    pub fn cudaGetErrorString(e: c_int) -> *const c_char;
    pub fn fastkv_probe() -> c_int;
    pub fn fastkv_flash_attention(q: *const c_void, q_row: i64, k: *const c_void, v: *const c_void, kv_row: i64,
        kv_head: i64, out: *mut c_void, out_row: i64, lse: *mut f32, q_pos: *const u32, k_pos: *const u32,
        window: c_int, n_queries: c_int, n_keys: c_int, n_heads: c_int, n_kv_heads: c_int, head_dim: c_int,
        dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_decode_workspace(n_heads: c_int, capacity: c_int, head_dim: c_int) -> i64;
    pub fn fastkv_decode_attention(q: *const c_void, k: *const c_void, v: *const c_void, cache_pos: *const u32,
        len: *const u32, capacity: c_int, q_pos: *const u32, window: c_int, out: *mut c_void, workspace: *mut f32,
        n_heads: c_int, n_kv_heads: c_int, head_dim: c_int, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_decode_batch_workspace(batch: c_int, n_heads: c_int, capacity: c_int, head_dim: c_int) -> i64;
    pub fn fastkv_decode_attention_batch(q: *const c_void, q_row: i64, caches: *const CacheRef, batch: c_int,
        max_capacity: c_int, q_pos: *const u32, window: c_int, out: *mut c_void, out_row: i64, workspace: *mut f32,
        n_heads: c_int, n_kv_heads: c_int, head_dim: c_int, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_gather_rows(src: *const c_void, src_batch: i64, src_row: i64, src_rows: i64, idx: *const u32,
        idx_batch: i64, count: c_int, batches: c_int, dst: *mut c_void, dst_batch: i64, dst_row: i64,
        row_bytes: c_int, stream: Stream) -> c_int;
    pub fn fastkv_embed(ids: *const u32, rows: c_int, table: *const c_void, vocab: c_int, dim: c_int, out: *mut f32,
        dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_rms_norm_f32(x: *const f32, x_stride: i64, out: *mut c_void, out_stride: i64, w: *const c_void,
        rows: c_int, n: c_int, eps: f32, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_add_residual(x: *mut f32, x_stride: i64, y: *const c_void, y_stride: i64, rows: i64, cols: c_int,
        dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_add_bias(y: *mut c_void, y_stride: i64, b: *const c_void, rows: i64, cols: c_int, dtype: c_int,
        stream: Stream) -> c_int;
    pub fn fastkv_kv_append(qkv: *const c_void, n_heads: c_int, n_kv_heads: c_int, head_dim: c_int,
        cache_k: *mut c_void, cache_v: *mut c_void, cache_pos: *mut u32, capacity: c_int, len: *mut u32,
        pos: *const u32, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_kv_append_batch(qkv: *const c_void, qkv_row: i64, caches: *const CacheRef, batch: c_int,
        n_heads: c_int, n_kv_heads: c_int, head_dim: c_int, pos: *const u32, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_pack_window(qkv: *const c_void, row_stride: i64, seq_len: c_int, window: c_int, n_heads: c_int,
        head_dim: c_int, out: *mut c_void, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_increment(x: *mut u32, n: c_int, by: u32, stream: Stream) -> c_int;
    pub fn fastkv_argmax(x: *const f32, n: c_int, out: *mut u32, stream: Stream) -> c_int;
    pub fn fastkv_rope(x: *mut c_void, row_stride: i64, rows: c_int, n_heads: c_int, head_dim: c_int,
        pos: *const u32, inv_freq: *const f32, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_rms_norm(x: *const c_void, x_stride: i64, out: *mut c_void, out_stride: i64, w: *const c_void,
        rows: c_int, heads: c_int, n: c_int, eps: f32, dtype: c_int, stream: Stream) -> c_int;
    pub fn fastkv_swiglu(gate_up: *const c_void, rows: i64, inter: c_int, out: *mut c_void, dtype: c_int,
        stream: Stream) -> c_int;
    pub fn fastkv_window_scores_workspace(n_heads: c_int, seq_len: c_int, window: c_int) -> i64;
    pub fn fastkv_window_scores(q_window: *const c_void, keys: *const c_void, key_head_stride: i64,
        key_row_stride: i64, lse: *const f32, lse_stride: c_int, workspace: *mut f32, scores: *mut f32,
        n_heads: c_int, n_kv_heads: c_int, head_dim: c_int, seq_len: c_int, window: c_int, dtype: c_int,
        stream: Stream) -> c_int;
    pub fn fastkv_pool_group(s: *const f32, n_heads: c_int, n_kv_heads: c_int, n: c_int, kernel: c_int,
        max_pool: c_int, out: *mut f32, stream: Stream) -> c_int;
    pub fn fastkv_sum_heads(a: *const f32, n_kv_heads: c_int, n: c_int, out: *mut f32, stream: Stream) -> c_int;
    pub fn fastkv_top_k(scores: *const f32, rows: c_int, n: c_int, k: c_int, window: c_int, out: *mut u32,
        out_stride: c_int, stream: Stream) -> c_int;
}
