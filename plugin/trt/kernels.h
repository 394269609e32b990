// The extern "C" launchers of plugin/*.cu that the TensorRT plugins call (same object code as the CUDA backend),
// and the two attention call sites: the attention launchers are being generalised (more head dims, optional
// arguments), so each is called from exactly one inline function here and a signature change is a one-line edit.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

extern "C" {
int fastkv_flash_attention(const void* q, int64_t q_row, const void* k, const void* v, int64_t kv_row, int64_t kv_head,
                           void* out, float* lse, int n_queries, int n_keys, int n_heads, int n_kv_heads, int head_dim,
                           int dtype, cudaStream_t stream);
int64_t fastkv_decode_workspace(int n_heads, int len);
int fastkv_decode_attention(const void* q, const void* k, const void* v, int64_t kv_row, int64_t kv_head, void* out,
                            float* workspace, int len, int n_heads, int n_kv_heads, int head_dim, int dtype,
                            cudaStream_t stream);
int64_t fastkv_window_scores_workspace(int n_heads, int seq_len, int window);
int fastkv_window_scores(const void* q_window, const void* keys, int64_t key_head_stride, int64_t key_row_stride,
                         const float* lse, int lse_stride, float* workspace, float* scores, int n_heads, int n_kv_heads,
                         int head_dim, int seq_len, int window, int dtype, cudaStream_t stream);
int fastkv_pool_group(const float* s, int n_heads, int n_kv_heads, int n, int kernel, int max_pool, float* out,
                      cudaStream_t stream);
int fastkv_sum_heads(const float* a, int n_kv_heads, int n, float* out, cudaStream_t stream);
int fastkv_top_k(const float* scores, int rows, int n, int k, int window, uint32_t* out, int out_stride,
                 cudaStream_t stream);
int fastkv_gather_rows(const void* src, int64_t src_batch, int64_t src_row, int64_t src_rows, const uint32_t* idx,
                       int64_t idx_batch, int count, int batches, void* dst, int64_t dst_batch, int64_t dst_row,
                       int row_bytes, cudaStream_t stream);
}

namespace fastkv_trt {

// Values of the launchers' `dtype` argument (plugin/common.cuh).
constexpr int kF16 = 0, kBF16 = 1;

// Head dims the attention kernels support today; grows with the generalised launchers.
inline bool attention_head_dim_supported(int d) { return d == 128; }

// Causal prefill over row-major q [S, H, D] and k/v [Sk, Hk, D]; out [S, H, D]; lse [H, S].
inline int prefill_attention(const void* q, const void* k, const void* v, void* out, float* lse, int n_queries,
                             int n_keys, int n_heads, int n_kv_heads, int head_dim, int dtype, cudaStream_t stream) {
  return fastkv_flash_attention(q, int64_t{n_heads} * head_dim, k, v, int64_t{n_kv_heads} * head_dim, head_dim, out,
                                lse, n_queries, n_keys, n_heads, n_kv_heads, head_dim, dtype, stream);
}

// f32 values of workspace decode_attention needs for a cache of `len` entries.
inline int64_t decode_attention_workspace(int n_heads, int len) { return fastkv_decode_workspace(n_heads, len); }

// One query q [H, D] over a head-major cache k/v [Hk, L, D]; out [H, D].
inline int decode_attention(const void* q, const void* k, const void* v, void* out, float* workspace, int len,
                            int n_heads, int n_kv_heads, int head_dim, int dtype, cudaStream_t stream) {
  return fastkv_decode_attention(q, k, v, head_dim, int64_t{len} * head_dim, out, workspace, len, n_heads, n_kv_heads,
                                 head_dim, dtype, stream);
}

}  // namespace fastkv_trt
