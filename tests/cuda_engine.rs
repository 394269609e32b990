//! The CUDA engine against the CPU reference, on the same engine directories and the same machine:
//! the four HF fixtures (bf16 engines) and a random-weight engine of SmolLM2-135M's shape at 2K
//! tokens, under full KV and FastKV. Each test prints `skipped: no CUDA device` without a GPU.
//!
//! Tolerances (bf16 activations on the GPU, f32 on the CPU, the same bf16 weights): logits within
//! [`TOL`] of the largest logit; the greedy token the same wherever the CPU's top-2 margin exceeds
//! twice that; kept KV positions and TSP positions the same sets up to near-ties (≥ [`OVERLAP`] of
//! the TSP set and, per layer, of each head's set on average, ≥ [`HEAD_FLOOR`] for every head); cache
//! lengths, sequence lengths and decode positions exactly equal.
#![cfg(feature = "cuda")]

mod common;
#[path = "common/cuda.rs"]
mod cuda_common;

use common::{build_engine, expected, fixture, rel_err, FIXTURES};
use fastkv::backend::{Backend, KvCache};
use fastkv::prefill::Prefill;
use fastkv::tensors::DType;
use fastkv::{Device, Engine, Error, Method, Policy};

const TOL: f32 = 0.05;
const OVERLAP: f64 = 0.9;
const HEAD_FLOOR: f64 = 0.75;

/// The engine on GPU 0, or `None` (and a printed skip) without a CUDA device.
fn on_gpu(dir: &std::path::Path) -> Option<Engine> {
    match Engine::open_on(dir, Device::Cuda(0)) {
        Ok(e) => Some(e),
        Err(Error::NoDevice { reason, .. }) => {
            cuda_common::no_cuda_device(&reason);
            None
        }
        Err(e) => panic!("opening {} on cuda:0: {e}", dir.display()),
    }
}

fn argmax_and_margin(logits: &[f32]) -> (u32, f32) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    (idx[0] as u32, logits[idx[0]] - logits[idx[1]])
}

fn shared(a: &[u32], b: &[u32]) -> f64 {
    let set: std::collections::HashSet<u32> = a.iter().copied().collect();
    b.iter().filter(|x| set.contains(x)).count() as f64 / a.len().max(1) as f64
}

fn compare_selection(ctx: &str, cpu: &Prefill<KvCache>, gpu: &Prefill<KvCache>) {
    assert_eq!(cpu.seq_lens, gpu.seq_lens, "{ctx}: sequence lengths");
    assert_eq!(cpu.next_position, gpu.next_position, "{ctx}");
    match (&cpu.tsp_positions, &gpu.tsp_positions) {
        (Some(a), Some(b)) => {
            assert_eq!(a.len(), b.len(), "{ctx}: TSP length");
            assert!(shared(a, b) >= OVERLAP, "{ctx}: TSP positions share {:.3}", shared(a, b));
        }
        (a, b) => assert_eq!(a.is_some(), b.is_some(), "{ctx}: TSP fired on one backend only"),
    }
    // bf16 rounding compounds over the layers before ℓ* and max pooling flips whole plateaus between
    // near-tied neighbours, so one head may part from the CPU more than a layer does: each layer's
    // mean overlap must reach OVERLAP, each head HEAD_FLOOR. The distribution is printed, so a real
    // bug (a wrong head, an off-by-one) still shows as a layer far below the others.
    let mut means = Vec::new();
    for l in 0..cpu.cache.num_layers() {
        let (a, b) = (cpu.cache.positions(l).unwrap(), gpu.cache.positions(l).unwrap());
        assert_eq!(a.len(), b.len(), "{ctx}: layer {l} cache heads");
        let mut heads = Vec::new();
        for (h, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_eq!(a.len(), b.len(), "{ctx}: layer {l} head {h} cache length");
            heads.push(shared(a, b));
        }
        let mean = heads.iter().sum::<f64>() / heads.len().max(1) as f64;
        let worst = heads.iter().copied().fold(1.0, f64::min);
        assert!(mean >= OVERLAP, "{ctx}: layer {l} keeps {mean:.3} of the CPU's entries on average");
        assert!(worst >= HEAD_FLOOR, "{ctx}: layer {l} has a head keeping {worst:.3} of the CPU's entries");
        means.push(format!("{mean:.3}/{worst:.3}"));
    }
    println!("{ctx}: kept-entry overlap per layer (mean/worst head): {}", means.join(" "));
}

