//! The baselines of docs/method.md §12 as policies: their selection formulas on hand-built inputs
//! (indices and per-head budgets worked out by hand or by an independent f64 loop), then end to end
//! on the fixture engines — budgets ≥ the prompt equal full KV, cache sizes follow the formulas,
//! GemFilter re-runs on fresh positions, and bad parameters name their flag.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use common::*;
use fastkv::cpu::attention::Heads;
use fastkv::cpu::kv_cache::LayerCache;
use fastkv::policy::{pyramid_keep_ratio, HeadScores, Params};
use fastkv::select::*;
use fastkv::tensors::DType;
use fastkv::{Budget, Engine, Floor, Method, Policy, Prompt, Request};

fn policy(method: Method, kv_budget: usize, params: Params) -> Policy {
    Policy {
        method,
        tsp_layer: 1,
        budget: Budget::Absolute { kv_budget, tsp_len: kv_budget },
        window: 8,
        kernel: 7,
        pool: Pool::Max,
        floor: Floor::NONE,
        params,
    }
}

// ---------------------------------------------------------------- closed-form selection

#[test]
fn adakv_allocates_the_global_top_scores_with_the_alpha_floor() {
    // base 3 ⇒ the top 6 of all 8 scores compete: 9 8 7 1 from head 0, 6 5 from head 1 ⇒ n = [4, 2].
    let scores = [9.0, 8.0, 7.0, 1.0, 6.0, 5.0, 0.0, 0.0];
    // α = 0.5: round(4·0.5 + 1.5) = round(3.5) = 4, round(2·0.5 + 1.5) = round(2.5) = 2 (ties to even).
    assert_eq!(ada_budgets(&scores, 2, 4, 3, 0.5).unwrap(), [4, 2]);
    // α = 1: every head gets the base; α = 0: the raw counts.
    assert_eq!(ada_budgets(&scores, 2, 4, 3, 1.0).unwrap(), [3, 3]);
    assert_eq!(ada_budgets(&scores, 2, 4, 3, 0.0).unwrap(), [4, 2]);
    // Budgets never exceed the candidates.
    assert_eq!(ada_budgets(&scores, 2, 4, 9, 0.2).unwrap(), [4, 4]);
    // Each head keeps its own top entries (descending), then the window.
    let idx = head_indices(&scores, 6, 2, &[4, 2]).unwrap();
    assert_eq!(idx, vec![vec![0, 1, 2, 3, 4, 5], vec![0, 1, 4, 5]]);
}

const TINY_SCORES: &str = r#"{"0-0": [1, 3], "0-1": [2], "1-0": [4], "1-1": [0, 0]}"#;

#[test]
fn headkv_budgets_follow_the_head_scores() {
    let scores = HeadScores::parse(Path::new("h.json"), TINY_SCORES, 2, 2).unwrap();
    // Means 2, 2, 4, 0 normalised by 8.
    assert_eq!(scores.scores, [0.25, 0.25, 0.5, 0.0]);
    let scores: &'static HeadScores = Box::leak(Box::new(scores));
    let p = policy(Method::Headkv, 20, Params { head_scores: Some(scores), ..Params::default() });
    // B' = 12, ⌊B'/1.2⌋ = 10, pool = 10·4 = 40: round(s·40 + 2).
    assert_eq!(p.head_budgets(0, 20, 100).unwrap(), [12, 12]);
    assert_eq!(p.head_budgets(1, 20, 100).unwrap(), [22, 2]);
    // Capped at the S − W candidates.
    assert_eq!(p.head_budgets(1, 20, 25).unwrap(), [17, 2]);
}

