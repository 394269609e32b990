// Attention with GQA (docs/method.md §2): causal flash attention for prefill on tensor cores, and
// split-key decode attention over a layer's cache, both for head dims 16, 32, 64 and 128 and with an
// optional sliding window masked by original positions (TSP compacts rows but keeps their positions).
//
// Prefill (FlashAttention-2's loop): a block owns 64 query rows of one query head, 4 warps × 16
// rows; K/V tiles of 64 keys of the head's KV head stream through shared memory (cp.async), S = Q·Kᵀ
// and O += P·V run as mma.sync m16n8k16 with f32 accumulators, and the softmax is online (log2
// domain). P never leaves registers: the accumulator layout of two n8 tiles is the A layout of one
// k16 step. Every loop over D steps by 16 (k16 steps, or two n8 tiles per ldmatrix_x4), so D = 16 is
// the smallest head dim the path takes. Every row's natural-log normaliser lse = ln Σ_j exp(q·k_j/√D)
// is written for the window scoring (`fastkv_window_scores` takes the last W rows of it).
//
// Decode: graph-friendly — the cache length is read from device memory and the grid is sized by the
// cache's capacity, so one captured launch serves every step.
#include "common.cuh"

namespace attention {

constexpr int BM = 64;  // query rows per block (16 per warp)
constexpr int BN = 64;  // keys per tile
constexpr int WARPS = BM / 16;
constexpr float LOG2E = 1.4426950408889634f;

// Shared-memory row stride (elements) of a tile of head dim D: 16 bytes of padding put the 8 rows
// of an ldmatrix in distinct banks for every D of 16..128.
template <int D> __host__ __device__ constexpr int pad() { return D + 8; }

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

// Copies `rows` rows of D elements (row r at src + r·stride) into smem tile [rows][pad<D>()]; rows at
// or past `valid` are zeros.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int valid) {
  constexpr int CHUNKS = ROWS * D / 8;
  for (int c = threadIdx.x; c < CHUNKS; c += WARPS * 32) {
    const int r = c / (D / 8), d = (c % (D / 8)) * 8;
    const bool ok = r < valid;
    cp_async16(tile + r * pad<D>() + d, src + (ok ? r * stride + d : 0), ok);
  }
}