/// Prefill and `steps` teacher-forced decode steps (the CPU's greedy tokens) on both backends.
fn compare(ctx: &str, cpu: &Engine, gpu: &Engine, ids: &[u32], policy: &Policy, steps: usize) {
    let (c, g) = (cpu.backend(), gpu.backend());
    let mut a = c.prefill(ids, policy, steps).unwrap();
    let mut b = g.prefill(ids, policy, steps).unwrap();
    compare_selection(ctx, &a, &b);
    let (mut la, mut lb) = (a.logits.clone(), b.logits.clone());
    for step in 0..=steps {
        let scale = la.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = rel_err(&lb, &la);
        assert!(err < TOL, "{ctx}: step {step}: logits differ by {err:.4} of the largest");
        let ((ta, margin), (tb, _)) = (argmax_and_margin(&la), argmax_and_margin(&lb));
        if margin > 2.0 * TOL * scale {
            assert_eq!(ta, tb, "{ctx}: step {step}: greedy token (CPU margin {margin:.3})");
        }
        if step < steps {
            let pos = a.next_position + step as u32;
            la = c.decode(ta, pos, &mut a.cache).unwrap();
            lb = g.decode(ta, pos, &mut b.cache).unwrap();
        }
    }
    println!("{ctx}: ok ({} tokens, {steps} decode steps)", ids.len());
}

#[test]
fn cuda_engine_matches_cpu_on_every_fixture() {
    for name in FIXTURES {
        let (_tmp, dir) = build_engine(&fixture(name), DType::Bf16);
        let Some(gpu) = on_gpu(&dir) else { return };
        let cpu = Engine::open(&dir).unwrap();
        let longest = expected(name).prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap();
        for policy in [cpu.full_policy(), cpu.default_policy()] {
            compare(&format!("{name} {:?}", policy.method), &cpu, &gpu, &longest.ids, &policy, 8);
        }
    }
}

#[test]
fn random_smollm2_shape_at_2k_tokens_matches_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2");
    fastkv::builder::build_random("smollm2-135m", 7, DType::Bf16, &dir, false).unwrap();
    let Some(gpu) = on_gpu(&dir) else { return };
    let cpu = Engine::open(&dir).unwrap();
    let vocab = cpu.spec().vocab_size as u32;
    let ids: Vec<u32> = (0..2048u32).map(|i| i.wrapping_mul(2654435761) % vocab).collect();
    for policy in [cpu.full_policy(), cpu.default_policy()] {
        compare(&format!("smollm2-shape {:?}", policy.method), &cpu, &gpu, &ids, &policy, 8);
    }
}

#[test]
fn graph_replay_equals_eager_launches() {
    let (_tmp, dir) = build_engine(&fixture("qwen3"), DType::Bf16);
    let Some(gpu) = on_gpu(&dir) else { return };
    let Backend::Cuda(model) = gpu.backend() else { unreachable!("opened on cuda") };
    let ids = expected("qwen3").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let policy = gpu.default_policy();
    let run = |graphs: bool| {
        model.set_graphs(graphs);
        let mut pre = gpu.backend().prefill(&ids, &policy, 12).unwrap();
        let mut token = fastkv::sampling::argmax(&pre.logits);
        let mut all = Vec::new();
        for step in 0..12 {
            let logits = gpu.backend().decode(token, pre.next_position + step, &mut pre.cache).unwrap();
            token = fastkv::sampling::argmax(&logits);
            all.push(logits);
        }
        all
    };
    let (eager, graphs) = (run(false), run(true));
    model.set_graphs(true);
    assert_eq!(eager, graphs, "a replayed graph must compute exactly what eager launches do");
}

#[test]
fn concurrent_requests_get_their_own_streams() {
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::Bf16);
    let Some(gpu) = on_gpu(&dir) else { return };
    let prompts: Vec<Vec<u32>> = expected("llama").prompts.into_iter().map(|p| p.ids).collect();
    let generate = |ids: &Vec<u32>| {
        let mut req = fastkv::Request::new(fastkv::Prompt::Tokens(ids.clone()));
        req.max_new_tokens = 8;
        gpu.generate(&req, |_| std::ops::ControlFlow::Continue(())).unwrap().token_ids
    };
    let alone: Vec<Vec<u32>> = prompts.iter().map(generate).collect();
    let together: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|ids| s.spawn(move || generate(ids))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
}

#[test]
fn what_the_gpu_cannot_run_is_a_clear_error() {
    let (_tmp, dir) = build_engine(&fixture("mistral"), DType::Bf16);
    let Some(gpu) = on_gpu(&dir) else { return };
    let err = Engine::open_on(&dir, Device::Cuda(99)).err().unwrap().to_string();
    assert!(err.contains("99"), "{err}");
    let ids = expected("mistral").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let snapkv = Policy { method: Method::Snapkv, ..gpu.default_policy() };
    let err = gpu.backend().prefill(&ids, &snapkv, 1).err().unwrap().to_string();
    assert!(err.contains("snapkv") && err.contains("fastkv") && err.contains("streamingllm"), "{err}");
    // The CPU backend keeps working in the same process.
    let cpu = Engine::open(&dir).unwrap();
    assert!(cpu.backend().prefill(&ids, &snapkv, 1).is_ok());
    // StreamingLLM and SnapKV-GQA run on the GPU.
    for method in [Method::Streamingllm, Method::SnapkvGqa] {
        let policy = Policy { method, ..gpu.default_policy() };
        compare(&format!("mistral {method:?}"), &cpu, &gpu, &ids, &policy, 2);
    }
}
