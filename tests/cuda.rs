//! The CUDA kernels of plugin/ against the host reference: `fastkv::select` for the selection path
//! (bit-exact where the kernels promise it: pooling, TSP, KV index sets), `fastkv::rope`,
//! `fastkv::cpu::kernels` and `fastkv::cpu::attention` within f16/bf16 tolerances. Inputs are
//! rounded to the device type first, so both sides see the same values. Without a GPU every test
//! prints `skipped: no CUDA device` and returns (fails, with `FASTKV_REQUIRE_GPU=1`).
#![cfg(feature = "cuda")]

mod common;
#[path = "common/cuda.rs"]
mod cuda_common;

use cuda_common::Allocating;
use fastkv::cpu::attention::{attention, Heads, KvView};
use fastkv::cpu::kernels::{rms_norm, swiglu};
use fastkv::cuda::{
    decode_batch_workspace_len, AttentionInputs, CacheRef, Element, Gather, Gpu, LayerKv, SlidingWindow,
};
use fastkv::rope::Rope;
use fastkv::sampling::argmax;
use fastkv::select::{self, Pool, Shape};
use fastkv::spec::{Arch, ModelSpec, RopeScaling};
use fastkv::Error;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn device() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(d) => Some(d),
        Err(Error::NoDevice { reason, .. }) => {
            cuda_common::no_cuda_device(&reason);
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// f16/bf16 with conversions and the tolerance of one rounding of a value of magnitude ~1.
trait Half: Element {
    const EPS: f32;
    fn of(x: f32) -> Self;
    fn f32(self) -> f32;
}
impl Half for f16 {
    const EPS: f32 = 1.0 / 1024.0;
    fn of(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
}
impl Half for bf16 {
    const EPS: f32 = 1.0 / 128.0;
    fn of(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// `n` uniform values in [−scale, scale) rounded to T: (device values, the same as f32).
fn random<T: Half>(rng: &mut StdRng, n: usize, scale: f32) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = (0..n).map(|_| T::of(rng.random_range(-scale..scale))).collect();
    let f = t.iter().map(|x| x.f32()).collect();
    (t, f)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w}");
    }
}

fn to_f32<T: Half>(v: Vec<T>) -> Vec<f32> {
    v.into_iter().map(Half::f32).collect()
}

/// `[S, Hk, D]` → `[Hk, S, D]`.
fn head_major(x: &[f32], s: usize, hk: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for j in 0..s {
        for g in 0..hk {
            out[(g * s + j) * d..][..d].copy_from_slice(&x[(j * hk + g) * d..][..d]);
        }
    }
    out
}

fn check_window_scores<T: Half>(dev: &Gpu, shape: Shape, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w } = shape;
    let (q, qf) = random::<T>(&mut rng, h * w * d, 2.0);
    let (k, kf) = random::<T>(&mut rng, hk * s * d, 2.0);
    let want = select::window_scores(&qf, &kf, &shape).unwrap();
    let got = dev.window_scores(&dev.upload(&q).unwrap(), &dev.upload(&k).unwrap(), None, &shape).unwrap();
    let got = dev.download(&got).unwrap();
    assert_close(&format!("window scores {shape:?}"), &got[..want.len()], &want, 1e-5, 1e-3);
}

#[test]
fn window_scores_match_select() {
    let Some(dev) = device() else { return };
    let shape = |h, hk, d, s, w| Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w };
    for (i, sh) in [
        shape(8, 2, 128, 300, 8),
        shape(32, 8, 128, 2000, 8),
        shape(4, 4, 64, 9, 8),     // one candidate
        shape(4, 2, 128, 8, 8),    // S = W: nothing to score
        shape(6, 2, 128, 515, 32), // G = 3, partial key tiles
    ]
    .into_iter()
    .enumerate()
    {
        check_window_scores::<bf16>(&dev, sh, i as u64);
        check_window_scores::<f16>(&dev, sh, 100 + i as u64);
    }
    // A window longer than the sequence (S < W) is an error, not a launch.
    let (q, k) = (dev.zeros::<bf16>(4 * 16 * 128).unwrap(), dev.zeros::<bf16>(2 * 8 * 128).unwrap());
    assert!(dev.window_scores(&q, &k, None, &shape(4, 2, 128, 8, 16)).is_err());
}