// q element (i, h, d) at [i·q_row + h·D + d], out at [i·out_row + h·D + d]; k/v element (j, g, d) at
// [j·kv_row + g·kv_head + d]. Query row i sees keys 0..=i + (n_keys − n_queries) (bottom-right aligned
// causal mask) and, with window > 0, only those with q_pos[i] − k_pos[j] < window (both ascending).
template <typename T, int D>
__global__ void __launch_bounds__(WARPS * 32)
    flash_prefill(const T* __restrict__ q, int64_t q_row, const T* __restrict__ k, const T* __restrict__ v,
                  int64_t kv_row, int64_t kv_head, T* __restrict__ out, int64_t out_row, float* __restrict__ lse,
                  const uint32_t* __restrict__ q_pos, const uint32_t* __restrict__ k_pos, int window, int n_queries,
                  int n_keys, int group, float scale) {
  constexpr int PAD = pad<D>();
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

  load_tile<T, D, BM>(qs, q + q0 * q_row + h * D, q_row, n_queries - q0);
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
  // Positions of the sliding window: the block's first and last query, and this thread's two rows.
  const int64_t pos_lo = window ? q_pos[q0] : 0, pos_hi = window ? q_pos[min(q0 + BM, n_queries) - 1] : 0;
  int64_t qp[2] = {0, 0};
#pragma unroll
  for (int r = 0; r < 2; ++r) qp[r] = window && row0 + r * 8 < n_queries ? q_pos[row0 + r * 8] : 0;

  for (int n0 = 0; n0 < last_key; n0 += BN) {
    // A tile whose newest key is out of the window of the block's oldest query is masked for all rows.
    if (window && pos_lo - k_pos[min(n0 + BN, n_keys) - 1] >= window) continue;
    __syncthreads();  // previous tile consumed
    load_tile<T, D, BN>(ks, kg + n0 * kv_row, kv_row, n_keys - n0);
    cp_async_commit();
    load_tile<T, D, BN>(vs, vg + n0 * kv_row, kv_row, n_keys - n0);
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
    const bool windowed = window && pos_hi - k_pos[n0] >= window;  // some key leaves some row's window
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + nt * 8 + tig * 2 + e % 2, i = row0 + e / 2 * 8;
        float x = s[nt][e] * sl2;
        if (masked && (j > i + offset || j >= n_keys)) x = -INFINITY;
        if (windowed && j < n_keys && qp[e / 2] - k_pos[j] >= window) x = -INFINITY;
        s[nt][e] = x;
        mx[e / 2] = fmaxf(mx[e / 2], x);
      }
    }
    float alpha[2], ms[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(~0u, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(~0u, mx[r], 2));
      ms[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with nothing visible yet: p = 0, l = o = 0
      alpha[r] = exp2f(m[r] - ms[r]);
      m[r] = mx[r];
    }
    cp_async_wait<0>();
    __syncthreads();  // V has landed
    uint32_t p[BN / 16][4];  // P as A fragments of the k16 steps of P·V
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const float p0 = exp2f(s[nt][0] - ms[0]), p1 = exp2f(s[nt][1] - ms[0]);
      const float p2 = exp2f(s[nt][2] - ms[1]), p3 = exp2f(s[nt][3] - ms[1]);
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
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* dst = out + i * out_row + h * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t w = pack2<T>(o[dt][r * 2] * inv, o[dt][r * 2 + 1] * inv);
      *reinterpret_cast<uint32_t*>(dst + dt * 8 + tig * 2) = w;
    }
    if (lse && tig == 0) lse[static_cast<int64_t>(h) * n_queries + i] = (m[r] + log2f(l[r])) / LOG2E;
  }
}

