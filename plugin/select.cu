// Large-k top-k selection (docs/method.md §3.4–3.5), one thread block per score row: a radix select
// (four 8-bit histogram passes over order-preserving keys) finds the k-th largest score, then one
// stream compaction in index order writes every index above it plus the lowest-index ties, so
// ties resolve exactly as `select::top_k` (higher score, then lower index; NaN lowest) and the
// output is ascending — what TSP needs, and fine for KV selection whose order is irrelevant.
// Each row's W window indices n..n+W−1 follow its k selected ones.
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace topk {

constexpr int THREADS = 512;
constexpr int ITEMS = 8;  // consecutive elements per thread, so scan order is index order
constexpr int CHUNK = THREADS * ITEMS;

// Unsigned keys in the order of f32::total_cmp, with NaN mapped to −∞ like `top_k`.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(isnan(x) ? -INFINITY : x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__global__ void __launch_bounds__(THREADS) top_k_rows(const float* __restrict__ scores, int n, int k, int window,
                                                      uint32_t* __restrict__ out, int out_stride) {
  using Scan = cub::BlockScan<uint32_t, THREADS>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix, s_remaining;
  const float* row = scores + static_cast<int64_t>(blockIdx.x) * n;
  uint32_t* dst = out + static_cast<int64_t>(blockIdx.x) * out_stride;
  const int tid = threadIdx.x;
  for (int t = tid; t < window; t += THREADS) dst[k + t] = n + t;
  if (k == 0) return;

  // Radix select: after the pass at `shift`, keys matching `prefix` on `mask` hold the k-th largest.
  uint32_t prefix = 0, mask = 0, remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += THREADS) hist[b] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += THREADS) {
      const uint32_t key = order_key(row[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t above = 0;
      int digit = 255;
      while (above + hist[digit] < remaining) above += hist[digit--];
      s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      s_remaining = remaining - above;
    }
    __syncthreads();
    prefix = s_prefix, remaining = s_remaining, mask |= 255u << shift;
  }
  // prefix is the k-th largest key; `remaining` of its ties are taken, lowest indices first.
  const uint32_t thr = prefix, ties = remaining;

  // Compaction: position = #greater before + min(#ties before, ties). Both counts of a chunk fit in
  // 16 bits, so one scan of (greater << 16 | tie) carries both.
  uint32_t greater_base = 0, tie_base = 0;
  for (int c0 = 0; c0 < n; c0 += CHUNK) {
    uint32_t keys[ITEMS], flags[ITEMS];
    for (int it = 0; it < ITEMS; ++it) {
      const int i = c0 + tid * ITEMS + it;
      keys[it] = i < n ? order_key(row[i]) : 0;
      flags[it] = i < n ? (keys[it] > thr ? 1u << 16 : keys[it] == thr ? 1u : 0u) : 0u;
    }
    uint32_t total;
    Scan(scan_tmp).ExclusiveSum(flags, flags, total);
    for (int it = 0; it < ITEMS; ++it) {
      const int i = c0 + tid * ITEMS + it;
      if (i >= n) break;
      const uint32_t greater = greater_base + (flags[it] >> 16), tie = tie_base + (flags[it] & 0xffff);
      if (keys[it] > thr || (keys[it] == thr && tie < ties)) dst[greater + min(tie, ties)] = i;
    }
    greater_base += total >> 16, tie_base += total & 0xffff;
    __syncthreads();  // scan_tmp is reused
  }
}

}  // namespace topk

extern "C" {
using namespace topk;

int fastkv_top_k(const float* scores, int rows, int n, int k, int window, uint32_t* out, int out_stride,
                 cudaStream_t stream) {
  if (rows < 0 || n < 0 || k < 0 || k > n || window < 0 || out_stride < k + window) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  top_k_rows<<<rows, THREADS, 0, stream>>>(scores, n, k, window, out, out_stride);
  return launch_status();
}

}  // extern "C"
