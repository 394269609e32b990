//! GGUF import: block dequantization against gguf-py, malformed files, and the real SmolLM2 /
//! Qwen2.5-Coder models against transformers loading the same GGUF (`scripts/make_gguf_reference.py`).

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use fastkv::builder::{build, BuildOptions};
use fastkv::gguf::dequant::GgmlType;
use fastkv::tensors::DType;
use fastkv::{Engine, Prompt, Request};
use serde::Deserialize;

fn fixture_json<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = fixture("gguf").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[derive(Deserialize)]
struct DequantFixture {
    blocks: Vec<Block>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    source: String,
    bytes: String,
    values: Vec<f32>,
}

const TYPE_IDS: [(&str, u32); 11] = [
    ("F32", 0),
    ("F16", 1),
    ("Q4_0", 2),
    ("Q4_1", 3),
    ("Q5_0", 6),
    ("Q5_1", 7),
    ("Q8_0", 8),
    ("Q4_K", 12),
    ("Q5_K", 13),
    ("Q6_K", 14),
    ("BF16", 30),
];

#[test]
fn every_block_format_dequantizes_like_gguf_py() {
    let fixture: DequantFixture = fixture_json("dequant.json");
    let mut covered = Vec::new();
    for b in &fixture.blocks {
        let id = TYPE_IDS.iter().find(|(n, _)| *n == b.kind).unwrap_or_else(|| panic!("type {}", b.kind)).1;
        let ty = GgmlType::from_id(id).unwrap();
        let bytes: Vec<u8> =
            (0..b.bytes.len()).step_by(2).map(|i| u8::from_str_radix(&b.bytes[i..i + 2], 16).unwrap()).collect();
        let (n, nb) = ty.block();
        assert_eq!(bytes.len() % nb, 0, "{} ({})", b.kind, b.source);
        let mut out = vec![f32::NAN; bytes.len() / nb * n];
        ty.dequantize(&bytes, &mut out);
        // Same formula, same order of f32 operations: bit-identical.
        assert_eq!(out, b.values, "{} ({})", b.kind, b.source);
        covered.push(b.kind.as_str());
    }
    for (name, _) in TYPE_IDS {
        assert!(covered.contains(&name), "no reference block of {name}");
    }
}

/// A minimal GGUF v3 writer for malformed-file tests: string/u32 metadata, F32 tensors.
fn gguf_bytes(version: u32, meta: &[(&str, &str)], tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        b.extend(8u32.to_le_bytes());
        s(&mut b, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += dims.iter().product::<u64>() * 4;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.resize(b.len() + offset as usize, 0);
    b
}

fn build_error(bytes: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let opts = BuildOptions {
        checkpoint: path,
        output: tmp.path().join("engine"),
        dtype: DType::F32,
        force: false,
        policy: Default::default(),
        calibrate: fastkv::builder::Calibrate::Never,
    };
    let err = match build(&opts, &fastkv::progress::Silent) {
        Ok(_) => panic!("the build must fail"),
        Err(e) => e.to_string(),
    };
    assert!(!tmp.path().join("engine").exists(), "a failed build left an engine behind");
    err
}

#[test]
fn malformed_gguf_files_fail_with_clear_errors() {
    let ok = gguf_bytes(3, &[("general.architecture", "llama")], &[("token_embd.weight", &[8, 4], 0)]);
    let mut bad_magic = ok.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    let e = build_error(&bad_magic);
    assert!(e.contains("not a GGUF file") && e.contains("71, 71, 77, 76"), "{e}");
    let e = build_error(&gguf_bytes(4, &[], &[]));
    assert!(e.contains("GGUF version 4"), "{e}");
    let e = build_error(&ok[..ok.len() - 4]);
    assert!(e.contains("truncated") && e.contains("token_embd.weight"), "{e}");
    let e = build_error(&ok[..30]);
    assert!(e.contains("truncated"), "{e}");
    let e = build_error(&gguf_bytes(3, &[], &[("blk.0.attn_q.weight", &[32, 2], 11)]));
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("ggml type 11 (Q3_K)"), "{e}");
    let e = build_error(&gguf_bytes(3, &[("general.architecture", "mamba")], &[]));
    assert!(e.contains("`mamba`") && e.contains("llama, qwen2"), "{e}");
    let e = build_error(&gguf_bytes(3, &[("general.architecture", "llama")], &[]));
    assert!(e.contains("missing `llama.embedding_length`"), "{e}");
}

#[derive(Deserialize)]
struct ModelFixture {
    eos_token_ids: Vec<u32>,
    chat_message: String,
    chat_text: String,
    prompts: Vec<RefPrompt>,
}