template <typename T, int D>
int launch_prefill(const void* q, int64_t q_row, const void* k, const void* v, int64_t kv_row, int64_t kv_head,
                   void* out, int64_t out_row, float* lse, const uint32_t* q_pos, const uint32_t* k_pos, int window,
                   int n_queries, int n_keys, int n_heads, int group, cudaStream_t stream) {
  const int smem = (BM + 2 * BN) * pad<D>() * 2;
  cudaError_t e = cudaFuncSetAttribute(flash_prefill<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  flash_prefill<T, D><<<dim3(ceil_div(n_queries, BM), n_heads), WARPS * 32, smem, stream>>>(
      static_cast<const T*>(q), q_row, static_cast<const T*>(k), static_cast<const T*>(v), kv_row, kv_head,
      static_cast<T*>(out), out_row, lse, q_pos, k_pos, window, n_queries, n_keys, group,
      rsqrtf(static_cast<float>(D)));
  return launch_status();
}

// Decode: one query row per head against the first `*len` entries of a cache [Hk, capacity, D].
// Block (g, split) covers keys [split·DEC_CHUNK, …) of KV head g for its G query heads; splits at or
// past `*len` return at once (the combine step never reads them). A key is handled by KL lanes
// holding E consecutive dims each (KL = 32 and E = D/32 for D ≥ 32; for D = 16 two half-warps take
// two keys at a time), so each key row is one coalesced read. Results are (max, Σexp, Σexp·v)
// partials per split, merged by `decode_combine`.
constexpr int DEC_WARPS = 4;
constexpr int DEC_CHUNK = 256;  // keys per split: enough splits to fill the GPU from ~8K keys on

template <int D> struct DecodeLanes {
  static constexpr int KL = D >= 32 ? 32 : D;  // lanes per key
  static constexpr int E = D / KL;             // dims per lane
  static constexpr int KPW = 32 / KL;          // keys per warp step
};

// E consecutive values of T at p (aligned to E values) as f32.
template <typename T, int E> __device__ __forceinline__ void load_f32(const T* p, float* out) {
  struct alignas(E * sizeof(T)) Vec {
    T x[E];
  };
  const Vec w = *reinterpret_cast<const Vec*>(p);
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = to_f32(w.x[e]);
}

// Block (g, split) of `splits` of one request's step (the single and the batched kernels below).
template <typename T, int D, int G>
__device__ __forceinline__ void decode_split_body(const T* __restrict__ q, const T* __restrict__ k,
                                                  const T* __restrict__ v, const uint32_t* __restrict__ cache_pos,
                                                  const uint32_t* __restrict__ len, int capacity,
                                                  const uint32_t* __restrict__ q_pos, int window,
                                                  float* __restrict__ part_ml, float* __restrict__ part_o, int g,
                                                  int split, int splits) {
  using L = DecodeLanes<D>;
  constexpr int E = L::E, STREAMS = DEC_WARPS * L::KPW;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = min(*len, static_cast<uint32_t>(capacity));
  const int begin = split * DEC_CHUNK, end = min(n, begin + DEC_CHUNK);
  if (begin >= end) return;
  const int sub = lane / L::KL, d0 = lane % L::KL * E, stream = warp * L::KPW + sub;
  const int64_t qp = window ? q_pos[0] : 0;
  const uint32_t* kp = cache_pos + static_cast<int64_t>(g) * capacity;
  const T* kg = k + static_cast<int64_t>(g) * capacity * D + d0;
  const T* vg = v + static_cast<int64_t>(g) * capacity * D + d0;
  const float sl2 = rsqrtf(static_cast<float>(D)) * LOG2E;
  float qv[G][E], acc[G][E] = {}, m[G], l[G];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    load_f32<T, E>(q + (g * G + h) * D + d0, qv[h]);
#pragma unroll
    for (int e = 0; e < E; ++e) qv[h][e] *= sl2;
    m[h] = -INFINITY, l[h] = 0.f;
  }
  // Every lane runs every step (the shuffles need the whole warp); keys past `end` or out of the
  // window only skip the loads and the update.
  for (int j0 = begin + warp * L::KPW; j0 < end; j0 += DEC_WARPS * L::KPW) {
    const int j = j0 + sub;
    const bool ok = j < end && !(window && qp - kp[j] >= window);
    float kf[E] = {}, vf[E] = {};
    if (ok) {
      load_f32<T, E>(kg + static_cast<int64_t>(j) * D, kf);
      load_f32<T, E>(vg + static_cast<int64_t>(j) * D, vf);
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) s = fmaf(qv[h][e], kf[e], s);
#pragma unroll
      for (int o = L::KL / 2; o > 0; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
      if (!ok) continue;
      const float mn = fmaxf(m[h], s), a = exp2f(m[h] - mn), p = exp2f(s - mn);
      m[h] = mn, l[h] = l[h] * a + p;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = acc[h][e] * a + p * vf[e];
    }
  }
  // Merge the key streams of the block through shared memory, then write this split's partial.
  __shared__ float sm_ml[STREAMS][G][2];
  __shared__ float sm_o[STREAMS][G][D];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (d0 == 0) sm_ml[stream][h][0] = m[h], sm_ml[stream][h][1] = l[h];
#pragma unroll
    for (int e = 0; e < E; ++e) sm_o[stream][h][d0 + e] = acc[h][e];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < G * D; c += DEC_WARPS * 32) {
    const int h = c / D, d = c % D;
    float mx = -INFINITY;
    for (int w = 0; w < STREAMS; ++w) mx = fmaxf(mx, sm_ml[w][h][0]);
    float sum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
      for (int w = 0; w < STREAMS; ++w) {
        const float a = exp2f(sm_ml[w][h][0] - mx);
        sum += sm_ml[w][h][1] * a, o += sm_o[w][h][d] * a;
      }
    }
    const int64_t slot = static_cast<int64_t>(g * G + h) * splits + split;
    part_o[slot * D + d] = o;
    if (d == 0) part_ml[slot * 2] = mx, part_ml[slot * 2 + 1] = sum;
  }
}

