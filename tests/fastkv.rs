//! FastKV on the CPU engine, end to end: budgets and gates per layer, TSP positions, the
//! compressed cache during decode, and invariance when nothing is evicted (docs/method.md §10).

mod common;

use std::ops::ControlFlow;

use common::*;
use fastkv::tensors::DType;
use fastkv::{Budget, Engine, Method, Policy, Prompt, Request};

fn long_prompt(engine: &Engine) -> Vec<u32> {
    let p = expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap();
    assert!(p.ids.len() >= 600);
    assert!(engine.spec().vocab_size > *p.ids.iter().max().unwrap() as usize);
    p.ids
}

fn run(engine: &Engine, ids: &[u32], policy: Policy, n: usize) -> fastkv::Output {
    let mut req = Request::new(Prompt::Tokens(ids.to_vec()));
    req.max_new_tokens = n;
    req.policy = Some(policy);
    req.record_selection = true;
    engine.generate(&req, |_| ControlFlow::Continue(())).unwrap()
}

#[test]
fn nothing_evicted_means_fastkv_equals_full() {
    for name in FIXTURES {
        let (_tmp, dir) = build_engine(&fixture(name), DType::F32);
        let engine = Engine::open(&dir).unwrap();
        let ids = long_prompt(&engine);
        let l = ids.len();
        let full = run(&engine, &ids, engine.full_policy(), 8);
        // C = L: top-k keeps every token (reordered); T = L: TSP never fires.
        let keep_all = Policy { budget: Budget::Absolute { kv_budget: l, tsp_len: l }, ..engine.default_policy() };
        let fastkv = run(&engine, &ids, keep_all, 8);
        let err = rel_err(&fastkv.prompt_logits, &full.prompt_logits);
        assert!(err < 1e-5, "{name}: {err:e}");
        assert_eq!(fastkv.token_ids, full.token_ids, "{name}");
        assert_eq!(fastkv.selection.unwrap().tsp_positions, None);
    }
}