/// The normaliser of the attention kernel (its lse) gives the same window scores in one pass.
#[test]
fn window_scores_reuse_attention_lse() {
    let Some(dev) = device() else { return };
    let (h, hk, d, s, w) = (8, 2, 128, 777, 8);
    let mut rng = StdRng::seed_from_u64(7);
    let (q, qf) = random::<bf16>(&mut rng, s * h * d, 1.0);
    let (k, kf) = random::<bf16>(&mut rng, s * hk * d, 1.0);
    let (v, _) = random::<bf16>(&mut rng, s * hk * d, 1.0);
    let (k_dev, v_dev) = (dev.upload(&k).unwrap(), dev.upload(&v).unwrap());
    let (_, lse) = dev.flash_attention(&dev.upload(&q).unwrap(), &k_dev, &v_dev, h, hk, d).unwrap();
    // Window queries [H, W, D] and keys [Hk, S, D] for the scorer and the reference.
    let mut qw = Vec::with_capacity(h * w * d);
    let mut qwf = Vec::with_capacity(h * w * d);
    for head in 0..h {
        for t in s - w..s {
            qw.extend_from_slice(&q[(t * h + head) * d..][..d]);
            qwf.extend_from_slice(&qf[(t * h + head) * d..][..d]);
        }
    }
    let keys = head_major(&kf, s, hk, d);
    let keys_t: Vec<bf16> = keys.iter().map(|&x| bf16::from_f32(x)).collect();
    let shape = Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w };
    let want = select::window_scores(&qwf, &keys, &shape).unwrap();
    let got = dev.window_scores(&dev.upload(&qw).unwrap(), &dev.upload(&keys_t).unwrap(), Some(&lse), &shape).unwrap();
    assert_close("window scores from lse", &dev.download(&got).unwrap(), &want, 1e-5, 1e-3);
}

#[test]
fn pool_group_is_bit_exact() {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    for (h, hk, n) in [(32, 8, 5000), (4, 2, 1), (6, 2, 0), (8, 8, 97)] {
        // Quantised scores: many ties and equal windows.
        let s: Vec<f32> = (0..h * n).map(|_| (rng.random_range(0..16) as f32) / 64.0).collect();
        let s_dev = dev.upload(&s).unwrap();
        for kernel in [1, 3, 7] {
            for pool in [Pool::Max, Pool::Avg] {
                let want = select::pool_group_scores(&s, h, hk, n, kernel, pool).unwrap();
                let got = dev.download(&dev.pool_group(&s_dev, h, hk, n, kernel, pool).unwrap()).unwrap();
                assert_eq!(&got[..want.len()], &want[..], "pool {pool:?} kernel {kernel} h {h} n {n}");
            }
        }
    }
}

/// Group scores with ties, −∞, signed zeros and NaN (which ranks lowest, tied with −∞).
fn adversarial_scores(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| match rng.random_range(0..100) {
            0 => f32::NAN,
            1 => f32::NEG_INFINITY,
            2..=40 => (rng.random_range(0..8) as f32) * 0.125,
            41 => -0.0,
            _ => rng.random::<f32>(),
        })
        .collect()
}

#[test]
fn tsp_indices_match_select_exactly() {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    let (hk, w) = (8, 8);
    for s in [8, 9, 100, 4096 + 8, 131072] {
        let n = s - w;
        let a = adversarial_scores(&mut rng, hk * n);
        let a_dev = dev.upload(&a).unwrap();
        let total = dev.sum_heads(&a_dev, hk, n).unwrap();
        // k = 0, 1, 20 %, 50 %, k = n.
        for tsp_len in [w, w + 1, w + n / 5, (w + n / 2).min(s), s] {
            let want = select::tsp_indices(&a, hk, s, w, tsp_len).unwrap();
            let got = dev.download(&dev.top_k(&total, 1, n, tsp_len - w, w).unwrap()).unwrap();
            assert_eq!(&got[..tsp_len], &want[..], "TSP S {s} T {tsp_len}");
        }
    }
}

#[test]
fn kv_indices_match_select_as_sets() {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    let (hk, w) = (8, 8);
    for s in [8, 50, 10_000, 131072] {
        let n = s - w;
        let a = adversarial_scores(&mut rng, hk * n);
        let a_dev = dev.upload(&a).unwrap();
        for budget in [w, w + 1, w + n / 5, s] {
            let want = select::kv_indices(&a, hk, s, w, budget).unwrap();
            let got = dev.download(&dev.top_k(&a_dev, hk, n, budget - w, w).unwrap()).unwrap();
            for g in 0..hk {
                let (mut x, mut y) = (got[g * budget..][..budget].to_vec(), want[g * budget..][..budget].to_vec());
                assert!(x.windows(2).all(|p| p[0] < p[1]), "head {g}: device indices ascending");
                x.sort_unstable();
                y.sort_unstable();
                assert_eq!(x, y, "KV head {g}, S {s}, budget {budget}");
            }
        }
    }
}