// out[h, d] = Σ_split exp2(m_s − M) o_s[d] / Σ_split exp2(m_s − M) l_s over the splits below `*len`;
// one block of D threads per query head. Nothing visible (len 0, or all out of the window): zeros.
template <typename T, int D>
__device__ __forceinline__ void decode_combine_body(const float* __restrict__ part_ml, const float* __restrict__ part_o,
                                                    int splits, const uint32_t* __restrict__ len, int capacity,
                                                    T* __restrict__ out, int h) {
  const int d = threadIdx.x;
  const int used = ceil_div(min(*len, static_cast<uint32_t>(capacity)), DEC_CHUNK);
  const float* ml = part_ml + static_cast<int64_t>(h) * splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < used; ++s) mx = fmaxf(mx, ml[s * 2]);
  float sum = 0.f, o = 0.f;
  for (int s = 0; s < used; ++s) {
    if (ml[s * 2] == -INFINITY) continue;
    const float a = exp2f(ml[s * 2] - mx);
    sum += ml[s * 2 + 1] * a, o += part_o[(static_cast<int64_t>(h) * splits + s) * D + d] * a;
  }
  out[h * D + d] = from_f32<T>(sum > 0.f ? o / sum : 0.f);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    decode_split(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const uint32_t* __restrict__ cache_pos, const uint32_t* __restrict__ len, int capacity,
                 const uint32_t* __restrict__ q_pos, int window, float* __restrict__ part_ml,
                 float* __restrict__ part_o) {
  decode_split_body<T, D, G>(q, k, v, cache_pos, len, capacity, q_pos, window, part_ml, part_o, blockIdx.x,
                             blockIdx.y, gridDim.y);
}

template <typename T, int D>
__global__ void decode_combine(const float* __restrict__ part_ml, const float* __restrict__ part_o, int splits,
                               const uint32_t* __restrict__ len, int capacity, T* __restrict__ out) {
  decode_combine_body<T, D>(part_ml, part_o, splits, len, capacity, out, blockIdx.x);
}

// The batched step: grid z (split) and y (combine) index the request; request b's partials start at
// b·H·splits slots of each half of the workspace.
template <typename T, int D, int G>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    decode_split_batch(const T* __restrict__ q, int64_t q_row, const FastkvCacheRef* __restrict__ caches,
                       const uint32_t* __restrict__ q_pos, int window, float* __restrict__ part_ml,
                       float* __restrict__ part_o, int n_heads) {
  const int b = blockIdx.z;
  const FastkvCacheRef c = caches[b];
  if (c.capacity <= 0) return;
  const int64_t slots = static_cast<int64_t>(n_heads) * gridDim.y * b;
  decode_split_body<T, D, G>(q + b * q_row, static_cast<const T*>(c.k), static_cast<const T*>(c.v), c.pos, c.len,
                             static_cast<int>(c.capacity), window ? q_pos + b : nullptr, window, part_ml + slots * 2,
                             part_o + slots * D, blockIdx.x, blockIdx.y, gridDim.y);
}

template <typename T, int D>
__global__ void decode_combine_batch(const float* __restrict__ part_ml, const float* __restrict__ part_o, int splits,
                                     const FastkvCacheRef* __restrict__ caches, T* __restrict__ out, int64_t out_row,
                                     int n_heads) {
  const int b = blockIdx.y;
  const FastkvCacheRef c = caches[b];
  if (c.capacity <= 0) return;
  const int64_t slots = static_cast<int64_t>(n_heads) * splits * b;
  decode_combine_body<T, D>(part_ml + slots * 2, part_o + slots * D, splits, c.len, static_cast<int>(c.capacity),
                            out + b * out_row, blockIdx.x);
}

