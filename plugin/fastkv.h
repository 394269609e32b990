// The kernel ABI of fastkv: every `extern "C"` launcher of plugin/*.cu, declared once. Every .cu file
// includes this header (through common.cuh), so nvcc checks each definition against its declaration; the
// TensorRT plugins include it; the Rust declarations (src/cuda/ffi.rs) are checked against it by
// tests/kernel_abi.rs.
//
// Conventions: a launcher returns a cudaError_t (cudaErrorInvalidValue for bad sizes) and only enqueues
// work on `stream`. `dtype` names the activation type (below); everything is accumulated in f32. Pointers are
// device pointers unless a comment says otherwise.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Values of the launchers' `dtype` argument.
enum FastkvDtype { FASTKV_F16 = 0, FASTKV_BF16 = 1 };

// One request's cache of one layer in a batched decode step: K and V [Hk, capacity, D], positions
// [Hk, capacity], its length (device memory, as the single-request launchers read it). The batched launchers
// read an array of these from device memory, so one captured step serves every batch of its size;
// capacity 0 marks a padding row, which they skip.
typedef struct FastkvCacheRef {
  void* k;
  void* v;
  uint32_t* pos;
  uint32_t* len;
  int64_t capacity;
} FastkvCacheRef;

// 0 when this build's kernel images load on the current device, else the runtime's error (e.g.
// cudaErrorNoKernelImageForDevice for a GPU the build has no code for).
int fastkv_probe(void);

// ---- attention.cu ----

// Causal GQA flash attention, head_dim ∈ {16, 32, 64, 128}. q: rows of `q_row` elements holding H heads
// (row i at position i + n_keys − n_queries), out: rows of `out_row` elements, not overlapping q, k or v;
// keys/values: element (j, g, d) at [j·kv_row + g·kv_head + d]. Rows and heads 16-byte aligned (strides
// multiples of 8 elements). lse: [H, n_queries] f32 or NULL. window > 0: key j is also masked for query i
// when q_pos[i] − k_pos[j] ≥ window (q_pos [n_queries], k_pos [n_keys], ascending); window = 0: q_pos and
// k_pos are not read (NULL is fine).
int fastkv_flash_attention(const void* q, int64_t q_row, const void* k, const void* v, int64_t kv_row, int64_t kv_head,
                           void* out, int64_t out_row, float* lse, const uint32_t* q_pos, const uint32_t* k_pos,
                           int window, int n_queries, int n_keys, int n_heads, int n_kv_heads, int head_dim, int dtype,
                           cudaStream_t stream);

// f32 values of workspace `fastkv_decode_attention` needs for a cache of `capacity` entries (host only).
int64_t fastkv_decode_workspace(int n_heads, int capacity, int head_dim);

// One decode step, head_dim ∈ {16, 32, 64, 128}, G = H/Hk ≤ 8: q/out [H, D]; the cache k/v [Hk, capacity, D]
// with positions cache_pos [Hk, capacity]; its length is read from device memory (`len`, u32; values past
// capacity count as capacity) and the grid is sized by capacity, so the launch can be captured in a CUDA
// graph once and replayed every step. window > 0: entry j is masked when *q_pos − cache_pos[g, j] ≥ window
// (q_pos: [1]); window = 0: cache_pos and q_pos are not read. A query with no visible entry gets zeros.
// workspace: `fastkv_decode_workspace(H, capacity, D)` floats.
int fastkv_decode_attention(const void* q, const void* k, const void* v, const uint32_t* cache_pos, const uint32_t* len,
                            int capacity, const uint32_t* q_pos, int window, void* out, float* workspace, int n_heads,
                            int n_kv_heads, int head_dim, int dtype, cudaStream_t stream);

// f32 values of workspace `fastkv_decode_attention_batch` needs for `batch` caches of at most `capacity`
// entries (host only).
int64_t fastkv_decode_batch_workspace(int batch, int n_heads, int capacity, int head_dim);

