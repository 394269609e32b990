//! The CUDA engine's speed on a real model's shape: full KV vs FastKV TTFT, prefill FLOP rate, the
//! selection's share of prefill, and decode tokens/s (CUDA graphs and eager; batches of 1, 4 and 16 requests)
//! beside the bandwidth bound, all in one run on one GPU. Weights are random (`fastkv-build --random-weights`): speed
//! depends on shapes only.
//!
//! `cargo bench --features cuda --bench cuda_engine -- [--preset llama-3.1-8b] [--lengths 32768,131072]
//!  [--decode-steps 64] [--json FILE]`
//!
//! The JSON file is rewritten after each length, so a run stopped by a time limit keeps every length it
//! finished; the profiled run (the selection's share), graphs vs eager and the batched decode run at the first
//! length only.
//!
//! Peaks used for the ratios (H200 SXM): 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e.

use std::time::Instant;

#[path = "../tests/common/cuda.rs"]
mod cuda;

use fastkv::backend::{Backend, Step};
use fastkv::tensors::DType;
use fastkv::{Device, Engine, Error, Policy};
use serde_json::json;

const PEAK_FLOPS: f64 = 989e12;
const PEAK_BYTES: f64 = 4.8e12;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Weight bytes every decode step reads (bf16).
fn weight_bytes(engine: &Engine) -> f64 {
    let s = engine.spec();
    let (e, d, i, v) = (s.hidden_size, s.head_dim, s.intermediate_size, s.vocab_size);
    let layer = s.qkv_rows() * e + e * s.num_heads * d + 3 * i * e;
    2.0 * (s.num_layers * layer + v * e) as f64
}

struct Run {
    ttft_s: f64,
    decode_tok_s: f64,
    seq_lens: Vec<usize>,
    kv_bytes: usize,
    selection_s: f64,
    total_s: f64,
}

fn run(engine: &Engine, ids: &[u32], policy: &Policy, steps: usize) -> fastkv::Result<Run> {
    let b = engine.backend();
    let t = Instant::now();
    let mut pre = b.prefill(ids, policy, steps)?;
    let ttft_s = t.elapsed().as_secs_f64();
    let mut token = fastkv::sampling::argmax(&pre.logits);
    let t = Instant::now();
    for step in 0..steps {
        token = fastkv::sampling::argmax(&b.decode(token, pre.next_position + step as u32, &mut pre.cache)?);
    }
    let decode_tok_s = steps as f64 / t.elapsed().as_secs_f64();
    let p = pre.profile;
    Ok(Run {
        ttft_s,
        decode_tok_s,
        seq_lens: pre.seq_lens.clone(),
        kv_bytes: pre.cache.bytes(),
        selection_s: p.selection_s,
        total_s: p.projections_s + p.attention_s + p.selection_s,
    })
}