#[test]
fn gathers_match_host() {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(17);
    let (hk, s, d, e) = (4, 1000, 128, 4096);
    let (k, _) = random::<bf16>(&mut rng, hk * s * d, 1.0);
    let idx: Vec<u32> = (0..hk * 300).map(|_| rng.random_range(0..s as u32)).collect();
    let got = dev.gather(&dev.upload(&k).unwrap(), hk, s, d, &dev.upload(&idx).unwrap(), 300).unwrap();
    let got = dev.download(&got).unwrap();
    for g in 0..hk {
        for r in 0..300 {
            let i = idx[g * 300 + r] as usize;
            assert_eq!(&got[(g * 300 + r) * d..][..d], &k[(g * s + i) * d..][..d], "K head {g} row {r}");
        }
    }
    // Hidden rows and position ids after TSP (batches = 1).
    let tsp: Vec<u32> = (0..s as u32).filter(|i| i % 3 != 1).collect();
    let (x, _) = random::<f16>(&mut rng, s * e, 1.0);
    let tsp_dev = dev.upload(&tsp).unwrap();
    let got = dev.download(&dev.gather(&dev.upload(&x).unwrap(), 1, s, e, &tsp_dev, tsp.len()).unwrap()).unwrap();
    let want: Vec<f16> = tsp.iter().flat_map(|&i| x[i as usize * e..][..e].to_vec()).collect();
    assert_eq!(got, want, "hidden rows");
    let pos: Vec<u32> = (0..s as u32).map(|p| p * 7 + 3).collect();
    let got = dev.download(&dev.gather(&dev.upload(&pos).unwrap(), 1, s, 1, &tsp_dev, tsp.len()).unwrap()).unwrap();
    let want: Vec<u32> = tsp.iter().map(|&i| pos[i as usize]).collect();
    assert_eq!(&got[..want.len()], &want[..], "position ids");
}

fn llama3_spec(head_dim: usize) -> ModelSpec {
    ModelSpec {
        arch: Arch::Llama,
        vocab_size: 8,
        hidden_size: 32 * head_dim,
        intermediate_size: 8,
        num_layers: 1,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        },
        max_position_embeddings: 131072,
        sliding_window: None,
        tie_word_embeddings: false,
        qkv_bias: false,
        qk_norm: false,
    }
}

fn check_rope<T: Half>(dev: &Gpu, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (heads, d, stride) = (40, 128, 48 * 128); // q and k heads of a fused row, then v untouched
    let rope = Rope::new(&llama3_spec(d));
    let mut pos: Vec<u32> = (0..300).map(|_| rng.random_range(0..131072)).collect();
    pos.sort_unstable(); // ascending, non-contiguous: positions after TSP
    let (x, mut want) = random::<T>(&mut rng, pos.len() * stride, 2.0);
    rope.table(&pos).apply(&mut want, stride, 0, 0, heads);
    let mut x_dev = dev.upload(&x).unwrap();
    let (pos_dev, freq_dev) = (dev.upload(&pos).unwrap(), dev.upload(rope.inv_freq()).unwrap());
    dev.rope(&mut x_dev, stride, heads, d, &pos_dev, &freq_dev).unwrap();
    assert_close("rope", &to_f32(dev.download(&x_dev).unwrap()), &want, 2.0 * T::EPS, T::EPS);
}

#[test]
fn rope_matches_host() {
    let Some(dev) = device() else { return };
    check_rope::<bf16>(&dev, 19);
    check_rope::<f16>(&dev, 20);
}

fn check_norm_swiglu<T: Half>(dev: &Gpu, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    // Whole rows (the layer norms) and per head (Qwen3's q/k norm: 32 heads of 128).
    for (rows, heads, n) in [(17, 1, 4096), (5, 32, 128), (3, 1, 100)] {
        let (x, xf) = random::<T>(&mut rng, rows * heads * n, 3.0);
        let (w, wf) = random::<T>(&mut rng, n, 1.5);
        let mut want = vec![0f32; xf.len()];
        rms_norm(&xf, &wf, 1e-6, &mut want);
        let got = dev.rms_norm(&dev.upload(&x).unwrap(), &dev.upload(&w).unwrap(), heads, 1e-6).unwrap();
        assert_close("rms_norm", &to_f32(dev.download(&got).unwrap()), &want, T::EPS, T::EPS);
    }
    let (rows, inter) = (9, 1000);
    let (gu, guf) = random::<T>(&mut rng, rows * 2 * inter, 6.0);
    let mut want = vec![0f32; rows * inter];
    swiglu(&guf, inter, &mut want);
    let got = dev.swiglu(&dev.upload(&gu).unwrap(), inter).unwrap();
    assert_close("swiglu", &to_f32(dev.download(&got).unwrap()), &want, T::EPS, T::EPS);
}

#[test]
fn rms_norm_and_swiglu_match_host() {
    let Some(dev) = device() else { return };
    check_norm_swiglu::<bf16>(&dev, 23);
    check_norm_swiglu::<f16>(&dev, 24);
}

/// A host attention call over head-major K/V `[Hk, stride, D]` with positions `[Hk, stride]`.
struct Host<'a> {
    k: &'a [f32],
    v: &'a [f32],
    pos: &'a [u32],
    len: usize,
    stride: usize,
    h: usize,
    hk: usize,
    d: usize,
    window: Option<usize>,
}

/// The host prefill attention: `[m, H·D]` outputs for queries at `q_pos` (the keys are the queries' rows).
fn host_attention(q: &[f32], q_pos: &[u32], a: &Host) -> Vec<f32> {
    let kv = KvView { k: a.k, v: a.v, pos: a.pos, len: a.len, stride: a.stride };
    let heads = Heads { n_heads: a.h, n_kv_heads: a.hk, head_dim: a.d, sliding_window: a.window };
    let mut out = vec![0f32; q_pos.len() * a.h * a.d];
    attention(q, q_pos, 0, &kv, &heads, &mut out);
    out
}

