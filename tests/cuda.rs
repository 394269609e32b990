//! The CUDA kernels of plugin/ against the host reference: `fastkv::select` for the selection path
//! (bit-exact where the kernels promise it: pooling, TSP, KV index sets), `fastkv::rope`,
//! `fastkv::cpu::kernels` and `fastkv::cpu::attention` within f16/bf16 tolerances. Inputs are
//! rounded to the device type first, so both sides see the same values. Without a GPU every test
//! prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

use fastkv::cpu::attention::{attention, Heads, KvView};
use fastkv::cpu::kernels::{rms_norm, swiglu};
use fastkv::cuda::{Device, Element};
use fastkv::rope::Rope;
use fastkv::select::{self, Pool, Shape};
use fastkv::spec::{Arch, ModelSpec, RopeScaling};
use fastkv::Error;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn device() -> Option<Device> {
    match Device::new(0) {
        Ok(d) => Some(d),
        Err(Error::NoCudaDevice(_)) => {
            println!("skipped: no CUDA device");
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

fn check_window_scores<T: Half>(dev: &Device, shape: Shape, seed: u64) {
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

fn check_rope<T: Half>(dev: &Device, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (heads, d, stride) = (40, 128, 48 * 128); // q and k heads of a fused row, then v untouched
    let rope = Rope::new(&llama3_spec(d));
    let mut pos: Vec<u32> = (0..300).map(|_| rng.random_range(0..131072)).collect();
    pos.sort_unstable(); // ascending, non-contiguous: positions after TSP
    let (x, mut want) = random::<T>(&mut rng, pos.len() * stride, 2.0);
    rope.table(&pos).apply(&mut want, stride, 0, heads);
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

fn check_norm_swiglu<T: Half>(dev: &Device, seed: u64) {
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

/// Sizes of a host attention call over head-major K/V.
struct Sizes {
    len: usize,
    stride: usize,
    h: usize,
    hk: usize,
}

/// The host attention over head-major keys: `[m, H·D]` outputs for queries at `q_pos`.
fn host_attention(q: &[f32], q_pos: &[u32], causal: bool, k: &[f32], v: &[f32], sz: Sizes) -> Vec<f32> {
    let d = 128;
    let pos: Vec<u32> = (0..sz.hk).flat_map(|_| 0..sz.stride as u32).collect();
    let kv = KvView { k, v, pos: &pos, len: sz.len, stride: sz.stride };
    let heads = Heads { n_heads: sz.h, n_kv_heads: sz.hk, head_dim: d, sliding_window: None };
    let mut out = vec![0f32; q_pos.len() * sz.h * d];
    attention(q, q_pos, 0, causal, &kv, &heads, &mut out);
    out
}

fn check_flash<T: Half>(dev: &Device, s: usize, h: usize, hk: usize, seed: u64) {
    let d = 128;
    let mut rng = StdRng::seed_from_u64(seed);
    let (q, qf) = random::<T>(&mut rng, s * h * d, 1.0);
    let (k, kf) = random::<T>(&mut rng, s * hk * d, 1.0);
    let (v, vf) = random::<T>(&mut rng, s * hk * d, 1.0);
    let (kh, vh) = (head_major(&kf, s, hk, d), head_major(&vf, s, hk, d));
    let pos: Vec<u32> = (0..s as u32).collect();
    let want = host_attention(&qf, &pos, true, &kh, &vh, Sizes { len: s, stride: s, h, hk });
    let (q_dev, k_dev, v_dev) = (dev.upload(&q).unwrap(), dev.upload(&k).unwrap(), dev.upload(&v).unwrap());
    let (out, lse) = dev.flash_attention(&q_dev, &k_dev, &v_dev, h, hk, d).unwrap();
    let what = format!("flash attention S {s} H {h} Hk {hk}");
    assert_close(&what, &to_f32(dev.download(&out).unwrap()), &want, 2.0 * T::EPS, 2.0 * T::EPS);
    // lse[h, i] = ln Σ_{j ≤ i} exp(q·k/√D), in f64 on the host.
    let lse = dev.download(&lse).unwrap();
    let g = h / hk;
    for head in 0..h {
        for i in (0..s).step_by(s.div_ceil(37)) {
            let qi = &qf[(i * h + head) * d..][..d];
            let logits: Vec<f64> = (0..=i)
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

#[test]
fn flash_attention_matches_cpu() {
    let Some(dev) = device() else { return };
    for (i, (s, h, hk)) in
        [(1, 4, 1), (63, 8, 2), (64, 8, 2), (65, 4, 4), (200, 6, 2), (1030, 32, 8)].into_iter().enumerate()
    {
        check_flash::<bf16>(&dev, s, h, hk, 30 + i as u64);
        check_flash::<f16>(&dev, s, h, hk, 60 + i as u64);
    }
    // Only head_dim 128 has a kernel: anything else is an error, not a launch.
    let x = dev.zeros::<bf16>(64 * 4 * 64).unwrap();
    assert!(dev.flash_attention(&x, &x, &x, 4, 4, 64).is_err());
}

fn check_decode<T: Half>(dev: &Device, len: usize, h: usize, hk: usize, seed: u64) {
    let (d, capacity) = (128, len + 5);
    let mut rng = StdRng::seed_from_u64(seed);
    let (q, qf) = random::<T>(&mut rng, h * d, 1.0);
    let (k, kf) = random::<T>(&mut rng, hk * capacity * d, 1.0);
    let (v, vf) = random::<T>(&mut rng, hk * capacity * d, 1.0);
    let want = host_attention(&qf, &[len as u32], false, &kf, &vf, Sizes { len, stride: capacity, h, hk });
    let (q_dev, k_dev, v_dev) = (dev.upload(&q).unwrap(), dev.upload(&k).unwrap(), dev.upload(&v).unwrap());
    let out = dev.decode_attention(&q_dev, &k_dev, &v_dev, hk, capacity, len).unwrap();
    let what = format!("decode attention len {len} H {h} Hk {hk}");
    assert_close(&what, &to_f32(dev.download(&out).unwrap()), &want, T::EPS, T::EPS);
}

#[test]
fn decode_attention_matches_cpu() {
    let Some(dev) = device() else { return };
    for (i, (len, h, hk)) in
        [(1, 4, 4), (255, 8, 2), (256, 24, 8), (257, 32, 8), (5000, 32, 4), (40_000, 64, 8)].into_iter().enumerate()
    {
        check_decode::<bf16>(&dev, len, h, hk, 90 + i as u64);
        check_decode::<f16>(&dev, len, h, hk, 120 + i as u64);
    }
    let x = dev.zeros::<bf16>(4 * 128).unwrap();
    assert!(dev.decode_attention(&x, &x, &x, 1, 4, 0).is_err(), "an empty cache is an error");
}
