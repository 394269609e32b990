//! Every backend against the CPU reference, over the same cases — as llama.cpp's test-backend-ops
//! runs every backend against its CPU one. A [`Candidate`] prefills and decodes the cases its way; the
//! harness runs the CPU backend one request at a time on the same engine directory and compares:
//! prefill logits, what each layer kept and what TSP propagated, and the logits of every decode step
//! (teacher-forced with the CPU's greedy tokens). A new backend, or a new way of decoding, is covered
//! by adding a candidate.
//!
//! Candidates: the CPU's **batched decode** (every case of a fixture decoded in one batch, as the
//! batching engine does; exact: the same bits), **CUDA** (feature `cuda`, on GPU 0, each case alone and all
//! decoded in batched steps; without a device it is skipped, or fails with `FASTKV_REQUIRE_GPU=1`) and
//! **TensorRT** (feature `tensorrt`: the engine's plans built on GPU 0 and run on `tensorrt:0`, for the cases they
//! take — the engine's FastKV policy at the lengths the export supports; skipped in one line without TensorRT's
//! libraries), within bf16 tolerances: logits within
//! [`TOL`] of the largest logit, the greedy token the same wherever the CPU's top-2 margin exceeds
//! twice that, kept KV positions sharing ≥ [`OVERLAP`] per layer on average and ≥ [`HEAD_FLOOR`] per
//! head, TSP positions ≥ [`OVERLAP`]; lengths and positions always exactly. `FASTKV_BACKENDS=cuda:0,…` (candidate
//! names) runs only those candidates: scripts/gpu-check.sh gives TensorRT's plan builds their own step.

mod common;
#[cfg(feature = "cuda")]
#[path = "common/cuda.rs"]
mod cuda_common;

use std::path::Path;

use common::*;
use fastkv::backend::{KvCache, Step};
use fastkv::prefill::Prefill;
use fastkv::tensors::DType;
use fastkv::{Engine, Method, Policy};

const TOL: f32 = 0.05;
const OVERLAP: f64 = 0.9;
const HEAD_FLOOR: f64 = 0.75;
/// Decode steps per case.
const STEPS: usize = 8;

/// One prompt under one policy.
#[derive(Clone)]
struct Case {
    name: String,
    ids: Vec<u32>,
    policy: Policy,
}

/// What a backend made of a case: its prefill (cache included) and the logits of each decode step.
struct Trace {
    prefill: Prefill<KvCache>,
    steps: Vec<Vec<f32>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Tolerance {
    /// The same bits.
    Exact,
    /// bf16 activations against the CPU's f32 ones (the CUDA candidate's).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Bf16,
}

/// A backend, or a way of running one, checked against the CPU reference.
trait Candidate {
    fn name(&self) -> &'static str;
    fn tolerance(&self) -> Tolerance;
    /// The engine on this candidate's device; `None` when it is absent here (the candidate is skipped).
    fn open(&self, dir: &Path) -> Option<Engine>;
    /// Prefills every case and decodes `forced[i]` (token by token) after case i.
    fn run(&self, engine: &Engine, cases: &[Case], forced: &[Vec<u32>]) -> Vec<Trace>;
    /// Whether it runs `case` at all (a TensorRT plan runs one policy over a range of lengths).
    fn runs(&self, _engine: &Engine, _case: &Case) -> bool {
        true
    }
}

/// Each case prefilled alone, then all decoded together, one batched step per token.
struct CpuBatched;

impl Candidate for CpuBatched {
    fn name(&self) -> &'static str {
        "cpu batched decode"
    }
    fn tolerance(&self) -> Tolerance {
        Tolerance::Exact
    }
    fn open(&self, dir: &Path) -> Option<Engine> {
        Some(Engine::open(dir).unwrap())
    }
    fn run(&self, engine: &Engine, cases: &[Case], forced: &[Vec<u32>]) -> Vec<Trace> {
        batched(engine, cases, forced)
    }
}

/// The CUDA backend on GPU 0, each case on its own (`batched: false`) or all decoded in one batched step per
/// token (cuBLAS with M = the batch, attention over the table of caches, a graph per batch bucket).
#[cfg(feature = "cuda")]
struct Cuda {
    batched: bool,
}

