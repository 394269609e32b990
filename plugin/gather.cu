// Row gathers after selection: the chosen K/V rows of every KV head into the layer's
// (preallocated) cache, and hidden-state rows / position ids of the tokens TSP keeps. One
// byte-generic kernel serves them all; it moves 16-byte words whenever the layout allows.
#include <algorithm>

#include "common.cuh"

namespace gather {

template <typename V>
__global__ void gather_rows(const char* __restrict__ src, int64_t src_batch, int64_t src_row, int64_t src_rows,
                            const uint32_t* __restrict__ idx, int64_t idx_batch, int count, char* __restrict__ dst,
                            int64_t dst_batch, int64_t dst_row, int row_bytes) {
  const int words = row_bytes / sizeof(V), b = blockIdx.y;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < static_cast<int64_t>(count) * words;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(e / words), w = static_cast<int>(e % words);
    const uint32_t i = idx[b * idx_batch + r];
    if (i >= src_rows) continue;  // out-of-range indices are the caller's bug; never read past src
    reinterpret_cast<V*>(dst + b * dst_batch + r * dst_row)[w] =
        reinterpret_cast<const V*>(src + b * src_batch + i * src_row)[w];
  }
}

}  // namespace gather

extern "C" {
using namespace gather;

int fastkv_gather_rows(const void* src, int64_t src_batch, int64_t src_row, int64_t src_rows, const uint32_t* idx,
                       int64_t idx_batch, int count, int batches, void* dst, int64_t dst_batch, int64_t dst_row,
                       int row_bytes, cudaStream_t stream) {
  if (count < 0 || batches < 0 || row_bytes <= 0) return cudaErrorInvalidValue;
  if (count == 0 || batches == 0) return cudaSuccess;
  const uint64_t all = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | src_batch | src_row |
                       dst_batch | dst_row | row_bytes;
  const int64_t total = static_cast<int64_t>(count) * row_bytes;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256 * 4), 4096)), batches);
  auto go = [&](auto word) {
    using V = decltype(word);
    gather_rows<V><<<grid, 256, 0, stream>>>(static_cast<const char*>(src), src_batch, src_row, src_rows, idx,
                                             idx_batch, count, static_cast<char*>(dst), dst_batch, dst_row, row_bytes);
  };
  if (all % 16 == 0) go(uint4{});
  else if (all % 4 == 0) go(uint32_t{});
  else go(char{});
  return launch_status();
}

}  // extern "C"
