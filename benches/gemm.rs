//! bf16 GEMM benchmark on the projection shapes of the engines, and a STREAM-like triad.
//!
//! `cargo bench --bench gemm [-- --shapes 512x960x576,4096x3072x576 --repeats 5] [-- --triad] [-- --peak]
//!  [-- --decode 1,4,16 [--dot pairs|avx512|avx2|portable]]`
//!
//! Per `MxNxK` shape (M activation rows, N output features, K input features) it times every bf16
//! path of `Linear::forward` this CPU has on the same inputs (`fastkv::cpu::isa::Path`: `amx`,
//! `avx512bf16`, and `f32`, the fallback that widens the weight for the `gemm` crate), and prints
//! one line per path, `path M N K GFLOP/s` (best of `--repeats`), which
//! benches/peers/gemm_vs_torch.py reads. `--triad` prints the memory bandwidth `a = b + s·c` reaches
//! on all rayon threads, the ceiling of weight-bound decode; `--peak` the rate of each bf16 kernel on
//! operands in L1, the ceiling of the GEMMs. `--decode M,...` times the decode products
//! (`cpu::gemv::products`, one activation row per request of a batch) of every dot this CPU has, over
//! a model's worth of bf16 weights (SmolLM2-135M's layers, 269 MB: nothing stays in cache), and prints
//! the weight bytes read per second beside the triad, the ceiling of a weight-bound decode step.

use std::time::Instant;

use fastkv::cpu::bf16_gemm::{self, PackedB};
use fastkv::cpu::isa::{self, Path};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// SmolLM2-135M: qkv, o, gate|up and down projections (N, K), at M = 512..4096.
const SMOLLM2: [(usize, usize); 4] = [(960, 576), (576, 576), (3072, 576), (576, 1536)];

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Best wall time of `repeats` runs of `f`, after one warm-up run.
fn best(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn bench_shape(m: usize, n: usize, k: usize, repeats: usize) {
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0).collect();
    let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 400.0)).collect();
    let mut out = vec![0f32; m * n];
    let gflops = |secs: f64| 2.0 * (m * n * k) as f64 / secs / 1e9;
    for path in Path::ALL.into_iter().filter(|p| p.available()) {
        if let Some(kernel) = bf16_gemm::kernel(path) {
            let packed = PackedB::new(&w, n, k);
            let t = best(repeats, || bf16_gemm::gemm_xwt(kernel, &x, m, &packed, &mut out, n));
            println!("{} {m} {n} {k} {:.1}", path.name(), gflops(t));
        }
    }
    let mut wide = vec![0f32; n * k];
    let t = best(repeats, || {
        wide.par_chunks_mut(k).zip(w.par_chunks(k)).for_each(|(o, w)| w.convert_to_f32_slice(o));
        fastkv::hostmath::gemm_f32(m, n, k, &mut out, n, false, (&x, k, 1), (&wide, 1, k), 1.0, true);
    });
    println!("f32 {m} {n} {k} {:.1}", gflops(t));
}

/// STREAM's triad on three 64 MiB f32 arrays, counting 3 arrays of traffic per pass (as STREAM does).
fn triad(repeats: usize) {
    let len = 16 << 20;
    let (b, c) = (vec![1f32; len], vec![2f32; len]);
    let mut a = vec![0f32; len];
    let t = best(repeats, || {
        a.par_chunks_mut(1 << 16).zip(b.par_chunks(1 << 16).zip(c.par_chunks(1 << 16))).for_each(|(a, (b, c))| {
            for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                *a = b + 3.0 * c;
            }
        })
    });
    println!("triad {:.1} GB/s on {} threads", 3.0 * 4.0 * len as f64 / t / 1e9, rayon::current_num_threads());
}