#[cfg(feature = "cuda")]
impl Candidate for Cuda {
    fn name(&self) -> &'static str {
        if self.batched {
            "cuda:0 batched decode"
        } else {
            "cuda:0"
        }
    }
    fn tolerance(&self) -> Tolerance {
        Tolerance::Bf16
    }
    fn open(&self, dir: &Path) -> Option<Engine> {
        match Engine::open_on(dir, fastkv::Device::Cuda(0)) {
            Ok(e) => Some(e),
            Err(fastkv::Error::NoDevice { reason, .. }) => {
                cuda_common::no_cuda_device(&reason);
                None
            }
            Err(e) => panic!("opening {} on cuda:0: {e}", dir.display()),
        }
    }
    fn run(&self, engine: &Engine, cases: &[Case], forced: &[Vec<u32>]) -> Vec<Trace> {
        if self.batched {
            batched(engine, cases, forced)
        } else {
            alone(engine, cases, forced)
        }
    }
}

/// The TensorRT backend on GPU 0: the engine's plans built first, for the longest of the cases.
#[cfg(feature = "tensorrt")]
struct TensorRt {
    max_input_len: usize,
}

#[cfg(feature = "tensorrt")]
impl Candidate for TensorRt {
    fn name(&self) -> &'static str {
        "tensorrt:0"
    }
    fn tolerance(&self) -> Tolerance {
        Tolerance::Bf16
    }
    fn open(&self, dir: &Path) -> Option<Engine> {
        use fastkv::trt::{builder, plan::Limits, plan::PlanOptions};
        // The GPU first: without one this run fails (FASTKV_REQUIRE_GPU=1) or skips, as the CUDA candidate does.
        if let Err(fastkv::Error::NoDevice { reason, .. }) = fastkv::backend::Backend::probe(fastkv::Device::Cuda(0)) {
            cuda_common::no_cuda_device(&reason);
            return None;
        }
        if let Err(e) = builder::available() {
            println!("skipped: tensorrt:0 ({e})");
            return None;
        }
        let limits = Limits { max_input_len: self.max_input_len, max_output_len: STEPS + 1 };
        let t0 = std::time::Instant::now();
        match builder::build_plans(dir, &PlanOptions { limits, device: 0 }, &fastkv::progress::Silent) {
            Ok(r) => {
                println!("tensorrt:0: plans built in {:.1} s (TensorRT {})", t0.elapsed().as_secs_f64(), r.version)
            }
            // A policy the export cannot express (absolute budgets) has no plans to check.
            Err(fastkv::Error::InvalidArgument { msg, .. }) => {
                println!("skipped: tensorrt:0 on {}: {msg}", dir.display());
                return None;
            }
            Err(e) => panic!("building TensorRT plans for {}: {e}", dir.display()),
        }
        Some(Engine::open_on(dir, fastkv::Device::TensorRt(0)).unwrap_or_else(|e| panic!("tensorrt:0: {e}")))
    }
    /// Every case twice: decode steps enqueued each time, then replayed from captured graphs; the same bits.
    fn run(&self, engine: &Engine, cases: &[Case], forced: &[Vec<u32>]) -> Vec<Trace> {
        let fastkv::backend::Backend::TensorRt(model) = engine.backend() else { unreachable!("opened on tensorrt") };
        model.set_graphs(false);
        let enqueued = alone(engine, cases, forced);
        model.set_graphs(true);
        let graphs = alone(engine, cases, forced);
        for ((case, a), b) in cases.iter().zip(&enqueued).zip(&graphs) {
            assert!(a.steps == b.steps, "tensorrt:0, {}: replayed graphs differ from enqueueV3", case.name);
        }
        graphs
    }
    fn runs(&self, engine: &Engine, case: &Case) -> bool {
        engine.backend().check(&case.policy, case.ids.len()).is_ok()
    }
}

/// Every candidate, or those `FASTKV_BACKENDS` names; the longest of `cases` sizes TensorRT's plans.
fn candidates(#[allow(unused_variables)] cases: &[Case]) -> Vec<Box<dyn Candidate>> {
    #[allow(unused_mut)]
    let mut all: Vec<Box<dyn Candidate>> = vec![Box::new(CpuBatched)];
    #[cfg(feature = "cuda")]
    all.extend([Box::new(Cuda { batched: false }) as Box<dyn Candidate>, Box::new(Cuda { batched: true })]);
    #[cfg(feature = "tensorrt")]
    all.push(Box::new(TensorRt { max_input_len: cases.iter().map(|c| c.ids.len()).max().unwrap_or(1) }));
    let wanted = std::env::var("FASTKV_BACKENDS").unwrap_or_default();
    all.retain(|c| wanted.is_empty() || wanted.split(',').any(|w| w.trim() == c.name()));
    all
}