/// Decode attention of one query row at `q_pos` over every visible cache entry, in f64 (each KV
/// head has its own positions here, which the CPU cache, built from one prefill, never has).
fn host_decode(q: &[f32], q_pos: u32, a: &Host) -> Vec<f32> {
    let mut out = vec![0f32; a.h * a.d];
    for (head, out) in out.chunks_exact_mut(a.d).enumerate() {
        let g = head / (a.h / a.hk);
        let q = &q[head * a.d..][..a.d];
        let visible: Vec<usize> = (0..a.len)
            .filter(|&t| a.window.is_none_or(|w| ((q_pos - a.pos[g * a.stride + t]) as usize) < w))
            .map(|t| g * a.stride + t)
            .collect();
        let logits: Vec<f64> = visible
            .iter()
            .map(|&r| a.k[r * a.d..][..a.d].iter().zip(q).map(|(&k, &q)| k as f64 * q as f64).sum::<f64>())
            .map(|l| l / (a.d as f64).sqrt())
            .collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        for (x, o) in out.iter_mut().enumerate() {
            *o = visible.iter().zip(&logits).map(|(&r, l)| (l - m).exp() / z * a.v[r * a.d + x] as f64).sum::<f64>()
                as f32;
        }
    }
    out
}

/// `n` ascending positions with gaps (the rows TSP keeps), starting at `first`.
fn gappy_positions(rng: &mut StdRng, n: usize, first: u32) -> Vec<u32> {
    let mut p = first;
    (0..n)
        .map(|_| {
            p += rng.random_range(1..4);
            p
        })
        .collect()
}

/// One prefill case: S rows, H / Hk heads of D, an optional window over gappy positions.
#[derive(Clone, Copy, Debug)]
struct Case {
    s: usize,
    h: usize,
    hk: usize,
    d: usize,
    window: Option<usize>,
}

