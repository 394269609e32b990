//! Prefill benchmark: full KV vs FastKV on one engine, side by side in one run.
//!
//! `cargo bench --bench prefill [-- --lengths 512,2048 --repeats 3 --warmup 1 --dtype bf16]`
//!
//! The engine is a random-weight model with SmolLM2-135M's shapes (30 layers, hidden 576, 9/3
//! heads, head_dim 64, MLP 1536), generated once under target/bench-engines: the speed of a model
//! does not depend on its weights' values, and no trained checkpoint can be downloaded here.
//! Prints, per length: TTFT for both methods, the measured speed-up beside the ideal FLOP ratio,
//! the time split (projections / attention / selection), and the GEMM rate inside prefill beside
//! the same GEMM routine alone on the same shapes. With `--rss L` it runs one full-KV prefill of L
//! tokens and prints the process's peak RSS (run it in separate processes to compare lengths).

use std::path::{Path, PathBuf};
use std::time::Instant;

use fastkv::builder::{build, BuildOptions};
use fastkv::cpu::linear::Linear;
use fastkv::tensors::{write_safetensors, DType, TensorFile, TensorPlan};
use fastkv::Engine;

const SHAPE: (usize, usize, usize, usize, usize, usize, usize) = (30, 576, 9, 3, 64, 1536, 49152);

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Writes (once) a random checkpoint with SmolLM2-135M's shapes and builds it.
fn engine_dir(dtype: DType) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-engines");
    let engine = root.join(format!("smollm2-shape-{dtype:?}").to_lowercase());
    if engine.join("engine.json").exists() {
        return engine;
    }
    let ckpt = root.join("smollm2-shape-checkpoint");
    let (n, e, h, hk, d, i, v) = SHAPE;
    if !ckpt.join("model.safetensors").exists() {
        std::fs::create_dir_all(&ckpt).unwrap();
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": e, "intermediate_size": i, "num_hidden_layers": n,
            "num_attention_heads": h, "num_key_value_heads": hk, "head_dim": d, "vocab_size": v,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true, "hidden_act": "silu"
        });
        std::fs::write(ckpt.join("config.json"), config.to_string()).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tokenizer.json");
        std::fs::copy(fixture, ckpt.join("tokenizer.json")).unwrap();
        let mut plan =
            vec![("model.embed_tokens.weight".to_string(), vec![v, e]), ("model.norm.weight".into(), vec![e])];
        for l in 0..n {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![e]),
                ("post_attention_layernorm.weight", vec![e]),
                ("self_attn.q_proj.weight", vec![h * d, e]),
                ("self_attn.k_proj.weight", vec![hk * d, e]),
                ("self_attn.v_proj.weight", vec![hk * d, e]),
                ("self_attn.o_proj.weight", vec![e, h * d]),
                ("mlp.gate_proj.weight", vec![i, e]),
                ("mlp.up_proj.weight", vec![i, e]),
                ("mlp.down_proj.weight", vec![e, i]),
            ] {
                plan.push((format!("{p}.{name}"), shape));
            }
        }
        let plan: Vec<TensorPlan> =
            plan.into_iter().map(|(name, shape)| TensorPlan { name, dtype: DType::F32, shape }).collect();
        let mut state = 0x9e3779b97f4a7c15u64;
        write_safetensors(&ckpt.join("model.safetensors"), &plan, &Default::default(), |k, buf| {
            let t = &plan[k];
            let count: usize = t.shape.iter().product();
            let norm = t.shape.len() == 1;
            let scale = if norm { 0.1 } else { 1.0 / (t.shape[1] as f32).sqrt() };
            for _ in 0..count {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let x = if norm { 1.0 + scale * u } else { scale * u * 1.7 };
                buf.extend_from_slice(&x.to_le_bytes());
            }
            Ok(())
        })
        .unwrap();
    }
    build(
        &BuildOptions {
            checkpoint: ckpt,
            output: engine.clone(),
            dtype,
            force: true,
            policy: Default::default(),
            calibrate: fastkv::builder::Calibrate::Never,
        },
        &fastkv::progress::Silent,
    )
    .unwrap();
    engine
}

