//! The selection reference against the spec: an independent float64 computation on closed-form
//! inputs, hand-computed ties and pooling edges, and properties over random shapes.

use fastkv::select::*;
use proptest::prelude::*;

/// q[h,i,d] and k[g,j,d] from sin/cos of their indices: no RNG, many distinct scores.
fn closed_form(h: usize, hk: usize, s: usize, w: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut q = Vec::new();
    for hh in 0..h {
        for i in 0..w {
            for dd in 0..d {
                q.push((0.3 * hh as f64 + 0.7 * i as f64 + 1.1 * dd as f64).sin() as f32);
            }
        }
    }
    let mut k = Vec::new();
    for g in 0..hk {
        for j in 0..s {
            for dd in 0..d {
                k.push((0.5 * g as f64 + 0.13 * j as f64 * (dd + 1) as f64).cos() as f32);
            }
        }
    }
    (q, k)
}

#[allow(clippy::too_many_arguments)]
/// docs/method.md §3.2–3.3 written out in f64 loops: full logits, W×W mask, softmax, sum, pool, group sum.
fn reference(
    q: &[f32],
    k: &[f32],
    h: usize,
    hk: usize,
    s: usize,
    w: usize,
    d: usize,
    kernel: usize,
    pool: Pool,
) -> Vec<f64> {
    let n = s - w;
    let gsz = h / hk;
    let mut a = vec![0f64; hk * n];
    for hh in 0..h {
        let g = hh / gsz;
        let mut sums = vec![0f64; n];
        for i in 0..w {
            let logits: Vec<f64> = (0..s)
                .map(|j| {
                    if j >= n && j - n > i {
                        return f64::NEG_INFINITY;
                    }
                    let dotp: f64 =
                        (0..d).map(|x| q[(hh * w + i) * d + x] as f64 * k[(g * s + j) * d + x] as f64).sum();
                    dotp / (d as f64).sqrt()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            for j in 0..n {
                sums[j] += (logits[j] - m).exp() / z;
            }
        }
        let half = kernel as i64 / 2;
        for j in 0..n as i64 {
            let window = (j - half..=j + half).filter(|&t| t >= 0 && t < n as i64).map(|t| sums[t as usize]);
            a[g * n + j as usize] += match pool {
                Pool::Max => window.fold(f64::NEG_INFINITY, f64::max),
                Pool::Avg => window.sum::<f64>() / kernel as f64,
            };
        }
    }
    a
}

#[test]
fn group_scores_match_an_independent_f64_computation() {
    for &(h, hk) in &[(4, 2), (6, 2), (4, 4), (8, 1)] {
        for &s in &[9, 10, 33, 200] {
            for pool in [Pool::Max, Pool::Avg] {
                let (w, d, kernel) = (8, 16, 7);
                let (q, k) = closed_form(h, hk, s, w, d);
                let shape = Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w };
                let got = group_scores(&q, &k, &shape, kernel, pool).unwrap();
                let want = reference(&q, &k, h, hk, s, w, d, kernel, pool);
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - r).abs() <= 1e-5 * r.abs().max(1e-3),
                        "H={h} Hk={hk} S={s} {pool:?} [{i}]: {g} vs {r}"
                    );
                }
            }
        }
    }
}

#[test]
fn identical_keys_tie_and_ties_go_to_the_lower_index() {
    // All keys equal → every non-window key gets the same score; top-k takes the lowest indices.
    let (h, hk, s, w, d) = (2, 1, 20, 4, 4);
    let q = vec![0.5f32; h * w * d];
    let k = vec![1.0f32; hk * s * d];
    let shape = Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w };
    let a = group_scores(&q, &k, &shape, 3, Pool::Max).unwrap();
    assert!(a.windows(2).all(|p| (p[0] - p[1]).abs() < 1e-7));
    assert_eq!(kv_indices(&a, hk, s, w, 9).unwrap(), vec![0, 1, 2, 3, 4, 16, 17, 18, 19]);
    assert_eq!(tsp_indices(&a, hk, s, w, 7).unwrap(), vec![0, 1, 2, 16, 17, 18, 19]);
}

#[test]
fn top_k_orders_by_score_then_index() {
    let scores = [1.0, 3.0, 2.0, 3.0, f32::NAN, 2.0, -1.0];
    assert_eq!(top_k(&scores, 4), vec![1, 3, 2, 5]);
    assert_eq!(top_k(&scores, 7), vec![1, 3, 2, 5, 0, 6, 4]);
    assert_eq!(top_k(&scores, 0), Vec::<u32>::new());
}

#[test]
fn maxpool_makes_plateaus_and_ignores_padding() {
    let s = [-5.0, -1.0, -7.0, -3.0, -9.0, -9.0];
    let pooled = pool_group_scores(&s, 1, 1, 6, 3, Pool::Max).unwrap();
    assert_eq!(pooled, vec![-1.0, -1.0, -1.0, -3.0, -3.0, -9.0]);
}

