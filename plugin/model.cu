// The glue of a CUDA model around cuBLAS GEMMs and the attention kernels: token embedding into the f32
// residual stream, RMSNorm from f32 rows to f16/bf16 GEMM inputs, residual and bias adds, the decode
// append of a token's K/V into a layer's cache, the window queries FastKV scores, a device counter increment and a greedy argmax.
// Everything a decode step needs reads its varying inputs (token id, position, cache length) from
// device memory, so the step can be captured in a CUDA graph once and replayed.
#include "common.cuh"

namespace model {

template <typename T>
__global__ void embed(const uint32_t* __restrict__ ids, const T* __restrict__ table, int vocab, int dim,
                      float* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const uint32_t id = ids[r];
  for (int c = threadIdx.x; c < dim; c += blockDim.x)
    out[r * dim + c] = id < static_cast<uint32_t>(vocab) ? to_f32(table[static_cast<int64_t>(id) * dim + c]) : 0.f;
}

constexpr int NORM_THREADS = 256;

// One block per row: Σx² as a tree (per-thread sums, warp shuffles, then the warps' sums), f32.
template <typename T>
__global__ void __launch_bounds__(NORM_THREADS)
    rms_norm_f32(const float* __restrict__ x, int64_t x_stride, T* __restrict__ out, int64_t out_stride,
                 const T* __restrict__ w, int n, float eps) {
  __shared__ float warp_sums[NORM_THREADS / 32];
  const float* xr = x + blockIdx.x * x_stride;
  T* orow = out + blockIdx.x * out_stride;
  float sq = 0.f;
  for (int i = threadIdx.x; i < n; i += NORM_THREADS) sq = fmaf(xr[i], xr[i], sq);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(~0u, sq, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sq;
  __syncthreads();
  sq = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_THREADS / 32; ++i) sq += warp_sums[i];
  const float inv = 1.f / sqrtf(sq / n + eps);
  for (int i = threadIdx.x; i < n; i += NORM_THREADS) orow[i] = from_f32<T>(to_f32(w[i]) * (xr[i] * inv));
}

template <typename T>
__global__ void add_residual(float* __restrict__ x, int64_t x_stride, const T* __restrict__ y, int64_t y_stride,
                             int64_t rows, int cols) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * cols) return;
  const int64_t r = e / cols, c = e % cols;
  x[r * x_stride + c] += to_f32(y[r * y_stride + c]);
}

template <typename T>
__global__ void add_bias(T* __restrict__ y, int64_t y_stride, const T* __restrict__ b, int64_t rows, int cols) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * cols) return;
  const int64_t r = e / cols, c = e % cols;
  y[r * y_stride + c] = from_f32<T>(to_f32(y[r * y_stride + c]) + to_f32(b[c]));
}

// One block: every thread reads the slot before the barrier, thread 0 bumps the length after it, so
// the increment follows all the block's reads of the old length; the writes of other threads need no
// ordering against it (the next kernel on the stream sees them all).
template <typename T>
__device__ __forceinline__ void kv_append_body(const T* __restrict__ qkv, int n_heads, int n_kv_heads, int head_dim,
                                               T* __restrict__ cache_k, T* __restrict__ cache_v,
                                               uint32_t* __restrict__ cache_pos, int capacity, uint32_t* len,
                                               const uint32_t* __restrict__ pos) {
  const uint32_t slot = *len;
  __syncthreads();
  if (slot >= static_cast<uint32_t>(capacity)) return;  // full: the token is dropped, len stays
  const T* kr = qkv + static_cast<int64_t>(n_heads) * head_dim;
  const T* vr = kr + static_cast<int64_t>(n_kv_heads) * head_dim;
  for (int e = threadIdx.x; e < n_kv_heads * head_dim; e += blockDim.x) {
    const int g = e / head_dim, d = e % head_dim;
    const int64_t dst = (static_cast<int64_t>(g) * capacity + slot) * head_dim + d;
    cache_k[dst] = kr[e], cache_v[dst] = vr[e];
  }
  for (int g = threadIdx.x; g < n_kv_heads; g += blockDim.x) cache_pos[static_cast<int64_t>(g) * capacity + slot] = *pos;
  if (threadIdx.x == 0) *len = slot + 1;
}

