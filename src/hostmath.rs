//! Host matrix products shared by the selection reference ([`crate::select`]) and the CPU backend:
//! one strided f32 GEMM over the `gemm` crate, so neither depends on the other.

/// `dst[i, j] = (read_dst ? dst[i, j] : 0) + alpha · Σ_k a[i, k] · b[k, j]` for `m×n` `dst` with
/// row stride `dst_rs`; `a` and `b` are (slice, row stride, column stride). `parallel` spreads it
/// over the rayon pool (for big products; small ones run inside already-parallel tasks).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    read_dst: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    alpha: f32,
    parallel: bool,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len());
    assert!(last(m, k, a.1, a.2) < a.0.len() && last(k, n, b.1, b.2) < b.0.len());
    // SAFETY: the asserts above bound every element the strides address.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            read_dst,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None },
        )
    }
}