fn check_flash<T: Half>(dev: &Gpu, c: Case, seed: u64) {
    let Case { s, h, hk, d, window } = c;
    let mut rng = StdRng::seed_from_u64(seed);
    let (q, qf) = random::<T>(&mut rng, s * h * d, 1.0);
    let (k, kf) = random::<T>(&mut rng, s * hk * d, 1.0);
    let (v, vf) = random::<T>(&mut rng, s * hk * d, 1.0);
    let (kh, vh) = (head_major(&kf, s, hk, d), head_major(&vf, s, hk, d));
    let pos = if window.is_some() { gappy_positions(&mut rng, s, 0) } else { (0..s as u32).collect() };
    let key_pos: Vec<u32> = (0..hk).flat_map(|_| pos.iter().copied()).collect();
    let host = Host { k: &kh, v: &vh, pos: &key_pos, len: s, stride: s, h, hk, d, window };
    let want = host_attention(&qf, &pos, &host);
    let (q_dev, k_dev, v_dev) = (dev.upload(&q).unwrap(), dev.upload(&k).unwrap(), dev.upload(&v).unwrap());
    let pos_dev = dev.upload(&pos).unwrap();
    let a = AttentionInputs {
        q: q_dev.slice(..),
        k: k_dev.slice(..),
        v: v_dev.slice(..),
        q_row: h * d,
        kv_row: hk * d,
        kv_head: d,
        n_queries: s,
        n_keys: s,
        n_heads: h,
        n_kv_heads: hk,
        head_dim: d,
        window: window.map(|size| SlidingWindow { size, q_pos: pos_dev.slice(..), k_pos: pos_dev.slice(..) }),
    };
    let mut out = dev.zeros::<T>(s * h * d).unwrap();
    let mut lse = dev.zeros::<f32>(h * s).unwrap();
    dev.flash_attention_into(&a, &mut out, h * d, Some(&mut lse)).unwrap();
    let what = format!("flash attention {c:?}");
    assert_close(&what, &to_f32(dev.download(&out).unwrap()), &want, 2.0 * T::EPS, 2.0 * T::EPS);
    // lse[h, i] = ln Σ_{visible j} exp(q·k/√D), in f64 on the host.
    let lse = dev.download(&lse).unwrap();
    let g = h / hk;
    for head in 0..h {
        for i in (0..s).step_by(s.div_ceil(37)) {
            let qi = &qf[(i * h + head) * d..][..d];
            let logits: Vec<f64> = (0..=i)
                .filter(|&j| !matches!(window, Some(w) if (pos[i] - pos[j]) as usize >= w))
                .map(|j| {
                    let kj = &kh[((head / g) * s + j) * d..][..d];
                    qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let want = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            let got = lse[head * s + i] as f64;
            assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{what}: lse[{head}, {i}] {got} vs {want}");
        }
    }
}

/// Every head dim, partial query/key blocks, GQA groups; with a sliding window over gappy (post-TSP)
/// positions, windows shorter than a tile, spanning tiles and longer than the sequence.
/// Tolerance: 2 roundings of T (P and the output are rounded to T; accumulation is f32).
#[test]
fn flash_attention_matches_cpu() {
    let Some(dev) = device() else { return };
    let case = |s, h, hk, d, window| Case { s, h, hk, d, window };
    let mut cases = vec![];
    for d in [16, 32, 64, 128] {
        cases.extend([
            case(1, 4, 1, d, None),
            case(63, 8, 2, d, None),
            case(65, 4, 4, d, None),
            case(200, 6, 2, d, None),
        ]);
        cases.extend([case(300, 4, 2, d, Some(7)), case(257, 6, 2, d, Some(100)), case(90, 2, 1, d, Some(1000))]);
    }
    cases.extend([case(64, 8, 2, 128, None), case(1030, 32, 8, 128, None), case(1030, 32, 8, 64, Some(256))]);
    for (i, c) in cases.into_iter().enumerate() {
        check_flash::<bf16>(&dev, c, 30 + i as u64);
        check_flash::<f16>(&dev, c, 600 + i as u64);
    }
    // Head dims without a kernel are an error, not a launch.
    let x = dev.zeros::<bf16>(64 * 4 * 80).unwrap();
    assert!(dev.flash_attention(&x, &x, &x, 4, 4, 80).is_err());
}

/// The model's layout: fused q|k|v rows in, a contiguous `[S, H·D]` output out.
#[test]
fn flash_attention_reads_fused_rows() {
    let Some(dev) = device() else { return };
    let (s, h, hk, d) = (150, 6, 2, 64);
    let width = (h + 2 * hk) * d;
    let mut rng = StdRng::seed_from_u64(77);
    let (qkv, qkvf) = random::<bf16>(&mut rng, s * width, 1.0);
    let cols =
        |lo: usize, n: usize| -> Vec<f32> { (0..s).flat_map(|i| qkvf[i * width + lo..][..n].to_vec()).collect() };
    let (qf, kf, vf) = (cols(0, h * d), cols(h * d, hk * d), cols((h + hk) * d, hk * d));
    let (kh, vh) = (head_major(&kf, s, hk, d), head_major(&vf, s, hk, d));
    let pos: Vec<u32> = (0..hk).flat_map(|_| 0..s as u32).collect();
    let host = Host { k: &kh, v: &vh, pos: &pos, len: s, stride: s, h, hk, d, window: None };
    let want = host_attention(&qf, &pos[..s], &host);
    let qkv_dev = dev.upload(&qkv).unwrap();
    let mut out = dev.zeros::<bf16>(s * h * d).unwrap();
    dev.flash_attention_into(&AttentionInputs::fused(&qkv_dev, s, h, hk, d), &mut out, h * d, None).unwrap();
    let eps = 2.0 * bf16::EPS;
    assert_close("flash attention on fused rows", &to_f32(dev.download(&out).unwrap()), &want, eps, eps);
}

/// A cache `[Hk, capacity, D]` with `len` entries at per-head gappy positions (KV selection keeps
/// different tokens per head), uploaded with its length on the device; returns it with its host copy.
fn random_cache<T: Half>(
    dev: &Gpu,
    rng: &mut StdRng,
    (hk, capacity, d): (usize, usize, usize),
    len: usize,
) -> (LayerKv<T>, Vec<f32>, Vec<f32>, Vec<u32>) {
    let (k, kf) = random::<T>(rng, hk * capacity * d, 1.0);
    let (v, vf) = random::<T>(rng, hk * capacity * d, 1.0);
    let mut pos = vec![0u32; hk * capacity];
    for g in 0..hk {
        pos[g * capacity..][..len].copy_from_slice(&gappy_positions(rng, len, 0));
    }
    let mut cache = dev.kv_cache::<T>(hk, capacity, d).unwrap();
    cache.k = dev.upload(&k).unwrap();
    cache.v = dev.upload(&v).unwrap();
    cache.pos = dev.upload(&pos).unwrap();
    dev.write(&[len as u32], &mut cache.len).unwrap();
    (cache, kf, vf, pos)
}

fn check_decode<T: Half>(dev: &Gpu, (len, h, hk, d): (usize, usize, usize, usize), window: Option<usize>, seed: u64) {
    let capacity = len + 300; // splits past len exist in the grid and must not count
    let mut rng = StdRng::seed_from_u64(seed);
    let (cache, kf, vf, pos) = random_cache::<T>(dev, &mut rng, (hk, capacity, d), len);
    let (q, qf) = random::<T>(&mut rng, h * d, 1.0);
    let q_pos = (0..hk).map(|g| if len == 0 { 0 } else { pos[g * capacity + len - 1] }).max().unwrap() + 1;
    let host = Host { k: &kf, v: &vf, pos: &pos, len, stride: capacity, h, hk, d, window };
    let want = host_decode(&qf, q_pos, &host);
    let q_pos_dev = dev.upload(&[q_pos]).unwrap();
    let out =
        dev.decode_attention(&dev.upload(&q).unwrap(), &cache, h, window.map(|w| (w, q_pos_dev.slice(..)))).unwrap();
    let what = format!("decode attention len {len} H {h} Hk {hk} D {d} window {window:?}");
    assert_close(&what, &to_f32(dev.download(&out).unwrap()), &want, T::EPS, T::EPS);
}

/// Every head dim and group size ≤ 8, lengths around the split size, capacity > len (length read on
/// the device), sliding windows by position. Tolerance: one rounding of T (f32 accumulation).
#[test]
fn decode_attention_matches_cpu() {
    let Some(dev) = device() else { return };
    let mut i = 0;
    for d in [16, 32, 64, 128] {
        for (len, h, hk) in [(1, 4, 4), (255, 8, 2), (256, 24, 8), (257, 21, 3), (5000, 32, 4), (3000, 14, 2)] {
            for window in [None, Some(64), Some(1000)] {
                check_decode::<bf16>(&dev, (len, h, hk, d), window, 90 + i);
                check_decode::<f16>(&dev, (len, h, hk, d), window, 900 + i);
                i += 1;
            }
        }
    }
    check_decode::<bf16>(&dev, (40_000, 64, 8, 128), None, 7);
    check_decode::<bf16>(&dev, (40_000, 64, 8, 128), Some(4096), 8);
    // An empty cache gives zeros; a head dim without a kernel is an error.
    check_decode::<bf16>(&dev, (0, 4, 2, 64), None, 9);
    let (q, cache) = (dev.zeros::<bf16>(4 * 80).unwrap(), dev.kv_cache::<bf16>(1, 4, 80).unwrap());
    assert!(dev.decode_attention(&q, &cache, 4, None).is_err());
}

/// Decode append: K/V of the fused row go to slot len of every KV head with the token's position,
/// then len advances on the device; a full cache drops the token. A decode step after it sees the
/// new entries. The prefill fill of a cache from fused rows (gather with head/row strides) too.
#[test]
fn kv_append_and_cache_fill() {
    let Some(dev) = device() else { return };
    let (s, h, hk, d, capacity) = (40, 6, 2, 32, 48);
    let width = (h + 2 * hk) * d;
    let mut rng = StdRng::seed_from_u64(41);
    let (qkv, _) = random::<bf16>(&mut rng, s * width, 1.0);
    let qkv_dev = dev.upload(&qkv).unwrap();
    let mut cache = dev.kv_cache::<bf16>(hk, capacity, d).unwrap();
    // Prefill: keep every other row for head 0, the last 20 rows for head 1 (ascending indices).
    let budget = 20;
    let idx: Vec<u32> = (0..budget as u32).map(|r| r * 2).chain(s as u32 - 20..s as u32).collect();
    let idx_dev = dev.upload(&idx).unwrap();
    let g = Gather {
        batches: hk,
        count: budget,
        row: d,
        src_rows: s,
        src_batch: d,
        src_row: width,
        idx_batch: budget,
        dst_batch: capacity * d,
        dst_row: d,
    };
    dev.gather_into(&qkv_dev.slice(h * d..), &idx_dev, &g, &mut cache.k).unwrap();
    dev.gather_into(&qkv_dev.slice((h + hk) * d..), &idx_dev, &g, &mut cache.v).unwrap();
    let pos: Vec<u32> = (0..s as u32).map(|p| p * 3).collect(); // original positions of the rows
    let pos_g = Gather { row: 1, src_batch: 0, src_row: 1, dst_batch: capacity, dst_row: 1, ..g };
    dev.gather_into(&dev.upload(&pos).unwrap(), &idx_dev, &pos_g, &mut cache.pos).unwrap();
    dev.write(&[budget as u32], &mut cache.len).unwrap();
    // Two decode tokens (fused rows of their own), at positions 500 and 501.
    let (tok, _) = random::<bf16>(&mut rng, 2 * width, 1.0);
    let tok_dev = dev.upload(&tok).unwrap();
    for t in 0..2 {
        let p = dev.upload(&[500 + t as u32]).unwrap();
        dev.kv_append(&tok_dev.slice(t * width..(t + 1) * width), h, &mut cache, &p).unwrap();
    }
    assert_eq!(dev.download(&cache.len).unwrap(), [budget as u32 + 2]);
    let (ck, cv, cp) =
        (dev.download(&cache.k).unwrap(), dev.download(&cache.v).unwrap(), dev.download(&cache.pos).unwrap());
    for gh in 0..hk {
        for r in 0..budget + 2 {
            let (src, p) = if r < budget {
                let i = idx[gh * budget + r] as usize;
                (&qkv[i * width..], pos[i])
            } else {
                (&tok[(r - budget) * width..], 500 + (r - budget) as u32)
            };
            let slot = (gh * capacity + r) * d;
            assert_eq!(&ck[slot..][..d], &src[(h + gh) * d..][..d], "K head {gh} slot {r}");
            assert_eq!(&cv[slot..][..d], &src[(h + hk + gh) * d..][..d], "V head {gh} slot {r}");
            assert_eq!(cp[gh * capacity + r], p, "position head {gh} slot {r}");
        }
    }
    // Decode over the cache as filled on the device, against the host over the downloaded copy.
    let f = |x: &[bf16]| to_f32(x.to_vec());
    let (q, qf) = random::<bf16>(&mut rng, h * d, 1.0);
    let q_pos = dev.upload(&[502u32]).unwrap();
    for window in [None, Some(40)] {
        let host = Host { k: &f(&ck), v: &f(&cv), pos: &cp, len: budget + 2, stride: capacity, h, hk, d, window };
        let want = host_decode(&qf, 502, &host);
        let out =
            dev.decode_attention(&dev.upload(&q).unwrap(), &cache, h, window.map(|w| (w, q_pos.slice(..)))).unwrap();
        assert_close("decode after append", &to_f32(dev.download(&out).unwrap()), &want, bf16::EPS, bf16::EPS);
    }
    // A full cache keeps its length and contents.
    dev.write(&[capacity as u32], &mut cache.len).unwrap();
    dev.kv_append(&tok_dev, h, &mut cache, &q_pos).unwrap();
    assert_eq!(dev.download(&cache.len).unwrap(), [capacity as u32]);
    assert_eq!(dev.download(&cache.k).unwrap(), ck);
}

fn check_model_kernels<T: Half>(dev: &Gpu, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    // Embedding: an id past the vocabulary gives a zero row.
    let (vocab, e) = (50, 96);
    let (table, tablef) = random::<T>(&mut rng, vocab * e, 2.0);
    let ids: Vec<u32> = vec![3, 0, 49, 7, 3, 50, 1000];
    let mut x = dev.zeros::<f32>(ids.len() * e).unwrap();
    dev.embed_into(&dev.upload(&ids).unwrap(), &dev.upload(&table).unwrap(), e, &mut x).unwrap();
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| if (i as usize) < vocab { tablef[i as usize * e..][..e].to_vec() } else { vec![0.0; e] })
        .collect();
    assert_eq!(dev.download(&x).unwrap(), want, "embed");

    // RMSNorm of f32 rows into T: the f32 tree sum vs the host's f64 sum is far below one rounding of T.
    for (rows, n) in [(5, 4096), (3, 100), (1, 576)] {
        let xf: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-3.0..3.0)).collect();
        let (w, wf) = random::<T>(&mut rng, n, 1.5);
        let mut want = vec![0f32; xf.len()];
        rms_norm(&xf, &wf, 1e-6, &mut want);
        let mut out = dev.zeros::<T>(rows * n).unwrap();
        dev.rms_norm_f32_into(&dev.upload(&xf).unwrap(), &dev.upload(&w).unwrap(), rows, 1e-6, &mut out).unwrap();
        assert_close("rms_norm_f32", &to_f32(dev.download(&out).unwrap()), &want, T::EPS, T::EPS);
    }

    // Residual add (one f32 addition: exact) and bias add (one rounding to T: exact).
    let (rows, cols) = (7, 300);
    let xf: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
    let (y, yf) = random::<T>(&mut rng, rows * cols, 2.0);
    let (b, bf) = random::<T>(&mut rng, cols, 2.0);
    let (mut x_dev, mut y_dev) = (dev.upload(&xf).unwrap(), dev.upload(&y).unwrap());
    dev.add_residual_into(&mut x_dev, &y_dev, rows * cols).unwrap();
    let want: Vec<f32> = xf.iter().zip(&yf).map(|(a, b)| a + b).collect();
    assert_eq!(dev.download(&x_dev).unwrap(), want, "add_residual");
    dev.add_bias_into(&mut y_dev, &dev.upload(&b).unwrap(), rows).unwrap();
    let want: Vec<f32> = yf.iter().enumerate().map(|(i, &v)| T::of(v + bf[i % cols]).f32()).collect();
    assert_eq!(to_f32(dev.download(&y_dev).unwrap()), want, "add_bias");

    // Window queries [H, W, D] from fused rows.
    let (s, h, hk, d, w) = (33, 6, 2, 16, 8);
    let width = (h + 2 * hk) * d;
    let (qkv, qkvf) = random::<T>(&mut rng, s * width, 1.0);
    let shape = Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w };
    let mut out = dev.zeros::<T>(h * w * d).unwrap();
    dev.pack_window_into(&dev.upload(&qkv).unwrap(), width, &shape, &mut out).unwrap();
    let mut want = Vec::with_capacity(h * w * d);
    for hh in 0..h {
        for t in s - w..s {
            want.extend_from_slice(&qkvf[t * width + hh * d..][..d]);
        }
    }
    assert_eq!(to_f32(dev.download(&out).unwrap()), want, "pack_window");
}

