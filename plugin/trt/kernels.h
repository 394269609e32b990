// The extern "C" launchers of plugin/*.cu that the TensorRT plugins call (same object code as the CUDA backend),
// and the two attention call sites: the attention launchers are being generalised (more head dims, optional
// arguments), so each is called from exactly one inline function here and a signature change is a one-line edit.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

extern "C" {
int fastkv_flash_attention(const void* q, int64_t q_row, const void* k, const void* v, int64_t kv_row, int64_t kv_head,
                           void* out, int64_t out_row, float* lse, const uint32_t* q_pos, const uint32_t* k_pos,
                           int window, int n_queries, int n_keys, int n_heads, int n_kv_heads, int head_dim, int dtype,
                           cudaStream_t stream);
int64_t fastkv_decode_workspace(int n_heads, int capacity, int head_dim);
int fastkv_decode_attention(const void* q, const void* k, const void* v, const uint32_t* cache_pos, const uint32_t* len,
                            int capacity, const uint32_t* q_pos, int window, void* out, float* workspace, int n_heads,
                            int n_kv_heads, int head_dim, int dtype, cudaStream_t stream);
int fastkv_increment(uint32_t* x, int n, uint32_t by, cudaStream_t stream);
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

// Head dims the attention kernels support.
inline bool attention_head_dim_supported(int d) { return d == 16 || d == 32 || d == 64 || d == 128; }

// Causal prefill over row-major q [S, H, D] and k/v [Sk, Hk, D]; out [S, H, D]; lse [H, S]. window > 0 also masks
// by positions q_pos [S] and k_pos [Sk].
inline int prefill_attention(const void* q, const void* k, const void* v, const uint32_t* q_pos,
                             const uint32_t* k_pos, int window, void* out, float* lse, int n_queries, int n_keys,
                             int n_heads, int n_kv_heads, int head_dim, int dtype, cudaStream_t stream) {
  return fastkv_flash_attention(q, int64_t{n_heads} * head_dim, k, v, int64_t{n_kv_heads} * head_dim, head_dim, out,
                                int64_t{n_heads} * head_dim, lse, q_pos, k_pos, window, n_queries, n_keys, n_heads,
                                n_kv_heads, head_dim, dtype, stream);
}

// f32 values of workspace decode_attention needs for a cache of `len` entries: the kernel's partials after four
// values that hold the cache length on the device.
inline int64_t decode_attention_workspace(int n_heads, int len, int head_dim) {
  return 4 + fastkv_decode_workspace(n_heads, len, head_dim);
}

// One query q [H, D] over a head-major cache k/v [Hk, L, D] whose L entries are all valid; out [H, D]. window > 0
// also masks by positions q_pos [1] and cache_pos [Hk, L]. The kernel reads the length from device memory, so it
// is set there first (memset + increment: both graph-capturable).
inline int decode_attention(const void* q, const void* k, const void* v, const uint32_t* q_pos,
                            const uint32_t* cache_pos, int window, void* out, float* workspace, int len, int n_heads,
                            int n_kv_heads, int head_dim, int dtype, cudaStream_t stream) {
  uint32_t* device_len = reinterpret_cast<uint32_t*>(workspace);
  if (cudaError_t e = cudaMemsetAsync(device_len, 0, sizeof(uint32_t), stream)) return e;
  if (int e = fastkv_increment(device_len, 1, static_cast<uint32_t>(len), stream)) return e;
  return fastkv_decode_attention(q, k, v, cache_pos, device_len, len, q_pos, window, out, workspace + 4, n_heads,
                                 n_kv_heads, head_dim, dtype, stream);
}

}  // namespace fastkv_trt
