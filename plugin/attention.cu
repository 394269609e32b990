// Attention with GQA (fastkv-spec §2): causal flash attention for prefill on tensor cores, and
// split-key decode attention over a layer's cache of any length.
//
// Prefill (FlashAttention-2's loop): a block owns 64 query rows of one query head, 4 warps × 16
// rows; K/V tiles of 64 keys of the head's KV head stream through shared memory (cp.async), S = Q·Kᵀ
// and O += P·V run as mma.sync m16n8k16 with f32 accumulators, and the softmax is online (log2
// domain). P never leaves registers: the accumulator layout of two n8 tiles is the A layout of one
// k16 step. Every row's natural-log normaliser lse = ln Σ_j exp(q·k_j/√D) is written for the
// window scoring (`fastkv_window_scores` takes the last W rows of it).
#include "common.cuh"

namespace attention {

constexpr int D = 128;        // head dim of the tensor-core path
constexpr int BM = 64;        // query rows per block (16 per warp)
constexpr int BN = 64;        // keys per tile
constexpr int WARPS = BM / 16;
constexpr int PAD = D + 8;    // smem row stride (halves): ldmatrix rows land in distinct banks
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, zero-filled when `valid` is false.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups of this thread are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a·b for one m16n8k16 tile.
template <typename T> __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b);
template <> __device__ __forceinline__ void mma<__half>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copies `rows` rows of D elements (row r at src + r·stride) into smem tile [rows][PAD]; rows at or
// past `valid` are zeros.
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int valid) {
  constexpr int CHUNKS = ROWS * D / 8;
  for (int c = threadIdx.x; c < CHUNKS; c += WARPS * 32) {
    const int r = c / (D / 8), d = (c % (D / 8)) * 8;
    const bool ok = r < valid;
    cp_async16(tile + r * PAD + d, src + (ok ? r * stride + d : 0), ok);
  }
}

// q/out element (i, h, d) at [i·q_row + h·D + d]; k/v element (j, g, d) at [j·kv_row + g·kv_head + d].
// Query row i sees keys 0..=i + (n_keys − n_queries) (bottom-right aligned causal mask).
template <typename T>
__global__ void __launch_bounds__(WARPS * 32)
    flash_prefill(const T* __restrict__ q, int64_t q_row, const T* __restrict__ k, const T* __restrict__ v,
                  int64_t kv_row, int64_t kv_head, T* __restrict__ out, float* __restrict__ lse, int n_queries,
                  int n_keys, int group, float scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + BM * PAD;
  T* vs = ks + BN * PAD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int qb = gridDim.x - 1 - blockIdx.x;  // longest (last) query blocks first
  const int h = blockIdx.y, g = h / group, q0 = qb * BM;
  const int offset = n_keys - n_queries;
  const T* kg = k + g * kv_head;
  const T* vg = v + g * kv_head;

  load_tile<T, BM>(qs, q + q0 * q_row + h * D, q_row, n_queries - q0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];  // this warp's 16 query rows as A fragments, held for the whole loop
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], qs + (warp * 16 + lane % 16) * PAD + kk * 16 + lane / 16 * 8);

  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float sl2 = scale * LOG2E;
  const int row0 = q0 + warp * 16 + gid;  // this thread's rows: row0 and row0 + 8
  const int last_key = min(n_keys, q0 + BM + offset);  // keys past it are masked for the whole block

  for (int n0 = 0; n0 < last_key; n0 += BN) {
    __syncthreads();  // previous tile consumed
    load_tile<T, BN>(ks, kg + n0 * kv_row, kv_row, n_keys - n0);
    cp_async_commit();
    load_tile<T, BN>(vs, vg + n0 * kv_row, kv_row, n_keys - n0);
    cp_async_commit();
    cp_async_wait<1>();  // K has landed; V keeps streaming in under Q·Kᵀ and the softmax
    __syncthreads();

    float s[BN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; nt += 2) {
        uint32_t b[4];  // B fragments of n tiles nt (b[0..1]) and nt+1 (b[2..3])
        ldmatrix_x4(b, ks + (nt * 8 + lane % 8 + lane / 16 * 8) * PAD + kk * 16 + (lane / 8) % 2 * 8);
        mma<T>(s[nt], qf[kk], b);
        mma<T>(s[nt + 1], qf[kk], b + 2);
      }
    }

    // Mask, then the online softmax update of both rows.
    const bool masked = n0 + BN > q0 + offset + 1 || n0 + BN > n_keys;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + nt * 8 + tig * 2 + e % 2, i = row0 + e / 2 * 8;
        float x = s[nt][e] * sl2;
        if (masked && (j > i + offset || j >= n_keys)) x = -INFINITY;
        s[nt][e] = x;
        mx[e / 2] = fmaxf(mx[e / 2], x);
      }
    }
    float alpha[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(~0u, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(~0u, mx[r], 2));
      alpha[r] = exp2f(m[r] - mx[r]);  // m = −∞ only before the first tile, where l = o = 0
      m[r] = mx[r];
    }
    cp_async_wait<0>();
    __syncthreads();  // V has landed
    uint32_t p[BN / 16][4];  // P as A fragments of the k16 steps of P·V
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const float p0 = exp2f(s[nt][0] - m[0]), p1 = exp2f(s[nt][1] - m[0]);
      const float p2 = exp2f(s[nt][2] - m[1]), p3 = exp2f(s[nt][3] - m[1]);
      sum[0] += p0 + p1, sum[1] += p2 + p3;
      p[nt / 2][nt % 2 * 2] = pack2<T>(p0, p1);
      p[nt / 2][nt % 2 * 2 + 1] = pack2<T>(p2, p3);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + sum[r];  // per-thread partial; reduced at the end
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0], o[dt][1] *= alpha[0], o[dt][2] *= alpha[1], o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        uint32_t b[4];  // V as B fragments of d tiles dt and dt+1
        ldmatrix_x4_trans(b, vs + (kk * 16 + lane % 8 + (lane / 8) % 2 * 8) * PAD + dt * 8 + lane / 16 * 8);
        mma<T>(o[dt], p[kk], b);
        mma<T>(o[dt + 1], p[kk], b + 2);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(~0u, l[r], 1);
    l[r] += __shfl_xor_sync(~0u, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + r * 8;
    if (i >= n_queries) continue;
    const float inv = 1.f / l[r];
    T* dst = out + i * q_row + h * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t w = pack2<T>(o[dt][r * 2] * inv, o[dt][r * 2 + 1] * inv);
      *reinterpret_cast<uint32_t*>(dst + dt * 8 + tig * 2) = w;
    }
    if (lse && tig == 0) lse[static_cast<int64_t>(h) * n_queries + i] = (m[r] + log2f(l[r])) / LOG2E;
  }
}