#[test]
fn model_kernels_match_host() {
    let Some(dev) = device() else { return };
    check_model_kernels::<bf16>(&dev, 51);
    check_model_kernels::<f16>(&dev, 52);
}

/// Greedy argmax on the device: the first index of the maximum, with ties, −∞ and one candidate;
/// the counter increment.
#[test]
fn argmax_and_increment() {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(61);
    for n in [1, 31, 1000, 151_936] {
        for quantised in [false, true] {
            let x: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..50) {
                    0 => f32::NEG_INFINITY,
                    _ if quantised => rng.random_range(0..4) as f32,
                    _ => rng.random_range(-10.0..10.0),
                })
                .collect();
            let mut out = dev.zeros::<u32>(1).unwrap();
            dev.argmax_into(&dev.upload(&x).unwrap(), n, &mut out).unwrap();
            assert_eq!(dev.download(&out).unwrap(), [argmax(&x)], "argmax n {n} quantised {quantised}");
        }
    }
    // The decode position advances on the device.
    let mut pos = dev.upload(&[41u32, 7]).unwrap();
    dev.increment(&mut pos.slice_mut(..1), 1).unwrap();
    dev.increment(&mut pos, 2).unwrap();
    assert_eq!(dev.download(&pos).unwrap(), [44, 9]);
}