#[test]
fn rate_mode_budgets_follow_the_formulas() {
    let (_tmp, dir) = build_engine(&fixture("qwen3"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let ids = long_prompt(&engine);
    let l = ids.len();
    let policy = engine.default_policy();
    assert_eq!(policy.method, Method::Fastkv);
    assert_eq!(policy.tsp_layer, engine.spec().num_layers / 2 - 1);
    let (t, r) = (0.2, 0.1);
    assert_eq!(policy.budget, Budget::Rate { tsp_rate: t, retain_rate: r });
    let out = run(&engine, &ids, policy, 1);
    let sel = out.selection.unwrap();
    let tsp_len = (l as f64 * t) as usize;
    for ls in &sel.layers {
        let (seq, kept) = if ls.layer <= policy.tsp_layer {
            (l, (l as f64 * r) as usize)
        } else {
            (tsp_len, (tsp_len as f64 * (r / t)) as usize)
        };
        assert_eq!(ls.seq_len, seq, "layer {}", ls.layer);
        for head in &ls.kept {
            assert_eq!(head.len(), kept, "layer {}", ls.layer);
        }
    }
    let m = out.metrics;
    assert!(m.kv_cache_bytes * 100 <= m.kv_cache_bytes_full * 11, "{} of {}", m.kv_cache_bytes, m.kv_cache_bytes_full);
}

#[test]
fn tsp_positions_are_sorted_unique_and_keep_the_window() {
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let ids = long_prompt(&engine);
    let l = ids.len();
    let policy = Policy { budget: Budget::Absolute { kv_budget: 64, tsp_len: 128 }, ..engine.default_policy() };
    let sel = run(&engine, &ids, policy, 1).selection.unwrap();
    assert_eq!(sel.tsp_layer, Some(policy.tsp_layer));
    let tsp = sel.tsp_positions.unwrap();
    assert_eq!(tsp.len(), 128);
    assert!(tsp.windows(2).all(|w| w[0] < w[1]));
    assert!(tsp.ends_with(&(l as u32 - 8..l as u32).collect::<Vec<_>>()));
    for ls in &sel.layers {
        for head in &ls.kept {
            assert_eq!(head.len(), 64);
            // The window is always cached; after TSP only propagated tokens can be.
            assert!(head.ends_with(&(l as u32 - 8..l as u32).collect::<Vec<_>>()));
            if ls.layer > policy.tsp_layer {
                assert!(head.iter().all(|p| tsp.binary_search(p).is_ok()), "layer {}", ls.layer);
            }
        }
    }
}

#[test]
fn short_prompts_skip_compression_and_tsp() {
    let (_tmp, dir) = build_engine(&fixture("mistral"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let ids: Vec<u32> = long_prompt(&engine)[..40].to_vec();
    // L < C: nothing is compressed and TSP does not fire (docs/method.md §8.1).
    let policy = Policy { budget: Budget::Absolute { kv_budget: 64, tsp_len: 16 }, ..engine.default_policy() };
    let sel = run(&engine, &ids, policy, 1).selection.unwrap();
    assert_eq!(sel.tsp_positions, None);
    assert!(sel.layers.iter().all(|ls| ls.seq_len == 40 && ls.kept.iter().all(|h| h.len() == 40)));
    // Rate mode with C = ⌊L·r⌋ < W clamps to the window instead of failing (docs/method.md §8.5).
    let tiny = run(&engine, &ids[..20], engine.default_policy(), 2);
    assert_eq!(tiny.token_ids.len(), 2);
}

#[test]
fn decode_appends_at_positions_after_the_prompt() {
    let (_tmp, dir) = build_engine(&fixture("qwen2"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let ids = long_prompt(&engine);
    let l = ids.len();
    let policy = engine.default_policy();
    let model = engine.backend();
    let mut pre = model.prefill(&ids, &policy, 4).unwrap();
    let len = |cache: &fastkv::backend::KvCache, l: usize| cache.positions(l).unwrap()[0].len();
    let kept: Vec<usize> = (0..pre.cache.num_layers()).map(|l| len(&pre.cache, l)).collect();
    let mut token = fastkv::sampling::argmax(&pre.logits);
    for step in 0..3 {
        let logits = model.decode(token, (l + step) as u32, &mut pre.cache).unwrap();
        token = fastkv::sampling::argmax(&logits);
        for (layer, k) in kept.iter().enumerate() {
            assert_eq!(len(&pre.cache, layer), k + step + 1);
            for positions in pre.cache.positions(layer).unwrap() {
                assert_eq!(*positions.last().unwrap(), (l + step) as u32);
            }
        }
    }
}

/// fastkv's floor: a short prompt — what a server gets all the time — is not compressed, so the
/// engine's default FastKV answers as full KV does; the paper's budgets without the floor (r = 0.1
/// of 48 tokens is a handful of entries) do not.
#[test]
fn default_fastkv_equals_full_kv_on_short_prompts() {
    let Some(model) = resource(root().join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf"), "scripts/models.sh")
    else {
        return;
    };
    let Some(essays) = essays() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("engine");
    let options = fastkv::builder::BuildOptions {
        checkpoint: model,
        output: dir.clone(),
        dtype: DType::Bf16,
        force: false,
        policy: fastkv::Overrides::default(),
        calibrate: fastkv::builder::Calibrate::Never,
    };
    fastkv::builder::build(&options, &fastkv::progress::Silent).unwrap();
    let engine = Engine::open(&dir).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&essays).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let ids = engine.encode(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let default = engine.default_policy();
    assert_eq!(default.floor, fastkv::Floor::DEFAULT);
    let mut paper_differs = false;
    for n in [16, 48, 100, 256] {
        let full = run(&engine, &ids[..n], engine.full_policy(), 16);
        let fastkv = run(&engine, &ids[..n], default, 16);
        assert_eq!(fastkv.token_ids, full.token_ids, "{n}-token prompt");
        assert_eq!(fastkv.metrics.kv_cache_bytes, full.metrics.kv_cache_bytes, "{n}-token prompt");
        let paper = run(&engine, &ids[..n], Policy { floor: fastkv::Floor::NONE, ..default }, 16);
        paper_differs |= paper.token_ids != full.token_ids;
    }
    assert!(paper_differs, "without the floor, r = 0.1 changes some short prompt's answer");
}