/// Each bf16 kernel on one 32×32 block over 8 k tiles, its 32 KB of operands in L1, on one thread
/// and on every thread at once: the ceiling a GEMM of that path reaches when memory costs nothing.
fn peak(repeats: usize) {
    const K_TILES: usize = 8;
    const CALLS: usize = 20_000;
    for path in Path::ALL.into_iter().filter(|p| p.available()) {
        let Some(kernel) = bf16_gemm::kernel(path) else { continue };
        let run = || {
            let a = bf16_gemm::Aligned::zeros(K_TILES * bf16_gemm::A_CHUNK);
            let b = PackedB::new(&vec![bf16::ONE; 32 * K_TILES * 32], 32, K_TILES * 32);
            let mut c = vec![0f32; 32 * 32];
            best(repeats, || {
                for _ in 0..CALLS {
                    // SAFETY: the path is available; `a` is one block of K_TILES chunks, `b` two column
                    // tiles of K_TILES tiles, `c` 32 rows of 32.
                    unsafe {
                        kernel(
                            a.as_slice().as_ptr(),
                            b.block(0).as_ptr(),
                            b.stride(),
                            K_TILES,
                            c.as_mut_ptr(),
                            32,
                            false,
                        )
                    };
                }
            })
        };
        let flops = (2 * 32 * 32 * 32 * K_TILES * CALLS) as f64;
        let threads = rayon::current_num_threads();
        let one = run();
        let slowest = (0..threads).into_par_iter().map(|_| run()).reduce(|| 0.0, f64::max);
        println!(
            "peak {}: {:.0} GFLOP/s on 1 thread, {:.0} on {threads} threads",
            path.name(),
            flops / one / 1e9,
            threads as f64 * flops / slowest / 1e9
        );
    }
}

/// Weight bytes per second of a decode step's products over all of SmolLM2-135M's weights, per dot
/// and batch size `m`, beside the triad.
fn decode(batches: &[usize], repeats: usize) {
    use fastkv::cpu::gemv::{self, Dot, Weights};
    let mats: Vec<(usize, usize)> = (0..30).flat_map(|_| SMOLLM2).chain([(49152, 576)]).collect();
    let weights: Vec<Vec<bf16>> = mats
        .iter()
        .map(|&(n, k)| (0..n * k).map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 400.0)).collect())
        .collect();
    let bytes: usize = weights.iter().map(|w| 2 * w.len()).sum();
    let only = arg("--dot");
    for dot in Dot::available()
        .into_iter()
        .filter(|d| only.as_ref().is_none_or(|o| format!("{d:?}").to_lowercase().contains(o)))
    {
        for &m in batches {
            let x: Vec<f32> = (0..m * 1536).map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0).collect();
            let mut out = vec![0f32; m * 49152];
            let t = best(repeats, || {
                for (&(n, k), w) in mats.iter().zip(&weights) {
                    gemv::products(dot, &x[..m * k], m, Weights::Bf16(w), k, &mut out[..m * n]);
                }
            });
            println!("decode {dot:?} m={m}: {:.1} GB/s of weights, {:.2} ms per step", bytes as f64 / t / 1e9, t * 1e3);
        }
    }
    triad(repeats);
}

fn main() {
    let repeats = arg("--repeats").map_or(5, |r| r.parse().expect("--repeats takes a count"));
    if let Some(batches) = arg("--decode") {
        let batches: Vec<usize> = batches.split(',').map(|m| m.parse().expect("--decode takes M,...")).collect();
        return decode(&batches, repeats);
    }
    if std::env::args().any(|a| a == "--triad") {
        return triad(repeats);
    }
    if std::env::args().any(|a| a == "--peak") {
        return peak(repeats);
    }
    eprintln!("cpu path: {}", isa::describe());
    let shapes: Vec<(usize, usize, usize)> = match arg("--shapes") {
        Some(s) => s
            .split(',')
            .map(|s| {
                let d: Vec<usize> = s.split('x').map(|v| v.parse().expect("--shapes takes MxNxK,...")).collect();
                assert!(d.len() == 3 && d.iter().all(|&v| v > 0), "--shapes takes MxNxK,... (positive)");
                (d[0], d[1], d[2])
            })
            .collect(),
        None => [512, 1024, 2048, 4096].iter().flat_map(|&m| SMOLLM2.map(|(n, k)| (m, n, k))).collect(),
    };
    for (m, n, k) in shapes {
        bench_shape(m, n, k, repeats);
    }
}