// `fastkv_decode_attention` for `batch` requests at once, each against its own cache: q row b at
// q + b·q_row, out row b at out + b·out_row, its cache `caches[b]` (device memory; capacities ≤
// `max_capacity`, which sizes the grid), its position q_pos[b] (window > 0). Rows with capacity 0 are
// skipped (their out rows are not written).
int fastkv_decode_attention_batch(const void* q, int64_t q_row, const FastkvCacheRef* caches, int batch,
                                  int max_capacity, const uint32_t* q_pos, int window, void* out, int64_t out_row,
                                  float* workspace, int n_heads, int n_kv_heads, int head_dim, int dtype,
                                  cudaStream_t stream);

// ---- gather.cu ----

// dst[b, r, :] = src[b, idx[b, r], :] for b < batches, r < count (indices ≥ src_rows are skipped); rows of
// `row_bytes`, all strides in bytes. K/V into a cache: batches = Hk, src_batch = S·D·2, dst_batch =
// capacity·D·2. Hidden rows: batches = 1, row_bytes = E·2. Position ids: row_bytes = 4.
int fastkv_gather_rows(const void* src, int64_t src_batch, int64_t src_row, int64_t src_rows, const uint32_t* idx,
                       int64_t idx_batch, int count, int batches, void* dst, int64_t dst_batch, int64_t dst_row,
                       int row_bytes, cudaStream_t stream);

// ---- model.cu ----

// out[r, :] = f32(table[ids[r], :]) for r < rows: ids u32, table [vocab, dim] of dtype, out [rows, dim] f32.
// Ids ≥ vocab give zero rows.
int fastkv_embed(const uint32_t* ids, int rows, const void* table, int vocab, int dim, float* out, int dtype,
                 cudaStream_t stream);

// For every row r < rows: out[r·out_stride ..][..n] = T(w · (x · 1/√(mean(x²) + eps))) of the f32 row
// x[r·x_stride ..][..n], with weight w [n] of dtype; f32 math.
int fastkv_rms_norm_f32(const float* x, int64_t x_stride, void* out, int64_t out_stride, const void* w, int rows, int n,
                        float eps, int dtype, cudaStream_t stream);

// x[r·x_stride + c] += f32(y[r·y_stride + c]) for r < rows, c < cols: the f32 residual stream plus a
// sublayer's output.
int fastkv_add_residual(float* x, int64_t x_stride, const void* y, int64_t y_stride, int64_t rows, int cols, int dtype,
                        cudaStream_t stream);

// y[r·y_stride + c] = T(y + b[c]) for r < rows, c < cols (Qwen2's q/k/v bias on the fused rows).
int fastkv_add_bias(void* y, int64_t y_stride, const void* b, int64_t rows, int cols, int dtype, cudaStream_t stream);

// Decode append for one layer, graph-safe (nothing read on the host): from the fused q|k|v row `qkv` of the
// new token (k heads at H·D, v heads at (H+Hk)·D), K and V of every KV head g go to slot s = *len of
// cache_k / cache_v [Hk, capacity, D], cache_pos[g·capacity + s] = *pos, then *len = s + 1. A full cache
// (s ≥ capacity) drops the token and leaves len alone.
int fastkv_kv_append(const void* qkv, int n_heads, int n_kv_heads, int head_dim, void* cache_k, void* cache_v,
                     uint32_t* cache_pos, int capacity, uint32_t* len, const uint32_t* pos, int dtype,
                     cudaStream_t stream);

// `fastkv_kv_append` for `batch` requests at once: row b of `qkv` (at qkv + b·qkv_row) into `caches[b]`
// (device memory) at position pos[b]; rows with capacity 0 are skipped.
int fastkv_kv_append_batch(const void* qkv, int64_t qkv_row, const FastkvCacheRef* caches, int batch, int n_heads,
                           int n_kv_heads, int head_dim, const uint32_t* pos, int dtype, cudaStream_t stream);

