//! bf16 GEMM with f32 accumulation on 32×32 blocks of C, by one of two kernels over one packing:
//! AMX tiles (`tdpbf16ps`) or AVX512-BF16 (`vdpbf16ps`), whichever [`isa::path`] picked.
//!
//! Both instructions multiply *pairs* of bf16 along k, so both want B with the two values of a
//! k-pair side by side for 16 output columns — 64 bytes, one AMX tile row or one zmm register —
//! and A with each row's k-pairs contiguous (one AMX tile row is 32 k of one row; one
//! `vpbroadcastd` is one k-pair). A is stored in [`A_CHUNK`]s — 32 rows × 32 k, one k tile of a
//! block after the other — so a kernel reads both operands as sequential streams. The weights
//! are packed once, A is rounded to bf16 per call (as in PyTorch's bf16 matmul), and one driver
//! serves both kernels. Why our own kernels rather than oneDNN: no system library or C++
//! toolchain at build time, one binary, and `benches/peers/gemm_vs_torch.py` measures them against
//! PyTorch's oneDNN on the same shapes.

use half::bf16;
use multiversion::multiversion;
use rayon::prelude::*;

use super::isa::Path;
use super::kernels::round_bf16;

/// Tile geometry: 16 rows of 64 bytes (32 bf16 of A, 16 k-pairs × 16 columns of B, 16 f32 of C).
const TILE: usize = 16;
pub const TILE_K: usize = 32;
/// Each kernel call computes a 32×32 block of C (four tiles).
pub const BLOCK: usize = 2 * TILE;
/// bf16 values of A per k tile of a block: 32 rows of 32, row-major (two AMX tiles, 2 KB).
pub const A_CHUNK: usize = BLOCK * TILE_K;

/// 64 bf16, one cache line: the unit of [`Aligned`], so every tile row starts on a cache line
/// (a tile row that straddles two lines makes AMX loads about 35 % slower, measured).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([bf16; 32]);

/// A zero-filled bf16 buffer aligned to 64 bytes.
pub struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

impl Aligned {
    pub fn zeros(len: usize) -> Self {
        Aligned { lines: vec![Line([bf16::ZERO; 32]); len.div_ceil(32)], len }
    }