template <typename T, int D, int G>
int launch_decode(const void* q, const void* k, const void* v, const uint32_t* cache_pos, const uint32_t* len,
                  int capacity, const uint32_t* q_pos, int window, float* workspace, void* out, int n_kv_heads,
                  cudaStream_t stream) {
  const int splits = ceil_div(capacity, DEC_CHUNK);
  float* part_ml = workspace;
  float* part_o = workspace + static_cast<int64_t>(n_kv_heads) * G * splits * 2;
  decode_split<T, D, G><<<dim3(n_kv_heads, splits), DEC_WARPS * 32, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), cache_pos, len, capacity, q_pos,
      window, part_ml, part_o);
  int e = launch_status();
  if (e) return e;
  decode_combine<T, D><<<n_kv_heads * G, D, 0, stream>>>(part_ml, part_o, splits, len, capacity, static_cast<T*>(out));
  return launch_status();
}

template <typename T, int D, int G>
int launch_decode_batch(const void* q, int64_t q_row, const FastkvCacheRef* caches, int batch, int max_capacity,
                        const uint32_t* q_pos, int window, float* workspace, void* out, int64_t out_row,
                        int n_kv_heads, cudaStream_t stream) {
  const int splits = ceil_div(max_capacity, DEC_CHUNK), n_heads = n_kv_heads * G;
  float* part_ml = workspace;
  float* part_o = workspace + static_cast<int64_t>(batch) * n_heads * splits * 2;
  decode_split_batch<T, D, G><<<dim3(n_kv_heads, splits, batch), DEC_WARPS * 32, 0, stream>>>(
      static_cast<const T*>(q), q_row, caches, q_pos, window, part_ml, part_o, n_heads);
  int e = launch_status();
  if (e) return e;
  decode_combine_batch<T, D><<<dim3(n_heads, batch), D, 0, stream>>>(part_ml, part_o, splits, caches,
                                                                    static_cast<T*>(out), out_row, n_heads);
  return launch_status();
}

