// Shared helpers of the fastkv CUDA kernels: element types and conversions. The launchers' ABI is
// fastkv.h, included here so every definition is checked against its declaration.
#pragma once

#include "fastkv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two f32 values as one packed 32-bit register of T (low half = a), the layout mma.sync expects.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The launch error of the kernels just enqueued (or `cudaSuccess`).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// Instantiates `body` with `T` bound to the element type named by `dtype`.
#define FASTKV_DISPATCH(dtype, ...)                                                                                \
  do {                                                                                                           \
    if ((dtype) == FASTKV_F16) {                                                                                 \
      using T = __half;                                                                                          \
      __VA_ARGS__;                                                                                                   \
    } else if ((dtype) == FASTKV_BF16) {                                                                         \
      using T = __nv_bfloat16;                                                                                   \
      __VA_ARGS__;                                                                                                   \
    } else {                                                                                                     \
      return static_cast<int>(cudaErrorInvalidValue);                                                            \
    }                                                                                                            \
  } while (0)

__host__ __device__ constexpr int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