/// Aggregate decode tokens/s of `batch` requests of `ids` under `policy` decoding together, `steps` batched steps.
fn batched_decode(engine: &Engine, ids: &[u32], policy: &Policy, batch: usize, steps: usize) -> fastkv::Result<f64> {
    let b = engine.backend();
    let mut pres = (0..batch).map(|_| b.prefill(ids, policy, steps)).collect::<fastkv::Result<Vec<_>>>()?;
    let mut tokens: Vec<u32> = pres.iter().map(|p| fastkv::sampling::argmax(&p.logits)).collect();
    let t = Instant::now();
    for step in 0..steps {
        let mut batch_steps: Vec<Step> = pres
            .iter_mut()
            .zip(&tokens)
            .map(|(p, &token)| Step { token, position: p.next_position + step as u32, cache: &mut p.cache })
            .collect();
        tokens = b.decode_batch(&mut batch_steps)?.iter().map(|l| fastkv::sampling::argmax(l)).collect();
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

fn main() {
    let preset = arg("--preset").unwrap_or("llama-3.1-8b".into());
    let lengths: Vec<usize> = arg("--lengths")
        .unwrap_or("32768,131072".into())
        .split(',')
        .map(|s| s.trim().parse().expect("--lengths: numbers"))
        .collect();
    let steps: usize = arg("--decode-steps").map_or(64, |s| s.parse().expect("--decode-steps: a number"));
    let dir = std::env::temp_dir().join(format!("fastkv-bench-{preset}"));
    fastkv::builder::build_random(&preset, 0, DType::Bf16, &Default::default(), &dir, true)
        .expect("random-weight engine");
    let t = Instant::now();
    let engine = match Engine::open_on(&dir, Device::Cuda(0)) {
        Ok(e) => e,
        Err(Error::NoDevice { reason, .. }) => return cuda::no_cuda_device(&reason),
        Err(e) => panic!("{e}"),
    };
    let load_s = t.elapsed().as_secs_f64();
    let Backend::Cuda(model) = engine.backend() else { unreachable!("opened on cuda") };
    let vocab = engine.spec().vocab_size as u32;
    let tokens = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| i.wrapping_mul(2654435761) % vocab).collect() };
    let (full, fastkv) = (engine.full_policy(), engine.default_policy());
    run(&engine, &tokens(2048), &fastkv, 4).expect("warm-up"); // loads kernels, picks cuBLAS algorithms
    let mut report = json!({ "preset": preset, "load_s": load_s, "decode_steps": steps, "rows": [] });
    for (i, &len) in lengths.iter().enumerate() {
        let ids = tokens(len);
        let f = run(&engine, &ids, &full, steps).expect("full KV");
        let k = run(&engine, &ids, &fastkv, steps).expect("FastKV");
        let n = engine.spec().num_layers;
        let ideal = engine.spec().prefill_flops(&vec![len; n]) / engine.spec().prefill_flops(&k.seq_lens);
        let bound = |r: &Run| PEAK_BYTES / (weight_bytes(&engine) + r.kv_bytes as f64);
        let mut row = json!({
            "tokens": len,
            "full": { "ttft_s": f.ttft_s, "decode_tok_s": f.decode_tok_s, "kv_bytes": f.kv_bytes,
                      "prefill_tflops": engine.spec().prefill_flops(&f.seq_lens) / f.ttft_s / 1e12,
                      "prefill_share_of_peak": engine.spec().prefill_flops(&f.seq_lens) / f.ttft_s / PEAK_FLOPS,
                      "decode_share_of_bandwidth_bound": f.decode_tok_s / bound(&f) },
            "fastkv": { "ttft_s": k.ttft_s, "decode_tok_s": k.decode_tok_s, "kv_bytes": k.kv_bytes,
                        "decode_share_of_bandwidth_bound": k.decode_tok_s / bound(&k) },
            "ttft_speedup": f.ttft_s / k.ttft_s,
            "ideal_flop_ratio": ideal,
            "decode_speedup": k.decode_tok_s / f.decode_tok_s,
        });
        if i == 0 {
            model.set_graphs(false);
            let eager = run(&engine, &ids[..ids.len().min(8192)], &fastkv, steps).expect("eager decode");
            model.set_graphs(true);
            let graphs = run(&engine, &ids[..ids.len().min(8192)], &fastkv, steps).expect("graph decode");
            model.set_profile(true);
            let profiled = run(&engine, &ids, &fastkv, 0).expect("profiled FastKV");
            model.set_profile(false);
            row["fastkv"]["selection_share_of_prefill"] = json!(profiled.selection_s / profiled.total_s);
            row["decode_8k_graphs_tok_s"] = json!(graphs.decode_tok_s);
            row["decode_8k_eager_tok_s"] = json!(eager.decode_tok_s);
            // Batched decode (one step for every request; batch 1 is the single-request path), FastKV at 4K.
            let short = &ids[..ids.len().min(4096)];
            let per_batch: serde_json::Map<String, serde_json::Value> = [1, 4, 16]
                .iter()
                .map(|&n| (n.to_string(), json!(batched_decode(&engine, short, &fastkv, n, steps).expect("batched"))))
                .collect();
            row["decode_4k_batch_tok_s"] = json!(per_batch);
        }
        println!("{row}");
        report["rows"].as_array_mut().expect("rows is an array").push(row);
        if let Some(path) = arg("--json") {
            // Through a temporary file, so a run killed mid-write leaves the previous lengths whole.
            let tmp = format!("{path}.partial");
            std::fs::write(&tmp, serde_json::to_string_pretty(&report).unwrap()).expect("--json: cannot write");
            std::fs::rename(&tmp, &path).expect("--json: cannot write");
        }
    }
    println!("{report}");
}