    pub fn as_slice(&self) -> &[bf16] {
        // SAFETY: `lines` holds at least `len` contiguous bf16 (Line is repr(C) without padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [bf16] {
        // SAFETY: as in `as_slice`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// `[n, k]` (n output columns) packed for the kernels: per 16 columns, k-pair rows of 64 bytes
/// holding `(w[j, 2p], w[j, 2p+1])` for its 16 `j`, every k-pair in order (k padded to 32). Zero
/// padding makes `n` a multiple of 32.
pub struct PackedB {
    data: Aligned,
    pub n: usize,
    pub k: usize,
    pub k_tiles: usize,
}

impl PackedB {
    /// Packs a row-major bf16 weight.
    pub fn new(w: &[bf16], n: usize, k: usize) -> Self {
        Self::from_rows(n, k, |j, row| row.copy_from_slice(&w[j * k..(j + 1) * k]))
    }

    /// Packs the matrix whose row `j` (`k` values) `row(j, out)` writes.
    pub fn from_rows(n: usize, k: usize, row: impl Fn(usize, &mut [bf16]) + Sync) -> Self {
        let k_tiles = k.div_ceil(TILE_K);
        let column_tile = k_tiles * TILE * TILE_K;
        let mut data = Aligned::zeros(n.div_ceil(BLOCK) * 2 * column_tile);
        data.as_mut_slice().par_chunks_mut(column_tile).enumerate().for_each_init(
            || vec![bf16::ZERO; k],
            |values, (nt, tile)| {
                for j in 0..TILE.min(n.saturating_sub(nt * TILE)) {
                    row(nt * TILE + j, values);
                    for (kk, &v) in values.iter().enumerate() {
                        tile[(kk / 2) * TILE_K + 2 * j + kk % 2] = v;
                    }
                }
            },
        );
        PackedB { data, n, k, k_tiles }
    }

    /// Column tiles `2·nb` and `2·nb + 1` start here, `stride()` values apart.
    pub fn block(&self, nb: usize) -> &[bf16] {
        &self.data.as_slice()[2 * nb * self.stride()..]
    }

    /// Values between the starts of two column tiles.
    pub fn stride(&self) -> usize {
        self.k_tiles * TILE * TILE_K
    }
}

/// Writes `x` (one row of A, at most `k_tiles · 32` wide) as row `r` of a 32-row block in chunks.
/// One dispatch per row, not per 32-value chunk (attention stores a probability row per key tile).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn store_a_row(block: &mut [bf16], r: usize, x: &[f32]) {
    for (kt, x) in x.chunks(TILE_K).enumerate() {
        let dst = &mut block[kt * A_CHUNK + r * TILE_K..][..x.len()];
        dst.iter_mut().zip(x).for_each(|(d, &v)| *d = round_bf16(v));
    }
}

/// `m` rows of `x` (`k` wide) rounded to bf16 in chunks, padded to 32 rows; blocks are
/// `k_tiles · A_CHUNK` apart.
fn pack_a(x: &[f32], m: usize, k: usize, k_tiles: usize) -> Aligned {
    let mut a = Aligned::zeros(m.div_ceil(BLOCK) * k_tiles * A_CHUNK);
    a.as_mut_slice().par_chunks_mut(k_tiles * A_CHUNK).zip(x[..m * k].par_chunks(BLOCK * k)).for_each(|(a, x)| {
        for (r, x) in x.chunks_exact(k).enumerate() {
            store_a_row(a, r, x);
        }
    });
    a
}

/// A 32×32 block of C over `k_tiles` tiles of k: `c[i, j] = Σ a[i, ·]·b[·, j]`, or `+=` with
/// `accumulate`, with A a block in chunks, B's second column tile `b_stride` after the first, and
/// C's rows `ldc` apart.
pub type Kernel = unsafe fn(
    a: *const bf16,
    b: *const bf16,
    b_stride: usize,
    k_tiles: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
);

/// The kernel of a bf16 path (`None` for the f32 path).
pub fn kernel(path: Path) -> Option<Kernel> {
    match path {
        Path::F32 => None,
        Path::Avx512Bf16 => Some(avx512bf16_block),
        Path::Amx => Some(amx_block),
    }
}

/// Bytes of bf16 activations per pass: each pass's rows of A stay in L2 while the workers sweep
/// every column block over them (one pass over all of A per column block would stream A from L3
/// or DRAM `n / 32` times).
const PANEL_BYTES: usize = 1 << 20;

/// `out[i, j] = Σ_k bf16(x[i, k]) · w[j, k]` for `m` rows of `x`; `out` rows are `out_stride`
/// apart. `kernel` must be one [`kernel`] returned for an available path.
pub fn gemm_xwt(kernel: Kernel, x: &[f32], m: usize, w: &PackedB, out: &mut [f32], out_stride: usize) {
    if m == 0 {
        return;
    }
    assert!(x.len() >= m * w.k && out.len() >= (m - 1) * out_stride + w.n, "gemm_xwt: buffers too short");
    let a = pack_a(x, m, w.k, w.k_tiles);
    let a_block = w.k_tiles * A_CHUNK;
    let mp = m.div_ceil(BLOCK) * BLOCK;
    let panel = (PANEL_BYTES / (2 * a_block)).max(1) * BLOCK;
    // Tasks write disjoint column blocks of `out`, so they share its address.
    let out_addr = out.as_mut_ptr() as usize;
    for p0 in (0..mp).step_by(panel) {
        let p1 = (p0 + panel).min(mp);
        (0..w.n.div_ceil(BLOCK)).into_par_iter().for_each(|nb| {
            let b = w.block(nb);
            let mut c = [0f32; BLOCK * BLOCK];
            let (j0, cols) = (nb * BLOCK, BLOCK.min(w.n - nb * BLOCK));
            for i0 in (p0..p1).step_by(BLOCK) {
                let rows = BLOCK.min(m.saturating_sub(i0));
                let a = a.as_slice()[i0 / BLOCK * a_block..].as_ptr();
                // SAFETY (both calls): the kernel's contract (its path available); `a` is the block
                // of rows from `i0` in chunks, `b` two column tiles of `k_tiles` tiles each. Column block
                // `nb` of `out` belongs to this task only, and a full block is in bounds (asserted
                // above); a partial one goes through the 32×32 scratch `c`.
                if rows == BLOCK && cols == BLOCK {
                    let dst = (out_addr as *mut f32).wrapping_add(i0 * out_stride + j0);
                    unsafe { kernel(a, b.as_ptr(), w.stride(), w.k_tiles, dst, out_stride, false) };
                    continue;
                }
                unsafe { kernel(a, b.as_ptr(), w.stride(), w.k_tiles, c.as_mut_ptr(), BLOCK, false) };
                for i in 0..rows {
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut((out_addr as *mut f32).add((i0 + i) * out_stride + j0), cols)
                    };
                    dst.copy_from_slice(&c[i * BLOCK..i * BLOCK + cols]);
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Whether this thread's tiles hold [`configure_tiles`]'s palette.
    static TILES_CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Loads the one tile palette every AMX kernel uses (eight tiles of 16 rows × 64 bytes) once per
/// thread: `ldtilecfg` and `tilerelease` around every 32×32 block cost 20–30 % of the projection
/// GEMMs (measured), more on attention's short blocks.
#[cfg(target_arch = "x86_64")]
unsafe fn configure_tiles() {
    if TILES_CONFIGURED.get() {
        return;
    }
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..8 {
        cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        cfg[48 + t] = TILE as u8;
    }
    std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) cfg.as_ptr(), options(nostack, readonly));
    TILES_CONFIGURED.set(true);
}

/// AMX: tiles 0–3 accumulate C, 4–5 hold A, 6–7 hold B. Loads are interleaved with the products
/// that need them, which measured 25 % faster than four loads then four products.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_block(
    a: *const bf16,
    b: *const bf16,
    b_stride: usize,
    k_tiles: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    configure_tiles();
    // C's 64 lines are rarely cached (the output of a projection is megabytes): asking for them
    // now lets the stores at the end find them in L1 (projection GEMMs: median 1.29×, measured).
    for r in 0..BLOCK {
        let row = c.add(r * ldc).cast::<i8>();
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(row);
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(row.add(64));
    }
    std::arch::asm!(
        "test {acc}, {acc}",
        "jnz 3f",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "jmp 2f",
        "3:",
        "tileloadd tmm0, [{c0} + {ldc}*1]",
        "tileloadd tmm1, [{c1} + {ldc}*1]",
        "tileloadd tmm2, [{c2} + {ldc}*1]",
        "tileloadd tmm3, [{c3} + {ldc}*1]",
        "2:",
        "tileloadd tmm4, [{a} + {ld}*1]",
        "tileloadd tmm6, [{b0} + {ld}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b1} + {ld}*1]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a} + {ld}*1 + 1024]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a}, 2048",
        "add {b0}, {tb}",
        "add {b1}, {tb}",
        "dec {kt}",
        "jnz 2b",
        "tilestored [{c0} + {ldc}*1], tmm0",
        "tilestored [{c1} + {ldc}*1], tmm1",
        "tilestored [{c2} + {ldc}*1], tmm2",
        "tilestored [{c3} + {ldc}*1], tmm3",
        a = inout(reg) a => _,
        b0 = inout(reg) b => _,
        b1 = inout(reg) b.add(b_stride) => _,
        ld = in(reg) 64usize,
        tb = in(reg) TILE * TILE_K * 2,
        kt = inout(reg) k_tiles => _,
        c0 = in(reg) c,
        c1 = in(reg) c.add(TILE),
        c2 = in(reg) c.add(TILE * ldc),
        c3 = in(reg) c.add(TILE * ldc + TILE),
        ldc = in(reg) ldc * 4,
        acc = in(reg) accumulate as usize,
        options(nostack),
    );
}

/// AVX512-BF16: four passes of 8 rows × 32 columns (16 zmm accumulators); per k-pair, two B
/// loads feed 16 `vdpbf16ps` with one broadcast A pair per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn avx512bf16_block(
    a: *const bf16,
    b: *const bf16,
    b_stride: usize,
    k_tiles: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const ROWS: usize = 8;
    for r0 in (0..BLOCK).step_by(ROWS) {
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = [_mm512_loadu_ps(c.add((r0 + r) * ldc)), _mm512_loadu_ps(c.add((r0 + r) * ldc + TILE))];
            }
        }
        for p in 0..k_tiles * TILE {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * TILE_K).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(b_stride + p * TILE_K).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = a.add(p / TILE * A_CHUNK + (r0 + r) * TILE_K + 2 * (p % TILE)).cast::<i32>().read();
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add((r0 + r) * ldc), acc[0]);
            _mm512_storeu_ps(c.add((r0 + r) * ldc + TILE), acc[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn amx_block(_: *const bf16, _: *const bf16, _: usize, _: usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("AMX exists only on x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn avx512bf16_block(_: *const bf16, _: *const bf16, _: usize, _: usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("AVX512-BF16 exists only on x86_64")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `tdpbf16ps` / `vdpbf16ps` as Intel's pseudo-code defines them (pairs of bf16 products into
    /// f32), on the same packing as the kernels: checks packing and blocking on any CPU.
    pub(crate) unsafe fn emulated_block(
        a: *const bf16,
        b: *const bf16,
        b_stride: usize,
        k_tiles: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        for i in 0..BLOCK {
            for j in 0..BLOCK {
                let bt = b.add((j / TILE) * b_stride);
                let mut acc = if accumulate { *c.add(i * ldc + j) } else { 0.0 };
                for p in 0..k_tiles * TILE {
                    let a = a.add(p / TILE * A_CHUNK + i * TILE_K + 2 * (p % TILE));
                    let b = bt.add(p * TILE_K + 2 * (j % TILE));
                    acc += (*a).to_f32() * (*b).to_f32() + (*a.add(1)).to_f32() * (*b.add(1)).to_f32();
                }
                *c.add(i * ldc + j) = acc;
            }
        }
    }

    #[test]
    fn emulated_kernel_matches_f64_reference() {
        check(emulated_block);
    }

    #[test]
    fn every_available_kernel_matches_f64_reference() {
        for path in Path::ALL {
            match kernel(path) {
                Some(k) if path.available() => check(k),
                Some(_) => eprintln!("{} not available on this CPU: its kernel is not exercised", path.name()),
                None => {}
            }
        }
    }

    /// `accumulate` adds the product to C instead of overwriting it.
    #[test]
    fn every_available_kernel_accumulates() {
        let mut kernels: Vec<Kernel> = vec![emulated_block];
        kernels.extend(Path::ALL.into_iter().filter(|p| p.available()).filter_map(kernel));
        let k = 3 * TILE_K;
        let x: Vec<f32> = (0..BLOCK * k).map(|i| ((i * 29 % 89) as f32 - 44.0) / 31.0).collect();
        let w: Vec<bf16> = (0..BLOCK * k).map(|i| bf16::from_f32(((i * 61 % 83) as f32 - 41.0) / 37.0)).collect();
        let (a, b) = (pack_a(&x, BLOCK, k, 3), PackedB::new(&w, BLOCK, k));
        for kernel in kernels {
            let ldc = BLOCK + 5;
            let (mut product, mut sum) = (vec![0f32; BLOCK * ldc], vec![0f32; BLOCK * ldc]);
            let start: Vec<f32> = (0..BLOCK * ldc).map(|i| (i % 7) as f32 - 3.0).collect();
            sum.copy_from_slice(&start);
            // SAFETY: the kernel's path is available; one block of 3 chunks, two column tiles of 3
            // tiles, 32 rows of `ldc` ≥ 32.
            unsafe {
                kernel(a.as_slice().as_ptr(), b.block(0).as_ptr(), b.stride(), 3, product.as_mut_ptr(), ldc, false);
                kernel(a.as_slice().as_ptr(), b.block(0).as_ptr(), b.stride(), 3, sum.as_mut_ptr(), ldc, true);
            }
            for i in 0..BLOCK {
                for j in 0..BLOCK {
                    let (got, want) = (sum[i * ldc + j], start[i * ldc + j] + product[i * ldc + j]);
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "[{i},{j}]: {got} vs {want}");
                }
            }
        }
    }

    /// Odd shapes (M, N, K not multiples of the tile, M = 1, K not a multiple of 32) against an f64
    /// reference on the same bf16-rounded inputs; 1100 rows of K = 1000 span three L2 panels.
    fn check(kernel: Kernel) {
        for &(m, n, k) in
            &[(1, 1, 1), (1, 33, 70), (17, 45, 31), (33, 64, 96), (70, 19, 129), (64, 96, 896), (1100, 40, 1000)]
        {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
            let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 41.0)).collect();
            let stride = n + 3;
            let mut out = vec![f32::NAN; m * stride];
            gemm_xwt(kernel, &x, m, &PackedB::new(&w, n, k), &mut out, stride);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k).map(|t| bf16::from_f32(x[i * k + t]).to_f64() * w[j * k + t].to_f64()).sum();
                    let got = out[i * stride + j] as f64;
                    assert!((got - r).abs() <= 1e-4 * (1.0 + r.abs()), "({m},{n},{k})[{i},{j}]: {got} vs {r}");
                }
                assert!(out[i * stride + n..(i + 1) * stride].iter().all(|v| v.is_nan()), "wrote past n");
            }
        }
    }
}
