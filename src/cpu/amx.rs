//! bf16 GEMM on Intel AMX tiles (`tdpbf16ps`, f32 accumulation), used for prefill products when
//! the CPU has AMX-BF16 and Linux grants the tile state; everything else keeps the `gemm` crate.
//! Why our own kernel rather than oneDNN: no system library or C toolchain at build time, and one
//! binary that falls back cleanly. The kernel is a 2×2-tile register block (two A and two B tile
//! loads per four `tdpbf16ps`); its speed against oneDNN is still to be measured on an AMX CPU
//! (`benches/peers/gemm_vs_torch.py`). As in PyTorch's bf16 matmul, the activations (A operand)
//! are rounded to bf16 before the product.

use std::sync::OnceLock;

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Tile geometry: 16 rows of 64 bytes (32 bf16 of A, 16 k-pairs × 16 columns of B, 16 f32 of C).
const TILE: usize = 16;
const TILE_K: usize = 32;
/// Each kernel call computes a 32×32 block of C in four tiles.
const BLOCK: usize = 2 * TILE;

/// Whether AMX-BF16 is present and usable, asked once: CPUID leaf 7 (EDX bit 24 AMX-TILE, bit 22
/// AMX-BF16), then `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, which Linux requires
/// before the first tile instruction (refused ⇒ we fall back).
/// Whether prefill GEMMs use AMX: the hardware must have it and the user must opt in with `FASTKV_AMX=1`,
/// because the kernel has only been checked in emulation so far (the build machines have no AMX).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("FASTKV_AMX").is_some_and(|v| v == "1") && available())
}

pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 {
        return false;
    }
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: a plain Linux syscall; it only changes this process's permitted xsave features.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// A `[n, k]` row-major bf16 weight repacked for B tiles: blocks of 16 output rows × 32 k, each a
/// 16×64-byte tile whose row `r` holds the pairs `(w[j, 2r], w[j, 2r+1])` for its 16 `j`. Zero
/// padding makes `n` a multiple of 32 and `k` of 32. Costs one more bf16 copy of the weight.
pub struct PackedB {
    data: Vec<bf16>,
    n: usize,
    k: usize,
    k_tiles: usize,
}

impl PackedB {
    pub fn new(w: &[bf16], n: usize, k: usize) -> Self {
        let k_tiles = k.div_ceil(TILE_K);
        let n_tiles = n.div_ceil(BLOCK) * 2;
        let tile_len = TILE * TILE_K;
        let mut data = vec![bf16::ZERO; n_tiles * k_tiles * tile_len];
        data.par_chunks_mut(k_tiles * tile_len).enumerate().for_each(|(nt, tiles)| {
            for j in 0..TILE {
                let row = nt * TILE + j;
                if row >= n {
                    break;
                }
                for (kk, &v) in w[row * k..(row + 1) * k].iter().enumerate() {
                    let (kt, kin) = (kk / TILE_K, kk % TILE_K);
                    tiles[kt * tile_len + (kin / 2) * TILE_K + 2 * j + kin % 2] = v;
                }
            }
        });
        PackedB { data, n, k, k_tiles }
    }
}

/// `out[i, j] = Σ_k bf16(x[i, k]) · w[j, k]` for `m` rows of `x`; `out` rows are `out_stride` apart.
/// Call only when [`available`] returned true.
pub fn gemm_xwt(x: &[f32], m: usize, w: &PackedB, out: &mut [f32], out_stride: usize) {
    gemm_with(kernel, x, m, w, out, out_stride)
}

/// A 32×32 block kernel: `(a, lda, b, k_tiles, c)` as [`kernel`] takes them.
type Kernel = unsafe fn(*const bf16, usize, *const bf16, usize, *mut f32);

/// Bytes of bf16 activations per pass: each pass's rows of A stay in L2 while the workers sweep
/// every column block over them (one pass over all of A per column block would stream A from L3
/// or DRAM `n / 32` times).
const PANEL_BYTES: usize = 1 << 20;