template <typename T>
__global__ void kv_append(const T* __restrict__ qkv, int n_heads, int n_kv_heads, int head_dim, T* __restrict__ cache_k,
                          T* __restrict__ cache_v, uint32_t* __restrict__ cache_pos, int capacity, uint32_t* len,
                          const uint32_t* __restrict__ pos) {
  kv_append_body(qkv, n_heads, n_kv_heads, head_dim, cache_k, cache_v, cache_pos, capacity, len, pos);
}

// One block per request of the batch.
template <typename T>
__global__ void kv_append_batch(const T* __restrict__ qkv, int64_t qkv_row, const FastkvCacheRef* __restrict__ caches,
                                int n_heads, int n_kv_heads, int head_dim, const uint32_t* __restrict__ pos) {
  const FastkvCacheRef c = caches[blockIdx.x];
  if (c.capacity <= 0) return;
  kv_append_body(qkv + blockIdx.x * qkv_row, n_heads, n_kv_heads, head_dim, static_cast<T*>(c.k), static_cast<T*>(c.v),
                 c.pos, static_cast<int>(c.capacity), c.len, pos + blockIdx.x);
}

template <typename T>
__global__ void pack_window(const T* __restrict__ qkv, int64_t row_stride, int seq_len, int window, int n_heads,
                            int head_dim, T* __restrict__ out) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= static_cast<int64_t>(n_heads) * window * head_dim) return;
  const int d = e % head_dim, t = (e / head_dim) % window, h = e / (static_cast<int64_t>(head_dim) * window);
  out[e] = qkv[static_cast<int64_t>(seq_len - window + t) * row_stride + h * head_dim + d];
}

__global__ void increment(uint32_t* __restrict__ x, int n, uint32_t by) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += by;
}

constexpr int ARGMAX_THREADS = 1024;

// One block: the first index of the largest value (NaN never wins), as `argmax_f32` on the host.
__global__ void __launch_bounds__(ARGMAX_THREADS) argmax(const float* __restrict__ x, int n, uint32_t* __restrict__ out) {
  __shared__ float best_v[ARGMAX_THREADS / 32];
  __shared__ int best_i[ARGMAX_THREADS / 32];
  float bv = -INFINITY;
  int bi = n;  // larger than every index: a thread with nothing seen loses every tie
  for (int i = threadIdx.x; i < n; i += ARGMAX_THREADS) {
    if (x[i] > bv || (bi == n && x[i] == bv)) bv = x[i], bi = i;
  }
  auto better = [](float v, int i, float w, int j) { return w > v || (w == v && j < i); };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(~0u, bv, o);
    const int j = __shfl_xor_sync(~0u, bi, o);
    if (better(bv, bi, w, j)) bv = w, bi = j;
  }
  if (threadIdx.x % 32 == 0) best_v[threadIdx.x / 32] = bv, best_i[threadIdx.x / 32] = bi;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < ARGMAX_THREADS / 32; ++w)
    if (better(bv, bi, best_v[w], best_i[w])) bv = best_v[w], bi = best_i[w];
  *out = bi < n ? bi : 0;
}

}  // namespace model