// Decode: one query row per head against `len` cached keys, all in its past. Block (g, split)
// covers keys [split·chunk, …) of KV head g for its G query heads: each warp takes one key at a
// time, every lane holding D/32 = 4 consecutive dims (coalesced 256-byte rows); results are
// (max, Σexp, Σexp·v) partials per split, merged by `decode_combine`.
constexpr int DEC_WARPS = 4;

template <typename T, int G>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    decode_split(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, int64_t kv_row,
                 int64_t kv_head, int len, int chunk, float scale, float* __restrict__ part_ml,
                 float* __restrict__ part_o) {
  const int g = blockIdx.x, split = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int begin = split * chunk, end = min(len, begin + chunk);
  float qv[G][4], acc[G][4] = {}, m[G], l[G];
#pragma unroll
  for (int h = 0; h < G; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) qv[h][e] = to_f32(q[(g * G + h) * D + lane * 4 + e]) * scale * LOG2E;
    m[h] = -INFINITY, l[h] = 0.f;
  }
  for (int j = begin + warp; j < end; j += DEC_WARPS) {
    const T* kr = k + g * kv_head + j * kv_row + lane * 4;
    const T* vr = v + g * kv_head + j * kv_row + lane * 4;
    const uint2 kw = *reinterpret_cast<const uint2*>(kr), vw = *reinterpret_cast<const uint2*>(vr);
    const T* kx = reinterpret_cast<const T*>(&kw);
    const T* vx = reinterpret_cast<const T*>(&vw);
    float kf[4], vf[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) kf[e] = to_f32(kx[e]), vf[e] = to_f32(vx[e]);
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float s = qv[h][0] * kf[0] + qv[h][1] * kf[1] + qv[h][2] * kf[2] + qv[h][3] * kf[3];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
      const float mn = fmaxf(m[h], s), a = exp2f(m[h] - mn), p = exp2f(s - mn);
      m[h] = mn, l[h] = l[h] * a + p;
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[h][e] = acc[h][e] * a + p * vf[e];
    }
  }
  // Merge the warps of the block through shared memory, then write this split's partial.
  __shared__ float sm_ml[DEC_WARPS][G][2];
  __shared__ float sm_o[DEC_WARPS][G][D];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (lane == 0) sm_ml[warp][h][0] = m[h], sm_ml[warp][h][1] = l[h];
#pragma unroll
    for (int e = 0; e < 4; ++e) sm_o[warp][h][lane * 4 + e] = acc[h][e];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < G * D; c += DEC_WARPS * 32) {
    const int h = c / D, d = c % D;
    float mx = -INFINITY;
    for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, sm_ml[w][h][0]);
    float sum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
      for (int w = 0; w < DEC_WARPS; ++w) {
        const float a = exp2f(sm_ml[w][h][0] - mx);
        sum += sm_ml[w][h][1] * a, o += sm_o[w][h][d] * a;
      }
    }
    const int64_t slot = static_cast<int64_t>(g * G + h) * gridDim.y + split;
    part_o[slot * D + d] = o;
    if (d == 0) part_ml[slot * 2] = mx, part_ml[slot * 2 + 1] = sum;
  }
}

