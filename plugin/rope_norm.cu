// Element-wise layer pieces on f16/bf16 activations with f32 math: RoPE at explicit positions
// (TSP keeps original positions), RMSNorm (whole rows or per head, Qwen3's q/k norm) and SwiGLU.
// They follow `rope::RopeTable::apply`, `cpu::kernels::rms_norm_row` and `cpu::kernels::swiglu`.
#include "common.cuh"

namespace layer {

// One thread per (row, head, frequency) pair; angles as the host computes them: f32 product,
// cos/sin in f64, so long-context positions keep their precision.
template <typename T>
__global__ void rope(T* __restrict__ x, int64_t row_stride, int n_heads, int head_dim, const uint32_t* __restrict__ pos,
                     const float* __restrict__ inv_freq, int rows) {
  const int half = head_dim / 2;
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= static_cast<int64_t>(rows) * n_heads * half) return;
  const int i = e % half, head = (e / half) % n_heads;
  const int64_t row = e / (static_cast<int64_t>(half) * n_heads);
  const float angle = __fmul_rn(static_cast<float>(pos[row]), inv_freq[i]);
  double s, c;
  sincos(static_cast<double>(angle), &s, &c);
  const float cs = static_cast<float>(c), sn = static_cast<float>(s);
  T* h = x + row * row_stride + head * head_dim;
  const float x0 = to_f32(h[i]), x1 = to_f32(h[i + half]);
  h[i] = from_f32<T>(x0 * cs - x1 * sn);
  h[i + half] = from_f32<T>(x1 * cs + x0 * sn);
}

// One warp per (row, head) segment of `n` values: out = w · (x · rsqrt(mean(x²) + eps)).
template <typename T>
__global__ void rms_norm(const T* __restrict__ x, int64_t x_stride, T* out, int64_t out_stride, const T* __restrict__ w,
                         int rows, int heads, int n, float eps) {
  const int64_t seg = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (seg >= static_cast<int64_t>(rows) * heads) return;
  const int64_t row = seg / heads, head = seg % heads;
  const T* xs = x + row * x_stride + head * n;
  T* os = out + row * out_stride + head * n;
  float sq = 0.f;
  for (int i = lane; i < n; i += 32) {
    const float v = to_f32(xs[i]);
    sq = fmaf(v, v, sq);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(~0u, sq, o);
  const float inv = rsqrtf(sq / n + eps);
  for (int i = lane; i < n; i += 32) os[i] = from_f32<T>(to_f32(w[i]) * (to_f32(xs[i]) * inv));
}

template <typename T>
__global__ void swiglu(const T* __restrict__ gate_up, int64_t rows, int inter, T* __restrict__ out) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * inter) return;
  const int64_t r = e / inter, c = e % inter;
  const float g = to_f32(gate_up[r * 2 * inter + c]), u = to_f32(gate_up[r * 2 * inter + inter + c]);
  out[e] = from_f32<T>(g / (1.f + expf(-g)) * u);
}

}  // namespace layer

extern "C" {
using namespace layer;

int fastkv_rope(void* x, int64_t row_stride, int rows, int n_heads, int head_dim, const uint32_t* pos,
                const float* inv_freq, int dtype, cudaStream_t stream) {
  if (rows < 0 || n_heads < 0 || head_dim <= 0 || head_dim % 2) return cudaErrorInvalidValue;
  const int64_t total = static_cast<int64_t>(rows) * n_heads * (head_dim / 2);
  if (total == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, rope<T><<<ceil_div(total, 256), 256, 0, stream>>>(static_cast<T*>(x), row_stride, n_heads,
                                                                            head_dim, pos, inv_freq, rows));
  return launch_status();
}

int fastkv_rms_norm(const void* x, int64_t x_stride, void* out, int64_t out_stride, const void* w, int rows, int heads,
                    int n, float eps, int dtype, cudaStream_t stream) {
  if (rows < 0 || heads <= 0 || n <= 0) return cudaErrorInvalidValue;
  const int64_t segs = static_cast<int64_t>(rows) * heads;
  if (segs == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, rms_norm<T><<<ceil_div(segs, 8), 256, 0, stream>>>(
                             static_cast<const T*>(x), x_stride, static_cast<T*>(out), out_stride,
                             static_cast<const T*>(w), rows, heads, n, eps));
  return launch_status();
}

int fastkv_swiglu(const void* gate_up, int64_t rows, int inter, void* out, int dtype, cudaStream_t stream) {
  if (rows < 0 || inter <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  FASTKV_DISPATCH(dtype, swiglu<T><<<ceil_div(rows * inter, 256), 256, 0, stream>>>(static_cast<const T*>(gate_up),
                                                                                     rows, inter, static_cast<T*>(out)));
  return launch_status();
}

}  // extern "C"