extern "C" {
using namespace model;

int fastkv_probe(void) {
  cudaFuncAttributes attributes;
  return static_cast<int>(cudaFuncGetAttributes(&attributes, increment));
}

int fastkv_embed(const uint32_t* ids, int rows, const void* table, int vocab, int dim, float* out, int dtype,
                 cudaStream_t stream) {
  if (rows < 0 || vocab <= 0 || dim <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, embed<T><<<rows, 256, 0, stream>>>(ids, static_cast<const T*>(table), vocab, dim, out));
  return launch_status();
}

int fastkv_rms_norm_f32(const float* x, int64_t x_stride, void* out, int64_t out_stride, const void* w, int rows, int n,
                        float eps, int dtype, cudaStream_t stream) {
  if (rows < 0 || n <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, rms_norm_f32<T><<<rows, NORM_THREADS, 0, stream>>>(x, x_stride, static_cast<T*>(out),
                                                                             out_stride, static_cast<const T*>(w), n,
                                                                             eps));
  return launch_status();
}

int fastkv_add_residual(float* x, int64_t x_stride, const void* y, int64_t y_stride, int64_t rows, int cols, int dtype,
                        cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, add_residual<T><<<ceil_div(rows * cols, 256), 256, 0, stream>>>(
                             x, x_stride, static_cast<const T*>(y), y_stride, rows, cols));
  return launch_status();
}

int fastkv_add_bias(void* y, int64_t y_stride, const void* b, int64_t rows, int cols, int dtype, cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, add_bias<T><<<ceil_div(rows * cols, 256), 256, 0, stream>>>(
                             static_cast<T*>(y), y_stride, static_cast<const T*>(b), rows, cols));
  return launch_status();
}

int fastkv_kv_append(const void* qkv, int n_heads, int n_kv_heads, int head_dim, void* cache_k, void* cache_v,
                     uint32_t* cache_pos, int capacity, uint32_t* len, const uint32_t* pos, int dtype,
                     cudaStream_t stream) {
  if (n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || capacity <= 0) return cudaErrorInvalidValue;
  FASTKV_DISPATCH(dtype, kv_append<T><<<1, 256, 0, stream>>>(static_cast<const T*>(qkv), n_heads, n_kv_heads, head_dim,
                                                             static_cast<T*>(cache_k), static_cast<T*>(cache_v),
                                                             cache_pos, capacity, len, pos));
  return launch_status();
}

int fastkv_kv_append_batch(const void* qkv, int64_t qkv_row, const FastkvCacheRef* caches, int batch, int n_heads,
                           int n_kv_heads, int head_dim, const uint32_t* pos, int dtype, cudaStream_t stream) {
  if (batch < 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || !caches || !pos ||
      qkv_row < int64_t{n_heads + 2 * n_kv_heads} * head_dim)
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, kv_append_batch<T><<<batch, 256, 0, stream>>>(static_cast<const T*>(qkv), qkv_row, caches,
                                                                       n_heads, n_kv_heads, head_dim, pos));
  return launch_status();
}

int fastkv_pack_window(const void* qkv, int64_t row_stride, int seq_len, int window, int n_heads, int head_dim,
                       void* out, int dtype, cudaStream_t stream) {
  if (window <= 0 || window > seq_len || n_heads <= 0 || head_dim <= 0 || row_stride < int64_t{n_heads} * head_dim)
    return cudaErrorInvalidValue;
  const int64_t total = static_cast<int64_t>(n_heads) * window * head_dim;
  FASTKV_DISPATCH(dtype, pack_window<T><<<ceil_div(total, 256), 256, 0, stream>>>(
                             static_cast<const T*>(qkv), row_stride, seq_len, window, n_heads, head_dim,
                             static_cast<T*>(out)));
  return launch_status();
}

int fastkv_increment(uint32_t* x, int n, uint32_t by, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  increment<<<ceil_div(n, 256), 256, 0, stream>>>(x, n, by);
  return launch_status();
}

int fastkv_argmax(const float* x, int n, uint32_t* out, cudaStream_t stream) {
  if (n <= 0) return cudaErrorInvalidValue;
  argmax<<<1, ARGMAX_THREADS, 0, stream>>>(x, n, out);
  return launch_status();
}

}  // extern "C"
