//! Kernel benchmark on one GPU, Llama-3.1-8B shapes (32 query / 8 KV heads, D = 128, W = 8, pooling 7):
//! causal flash attention at L = 32K and 128K (TFLOP/s against the bf16 dense peak), decode attention
//! over a 128K cache (TB/s against HBM), and FastKV's selection path at L = 128K (window scores from
//! the attention's lse, pooling, per-KV-head top-k of 20 %, TSP top-k, K/V and hidden-row gathers) as
//! a share of that layer's attention time. Writes JSON to `$FASTKV_BENCH_JSON` (default
//! target/kernels-bench.json) and prints it. Without a GPU: prints `skipped: no CUDA device`.

use std::time::Instant;

#[path = "../tests/common/cuda.rs"]
mod cuda;

use cuda::Allocating;
use cudarc::driver::CudaSlice;
use fastkv::cuda::{decode_workspace_len, Gpu, LayerKv};
use fastkv::select::{Pool, Shape};
use fastkv::Error;
use half::bf16;
use serde_json::json;

const H: usize = 32;
const HK: usize = 8;
const D: usize = 128;
const W: usize = 8;
/// H200 limits the figures are set beside.
const PEAK_BF16_TFLOPS: f64 = 989.0;
const PEAK_HBM_TBS: f64 = 4.8;

/// Deterministic values in [−1, 1) without a slow host RNG over gigabytes.
fn values(dev: &Gpu, n: usize, seed: u64) -> CudaSlice<bf16> {
    let host: Vec<bf16> = (0..n as u64)
        .map(|i| {
            let x = (i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            bf16::from_f32(x as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect();
    dev.upload(&host).expect("upload")
}

/// Mean seconds of `f` over `iters` runs after one warm-up, synchronised.
fn time(dev: &Gpu, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    dev.synchronize().expect("sync");
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().expect("sync");
    t.elapsed().as_secs_f64() / iters as f64
}

/// Seconds and TFLOP/s of causal flash attention at sequence length `l`.
fn attention(dev: &Gpu, l: usize, iters: usize) -> (f64, f64) {
    let (q, k, v) = (values(dev, l * H * D, 1), values(dev, l * HK * D, 2), values(dev, l * HK * D, 3));
    let s = time(dev, iters, || drop(dev.flash_attention(&q, &k, &v, H, HK, D).expect("flash attention")));
    let flops = 4.0 * (l as f64) * (l as f64 + 1.0) / 2.0 * (H * D) as f64; // causal: Q·Kᵀ + P·V
    (s, flops / s / 1e12)
}

fn main() {
    let dev = match Gpu::new(0) {
        Ok(d) => d,
        Err(Error::NoDevice { reason, .. }) => return cuda::no_cuda_device(&reason),
        Err(e) => panic!("{e}"),
    };
    let (t32, tflops32) = attention(&dev, 32 * 1024, 5);
    let l = 128 * 1024;
    let (t128, tflops128) = attention(&dev, l, 2);

    // Decode over a 128K cache: K and V of every KV head read once.
    let mut cache = LayerKv {
        k: values(&dev, HK * l * D, 5),
        v: values(&dev, HK * l * D, 6),
        pos: dev.zeros(HK * l).expect("alloc"),
        len: dev.zeros(1).expect("alloc"),
        n_kv_heads: HK,
        capacity: l,
        head_dim: D,
    };
    dev.write(&[l as u32], &mut cache.len).expect("cache length");
    let q1 = values(&dev, H * D, 4);
    let mut out = dev.zeros::<bf16>(H * D).expect("alloc");
    let mut workspace = dev.zeros::<f32>(decode_workspace_len(H, l, D).expect("workspace")).expect("alloc");
    let t_dec = time(&dev, 20, || {
        dev.decode_attention_into(&q1, &cache, H, None, &mut out, &mut workspace).expect("decode");
    });
    let dec_tbs = (2 * HK * l * D * 2) as f64 / t_dec / 1e12;
    drop((q1, cache, out, workspace));

    // The selection path of one FastKV layer at L = 128K (KV budget and TSP length 20 %).
    let shape = Shape { n_heads: H, n_kv_heads: HK, head_dim: D, seq_len: l, window: W };
    let n = l - W;
    let k_sel = n / 5;
    let (q, k, v) = (values(&dev, l * H * D, 7), values(&dev, l * HK * D, 8), values(&dev, l * HK * D, 9));
    let (_, lse) = dev.flash_attention(&q, &k, &v, H, HK, D).expect("flash attention");
    drop((q, k, v));
    let (qw, keys, vals) = (values(&dev, H * W * D, 10), values(&dev, HK * l * D, 11), values(&dev, HK * l * D, 13));
    let hidden = values(&dev, l * 4096, 12);
    let mut parts = [0.0f64; 3];
    let t_sel = time(&dev, 5, || {
        let t = Instant::now();
        let s = dev.window_scores(&qw, &keys, Some(&lse), &shape).expect("window scores");
        let a = dev.pool_group(&s, H, HK, n, 7, Pool::Max).expect("pool");
        dev.synchronize().expect("sync");
        parts[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let idx = dev.top_k(&a, HK, n, k_sel, W).expect("kv top-k");
        let total = dev.sum_heads(&a, HK, n).expect("sum heads");
        let tsp = dev.top_k(&total, 1, n, k_sel, W).expect("tsp top-k");
        dev.synchronize().expect("sync");
        parts[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let kc = dev.gather(&keys, HK, l, D, &idx, k_sel + W).expect("gather K");
        let vc = dev.gather(&vals, HK, l, D, &idx, k_sel + W).expect("gather V");
        let hc = dev.gather(&hidden, 1, l, 4096, &tsp, k_sel + W).expect("gather hidden");
        dev.synchronize().expect("sync");
        parts[2] += t.elapsed().as_secs_f64();
        drop((kc, vc, hc));
    });
    let per = |x: f64| x / 6.0 * 1e3; // one warm-up + 5 timed runs accumulated, in ms
    let report = json!({
        "flash_attention": {
            "L32K": {"ms": t32 * 1e3, "tflops": tflops32, "fraction_of_bf16_peak": tflops32 / PEAK_BF16_TFLOPS},
            "L128K": {"ms": t128 * 1e3, "tflops": tflops128, "fraction_of_bf16_peak": tflops128 / PEAK_BF16_TFLOPS},
        },
        "decode_attention_L128K": {"ms": t_dec * 1e3, "tbs": dec_tbs, "fraction_of_hbm_peak": dec_tbs / PEAK_HBM_TBS},
        "selection_L128K": {
            "ms": t_sel * 1e3,
            "scores_pool_ms": per(parts[0]),
            "top_k_ms": per(parts[1]),
            "gathers_ms": per(parts[2]),
            "fraction_of_layer_attention": t_sel / t128,
        },
        "peaks": {"bf16_tflops": PEAK_BF16_TFLOPS, "hbm_tbs": PEAK_HBM_TBS},
    });
    let text = serde_json::to_string_pretty(&report).expect("json");
    println!("{text}");
    let path = std::env::var("FASTKV_BENCH_JSON").unwrap_or_else(|_| "target/kernels-bench.json".into());
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{path}: {e}"));
}