fn gemm_with(kernel: Kernel, x: &[f32], m: usize, w: &PackedB, out: &mut [f32], out_stride: usize) {
    if m == 0 {
        return;
    }
    let (k, kp) = (w.k, w.k_tiles * TILE_K);
    assert!(x.len() >= m * k && out.len() >= (m - 1) * out_stride + w.n, "gemm_xwt: buffers too short");
    let mp = m.div_ceil(BLOCK) * BLOCK;
    let mut a = vec![bf16::ZERO; mp * kp];
    a.par_chunks_mut(kp).zip(x[..m * k].par_chunks(k)).for_each(|(a, x)| a[..k].convert_from_f32_slice(x));
    let tile_len = TILE * TILE_K;
    let panel = (PANEL_BYTES / (2 * kp) / BLOCK).max(1) * BLOCK;
    // Tasks write disjoint column blocks of `out`, so they share its address.
    let out_addr = out.as_mut_ptr() as usize;
    for p0 in (0..mp).step_by(panel) {
        let p1 = (p0 + panel).min(mp);
        (0..w.n.div_ceil(BLOCK)).into_par_iter().for_each(|nb| {
            let b = &w.data[2 * nb * w.k_tiles * tile_len..];
            let mut c = [0f32; BLOCK * BLOCK];
            let (j0, cols) = (nb * BLOCK, BLOCK.min(w.n - nb * BLOCK));
            for i0 in (p0..p1).step_by(BLOCK) {
                // SAFETY: the kernel's contract (AMX enabled for the real one); `a` has 32 rows of
                // `kp` from row `i0`, `b` two column tiles of `k_tiles` tiles each, `c` is 32×32.
                unsafe { kernel(a[i0 * kp..].as_ptr(), kp, b.as_ptr(), w.k_tiles, c.as_mut_ptr()) };
                for i in 0..BLOCK.min(m.saturating_sub(i0)) {
                    // SAFETY: in bounds (asserted above); column block `nb` belongs to this task only.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut((out_addr as *mut f32).add((i0 + i) * out_stride + j0), cols)
                    };
                    dst.copy_from_slice(&c[i * BLOCK..i * BLOCK + cols]);
                }
            }
        });
    }
}

/// One 32×32 block of C over all `k_tiles`: tiles 0–3 accumulate C, 4–5 hold A, 6–7 hold B.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel(a: *const bf16, lda: usize, b: *const bf16, k_tiles: usize, c: *mut f32) {
    // Palette 1, eight tiles of 16 rows × 64 bytes. Passed through memory the asm reads.
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..8 {
        cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        cfg[48 + t] = TILE as u8;
    }
    let tile_bytes = TILE * TILE_K * 2;
    std::arch::asm!(
        "ldtilecfg [{cfg}]",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {lda}*1]",
        "tileloadd tmm5, [{a1} + {lda}*1]",
        "tileloadd tmm6, [{b0} + {ldb}*1]",
        "tileloadd tmm7, [{b1} + {ldb}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b0}, {tb}",
        "add {b1}, {tb}",
        "dec {kt}",
        "jnz 2b",
        "tilestored [{c0} + {ldc}*1], tmm0",
        "tilestored [{c1} + {ldc}*1], tmm1",
        "tilestored [{c2} + {ldc}*1], tmm2",
        "tilestored [{c3} + {ldc}*1], tmm3",
        "tilerelease",
        cfg = in(reg) cfg.as_ptr(),
        a0 = inout(reg) a => _,
        a1 = inout(reg) a.add(TILE * lda) => _,
        lda = in(reg) lda * 2,
        b0 = inout(reg) b => _,
        b1 = inout(reg) b.add(k_tiles * TILE * TILE_K) => _,
        ldb = in(reg) 64usize,
        tb = in(reg) tile_bytes,
        kt = inout(reg) k_tiles => _,
        c0 = in(reg) c,
        c1 = in(reg) c.add(TILE),
        c2 = in(reg) c.add(TILE * BLOCK),
        c3 = in(reg) c.add(TILE * BLOCK + TILE),
        ldc = in(reg) BLOCK * 4,
        options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: *const bf16, _: usize, _: *const bf16, _: usize, _: *mut f32) {
    unreachable!("AMX exists only on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tdpbf16ps` as Intel's pseudo-code defines it, on the same tiles as [`kernel`]: checks the
    /// packing and blocking on any CPU.
    unsafe fn kernel_emulated(a: *const bf16, lda: usize, b: *const bf16, k_tiles: usize, c: *mut f32) {
        for (ti, tj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let bt = b.add(tj * k_tiles * TILE * TILE_K);
            for i in 0..TILE {
                for j in 0..TILE {
                    let mut acc = 0f32;
                    for kt in 0..k_tiles {
                        for p in 0..TILE {
                            let a = a.add((ti * TILE + i) * lda + kt * TILE_K + 2 * p);
                            let b = bt.add(kt * TILE * TILE_K + p * TILE_K + 2 * j);
                            acc += (*a).to_f32() * (*b).to_f32() + (*a.add(1)).to_f32() * (*b.add(1)).to_f32();
                        }
                    }
                    *c.add((ti * TILE + i) * BLOCK + tj * TILE + j) = acc;
                }
            }
        }
    }

    #[test]
    fn emulated_tiles_match_f64_reference() {
        check(kernel_emulated);
    }

    #[test]
    fn amx_matches_f64_reference() {
        if !available() {
            eprintln!("AMX-BF16 not available on this CPU: AMX kernel not exercised");
            return;
        }
        check(kernel);
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
            gemm_with(kernel, &x, m, &PackedB::new(&w, n, k), &mut out, stride);
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