/// Each case prefilled on its own, then every case decoded together, one batched step per token.
fn batched(engine: &Engine, cases: &[Case], forced: &[Vec<u32>]) -> Vec<Trace> {
    let b = engine.backend();
    let mut traces: Vec<Trace> = cases
        .iter()
        .map(|c| Trace { prefill: b.prefill(&c.ids, &c.policy, STEPS).unwrap(), steps: Vec::new() })
        .collect();
    for step in 0..STEPS {
        let mut steps: Vec<Step> = traces
            .iter_mut()
            .zip(forced)
            .map(|(t, f)| Step {
                token: f[step],
                position: t.prefill.next_position + step as u32,
                cache: &mut t.prefill.cache,
            })
            .collect();
        let logits = b.decode_batch(&mut steps).unwrap();
        traces.iter_mut().zip(logits).for_each(|(t, l)| t.steps.push(l));
    }
    traces
}

/// Each case prefilled and decoded on its own: the reference, run on the CPU backend.
fn alone(engine: &Engine, cases: &[Case], forced: &[Vec<u32>]) -> Vec<Trace> {
    let b = engine.backend();
    cases
        .iter()
        .zip(forced)
        .map(|(c, f)| {
            let mut prefill = b.prefill(&c.ids, &c.policy, STEPS).unwrap();
            let steps = (0..STEPS)
                .map(|s| b.decode(f[s], prefill.next_position + s as u32, &mut prefill.cache).unwrap())
                .collect();
            Trace { prefill, steps }
        })
        .collect()
}

fn shared(a: &[u32], b: &[u32]) -> f64 {
    let set: std::collections::HashSet<u32> = a.iter().copied().collect();
    b.iter().filter(|x| set.contains(x)).count() as f64 / a.len().max(1) as f64
}

fn argmax_and_margin(logits: &[f32]) -> (u32, f32) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    (idx[0] as u32, logits[idx[0]] - logits[idx[1]])
}

fn compare_selection(ctx: &str, tol: Tolerance, cpu: &Prefill<KvCache>, other: &Prefill<KvCache>) {
    assert_eq!(cpu.seq_lens, other.seq_lens, "{ctx}: sequence lengths");
    assert_eq!(cpu.next_position, other.next_position, "{ctx}");
    match (&cpu.tsp_positions, &other.tsp_positions) {
        (Some(a), Some(b)) if tol == Tolerance::Exact => assert_eq!(a, b, "{ctx}: TSP positions"),
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
        let (a, b) = (cpu.cache.positions(l).unwrap(), other.cache.positions(l).unwrap());
        assert_eq!(a.len(), b.len(), "{ctx}: layer {l} cache heads");
        if tol == Tolerance::Exact {
            assert_eq!(a, b, "{ctx}: layer {l} kept positions");
            continue;
        }
        let heads: Vec<f64> = a.iter().zip(&b).map(|(a, b)| shared(a, b)).collect();
        a.iter().zip(&b).enumerate().for_each(|(h, (a, b))| assert_eq!(a.len(), b.len(), "{ctx}: layer {l} head {h}"));
        let mean = heads.iter().sum::<f64>() / heads.len().max(1) as f64;
        let worst = heads.iter().copied().fold(1.0, f64::min);
        assert!(mean >= OVERLAP, "{ctx}: layer {l} keeps {mean:.3} of the CPU's entries on average");
        assert!(worst >= HEAD_FLOOR, "{ctx}: layer {l} has a head keeping {worst:.3} of the CPU's entries");
        means.push(format!("{mean:.3}/{worst:.3}"));
    }
    if !means.is_empty() {
        println!("{ctx}: kept-entry overlap per layer (mean/worst head): {}", means.join(" "));
    }
}

fn compare_logits(ctx: &str, tol: Tolerance, cpu: &[f32], other: &[f32]) {
    if tol == Tolerance::Exact {
        assert!(cpu.iter().zip(other).all(|(a, b)| a.to_bits() == b.to_bits()), "{ctx}: logits differ");
        return;
    }
    let scale = cpu.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = rel_err(other, cpu);
    assert!(err < TOL, "{ctx}: logits differ by {err:.4} of the largest");
    let ((ta, margin), (tb, _)) = (argmax_and_margin(cpu), argmax_and_margin(other));
    if margin > 2.0 * TOL * scale {
        assert_eq!(ta, tb, "{ctx}: greedy token (CPU margin {margin:.3})");
    }
}

