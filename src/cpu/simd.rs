//! The f32 vector registers of AVX-512 (16 lanes) and AVX2+FMA (8 lanes) behind one trait, so the
//! hand-written decode kernels (the bf16 dot, decode attention) are written once and compiled for
//! both. A kernel's entry point enables the instructions with `#[target_feature]`; these
//! `#[inline(always)]` methods inline into it, leaving no calls in its loops.

use std::arch::x86_64::*;

use half::bf16;

/// One width of f32 vector register and the operations the decode kernels use on it.
pub(super) trait Lanes {
    /// f32 lanes per register.
    const N: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// N bf16 from `p` as f32 lanes, exactly (a bf16 is the top half of an f32).
    unsafe fn load_bf16(p: *const bf16) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// a·b + c, fused.
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Σ of the lanes.
    unsafe fn sum(v: Self::V) -> f32;
    /// The lane sums of sixteen registers (unused ones zero). Each register's lanes are added in an
    /// order that does not depend on the other fifteen, so a sum is the same in any block.
    #[inline(always)]
    unsafe fn sums16(v: &[Self::V; 16]) -> [f32; 16] {
        let mut out = [0f32; 16];
        for (o, &v) in out.iter_mut().zip(v) {
            *o = Self::sum(v);
        }
        out
    }
}

pub(super) struct Avx512;

impl Lanes for Avx512 {
    const N: usize = 16;
    type V = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())), 16))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    /// A transposing tree of 45 instructions instead of sixteen reductions of ~10: within each
    /// 128-bit lane (a₀+a₂)+(a₁+a₃), then (L₀+L₁)+(L₂+L₃) over the four lanes, for every register.
    #[inline(always)]
    unsafe fn sums16(v: &[__m512; 16]) -> [f32; 16] {
        let mut pairs = [_mm512_setzero_ps(); 8];
        for (i, p) in pairs.iter_mut().enumerate() {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            *p = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        let mut quads = [_mm512_setzero_ps(); 4];
        for (i, q) in quads.iter_mut().enumerate() {
            let (a, b) = (_mm512_castps_pd(pairs[2 * i]), _mm512_castps_pd(pairs[2 * i + 1]));
            *q = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
        }
        let all = fold_lanes(fold_lanes(quads[0], quads[1]), fold_lanes(quads[2], quads[3]));
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), all);
        out
    }
}

/// `[a.L0+a.L1, a.L2+a.L3, b.L0+b.L1, b.L2+b.L3]` of the 128-bit lanes of `a` and `b` (no closure:
/// a closure would not inherit its caller's target features).
#[inline(always)]
unsafe fn fold_lanes(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
}

pub(super) struct Avx2;

impl Lanes for Avx2 {
    const N: usize = 8;
    type V = __m256;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)))
    }
}