#[test]
fn avgpool_divides_by_the_kernel_including_padding() {
    let s = [3.0, 6.0, 9.0, 12.0];
    let pooled = pool_group_scores(&s, 1, 1, 4, 3, Pool::Avg).unwrap();
    assert_eq!(pooled, vec![3.0, 6.0, 9.0, 7.0]);
}

#[test]
fn pooling_happens_per_query_head_before_the_group_sum() {
    // Two heads of one group: max(a)+max(b) ≠ max(a+b).
    let s = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    let pooled = pool_group_scores(&s, 2, 1, 3, 3, Pool::Max).unwrap();
    assert_eq!(pooled, vec![1.0, 2.0, 1.0]);
}

#[test]
fn sequences_no_longer_than_the_window_keep_just_the_window() {
    let shape = Shape { n_heads: 2, n_kv_heads: 1, head_dim: 2, seq_len: 3, window: 3 };
    let a = group_scores(&[0.1; 12], &[0.2; 6], &shape, 7, Pool::Avg).unwrap();
    assert!(a.is_empty());
    assert_eq!(kv_indices(&a, 1, 3, 3, 3).unwrap(), vec![0, 1, 2]);
    assert_eq!(tsp_indices(&a, 1, 3, 3, 3).unwrap(), vec![0, 1, 2]);
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let shape = Shape { n_heads: 3, n_kv_heads: 2, head_dim: 2, seq_len: 10, window: 2 };
    assert!(window_scores(&[0.0; 12], &[0.0; 40], &shape).is_err());
    let shape = Shape { n_heads: 2, n_kv_heads: 1, head_dim: 2, seq_len: 10, window: 11 };
    assert!(window_scores(&[0.0; 44], &[0.0; 20], &shape).is_err());
    let shape = Shape { n_heads: 2, n_kv_heads: 1, head_dim: 2, seq_len: 10, window: 2 };
    assert!(window_scores(&[0.0; 7], &[0.0; 20], &shape).is_err());
    let shape = Shape { n_heads: 2, n_kv_heads: 1, head_dim: 2, seq_len: 10, window: 0 };
    assert!(window_scores(&[], &[0.0; 20], &shape).is_err());
    assert!(pool_group_scores(&[0.0; 8], 1, 1, 8, 4, Pool::Max).is_err());
    assert!(pool_group_scores(&[0.0; 8], 1, 1, 8, 0, Pool::Max).is_err());
    assert!(pool_group_scores(&[0.0; 7], 1, 1, 8, 3, Pool::Max).is_err());
    assert!(kv_indices(&[0.0; 8], 1, 10, 2, 1).is_err());
    assert!(kv_indices(&[0.0; 8], 1, 10, 2, 11).is_err());
    assert!(tsp_indices(&[0.0; 8], 1, 10, 2, 11).is_err());
    assert!(kv_indices(&[0.0; 9], 1, 10, 2, 5).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn selected_indices_are_unique_in_range_and_keep_the_window(
        hk in 1usize..=2, group in prop::sample::select(vec![1usize, 2, 4]), d in 1usize..16, w in 1usize..8,
        extra in 0usize..150, kernel in prop::sample::select(vec![1usize, 3, 5, 7]), max in any::<bool>(),
        budget_frac in 0.0f64..=1.0, tsp_frac in 0.0f64..=1.0, seed in any::<u64>(),
    ) {
        let (h, s) = (hk * group, w + extra);
        let mut state = seed | 1;
        let mut rnd = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5 };
        let q: Vec<f32> = (0..h * w * d).map(|_| rnd()).collect();
        let k: Vec<f32> = (0..hk * s * d).map(|_| rnd()).collect();
        let shape = Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w };
        let pool = if max { Pool::Max } else { Pool::Avg };
        let a = group_scores(&q, &k, &shape, kernel, pool).unwrap();
        let n = s - w;
        let window: Vec<u32> = (n as u32..s as u32).collect();

        let budget = w + (extra as f64 * budget_frac) as usize;
        let kv = kv_indices(&a, hk, s, w, budget).unwrap();
        prop_assert_eq!(kv.len(), hk * budget);
        for g in 0..hk {
            let head = &kv[g * budget..(g + 1) * budget];
            prop_assert!(head.ends_with(&window));
            let mut sorted = head.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), budget);
            prop_assert!(head.iter().all(|&i| (i as usize) < s));
            // The top part really is the top: nothing left out beats the weakest kept entry.
            let scores = &a[g * n..(g + 1) * n];
            let top = &head[..budget - w];
            if let Some(&weakest) = top.last() {
                for j in 0..n as u32 {
                    if !top.contains(&j) {
                        let (sj, sw) = (scores[j as usize], scores[weakest as usize]);
                        prop_assert!(sj < sw || (sj == sw && j > weakest));
                    }
                }
            }
        }

        let t = w + (extra as f64 * tsp_frac) as usize;
        let tsp = tsp_indices(&a, hk, s, w, t).unwrap();
        prop_assert_eq!(tsp.len(), t);
        prop_assert!(tsp.windows(2).all(|p| p[0] < p[1]));
        prop_assert!(tsp.ends_with(&window));
    }
}