/// Every candidate against the CPU on `cases` of the engine in `dir`.
fn check_all(dir: &Path, what: &str, cases: &[Case]) {
    // Absent candidates first: a run with none left (no GPU, no TensorRT) computes no reference.
    let opened: Vec<(Box<dyn Candidate>, Engine)> =
        candidates(cases).into_iter().filter_map(|c| c.open(dir).map(|e| (c, e))).collect();
    if opened.is_empty() {
        return;
    }
    let cpu = Engine::open(dir).unwrap();
    // The CPU's own greedy tokens drive every decode.
    let reference_greedy = |c: &Case| {
        let mut pre = cpu.backend().prefill(&c.ids, &c.policy, STEPS).unwrap();
        let mut tokens = vec![fastkv::sampling::argmax(&pre.logits)];
        for s in 0..STEPS - 1 {
            let logits = cpu.backend().decode(tokens[s], pre.next_position + s as u32, &mut pre.cache).unwrap();
            tokens.push(fastkv::sampling::argmax(&logits));
        }
        tokens
    };
    let forced: Vec<Vec<u32>> = cases.iter().map(reference_greedy).collect();
    let reference = alone(&cpu, cases, &forced);
    for (candidate, engine) in opened {
        let tol = candidate.tolerance();
        // The cases this candidate runs, with their references and forced tokens.
        let picked: Vec<usize> = (0..cases.len()).filter(|&i| candidate.runs(&engine, &cases[i])).collect();
        let mine: Vec<Case> = picked.iter().map(|&i| cases[i].clone()).collect();
        let forced: Vec<Vec<u32>> = picked.iter().map(|&i| forced[i].clone()).collect();
        let reference: Vec<&Trace> = picked.iter().map(|&i| &reference[i]).collect();
        let traces = candidate.run(&engine, &mine, &forced);
        for ((case, want), got) in mine.iter().zip(reference).zip(&traces) {
            let ctx = format!("{} on {what}, {}", candidate.name(), case.name);
            compare_selection(&ctx, tol, &want.prefill, &got.prefill);
            compare_logits(&format!("{ctx}, prefill"), tol, &want.prefill.logits, &got.prefill.logits);
            for (s, (a, b)) in want.steps.iter().zip(&got.steps).enumerate() {
                compare_logits(&format!("{ctx}, step {s}"), tol, a, b);
            }
        }
        println!("{} on {what}: {} of {} cases ok", candidate.name(), mine.len(), cases.len());
    }
}

/// The methods every backend runs, on `ids`.
fn cases(engine: &Engine, ids: &[u32], lengths: &[usize]) -> Vec<Case> {
    let methods = [Method::Full, Method::Fastkv, Method::SnapkvGqa, Method::Streamingllm];
    lengths
        .iter()
        .flat_map(|&n| {
            methods.map(|method| Case {
                name: format!("{} at {n} tokens", method.name()),
                ids: ids[..n.min(ids.len())].to_vec(),
                policy: Policy { method, ..engine.default_policy() },
            })
        })
        .collect()
}

#[test]
fn every_backend_matches_cpu_on_every_fixture() {
    for name in FIXTURES {
        let (_tmp, dir) = build_engine(&fixture(name), DType::Bf16);
        let engine = Engine::open(&dir).unwrap();
        let longest = expected(name).prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
        check_all(&dir, name, &cases(&engine, &longest, &[longest.len(), longest.len() / 3, 24]));
    }
}

#[test]
fn every_backend_matches_cpu_on_smollm2s_shape_at_2k_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2");
    fastkv::builder::build_random("smollm2-135m", 7, DType::Bf16, &Default::default(), &dir, false).unwrap();
    let engine = Engine::open(&dir).unwrap();
    let vocab = engine.spec().vocab_size as u32;
    let ids: Vec<u32> = (0..2048u32).map(|i| i.wrapping_mul(2654435761) % vocab).collect();
    let cases: Vec<Case> = cases(&engine, &ids, &[2048])
        .into_iter()
        .filter(|c| matches!(c.policy.method, Method::Full | Method::Fastkv))
        .collect();
    check_all(&dir, "smollm2-135m's shape", &cases);
}