// The window queries of FastKV's scoring: q heads of the last `window` rows of the fused rows `qkv`
// ([seq_len, row_stride], q head h at column h·D) → out [H, window, D], what `fastkv_window_scores` takes.
int fastkv_pack_window(const void* qkv, int64_t row_stride, int seq_len, int window, int n_heads, int head_dim,
                       void* out, int dtype, cudaStream_t stream);

// x[i] += by for i < n: advances device counters (the decode position) inside a captured step.
int fastkv_increment(uint32_t* x, int n, uint32_t by, cudaStream_t stream);

// *out = the first index of the largest of the n f32 values x (greedy sampling on the device, so a decode
// graph can feed its own next token); NaN never wins, all-NaN gives 0.
int fastkv_argmax(const float* x, int n, uint32_t* out, cudaStream_t stream);

// ---- rope_norm.cu ----

// Rotates (rotate-half, HF Llama) `n_heads` heads of `head_dim` at the start of every row of x (rows
// `row_stride` elements apart) in place; row r is at position pos[r]; inv_freq: [head_dim/2] f32 after any
// llama3/linear scaling (`Rope::inv_freq`).
int fastkv_rope(void* x, int64_t row_stride, int rows, int n_heads, int head_dim, const uint32_t* pos,
                const float* inv_freq, int dtype, cudaStream_t stream);

// For every row r < rows and head h < heads: out[r·out_stride + h·n ..][..n] = RMSNorm of the same segment
// of x with weight w ([n]). heads = 1 is the usual norm; heads = H, n = D the per-head q/k norm. In place
// (out = x) is allowed.
int fastkv_rms_norm(const void* x, int64_t x_stride, void* out, int64_t out_stride, const void* w, int rows, int heads,
                    int n, float eps, int dtype, cudaStream_t stream);

// gate_up rows [gate | up] of width 2·inter → out rows of width inter: silu(gate)·up.
int fastkv_swiglu(const void* gate_up, int64_t rows, int inter, void* out, int dtype, cudaStream_t stream);

// ---- scores.cu ----

// f32 values of workspace `fastkv_window_scores` needs when it computes the normaliser itself (host only).
int64_t fastkv_window_scores_workspace(int n_heads, int seq_len, int window);

// q_window: [H, W, D]; key (g, j) at keys[g·key_head_stride + j·key_row_stride] (elements, multiples of 8,
// 16-byte aligned); scores: [H, S−W] f32. With `lse` (row (h, t) at lse[h·lse_stride + t], natural log of
// the scaled-logit normaliser, e.g. the attention kernel's output for the last W rows) one pass runs;
// without (`lse` = NULL) `workspace` must hold `fastkv_window_scores_workspace` floats. D must be a
// multiple of 8, at most 256.
int fastkv_window_scores(const void* q_window, const void* keys, int64_t key_head_stride, int64_t key_row_stride,
                         const float* lse, int lse_stride, float* workspace, float* scores, int n_heads, int n_kv_heads,
                         int head_dim, int seq_len, int window, int dtype, cudaStream_t stream);

// s: [H, n] → out: [Hk, n]; pooling kernel odd; max_pool: 1 = max, 0 = avg (zero padding, ÷ kernel).
int fastkv_pool_group(const float* s, int n_heads, int n_kv_heads, int n, int kernel, int max_pool, float* out,
                      cudaStream_t stream);

// a: [Hk, n] → out: [n], the sum over KV heads that TSP ranks.
int fastkv_sum_heads(const float* a, int n_kv_heads, int n, float* out, cudaStream_t stream);

// ---- select.cu ----

// scores: [rows, n] f32 → out: rows of `out_stride` ≥ k + window u32: the indices of the k largest scores of
// the row in ascending order, then n, n+1, …, n+window−1. 0 ≤ k ≤ n.
int fastkv_top_k(const float* scores, int rows, int n, int k, int window, uint32_t* out, int out_stride,
                 cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