fn tokens(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % SHAPE.6 as u32).collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let dtype = match arg("--dtype").as_deref() {
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        _ => DType::Bf16,
    };
    let dir = engine_dir(dtype);
    let engine = Engine::open(&dir).unwrap();
    if let Some(len) = arg("--rss") {
        let len: usize = len.parse().unwrap();
        engine.backend().prefill(&tokens(len), &engine.full_policy(), 0).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let hwm = status.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM: ?");
        println!("prefill {len} tokens (full KV, {dtype:?}): peak RSS {}", hwm.trim_start_matches("VmHWM:").trim());
        return;
    }
    let lengths: Vec<usize> =
        arg("--lengths").unwrap_or("512,2048".into()).split(',').map(|s| s.trim().parse().unwrap()).collect();
    let repeats: usize = arg("--repeats").map_or(3, |r| r.parse().unwrap());
    let warmup: usize = arg("--warmup").map_or(1, |r| r.parse().unwrap());
    let model = engine.backend();
    println!("engine: SmolLM2-135M shapes, random weights, {dtype:?}, {} threads", rayon::current_num_threads());
    println!("cpu path: {}", fastkv::cpu::isa::describe());
    println!(
        "{:>6} {:>6} {:>9} {:>9} {:>8} {:>7} {:>7} | {:>6} {:>6} {:>6} | {:>10} {:>10}",
        "L",
        "method",
        "TTFT s",
        "tok/s",
        "speedup",
        "ideal",
        "% ideal",
        "proj%",
        "attn%",
        "sel%",
        "GEMM GF/s",
        "alone GF/s"
    );
    for &len in &lengths {
        let ids = tokens(len);
        let n = engine.spec().num_layers;
        let mut full_ttft = 0.0;
        for (name, policy) in [("full", engine.full_policy()), ("fastkv", engine.default_policy())] {
            for _ in 0..warmup {
                model.prefill(&ids, &policy, 0).unwrap();
            }
            let runs: Vec<_> = (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    let p = model.prefill(&ids, &policy, 0).unwrap();
                    (t.elapsed().as_secs_f64(), p)
                })
                .collect();
            let ttft = median(runs.iter().map(|r| r.0).collect());
            let p = &runs[0].1;
            let seq = &p.seq_lens;
            let (ideal, speedup) = if name == "full" {
                full_ttft = ttft;
                (1.0, 1.0)
            } else {
                (engine.spec().prefill_flops(&vec![len; n]) / engine.spec().prefill_flops(seq), full_ttft / ttft)
            };
            let total = p.profile.projections_s + p.profile.attention_s + p.profile.selection_s;
            let (_, e, h, hk, d, i, _) = SHAPE;
            let gemm_flops: f64 =
                seq.iter().map(|&s| 2.0 * s as f64 * (e * (h + 2 * hk) * d + h * d * e + 3 * e * i) as f64).sum();
            println!(
                "{:>6} {:>6} {:>9.3} {:>9.0} {:>7.2}x {:>6.2}x {:>6.0}% | {:>5.1}% {:>5.1}% {:>5.1}% | {:>10.1} {:>10.1}",
                len,
                name,
                ttft,
                len as f64 / ttft,
                speedup,
                ideal,
                100.0 * speedup / ideal,
                100.0 * p.profile.projections_s / total,
                100.0 * p.profile.attention_s / total,
                100.0 * p.profile.selection_s / total,
                gemm_flops / p.profile.projections_s / 1e9,
                gemm_alone(&dir, len) / 1e9,
            );
        }
    }
}

/// FLOP/s of the engine's own matmul on one layer's projection shapes, with nothing else running.
fn gemm_alone(dir: &Path, m: usize) -> f64 {
    let file = TensorFile::open(&dir.join("weights.safetensors")).unwrap();
    let (_, e, h, hk, d, i, _) = SHAPE;
    let shapes = [
        ("layers.0.wqkv", (h + 2 * hk) * d, e),
        ("layers.0.wo", e, h * d),
        ("layers.0.w_gate_up", 2 * i, e),
        ("layers.0.w_down", e, i),
    ];
    let mut flops = 0.0;
    let mut secs = 0.0;
    for (name, rows, cols) in shapes {
        let w = Linear::load(&file, name, rows, cols).unwrap();
        let x = vec![0.5f32; m * cols];
        let mut out = vec![0f32; m * rows];
        w.forward(&x, m, &mut out);
        let t = Instant::now();
        w.forward(&x, m, &mut out);
        secs += t.elapsed().as_secs_f64();
        flops += 2.0 * (m * rows * cols) as f64;
    }
    flops / secs
}