/// The batched decode launchers do for every row of a batch what the single-request ones do for it, bit for bit:
/// three caches of different capacities and lengths (one past the split size) and a padding row, with and
/// without a sliding window; the append first, then the attention over the appended caches.
#[test]
fn batched_append_and_decode_equal_one_by_one() {
    let Some(dev) = device() else { return };
    let (h, hk, d) = (8, 2, 64);
    let width = (h + 2 * hk) * d;
    let mut rng = StdRng::seed_from_u64(77);
    let shapes = [(300, 40), (1000, 700), (64, 1)]; // (capacity, len)
    let (qkv_host, _) = random::<bf16>(&mut rng, 4 * width, 1.0);
    let qkv = dev.upload(&qkv_host).unwrap();
    let positions = dev.upload(&[900u32, 1500, 70, 0]).unwrap();
    for window in [None, Some(256)] {
        let mut single = Vec::new();
        let mut batch = Vec::new();
        for (b, &(cap, len)) in shapes.iter().enumerate() {
            let seed = 500 + b as u64;
            let (c1, ..) = random_cache::<bf16>(&dev, &mut StdRng::seed_from_u64(seed), (hk, cap, d), len);
            let (c2, ..) = random_cache::<bf16>(&dev, &mut StdRng::seed_from_u64(seed), (hk, cap, d), len);
            single.push(c1);
            batch.push(c2);
        }
        // One by one.
        let mut want = Vec::new();
        for (b, c) in single.iter_mut().enumerate() {
            let row = qkv.slice(b * width..(b + 1) * width);
            let p = positions.slice(b..b + 1);
            dev.kv_append(&row, h, c, &p).unwrap();
            let q = dev.upload(&qkv_host[b * width..][..h * d]).unwrap();
            let out = dev.decode_attention(&q, c, h, window.map(|w| (w, p))).unwrap();
            want.push(dev.download(&out).unwrap());
        }
        // Batched: the three caches and a padding row.
        let mut table: Vec<CacheRef> = batch.iter().map(|c| c.cache_ref(&dev)).collect();
        table.push(CacheRef::default());
        let table = dev.upload(&table).unwrap();
        let max_capacity = shapes.iter().map(|s| s.0).max().unwrap();
        let mut out = dev.zeros::<bf16>(4 * h * d).unwrap();
        let mut workspace = dev.zeros::<f32>(decode_batch_workspace_len(4, h, max_capacity, d).unwrap()).unwrap();
        // SAFETY: the table holds three live caches of (hk, ≤ max_capacity, d) and a padding row.
        unsafe {
            dev.kv_append_batch(&qkv, width, &table, (h, hk, d), &positions).unwrap();
            let w = window.map(|w| (w, positions.slice(..)));
            dev.decode_attention_batch_into(&qkv, width, &table, max_capacity, (h, hk, d), w, &mut out, &mut workspace)
                .unwrap();
        }
        dev.synchronize().unwrap();
        let got = dev.download(&out).unwrap();
        for (b, (one, many)) in single.iter().zip(&batch).enumerate() {
            assert_eq!(dev.download(&many.len).unwrap(), dev.download(&one.len).unwrap(), "row {b} length");
            assert_eq!(dev.download(&many.k).unwrap(), dev.download(&one.k).unwrap(), "row {b} K");
            assert_eq!(dev.download(&many.pos).unwrap(), dev.download(&one.pos).unwrap(), "row {b} positions");
            let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got[b * h * d..][..h * d]), bits(&want[b]), "row {b} attention, window {window:?}");
        }
        assert!(got[3 * h * d..].iter().all(|v| v.to_bits() == 0), "the padding row is not written");
    }
}
