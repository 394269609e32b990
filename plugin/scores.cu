// FastKV window scores, pooling and group sums (docs/method.md §3.2–3.5), GQA-aware: every KV head's
// keys are read once (per pass) for the G·W window query rows of its group; K is never expanded.
//
// s[h, j] = Σ_t exp(q_(h,t)·k_j/√D − lse_(h,t)) over the W window rows t, for the S−W non-window keys.
// The softmax normaliser lse covers all S keys with the causal mask inside the W×W tail block. It is
// either taken from the causal attention kernel (its log-sum-exp of the last W rows, one pass) or
// computed here by a first pass (per-warp partial max/sum-exp, then one warp per row combines).
#include "common.cuh"

namespace scores {

constexpr int KEYS = 128;  // keys per block, one per thread
constexpr int ROWS = 8;    // query rows held in registers at a time

struct Partial {
  float max, sum;
};

__device__ __forceinline__ Partial combine(Partial a, Partial b) {
  float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

// One pass over a tile of KEYS keys of KV head blockIdx.y for all G·W rows of its group. kStats:
// write per-warp (max, Σexp) partials of every row; otherwise: accumulate window probabilities.
template <typename T, bool kStats>
__global__ void __launch_bounds__(KEYS) window_pass(const T* __restrict__ q, const T* __restrict__ keys,
                                                    int64_t key_head_stride, int64_t key_row_stride,
                                                    const float* __restrict__ lse, int lse_stride,
                                                    Partial* __restrict__ partial, float* __restrict__ scores,
                                                    int group, int head_dim, int seq_len, int window) {
  extern __shared__ uint32_t smem[];
  const int words = head_dim / 2 + 1;  // padded row of packed pairs: conflict-free per-key reads
  uint32_t* ks = smem;
  float* qs = reinterpret_cast<float*>(smem + KEYS * words);
  const int g = blockIdx.y, tid = threadIdx.x, j0 = blockIdx.x * KEYS, j = j0 + tid;
  const int n = seq_len - window, rows = group * window;
  const float scale = rsqrtf(static_cast<float>(head_dim));
  const T* kg = keys + g * key_head_stride;

  for (int c = tid; c < KEYS * head_dim / 8; c += KEYS) {
    const int r = c / (head_dim / 8), d = (c % (head_dim / 8)) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (j0 + r < seq_len) v = *reinterpret_cast<const uint4*>(kg + (j0 + r) * key_row_stride + d);
    uint32_t* dst = ks + r * words + d / 2;
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  }

  int cur_head = -1;
  float cur_sum = 0.f;
  for (int r0 = 0; r0 < rows; r0 += ROWS) {
    __syncthreads();  // keys stored / previous query chunk consumed
    for (int c = tid; c < ROWS * head_dim; c += KEYS) {
      const int r = r0 + c / head_dim;
      qs[c] = r < rows ? to_f32(q[(static_cast<int64_t>(g) * rows + r) * head_dim + c % head_dim]) : 0.f;
    }
    __syncthreads();
    float acc[ROWS] = {};
    const uint32_t* kr = ks + tid * words;
    for (int d = 0; d < head_dim; d += 2) {
      const uint32_t w = kr[d / 2];
      const T* pair = reinterpret_cast<const T*>(&w);
      const float k0 = to_f32(pair[0]), k1 = to_f32(pair[1]);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        const float2 qv = *reinterpret_cast<const float2*>(qs + rr * head_dim + d);
        acc[rr] = fmaf(qv.x, k0, fmaf(qv.y, k1, acc[rr]));
      }
    }
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const int r = r0 + rr;
      if (r >= rows) break;
      const int t = r % window;
      const bool visible = j < seq_len && (j < n || j - n <= t);
      const float logit = visible ? acc[rr] * scale : -INFINITY;
      if (kStats) {
        Partial p = {logit, visible ? 1.f : 0.f};
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          Partial other = {__shfl_xor_sync(~0u, p.max, o), __shfl_xor_sync(~0u, p.sum, o)};
          p = combine(p, other);
        }
        if (tid % 32 == 0) {
          const int tiles = gridDim.x * (KEYS / 32);
          partial[(static_cast<int64_t>(g) * rows + r) * tiles + blockIdx.x * (KEYS / 32) + tid / 32] = p;
        }
      } else if (j < n) {
        const int head = r / window;
        if (head != cur_head) {
          if (cur_head >= 0) scores[(static_cast<int64_t>(g) * group + cur_head) * n + j] = cur_sum;
          cur_head = head, cur_sum = 0.f;
        }
        const int qh = g * group + head;
        cur_sum += expf(logit - lse[static_cast<int64_t>(qh) * lse_stride + t]);
      }
    }
  }
  if (!kStats && j < n && cur_head >= 0) scores[(static_cast<int64_t>(g) * group + cur_head) * n + j] = cur_sum;
}

// lse[row] = log Σ exp over all partials of the row; one warp per row.
__global__ void combine_partials(const Partial* __restrict__ partial, int tiles, int rows, float* __restrict__ lse) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  Partial p = {-INFINITY, 0.f};
  for (int i = lane; i < tiles; i += 32) p = combine(p, partial[static_cast<int64_t>(row) * tiles + i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) p = combine(p, {__shfl_xor_sync(~0u, p.max, o), __shfl_xor_sync(~0u, p.sum, o)});
  if (lane == 0) lse[row] = p.max + logf(p.sum);
}