// launch_decode with the group size (G ≤ 8) as a template argument.
template <typename T, int D>
int decode_group(int group, const void* q, const void* k, const void* v, const uint32_t* cache_pos,
                 const uint32_t* len, int capacity, const uint32_t* q_pos, int window, float* workspace, void* out,
                 int n_kv_heads, cudaStream_t stream) {
  switch (group) {
#define FASTKV_G(G)                                                                                         \
  case G:                                                                                                   \
    return launch_decode<T, D, G>(q, k, v, cache_pos, len, capacity, q_pos, window, workspace, out, n_kv_heads, \
                                  stream);
    FASTKV_G(1) FASTKV_G(2) FASTKV_G(3) FASTKV_G(4) FASTKV_G(5) FASTKV_G(6) FASTKV_G(7) FASTKV_G(8)
#undef FASTKV_G
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int D>
int decode_batch_group(int group, const void* q, int64_t q_row, const FastkvCacheRef* caches, int batch,
                       int max_capacity, const uint32_t* q_pos, int window, float* workspace, void* out,
                       int64_t out_row, int n_kv_heads, cudaStream_t stream) {
  switch (group) {
#define FASTKV_G(G)                                                                                          \
  case G:                                                                                                    \
    return launch_decode_batch<T, D, G>(q, q_row, caches, batch, max_capacity, q_pos, window, workspace, out, \
                                        out_row, n_kv_heads, stream);
    FASTKV_G(1) FASTKV_G(2) FASTKV_G(3) FASTKV_G(4) FASTKV_G(5) FASTKV_G(6) FASTKV_G(7) FASTKV_G(8)
#undef FASTKV_G
    default: return cudaErrorInvalidValue;
  }
}

// Instantiates `body` with the constexpr `D` bound to `head_dim` (16, 32, 64 or 128).
#define FASTKV_HEAD_DIM(head_dim, ...)                       \
  do {                                                       \
    switch (head_dim) {                                      \
      case 16: { constexpr int D = 16; __VA_ARGS__; } break; \
      case 32: { constexpr int D = 32; __VA_ARGS__; } break; \
      case 64: { constexpr int D = 64; __VA_ARGS__; } break; \
      case 128: { constexpr int D = 128; __VA_ARGS__; } break; \
      default: return cudaErrorInvalidValue;                 \
    }                                                        \
  } while (0)

}  // namespace attention

extern "C" {

int fastkv_flash_attention(const void* q, int64_t q_row, const void* k, const void* v, int64_t kv_row,
                           int64_t kv_head, void* out, int64_t out_row, float* lse, const uint32_t* q_pos,
                           const uint32_t* k_pos, int window, int n_queries, int n_keys, int n_heads, int n_kv_heads,
                           int head_dim, int dtype, cudaStream_t stream) {
  using namespace attention;
  if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || n_queries < 0 || n_keys < n_queries ||
      q_row % 8 || kv_row % 8 || kv_head % 8 || out_row % 8 || window < 0 || (window && (!q_pos || !k_pos)))
    return cudaErrorInvalidValue;
  if (n_queries == 0) return cudaSuccess;
  const int group = n_heads / n_kv_heads;
  FASTKV_DISPATCH(dtype, FASTKV_HEAD_DIM(head_dim, return launch_prefill<T, D>(q, q_row, k, v, kv_row, kv_head, out,
                                                                                out_row, lse, q_pos, k_pos, window,
                                                                                n_queries, n_keys, n_heads, group,
                                                                                stream)));
  return cudaErrorInvalidValue;
}

int64_t fastkv_decode_workspace(int n_heads, int capacity, int head_dim) {
  return static_cast<int64_t>(n_heads) * ceil_div(capacity, attention::DEC_CHUNK) * (2 + head_dim);
}

int fastkv_decode_attention(const void* q, const void* k, const void* v, const uint32_t* cache_pos,
                            const uint32_t* len, int capacity, const uint32_t* q_pos, int window, void* out,
                            float* workspace, int n_heads, int n_kv_heads, int head_dim, int dtype,
                            cudaStream_t stream) {
  using namespace attention;
  if (capacity <= 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || !len || window < 0 ||
      (window && (!cache_pos || !q_pos)))
    return cudaErrorInvalidValue;
  const int group = n_heads / n_kv_heads;
  FASTKV_DISPATCH(dtype, FASTKV_HEAD_DIM(head_dim, return decode_group<T, D>(group, q, k, v, cache_pos, len, capacity,
                                                                              q_pos, window, workspace, out,
                                                                              n_kv_heads, stream)));
  return cudaErrorInvalidValue;
}

int64_t fastkv_decode_batch_workspace(int batch, int n_heads, int capacity, int head_dim) {
  return static_cast<int64_t>(batch) * fastkv_decode_workspace(n_heads, capacity, head_dim);
}

int fastkv_decode_attention_batch(const void* q, int64_t q_row, const FastkvCacheRef* caches, int batch,
                                  int max_capacity, const uint32_t* q_pos, int window, void* out, int64_t out_row,
                                  float* workspace, int n_heads, int n_kv_heads, int head_dim, int dtype,
                                  cudaStream_t stream) {
  using namespace attention;
  if (batch < 0 || max_capacity <= 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || !caches ||
      q_row < int64_t{n_heads} * head_dim || out_row < int64_t{n_heads} * head_dim || window < 0 ||
      (window && !q_pos))
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const int group = n_heads / n_kv_heads;
  FASTKV_DISPATCH(dtype, FASTKV_HEAD_DIM(head_dim, return decode_batch_group<T, D>(group, q, q_row, caches, batch,
                                                                                    max_capacity, q_pos, window,
                                                                                    workspace, out, out_row,
                                                                                    n_kv_heads, stream)));
  return cudaErrorInvalidValue;
}

}  // extern "C"
