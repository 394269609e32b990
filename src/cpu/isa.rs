//! Which of the CPU's units the CPU backend computes with, found once at run time so one binary
//! takes the fastest path on every x86-64 (and aarch64) it meets.
//!
//! The path decides the bf16 products — projections and prefill attention: AMX tiles, else
//! AVX512-BF16 `vdpbf16ps` where it outruns f32 (AMD), else widening to f32 for the `gemm` crate. Element-wise kernels are
//! compiled for AVX-512, AVX2 and NEON and pick their own ISA (`multiversion`); the hand-written
//! decode kernels (the bf16 dot, decode attention) pick theirs by [`Simd`].
//! `FASTKV_CPU=<path>` caps the path at a lower one, to compare paths on one machine or to take
//! the f32 path (`f32`), which is exact against an f32 reference.

use std::sync::OnceLock;

/// The bf16 product path, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// bf16 weights widened to f32 for the `gemm` crate (which uses AVX-512, AVX2 or NEON itself).
    F32,
    /// `vdpbf16ps`: bf16 pairs into f32 lanes (Zen 4 and later, Sapphire Rapids and later).
    Avx512Bf16,
    /// AMX-BF16 tiles (`tdpbf16ps`, Sapphire Rapids and later).
    Amx,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::F32, Path::Avx512Bf16, Path::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Path::F32 => "f32",
            Path::Avx512Bf16 => "avx512bf16",
            Path::Amx => "amx",
        }
    }

    /// Whether this CPU (and OS) can run the path.
    pub fn available(self) -> bool {
        match self {
            Path::F32 => true,
            Path::Avx512Bf16 => avx512bf16(),
            Path::Amx => amx(),
        }
    }
}

/// The path in use: the fastest available — AVX512-BF16 only where [`bf16_dot_outruns_fma`] —
/// capped by `FASTKV_CPU` at any available path (an unknown name is ignored with a warning, so a
/// typo never changes results silently).
pub fn path() -> Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        let highest = Path::ALL.into_iter().rev().find(|p| p.available()).unwrap_or(Path::F32);
        let fastest = if highest == Path::Avx512Bf16 && !bf16_dot_outruns_fma() { Path::F32 } else { highest };
        match std::env::var("FASTKV_CPU") {
            Ok(name) => match Path::ALL.into_iter().find(|p| p.name() == name) {
                Some(cap) => cap.min(highest),
                None => {
                    eprintln!(
                        "warning: FASTKV_CPU={name} is not one of f32, avx512bf16, amx; using {}",
                        fastest.name()
                    );
                    fastest
                }
            },
            Err(_) => fastest,
        }
    })
}

/// Whether `vdpbf16ps` (two bf16 products per f32 lane) outruns f32 FMA: on AMD Zen 4 it does
/// twice an FMA's work per cycle; on Intel cores it issues at half the FMA rate (Sapphire Rapids:
/// 61 vs 123 GFLOP/s per core in bare loops, and with AMX capped away the f32 path prefilled 2K
/// tokens 3–21 % faster; a Xeon without AMX, lscpu model 207: 88 vs 175), so there f32 is faster
/// as well as exact.
#[cfg(target_arch = "x86_64")]
fn bf16_dot_outruns_fma() -> bool {
    // CPUID leaf 0 spells the vendor in EBX, EDX, ECX: "Genu" "ineI" "ntel".
    let id = std::arch::x86_64::__cpuid(0);
    (id.ebx, id.edx, id.ecx)
        != (u32::from_le_bytes(*b"Genu"), u32::from_le_bytes(*b"ineI"), u32::from_le_bytes(*b"ntel"))
}

/// The vector instructions of the hand-written decode kernels (`gemv`'s widening dot, decode
/// attention in `kv_cache`): their AVX-512 or AVX2+FMA intrinsics, or plain Rust.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Avx2,
    Portable,
}

impl Simd {
    /// The kinds this CPU runs, widest first (tests check each against a reference).
    pub fn available() -> impl Iterator<Item = Simd> {
        [Simd::Avx512, Simd::Avx2, Simd::Portable].into_iter().filter(|s| match s {
            Simd::Avx512 => has_avx512f(),
            Simd::Avx2 => has_avx2_fma(),
            Simd::Portable => true,
        })
    }

    /// The widest this CPU runs.
    pub fn best() -> Simd {
        Simd::available().next().unwrap_or(Simd::Portable)
    }
}

/// One line for benchmarks and logs: the path and the CPU's vector units.
pub fn describe() -> String {
    let units: Vec<&str> = [
        ("amx-bf16", amx()),
        ("avx512-bf16", avx512bf16()),
        ("avx512f", has_avx512f()),
        ("avx2+fma", has_avx2_fma()),
        ("neon", cfg!(target_arch = "aarch64")),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    format!("{} (CPU has {})", path().name(), if units.is_empty() { "none of them".into() } else { units.join(", ") })
}

#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn avx512bf16() -> bool {
    std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512bw")
}

/// AMX-BF16 in CPUID, and Linux's permission for the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`, required before the first tile instruction; refused ⇒ not available).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // CPUID leaf 7, EDX bit 24 AMX-TILE and bit 22 AMX-BF16 (`is_x86_feature_detected!` has
        // no stable name for them yet).
        if __cpuid(0).eax < 7 || __cpuid_count(7, 0).edx & (1 << 24 | 1 << 22) != 1 << 24 | 1 << 22 {
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
    })
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn amx() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
mod other {
    pub fn has_avx512f() -> bool {
        false
    }
    pub fn has_avx2_fma() -> bool {
        false
    }
    pub fn avx512bf16() -> bool {
        false
    }
    pub fn amx() -> bool {
        false
    }
    pub fn bf16_dot_outruns_fma() -> bool {
        false
    }
}
#[cfg(not(target_arch = "x86_64"))]
use other::*;
