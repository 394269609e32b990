// The launchers of plugin/*.cu as the TensorRT plugins call them (the kernel ABI is ../fastkv.h; same object code as
// the CUDA backend). Each attention launcher is called from exactly one inline function here, so a signature change
// is a one-line edit.
#pragma once

#include "../plugin/fastkv.h"

namespace fastkv_trt {

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

// One decode step on a preallocated cache, in place: the new token's K/V (from the fused row qkv [(H + 2·Hk)·D],
// q heads first) go to slot *len of k/v [Hk, capacity, D] with position *pos in cache_pos [Hk, capacity], *len grows
// by one, then q attends over the *len entries (window > 0 also masks by positions). Nothing is read on the host, so
// the step can be captured in a CUDA graph. workspace: cache_attention_workspace(H, capacity, D) floats.
inline int64_t cache_attention_workspace(int n_heads, int capacity, int head_dim) {
  return fastkv_decode_workspace(n_heads, capacity, head_dim);
}
inline int cache_attention(const void* qkv, void* k, void* v, uint32_t* cache_pos, uint32_t* len, int capacity,
                           const uint32_t* pos, int window, void* out, float* workspace, int n_heads, int n_kv_heads,
                           int head_dim, int dtype, cudaStream_t stream) {
  if (int e = fastkv_kv_append(qkv, n_heads, n_kv_heads, head_dim, k, v, cache_pos, capacity, len, pos, dtype, stream))
    return e;
  return fastkv_decode_attention(qkv, k, v, cache_pos, len, capacity, pos, window, out, workspace, n_heads,
                                 n_kv_heads, head_dim, dtype, stream);
}

}  // namespace fastkv_trt