#[test]
fn head_score_files_are_checked() {
    let parse = |text: &str| HeadScores::parse(Path::new("h.json"), text, 2, 2).unwrap_err().to_string();
    let missing = parse(r#"{"0-0": [1], "0-1": [2], "1-0": [4]}"#);
    assert!(missing.contains("h.json") && missing.contains("\"1-1\" is missing"), "{missing}");
    let outside = parse(r#"{"0-0": [1], "0-1": [2], "1-0": [4], "1-1": [1], "2-0": [1]}"#);
    assert!(outside.contains("\"2-0\" is outside"), "{outside}");
    assert!(parse(r#"{"0_0": [1]}"#).contains("not \"layer-head\""));
    assert!(parse(r#"{"0-0": []}"#).contains("non-empty"));
    assert!(parse("[1, 2]").contains("h.json"));
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let err = HeadScores::load(Path::new("/nonexistent/heads.json"), engine.spec()).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/heads.json"), "{err}");
}

#[test]
fn pyramidkv_budgets_fall_linearly() {
    // C = 108, W = 8 ⇒ B' = 100: from 2·100 − 5 = 195 down by ⌊190/3⌋ = 63 per layer.
    let p = policy(Method::Pyramidkv, 108, Params::default());
    let budgets: Vec<usize> = (0..4).map(|l| p.pyramid_budget(l, 4, 1000)).collect();
    assert_eq!(budgets, [195 + 8, 132 + 8, 69 + 8, 6 + 8]);
    assert_eq!(p.plan(3, 4, 1000, 1000).kv_budget, Some(14));
    // Layer 0's budget exceeds a 150-token prompt: stored whole.
    assert_eq!(p.plan(0, 4, 150, 150).kv_budget, None);
}

#[test]
fn streamingllm_keeps_sinks_and_recent_tokens() {
    assert_eq!(streaming_indices(10, 4, 7), [0, 1, 2, 3, 7, 8, 9]);
    assert_eq!(streaming_indices(10, 4, 12), (0..10).collect::<Vec<u32>>());
    assert_eq!(streaming_indices(10, 4, 3), [0, 1, 2]);
}

#[test]
fn pyramidinfer_follows_the_cosine_schedule() {
    assert_eq!(pyramid_keep_ratio(0.3, 0, 4), 1.0);
    assert!((pyramid_keep_ratio(0.3, 2, 4) - 0.65).abs() < 1e-12);
    assert_eq!(pyramid_keep_ratio(0.3, 4, 4), 0.3);
    assert!((pyramid_keep_ratio(0.0, 1, 4) - (1.0 + 0.5f64.sqrt()) / 2.0).abs() < 1e-12);
    let p = policy(Method::Pyramidinfer, 100, Params { decay_ratio: Some(0.5), ..Params::default() });
    // ρ_2 = 0.5·½ + 0.5 = 0.75 of 200.
    assert_eq!(p.pyramid_keep(2, 4, 1000, 200), 150);
    // At least min(64, context) tokens stay.
    let p0 = policy(Method::Pyramidinfer, 100, Params { decay_ratio: Some(0.0), ..Params::default() });
    assert_eq!(p0.pyramid_keep(3, 4, 1000, 80), 64);
    assert_eq!(p0.pyramid_keep(3, 4, 1000, 30), 30);
    // Without --decay-ratio, ρ makes the mean cached fraction the retain fraction C/L = 0.7 …
    let rho = policy(Method::Pyramidinfer, 700, Params::default()).decay_ratio(8, 1000);
    let mut frac = 1.0;
    let mut mean = 0.0;
    for l in 0..8 {
        mean += frac / 8.0;
        frac *= (1.0 - rho) * ((std::f64::consts::PI * l as f64 / 8.0).cos() + 1.0) / 2.0 + rho;
    }
    assert!((mean - 0.7).abs() < 1e-9, "ρ = {rho}: mean cached {mean}");
    // … which ρ = 0 already exceeds for 0.4 (≈ 0.59 over 8 layers), so 0 is the closest.
    assert_eq!(policy(Method::Pyramidinfer, 400, Params::default()).decay_ratio(8, 1000), 0.0);
    assert_eq!(policy(Method::Pyramidinfer, 1000, Params::default()).decay_ratio(8, 1000), 1.0);
    // Recent tokens: ⌊1000·0.01⌋ + 1.
    assert_eq!(p.recent_len(1000), 11);
    // Propagated: sink 0, the top 2 context scores (positions 2 and 4), the recent 6 and 7.
    assert_eq!(pyramidinfer_indices(&[9.0, 1.0, 5.0, 3.0, 4.0, 2.0], 8, 1, 2), [0, 2, 4, 6, 7]);
}

#[test]
fn gemfilter_picks_the_top_raw_scores_after_avgpool_5() {
    // Summed over heads: [0, 0, 0, 10, 0, 0, 5]; avgpool 5 (zero padding, /5): [0, 2, 2, 2, 3, 3, 1].
    let mut raw = vec![0f32; 14];
    raw[3] = 10.0;
    raw[7 + 6] = 5.0;
    assert_eq!(gemfilter_indices(&raw, 2, 7, 2).unwrap(), [4, 5]);
    assert_eq!(gemfilter_indices(&raw, 2, 7, 3).unwrap(), [1, 4, 5]);
    // Raw scores are plain dot products: no softmax, no 1/√D; heads 0 and 1 share KV head 0.
    let shape = Shape { n_heads: 2, n_kv_heads: 1, head_dim: 2, seq_len: 3, window: 1 };
    let q = [1.0, 2.0, -1.0, 0.5];
    let k = [1.0, 1.0, 2.0, 0.0, 0.0, 3.0];
    assert_eq!(last_query_scores(&q, &k, &shape).unwrap(), [3.0, 2.0, 6.0, -0.5, -2.0, 1.5]);
}

/// q[h,i,d], k[g,j,d] from sin/cos of their indices.
fn closed_form(h: usize, rows: usize, hk: usize, s: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let q = (0..h * rows * d).map(|x| ((0.37 * x as f64).sin() * 1.5) as f32).collect();
    let k = (0..hk * s * d).map(|x| ((0.11 * x as f64 + 0.3).cos() * 1.5) as f32).collect();
    (q, k)
}

/// Σ_r weight_r · causal softmax of the last `rows` query rows, f64, for the first S − W keys.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    h: usize,
    hk: usize,
    s: usize,
    d: usize,
    rows: usize,
    w: usize,
    weights: &[f64],
) -> Vec<f64> {
    let n = s - w;
    let mut out = vec![0f64; h * n];
    for hh in 0..h {
        let g = hh / (h / hk);
        for r in 0..rows {
            let visible = s - rows + r + 1;
            let logits: Vec<f64> = (0..visible)
                .map(|j| {
                    (0..d).map(|x| q[(hh * rows + r) * d + x] as f64 * k[(g * s + j) * d + x] as f64).sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            for j in 0..n.min(visible) {
                out[hh * n + j] += weights[r] * (logits[j] - m).exp() / z;
            }
        }
    }
    out
}

#[test]
fn h2o_and_pyramidinfer_scores_match_an_f64_reference() {
    let (h, hk, s, d, w) = (4, 2, 300, 5, 8);
    // H2O: every row (300 > one GEMM chunk of rows per group), W = 8 keys unscored.
    let (q, k) = closed_form(h, s, hk, s, d);
    let got = h2o_scores(&q, &k, &Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: w }).unwrap();
    let want = reference(&q, &k, h, hk, s, d, s, w, &vec![1.0; s]);
    let err = got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    assert!(err < 1e-4, "{err:e}");
    // PyramidInfer: the last R = 6 rows, weighted 1.0 … 1.2, score the first S − R keys.
    let r = 6;
    let (q, k) = closed_form(h, r, hk, s, d);
    let got = recent_scores(&q, &k, &Shape { n_heads: h, n_kv_heads: hk, head_dim: d, seq_len: s, window: r }).unwrap();
    let weights: Vec<f64> = (0..r).map(|i| 1.0 + 0.2 * i as f64 / (r - 1) as f64).collect();
    let want = reference(&q, &k, h, hk, s, d, r, r, &weights);
    let err = got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    assert!(err < 1e-5, "{err:e}");
}

/// Softmax attention of query head `hh` (its `d` values in `q`) over `(k, v)` rows, in f64.
fn softmax_reference(q: &[f32], rows: &[(&[f32], &[f32])]) -> Vec<f64> {
    let d = q.len();
    let logits: Vec<f64> = rows
        .iter()
        .map(|(k, _)| k.iter().zip(q).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (d as f64).sqrt())
        .collect();
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
    (0..d).map(|x| rows.iter().zip(&logits).map(|((_, v), l)| (l - m).exp() / z * v[x] as f64).sum()).collect()
}

/// What the cache holds of `x`: itself, or its bf16 rounding.
fn stored(x: &[f32], bf16: bool) -> Vec<f32> {
    x.iter().map(|&v| if bf16 { half::bf16::from_f32(v).to_f32() } else { v }).collect()
}

#[test]
fn ragged_decode_attention_matches_per_head_softmax() {
    // H = 4 query heads over Hk = 2 KV heads, ragged per-query-head caches (AdaKV/HeadKV layout),
    // stored in f32 and in bf16 (then the reference takes the bf16-rounded K and V).
    let (hk, h, d, s) = (2, 4, 3, 6);
    let k: Vec<f32> = (0..hk * s * d).map(|x| (0.7 * x as f32).sin()).collect();
    let v: Vec<f32> = (0..hk * s * d).map(|x| (0.3 * x as f32).cos()).collect();
    let positions: Vec<u32> = (0..s as u32).collect();
    let keep = vec![vec![5, 0], vec![1, 2, 3, 5], vec![4, 5], vec![0, 1, 2, 3, 4, 5]];
    let (k_new, v_new) = (vec![0.5, -0.2, 0.1, 0.3, 0.3, 0.9], vec![1.0, 2.0, 3.0, -1.0, -2.0, -3.0]);
    let q: Vec<f32> = (0..h * d).map(|x| (1.3 * x as f32).cos()).collect();
    for bf16 in [false, true] {
        let mut cache = LayerCache::from_prefill(&k, &v, &positions, Some(&keep), hk, d, 1, bf16);
        cache.push(&k_new, &v_new, 6);
        assert_eq!((cache.n_heads(), cache.len()), (4, 7));
        assert_eq!(cache.bytes(), 2 * (3 + 5 + 3 + 7) * d * if bf16 { 2 } else { 4 });
        assert_eq!(cache.positions(2), [4, 5, 6]);
        let mut out = vec![0f32; h * d];
        let heads = Heads { n_heads: h, n_kv_heads: hk, head_dim: d, sliding_window: None };
        cache.attend(&q, 6, &heads, &mut out);
        let (k, v, k_new, v_new) = (stored(&k, bf16), stored(&v, bf16), stored(&k_new, bf16), stored(&v_new, bf16));
        for (hh, rows) in keep.iter().enumerate() {
            let g = hh / 2;
            let row = |r: usize, src: &'static str| -> &[f32] {
                match (r < s, src) {
                    (true, "k") => &k[(g * s + r) * d..][..d],
                    (true, _) => &v[(g * s + r) * d..][..d],
                    (false, "k") => &k_new[g * d..][..d],
                    (false, _) => &v_new[g * d..][..d],
                }
            };
            let all: Vec<(&[f32], &[f32])> =
                rows.iter().map(|&r| r as usize).chain([s]).map(|r| (row(r, "k"), row(r, "v"))).collect();
            let want = softmax_reference(&q[hh * d..(hh + 1) * d], &all);
            for x in 0..d {
                let got = out[hh * d + x] as f64;
                assert!((got - want[x]).abs() < 1e-5, "bf16 {bf16}, head {hh}: {got} vs {}", want[x]);
            }
        }
    }
}

#[test]
fn decode_attention_over_many_chunks_and_a_window_matches_softmax() {
    // 1 300 cached entries (three threads' chunks) of 2 KV heads for 6 query heads; the window
    // hides all but the last 700 positions. Head dimensions 64 and 128 take this CPU's SIMD
    // kernel, 40 the portable loop (each kernel alone: `kv_cache::tests`).
    let (hk, h, s, window) = (2, 6, 1300, 700);
    let positions: Vec<u32> = (0..s as u32).collect();
    for (d, bf16) in [64, 128, 40].into_iter().flat_map(|d| [(d, false), (d, true)]) {
        let k: Vec<f32> = (0..hk * s * d).map(|x| (0.37 * x as f32).sin()).collect();
        let v: Vec<f32> = (0..hk * s * d).map(|x| (0.11 * x as f32).cos()).collect();
        let q: Vec<f32> = (0..h * d).map(|x| (0.9 * x as f32).cos() / (d as f32 / 64.0).sqrt()).collect();
        let cache = LayerCache::from_prefill(&k, &v, &positions, None, hk, d, 0, bf16);
        let heads = Heads { n_heads: h, n_kv_heads: hk, head_dim: d, sliding_window: Some(window) };
        let mut out = vec![0f32; h * d];
        cache.attend(&q, s as u32, &heads, &mut out);
        let (k, v) = (stored(&k, bf16), stored(&v, bf16));
        for hh in 0..h {
            let g = hh / (h / hk);
            let rows: Vec<(&[f32], &[f32])> =
                (s + 1 - window..s).map(|r| (&k[(g * s + r) * d..][..d], &v[(g * s + r) * d..][..d])).collect();
            let want = softmax_reference(&q[hh * d..(hh + 1) * d], &rows);
            for x in 0..d {
                let got = out[hh * d + x] as f64;
                assert!((got - want[x]).abs() < 1e-5, "d {d}, bf16 {bf16}, head {hh}[{x}]: {got} vs {}", want[x]);
            }
        }
    }
}

// ---------------------------------------------------------------- end to end

fn long_prompt() -> Vec<u32> {
    expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids
}

fn run(engine: &Engine, ids: &[u32], policy: Policy, n: usize) -> fastkv::Result<fastkv::Output> {
    let mut req = Request::new(Prompt::Tokens(ids.to_vec()));
    req.max_new_tokens = n;
    req.policy = Some(policy);
    req.record_selection = true;
    engine.generate(&req, |_| ControlFlow::Continue(()))
}

/// Uniform head scores for `engine`'s shape, written to `dir`.
fn head_scores(engine: &Engine, dir: &Path) -> &'static HeadScores {
    let s = engine.spec();
    let map: serde_json::Map<String, serde_json::Value> = (0..s.num_layers * s.num_heads)
        .map(|i| (format!("{}-{}", i / s.num_heads, i % s.num_heads), serde_json::json!([1.0 + (i % 3) as f64])))
        .collect();
    let path = dir.join("heads.json");
    std::fs::write(&path, serde_json::to_string(&map).unwrap()).unwrap();
    HeadScores::load(&path, s).unwrap()
}

fn baselines() -> impl Iterator<Item = Method> {
    Method::ALL.into_iter().filter(|&m| m != Method::Full)
}

#[test]
fn budgets_at_least_the_prompt_equal_full_kv() {
    for name in FIXTURES {
        let (tmp, dir) = build_engine(&fixture(name), DType::F32);
        let engine = Engine::open(&dir).unwrap();
        let ids = long_prompt();
        let full = run(&engine, &ids, engine.full_policy(), 8).unwrap();
        let params = Params { head_scores: Some(head_scores(&engine, tmp.path())), ..Params::default() };
        for method in baselines() {
            // PyramidKV's last layer keeps ⌊B'/20⌋: the budget must be ≥ 20·L for it to keep everything.
            let kv_budget = 64 * ids.len();
            let p = Policy {
                method,
                budget: Budget::Absolute { kv_budget, tsp_len: kv_budget },
                params,
                ..engine.default_policy()
            };
            let out = run(&engine, &ids, p, 8).unwrap();
            let err = rel_err(&out.prompt_logits, &full.prompt_logits);
            assert!(err < 1e-5, "{name} {method:?}: {err:e}");
            assert_eq!(out.token_ids, full.token_ids, "{name} {method:?}");
            // Nothing evicted: every layer stores its KV heads whole.
            let (hk, sel) = (engine.spec().num_kv_heads, out.selection.unwrap());
            assert!(sel.layers.iter().all(|l| l.kept.len() == hk && l.kept.iter().all(|k| k.len() == ids.len())));
        }
    }
}

#[test]
fn cache_sizes_follow_the_formulas() {
    let (tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let s = engine.spec().clone();
    let (n_layers, h, hk, d) = (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim);
    let ids = long_prompt();
    let l = ids.len();
    let (c, w) = (64, 8);
    let params = Params { head_scores: Some(head_scores(&engine, tmp.path())), ..Params::default() };
    let window: Vec<u32> = (l as u32 - 8..l as u32).collect();
    for method in baselines() {
        let p = Policy {
            method,
            budget: Budget::Absolute { kv_budget: c, tsp_len: 128 },
            params,
            ..engine.default_policy()
        };
        let out = run(&engine, &ids, p, 3).unwrap_or_else(|e| panic!("{method:?}: {e}"));
        assert_eq!(out.token_ids.len(), 3, "{method:?}");
        let sel = out.selection.unwrap();
        let kept: usize = sel.layers.iter().flat_map(|ls| ls.kept.iter().map(Vec::len)).sum();
        assert_eq!(out.metrics.kv_cache_bytes, 2 * kept * d * 4, "{method:?}");
        for ls in &sel.layers {
            let lens: Vec<usize> = ls.kept.iter().map(Vec::len).collect();
            let (lay, ctx) = (ls.layer, format!("{method:?} layer {}", ls.layer));
            match method {
                Method::Fastkv | Method::SnapkvGqa => assert_eq!(lens, vec![c; hk], "{ctx}"),
                Method::Snapkv | Method::H2o => assert_eq!(lens, vec![c; h], "{ctx}"),
                Method::Pyramidkv => assert_eq!(lens, vec![p.pyramid_budget(lay, n_layers, l); h], "{ctx}"),
                Method::Headkv => {
                    let want: Vec<usize> = p.head_budgets(lay, c, l).unwrap().iter().map(|b| b + w).collect();
                    assert_eq!(lens, want, "{ctx}");
                }
                Method::Adakv => {
                    // Rounding moves each head by at most ½ from its share of H·(C − W).
                    let total: usize = lens.iter().map(|n| n - w).sum();
                    assert!(total.abs_diff(h * (c - w)) <= h / 2, "{ctx}: {lens:?}");
                    let floor = (0.2 * (c - w) as f64).round() as usize + w;
                    assert!(lens.iter().all(|&n| n >= floor), "{ctx}: {lens:?}");
                }
                Method::Streamingllm => {
                    let want: Vec<u32> = (0..4).chain(l as u32 - 60..l as u32).collect();
                    assert!(ls.kept.iter().all(|k| *k == want), "{ctx}");
                }
                Method::Gemfilter => {
                    // The re-run saw C tokens at fresh positions 0..C−1.
                    assert!(ls.kept.iter().all(|k| *k == (0..c as u32).collect::<Vec<_>>()), "{ctx}");
                }
                Method::Pyramidinfer => {
                    assert_eq!(lens, vec![ls.seq_len; hk], "{ctx}");
                    if lay + 1 < n_layers {
                        let recent = p.recent_len(l);
                        let context = ls.seq_len - recent - 4;
                        let next = 4 + p.pyramid_keep(lay, n_layers, l, context) + recent;
                        assert_eq!(sel.layers[lay + 1].seq_len, next, "{ctx}");
                    }
                }
                Method::Full => unreachable!(),
            }
            if !matches!(method, Method::Gemfilter | Method::Pyramidinfer | Method::Streamingllm) {
                assert!(ls.kept.iter().all(|k| k.ends_with(&window)), "{ctx}: the window is always kept");
            }
        }
        let m = &out.metrics;
        assert!(m.kv_cache_bytes < m.kv_cache_bytes_full || method.per_query_head(), "{method:?}");
    }
}

#[test]
fn gemfilter_reruns_the_selected_tokens_from_position_zero() {
    let (_tmp, dir) = build_engine(&fixture("qwen3"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let ids = long_prompt();
    let k = 100;
    let p = Policy {
        method: Method::Gemfilter,
        budget: Budget::Absolute { kv_budget: k, tsp_len: k },
        params: Params { filter_layer: Some(1), ..Params::default() },
        ..engine.default_policy()
    };
    let model = engine.backend();
    let mut pre = model.prefill(&ids, &p, 2).unwrap();
    let kept = pre.filtered_positions.clone().unwrap();
    assert_eq!(kept.len(), k);
    assert!(kept.windows(2).all(|w| w[0] < w[1]) && (*kept.last().unwrap() as usize) < ids.len());
    // Same logits as a full prefill of just those tokens, which sees positions 0..k−1.
    let picked: Vec<u32> = kept.iter().map(|&i| ids[i as usize]).collect();
    let mut full = model.prefill(&picked, &engine.full_policy(), 2).unwrap();
    assert!(rel_err(&pre.logits, &full.logits) < 1e-6);
    assert_eq!(pre.next_position, k as u32);
    for l in 0..pre.cache.num_layers() {
        assert_eq!(pre.cache.positions(l).unwrap()[0], (0..k as u32).collect::<Vec<_>>());
    }
    // Decoding continues at position k, exactly like the full run on the picked tokens.
    let t = fastkv::sampling::argmax(&pre.logits);
    let a = model.decode(t, pre.next_position, &mut pre.cache).unwrap();
    let b = model.decode(t, full.next_position, &mut full.cache).unwrap();
    assert!(rel_err(&a, &b) < 1e-6);
    // The filter layer matters: a different f selects differently on this prompt.
    let other = Policy { params: Params { filter_layer: Some(0), ..p.params }, ..p };
    assert_ne!(model.prefill(&ids, &other, 0).unwrap().filtered_positions.unwrap(), kept);
}

#[test]
fn bad_baseline_parameters_name_their_flag() {
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let spec = engine.spec();
    let base = engine.default_policy();
    let with = |method, params| Policy { method, params, ..base };
    let d = Params::default();
    let cases = [
        (with(Method::Headkv, d), "head_scores"),
        (with(Method::Gemfilter, Params { filter_layer: Some(99), ..d }), "filter_layer"),
        (with(Method::Adakv, Params { ada_alpha: 1.5, ..d }), "ada_alpha"),
        (with(Method::Pyramidinfer, Params { decay_ratio: Some(-0.1), ..d }), "decay_ratio"),
        (with(Method::Pyramidinfer, Params { recent_ratio: 1.0, ..d }), "recent_ratio"),
        (with(Method::H2o, Params { h2o_max_len: 0, ..d }), "h2o_max_len"),
    ];
    for (p, flag) in cases {
        let err = p.validate(spec).unwrap_err().to_string();
        assert!(err.contains(flag), "{err}");
    }
    // Head scores of another model shape are refused.
    let other: &'static HeadScores =
        Box::leak(Box::new(HeadScores::parse(Path::new("h.json"), TINY_SCORES, 2, 2).unwrap()));
    let err = with(Method::Headkv, Params { head_scores: Some(other), ..d }).validate(spec).unwrap_err().to_string();
    assert!(err.contains("head_scores") && err.contains("2 layers × 2 heads"), "{err}");
    // H2O refuses prompts above --h2o-max-len, naming the flag.
    let ids = long_prompt();
    let err = run(&engine, &ids, with(Method::H2o, Params { h2o_max_len: 100, ..d }), 1).unwrap_err().to_string();
    assert!(err.contains("h2o_max_len") && err.contains(&ids.len().to_string()), "{err}");
}

#[test]
fn one_shared_prefill_equals_every_policy_run_alone() {
    let (_tmp, dir) = build_engine(&fixture("qwen3"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let model = engine.backend();
    let ids = long_prompt();
    let base = engine.default_policy();
    let rate = |method, tsp_layer, retain_rate| Policy {
        method,
        tsp_layer,
        budget: Budget::Rate { tsp_rate: 0.4, retain_rate },
        ..base
    };
    let gemfilter =
        |f| Policy { params: Params { filter_layer: Some(f), ..Params::default() }, ..rate(Method::Gemfilter, 1, 0.2) };
    // Streams part at ℓ* = 1 and 2 (FastKV), at every layer (PyramidInfer); GemFilter leaves at f.
    let policies = [
        engine.full_policy(),
        rate(Method::Fastkv, 1, 0.2),
        rate(Method::Fastkv, 1, 0.3),
        rate(Method::Fastkv, 2, 0.2),
        rate(Method::Snapkv, 1, 0.2),
        rate(Method::Streamingllm, 1, 0.2),
        gemfilter(1),
        gemfilter(0),
        rate(Method::Pyramidinfer, 1, 0.5),
        rate(Method::Adakv, 1, 0.2),
    ];
    let shared = model.prefill_many(&ids, &policies, 2).unwrap();
    assert_eq!(shared.len(), policies.len());
    for (p, mut many) in policies.iter().zip(shared) {
        let mut alone = model.prefill(&ids, p, 2).unwrap();
        let ctx = format!("{:?} ℓ*={} {:?}", p.method, p.tsp_layer, p.budget);
        assert_eq!(many.logits, alone.logits, "{ctx}");
        assert_eq!(many.seq_lens, alone.seq_lens, "{ctx}");
        assert_eq!(many.tsp_positions, alone.tsp_positions, "{ctx}");
        assert_eq!(many.filtered_positions, alone.filtered_positions, "{ctx}");
        assert_eq!(many.next_position, alone.next_position, "{ctx}");
        for l in 0..many.cache.num_layers() {
            let (a, b) = (many.cache.positions(l).unwrap(), alone.cache.positions(l).unwrap());
            assert_eq!(a.len(), b.len(), "{ctx}");
            (0..a.len()).for_each(|h| assert_eq!(a[h], b[h], "{ctx}"));
        }
        let t = fastkv::sampling::argmax(&many.logits);
        let a = model.decode(t, many.next_position, &mut many.cache).unwrap();
        assert_eq!(a, model.decode(t, alone.next_position, &mut alone.cache).unwrap(), "{ctx}");
    }
    // The streams really part: FastKV at two layers and GemFilter differ from full.
    let tsp = |i: usize| model.prefill(&ids, &policies[i], 0).unwrap().tsp_positions.unwrap();
    assert!(tsp(1).len() < ids.len() && tsp(1) != tsp(3));
}