// out[h, d] = Σ_split exp2(m_s − M) o_s[d] / Σ_split exp2(m_s − M) l_s; one block per query head.
template <typename T>
__global__ void decode_combine(const float* __restrict__ part_ml, const float* __restrict__ part_o, int splits,
                               T* __restrict__ out) {
  const int h = blockIdx.x, d = threadIdx.x;
  const float* ml = part_ml + static_cast<int64_t>(h) * splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ml[s * 2]);
  float sum = 0.f, o = 0.f;
  for (int s = 0; s < splits; ++s) {
    if (ml[s * 2] == -INFINITY) continue;
    const float a = exp2f(ml[s * 2] - mx);
    sum += ml[s * 2 + 1] * a, o += part_o[(static_cast<int64_t>(h) * splits + s) * D + d] * a;
  }
  out[h * D + d] = from_f32<T>(o / sum);
}

constexpr int DEC_CHUNK = 256;  // keys per split: enough splits to fill the GPU from ~8K keys on

template <typename T, int G>
int launch_decode(const void* q, const void* k, const void* v, int64_t kv_row, int64_t kv_head, int n_kv_heads, int len,
                  float* workspace, void* out, cudaStream_t stream) {
  const int splits = ceil_div(len, DEC_CHUNK);
  float* part_ml = workspace;
  float* part_o = workspace + static_cast<int64_t>(n_kv_heads) * G * splits * 2;
  decode_split<T, G><<<dim3(n_kv_heads, splits), DEC_WARPS * 32, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), kv_row, kv_head, len, DEC_CHUNK,
      rsqrtf(static_cast<float>(D)), part_ml, part_o);
  int e = launch_status();
  if (e) return e;
  decode_combine<T><<<n_kv_heads * G, D, 0, stream>>>(part_ml, part_o, splits, static_cast<T*>(out));
  return launch_status();
}

// launch_decode with the group size as a template argument (G ≤ 8).
template <typename T>
int decode_group(int group, const void* q, const void* k, const void* v, int64_t kv_row, int64_t kv_head,
                 int n_kv_heads, int len, float* workspace, void* out, cudaStream_t stream) {
  switch (group) {
#define FASTKV_G(G) \
  case G: return launch_decode<T, G>(q, k, v, kv_row, kv_head, n_kv_heads, len, workspace, out, stream);
    FASTKV_G(1) FASTKV_G(2) FASTKV_G(3) FASTKV_G(4) FASTKV_G(5) FASTKV_G(6) FASTKV_G(7) FASTKV_G(8)
#undef FASTKV_G
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace attention

extern "C" {

// Causal GQA flash attention, head dim 128. q/out: rows of `q_row` elements holding H heads of 128
// (row i at position i + n_keys − n_queries); keys/values: element (j, g, d) at
// [j·kv_row + g·kv_head + d] (rows and heads 16-byte aligned). lse: [H, n_queries] f32 or NULL.
int fastkv_flash_attention(const void* q, int64_t q_row, const void* k, const void* v, int64_t kv_row,
                           int64_t kv_head, void* out, float* lse, int n_queries, int n_keys, int n_heads,
                           int n_kv_heads, int head_dim, int dtype, cudaStream_t stream) {
  using namespace attention;
  if (head_dim != D || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || n_queries < 0 ||
      n_keys < n_queries || q_row % 8 || kv_row % 8 || kv_head % 8)
    return cudaErrorInvalidValue;
  if (n_queries == 0) return cudaSuccess;
  const int smem = (BM + 2 * BN) * PAD * 2;
  const dim3 grid(ceil_div(n_queries, BM), n_heads);
  FASTKV_DISPATCH(dtype, {
    cudaError_t e = cudaFuncSetAttribute(flash_prefill<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    flash_prefill<T><<<grid, WARPS * 32, smem, stream>>>(
        static_cast<const T*>(q), q_row, static_cast<const T*>(k), static_cast<const T*>(v), kv_row, kv_head,
        static_cast<T*>(out), lse, n_queries, n_keys, n_heads / n_kv_heads, rsqrtf(static_cast<float>(D)));
  });
  return launch_status();
}

// f32 values of workspace `fastkv_decode_attention` needs.
int64_t fastkv_decode_workspace(int n_heads, int len) {
  return static_cast<int64_t>(n_heads) * ceil_div(len, attention::DEC_CHUNK) * (2 + attention::D);
}

// One decode step: q/out [H, 128]; the cache's `len` ≥ 1 entries of KV head g at
// [j·kv_row + g·kv_head + d], all visible. G = H/Hk ≤ 8.
int fastkv_decode_attention(const void* q, const void* k, const void* v, int64_t kv_row, int64_t kv_head, void* out,
                            float* workspace, int len, int n_heads, int n_kv_heads, int head_dim, int dtype,
                            cudaStream_t stream) {
  using namespace attention;
  if (head_dim != D || len <= 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || kv_row % 4 ||
      kv_head % 4)
    return cudaErrorInvalidValue;
  if (dtype == FASTKV_F16) return decode_group<__half>(n_heads / n_kv_heads, q, k, v, kv_row, kv_head, n_kv_heads, len, workspace, out, stream);
  if (dtype == FASTKV_BF16) return decode_group<__nv_bfloat16>(n_heads / n_kv_heads, q, k, v, kv_row, kv_head, n_kv_heads, len, workspace, out, stream);
  return cudaErrorInvalidValue;
}

}  // extern "C"