// A[g, j] = Σ_heads pool(s[head])[j], in exactly the order of `select::pool_group_scores`, so the
// result is bit-identical to the host reference.
__global__ void pool_group(const float* __restrict__ s, int group, int n, int kernel, int max_pool,
                           float* __restrict__ out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x, g = blockIdx.y, half = kernel / 2;
  if (j >= n) return;
  const int lo = max(j - half, 0), hi = min(j + half + 1, n);
  float acc = 0.f;
  for (int h = g * group; h < (g + 1) * group; ++h) {
    const float* row = s + static_cast<int64_t>(h) * n;
    float pooled;
    if (max_pool) {
      pooled = -INFINITY;
      for (int i = lo; i < hi; ++i) pooled = fmaxf(pooled, row[i]);
    } else {
      float sum = 0.f;
      for (int i = lo; i < hi; ++i) sum += row[i];
      pooled = __fdiv_rn(sum, static_cast<float>(kernel));
    }
    acc += pooled;
  }
  out[static_cast<int64_t>(g) * n + j] = acc;
}

// a[j] = Σ_g A[g, j] in KV-head order (the TSP score, as `select::tsp_indices` sums it).
__global__ void sum_heads(const float* __restrict__ a, int n_kv_heads, int n, float* __restrict__ out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float acc = 0.f;
  for (int g = 0; g < n_kv_heads; ++g) acc += a[static_cast<int64_t>(g) * n + j];
  out[j] = acc;
}

template <typename T, bool kStats>
int launch_pass(const void* q, const void* keys, int64_t khs, int64_t krs, const float* lse, int lse_stride,
                Partial* partial, float* scores, int n_kv_heads, int group, int head_dim, int seq_len, int window,
                cudaStream_t stream) {
  const size_t smem = KEYS * (head_dim / 2 + 1) * 4 + ROWS * head_dim * 4;
  cudaError_t e = cudaFuncSetAttribute(window_pass<T, kStats>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  dim3 grid(ceil_div(kStats ? seq_len : seq_len - window, KEYS), n_kv_heads);
  window_pass<T, kStats><<<grid, KEYS, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(keys), khs,
                                                       krs, lse, lse_stride, partial, scores, group, head_dim,
                                                       seq_len, window);
  return launch_status();
}

}  // namespace scores

extern "C" {
using namespace scores;

int64_t fastkv_window_scores_workspace(int n_heads, int seq_len, int window) {
  const int64_t rows = static_cast<int64_t>(n_heads) * window;
  return (rows + 1) / 2 * 2 + 2 * rows * ceil_div(seq_len, KEYS) * (KEYS / 32);  // lse, then 8-byte aligned partials
}

int fastkv_window_scores(const void* q_window, const void* keys, int64_t key_head_stride, int64_t key_row_stride,
                         const float* lse, int lse_stride, float* workspace, float* scores, int n_heads,
                         int n_kv_heads, int head_dim, int seq_len, int window, int dtype, cudaStream_t stream) {
  if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || head_dim <= 0 || head_dim % 8 ||
      head_dim > 256 || window <= 0 || window > seq_len || key_head_stride % 8 || key_row_stride % 8 ||
      reinterpret_cast<uintptr_t>(keys) % 16 || (!lse && !workspace))
    return cudaErrorInvalidValue;
  if (seq_len == window) return cudaSuccess;
  const int group = n_heads / n_kv_heads;
  FASTKV_DISPATCH(dtype, {
    if (!lse) {
      Partial* partial = reinterpret_cast<Partial*>(workspace + (static_cast<int64_t>(n_heads) * window + 1) / 2 * 2);
      int e = launch_pass<T, true>(q_window, keys, key_head_stride, key_row_stride, nullptr, 0, partial, nullptr,
                                   n_kv_heads, group, head_dim, seq_len, window, stream);
      if (e) return e;
      const int rows = n_heads * window;
      combine_partials<<<ceil_div(rows, 8), 256, 0, stream>>>(partial, ceil_div(seq_len, KEYS) * (KEYS / 32), rows,
                                                              workspace);
      if ((e = launch_status())) return e;
      lse = workspace, lse_stride = window;
    }
    return launch_pass<T, false>(q_window, keys, key_head_stride, key_row_stride, lse, lse_stride, nullptr, scores,
                                 n_kv_heads, group, head_dim, seq_len, window, stream);
  });
}

int fastkv_pool_group(const float* s, int n_heads, int n_kv_heads, int n, int kernel, int max_pool, float* out,
                      cudaStream_t stream) {
  if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || kernel <= 0 || kernel % 2 == 0 || n < 0)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  pool_group<<<dim3(ceil_div(n, 256), n_kv_heads), 256, 0, stream>>>(s, n_heads / n_kv_heads, n, kernel, max_pool,
                                                                      out);
  return launch_status();
}

int fastkv_sum_heads(const float* a, int n_kv_heads, int n, float* out, cudaStream_t stream) {
  if (n_kv_heads <= 0 || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  sum_heads<<<ceil_div(n, 256), 256, 0, stream>>>(a, n_kv_heads, n, out);
  return launch_status();
}

}  // extern "C"