#[derive(Deserialize)]
struct RefPrompt {
    text: String,
    ids: Vec<u32>,
    logit_ids: Vec<usize>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn model_path(file: &str, script: &str) -> Option<PathBuf> {
    common::resource(common::root().join("target/models").join(file), script)
}

/// f32 engine built from the GGUF once per test binary; the temp dir lives as long as the process.
fn engine(cell: &'static OnceLock<(tempfile::TempDir, Engine)>, path: &Path) -> &'static Engine {
    &cell
        .get_or_init(|| {
            let t = std::time::Instant::now();
            let (tmp, dir) = build_engine(path, DType::F32);
            eprintln!("{}: f32 engine built in {:.1} s", path.display(), t.elapsed().as_secs_f64());
            (tmp, Engine::open(&dir).unwrap())
        })
        .1
}

fn greedy_full(engine: &Engine, ids: &[u32], n: usize) -> fastkv::Output {
    let mut req = Request::new(Prompt::Tokens(ids.to_vec()));
    req.max_new_tokens = n;
    req.policy = Some(engine.full_policy());
    engine.generate(&req, |_| ControlFlow::Continue(())).unwrap()
}

/// Tokenizer ids, chat template, last-token logits (within 1e-3 relative) and greedy tokens (up to
/// the engine's EOS, where it stops and transformers was told not to) against the reference.
fn check_against_reference(engine: &Engine, name: &str) {
    let reference: ModelFixture = fixture_json(name);
    assert_eq!(engine.chat_prompt(&reference.chat_message).unwrap(), reference.chat_text, "{name}: chat template");
    let eos = engine.manifest.tokenizer.eos_token_ids.clone();
    assert_eq!(eos, reference.eos_token_ids, "{name}: EOS ids (generation config of the reference)");
    for p in &reference.prompts {
        assert_eq!(engine.encode(&p.text).unwrap(), p.ids, "{name}: tokenizer ids of {:?}", p.text);
        let out = greedy_full(engine, &p.ids, p.greedy.len());
        let ours: Vec<f32> = p.logit_ids.iter().map(|&i| out.prompt_logits[i]).collect();
        let err = rel_err(&ours, &p.logits);
        let expected = match p.greedy.iter().position(|t| eos.contains(t)) {
            Some(i) => &p.greedy[..=i],
            None => &p.greedy[..],
        };
        let agree = out.token_ids.iter().zip(expected).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{name}, {} tokens: logits relative error {err:.2e}, greedy {agree}/{} tokens agree",
            p.ids.len(),
            expected.len()
        );
        assert!(err < 1e-3, "{name}, {} tokens: logits relative error {err:e}", p.ids.len());
        assert_eq!(out.token_ids, expected, "{name}, {} tokens: greedy continuation", p.ids.len());
    }
}

static SMOLLM2: OnceLock<(tempfile::TempDir, Engine)> = OnceLock::new();

/// The SmolLM2 engine, or `None` (the test skips) before scripts/models.sh has installed it.
fn smollm2() -> Option<&'static Engine> {
    Some(engine(&SMOLLM2, &model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/models.sh")?))
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(engine) = smollm2() else { return };
    check_against_reference(engine, "smollm2.json");
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(engine) = smollm2() else { return };
    let spec = engine.spec();
    assert_eq!((spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads), (30, 576, 9, 3));
    assert!(spec.tie_word_embeddings && spec.rope_theta == 1e5 && spec.max_position_embeddings == 8192);
    let eos = &engine.manifest.tokenizer.eos_token_ids;
    assert_eq!(eos, &[engine.encode("<|im_end|>").unwrap()[0]], "<|im_end|> ends generation");
    let out = greedy_full(engine, &engine.encode("The capital of France is").unwrap(), 1);
    assert_eq!(engine.decode(&out.token_ids).unwrap(), " Paris");
}

#[test]
#[ignore = "needs scripts/models.sh --with-qwen (400 MB)"]
fn qwen2_5_coder_gguf_matches_transformers() {
    static QWEN: OnceLock<(tempfile::TempDir, Engine)> = OnceLock::new();
    let Some(path) = model_path("Qwen2.5-Coder-0.5B-Instruct.gguf", "scripts/models.sh --with-qwen") else { return };
    let engine = engine(&QWEN, &path);
    let spec = engine.spec();
    assert_eq!((spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads), (24, 896, 14, 2));
    assert!(!spec.tie_word_embeddings && spec.qkv_bias && spec.rope_theta == 1e6);
    check_against_reference(engine, "qwen2.5-coder.json");
}
