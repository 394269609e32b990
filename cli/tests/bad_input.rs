//! Every bad input ends in one clear line naming the file, tensor or flag, a non-zero exit, and no
//! partial output — never a panic.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;

use common::*;
use fastkv::tensors::DType;
use fastkv::{Engine, Prompt, Request, Sampling};
use safetensors::tensor::{SafeTensors, TensorView};

/// Runs fastkv-build on `checkpoint`; asserts failure with a one-line error containing every
/// `needle`, and that nothing was left at the output path or beside it.
fn build_fails(checkpoint: &Path, needles: &[&str]) {
    let out_parent = tempfile::tempdir().unwrap();
    let output = out_parent.path().join("engine");
    let run = Command::new(env!("CARGO_BIN_EXE_fastkv-build"))
        .args(["--checkpoint", checkpoint.to_str().unwrap(), "--output", output.to_str().unwrap(), "--dtype", "f32"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "build should fail: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one-line error expected, got:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error should mention {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(std::fs::read_dir(out_parent.path()).unwrap().count(), 0, "build left files behind");
}

/// Rewrites `model.safetensors` of a copied llama fixture through `edit`.
fn edit_weights(
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let (tmp, dir) = copy_fixture("llama");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &path).unwrap();
    (tmp, dir)
}

#[test]
fn missing_config_json_is_named() {
    let (_t, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    build_fails(&dir, &["config.json", "missing"]);
}

#[test]
fn missing_weights_are_named() {
    let (_t, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    build_fails(&dir, &["model.safetensors"]);
}

#[test]
fn missing_shard_is_named() {
    let (_t, dir) = copy_fixture("qwen3");
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .unwrap();
    std::fs::remove_file(dir.join(&shard)).unwrap();
    build_fails(&dir, &[&shard]);
}

#[test]
fn missing_tokenizer_is_named() {
    let (_t, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    build_fails(&dir, &["tokenizer.json"]);
}

#[test]
fn unknown_model_type_lists_supported_ones() {
    let (_t, dir) = copy_fixture("llama");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"llama\"", "\"gpt2\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    build_fails(&dir, &["config.json", "gpt2", "llama, mistral, qwen2, qwen3"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = edit_weights(|t| t.retain(|(n, ..)| n != "model.layers.2.mlp.up_proj.weight"));
    build_fails(&dir, &["model.layers.2.mlp.up_proj.weight", "missing"]);
}

#[test]
fn tensor_shape_mismatch_names_tensor_expected_and_actual() {
    let (_t, dir) = edit_weights(|t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.layers.1.mlp.down_proj.weight").unwrap();
        let (rows, cols) = (e.2[0], e.2[1]);
        e.2 = vec![rows, cols - 1];
        e.3.truncate(rows * (cols - 1) * 4);
    });
    build_fails(&dir, &["model.layers.1.mlp.down_proj.weight", "shape", "expected"]);
}

#[test]
fn tensor_dtype_mismatch_names_tensor_and_dtype() {
    let (_t, dir) = edit_weights(|t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.norm.weight").unwrap();
        e.1 = safetensors::Dtype::I32;
    });
    build_fails(&dir, &["model.norm.weight", "dtype", "I32"]);
}

#[test]
fn truncated_safetensors_is_reported_as_corrupt() {
    let (_t, dir) = copy_fixture("llama");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    build_fails(&dir, &["model.safetensors", "corrupt or truncated"]);
    std::fs::write(&path, &bytes[..5]).unwrap();
    build_fails(&dir, &["model.safetensors", "corrupt or truncated"]);
}

#[test]
fn existing_output_is_refused_without_force() {
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let run = Command::new(env!("CARGO_BIN_EXE_fastkv-build"))
        .args(["--checkpoint", fixture("llama").to_str().unwrap(), "--output", engine.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--force"));
    let forced = Command::new(env!("CARGO_BIN_EXE_fastkv-build"))
        .args([
            "--checkpoint",
            fixture("llama").to_str().unwrap(),
            "--output",
            engine.to_str().unwrap(),
            "--force",
            "--no-calibrate",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(forced.status.success());
    Engine::open(&engine).unwrap();
}

fn set_format_version(engine: &Path, version: &str) {
    let path = engine.join("engine.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["format_version"] = version.into();
    std::fs::write(&path, v.to_string()).unwrap();
}

fn open_err(engine: &Path) -> String {
    match Engine::open(engine) {
        Ok(_) => panic!("engine should be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn newer_engine_format_is_refused() {
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    set_format_version(&engine, "2.0");
    let msg = open_err(&engine);
    assert!(msg.contains("engine.json") && msg.contains("2.0") && msg.contains("newer"), "{msg}");
    set_format_version(&engine, "banana");
    assert!(open_err(&engine).contains("unknown format_version"));
}

#[test]
fn corrupt_engine_weights_are_detected() {
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let path = engine.join("weights.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .args(["verify", "--engine", engine.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("sha256"));
    std::fs::write(&path, &bytes[..n - 8]).unwrap();
    assert!(open_err(&engine).contains("size"));
}

/// Runs `fastkv run` with `args`; asserts an error containing `needle` and no output; returns stderr.
fn run_fails(engine: &Path, args: &[&str], needle: &str) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .args(["run", "--engine", engine.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{args:?} should fail");
    assert!(stderr.contains(needle), "{args:?}: error should mention {needle:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(run.stdout.is_empty(), "{args:?} printed output before failing");
    stderr.into_owned()
}

/// [`run_fails`], and the error is one line.
fn run_fails_in_one_line(engine: &Path, args: &[&str], needle: &str) {
    let stderr = run_fails(engine, args, needle);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one-line error expected, got:\n{stderr}");
}

#[test]
fn bad_requests_get_clear_errors() {
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    run_fails(&engine, &["--prompt", ""], "empty");
    let long = "word ".repeat(5000);
    run_fails(&engine, &["--prompt", &long], "at most 4096");
    run_fails(&engine, &["--prompt", "hi", "--temperature=-1"], "--temperature");
    run_fails(&engine, &["--prompt", "hi", "--top-p", "0"], "--top-p");
    run_fails(&engine, &["--prompt", "hi", "--tsp-layer", "99"], "--tsp-layer");
    run_fails(&engine, &["--prompt", "hi", "--retain-rate", "1.5"], "--retain-rate");
    run_fails(&engine, &["--prompt", "hi", "--kernel", "4"], "--kernel");
    run_fails(&engine, &["--prompt", "hi", "--window", "0"], "--window");
    run_fails(&engine, &["--prompt", "hi", "--kv-budget", "0"], "--kv-budget");
    run_fails(&engine, &["--prompt-file", "/nonexistent/prompt.txt"], "prompt.txt");
    let missing = engine.with_file_name("nope");
    run_fails(&missing, &["--prompt", "hi"], "engine.json");
    run_fails(&engine, &["--prompt", "hi", "--device", "gpu"], "cuda:N");
    // An engine without plans (or a build without the feature) says how to get them.
    let e = run_fails(&engine, &["--prompt", "hi", "--device", "tensorrt:0"], "tensorrt");
    assert!(e.contains("--target tensorrt") || e.contains("--features tensorrt"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
}

#[test]
fn a_device_this_machine_or_build_lacks_is_one_clear_line() {
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    // A build without the `cuda` feature says how to get it; with it, this GPU-less machine has no driver.
    let clear = |stderr: &str| stderr.contains("no cuda device") || stderr.contains("--features cuda");
    for device in ["cuda", "cuda:3"] {
        let run = Command::new(env!("CARGO_BIN_EXE_fastkv"))
            .args(["run", "--engine", engine.to_str().unwrap(), "--prompt", "hi", "--device", device])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        if run.status.success() {
            println!("skipped: this machine has a CUDA device");
            return;
        }
        assert!(!run.status.success(), "{device}: {stderr}");
        assert!(clear(&stderr) && stderr.trim().lines().count() == 1, "{device}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // The CPU backend keeps working in the same build.
    let ok = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .args([
            "run",
            "--engine",
            engine.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn library_rejects_bad_sampling_and_token_ids() {
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let mut req = Request::new(Prompt::Tokens(vec![1, 2, 100_000]));
    let err = engine.generate(&req, |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("100000") && err.contains("vocabulary"), "{err}");
    req.prompt = Prompt::Tokens(vec![1, 2]);
    req.sampling = Sampling { temperature: f32::NAN, ..Sampling::default() };
    assert!(engine.generate(&req, |_| ControlFlow::Continue(())).is_err());
}

#[test]
fn tsp_layer_flag_sets_the_engine_default_and_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let build = |layer: &str| {
        Command::new(env!("CARGO_BIN_EXE_fastkv-build"))
            .args(["--checkpoint", fixture("llama").to_str().unwrap(), "--output"])
            .arg(tmp.path().join("engine"))
            .args(["--dtype", "f32", "--tsp-layer", layer])
            .output()
            .unwrap()
    };
    let bad = build("4");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("--tsp-layer") && stderr.contains("0..4"), "{stderr}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "build left files behind");
    let good = build("2");
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(stdout.contains("ℓ* = 2, t = 0.2") && stdout.contains("not calibrated (--tsp-layer"), "{stdout}");
    assert_eq!(Engine::open(tmp.path().join("engine")).unwrap().default_policy().tsp_layer, 2);
}

/// Rewrites a JSON file of a copied fixture through `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// A GGUF metadata value.
enum Meta {
    U32(u32),
    Str(&'static str),
    Strs(Vec<String>),
}

/// A GGUF v3 file of `meta` and zero-filled F32 tensors `(name, ggml dims, stored values)`.
fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[(String, Vec<u64>, usize)]) -> Vec<u8> {
    let str = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        str(&mut b, key);
        match value {
            Meta::U32(n) => {
                b.extend(4u32.to_le_bytes());
                b.extend(n.to_le_bytes());
            }
            Meta::Str(s) => {
                b.extend(8u32.to_le_bytes());
                str(&mut b, s);
            }
            Meta::Strs(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|s| str(&mut b, s));
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, values) in tensors {
        str(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(0u32.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += *values as u64 * 4;
    }
    b.resize(b.len().div_ceil(32) * 32 + offset as usize, 0);
    b
}

/// A one-layer llama GGUF (hidden 32, two heads of 16, one KV head, 8 tokens) after `edit` changed
/// its metadata or its tensors' ggml dims.
fn tiny_gguf(
    edit: impl FnOnce(&mut Vec<(&'static str, Meta)>, &mut Vec<(String, Vec<u64>, usize)>),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let mut meta = vec![
        ("general.architecture", Meta::Str("llama")),
        ("llama.embedding_length", Meta::U32(32)),
        ("llama.attention.head_count", Meta::U32(2)),
        ("llama.attention.head_count_kv", Meta::U32(1)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.feed_forward_length", Meta::U32(32)),
        ("llama.context_length", Meta::U32(64)),
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.pre", Meta::Str("smollm")),
        ("tokenizer.ggml.tokens", Meta::Strs("abcdefgh".chars().map(String::from).collect())),
        ("tokenizer.ggml.merges", Meta::Strs(Vec::new())),
    ];
    let t = |name: &str, dims: &[u64]| (name.to_string(), dims.to_vec(), dims.iter().product::<u64>() as usize);
    let mut tensors = vec![
        t("token_embd.weight", &[32, 8]),
        t("output_norm.weight", &[32]),
        t("blk.0.attn_norm.weight", &[32]),
        t("blk.0.attn_q.weight", &[32, 32]),
        t("blk.0.attn_k.weight", &[32, 16]),
        t("blk.0.attn_v.weight", &[32, 16]),
        t("blk.0.attn_output.weight", &[32, 32]),
        t("blk.0.ffn_norm.weight", &[32]),
        t("blk.0.ffn_gate.weight", &[32, 32]),
        t("blk.0.ffn_up.weight", &[32, 32]),
        t("blk.0.ffn_down.weight", &[32, 32]),
    ];
    edit(&mut meta, &mut tensors);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    std::fs::write(&path, gguf_bytes(&meta, &tensors)).unwrap();
    (tmp, path)
}

/// Sets the ggml dims (and stored size) of tensor `name`.
fn set_dims(tensors: &mut [(String, Vec<u64>, usize)], name: &str, dims: &[u64]) {
    let t = tensors.iter_mut().find(|t| t.0 == name).unwrap();
    t.1 = dims.to_vec();
    t.2 = dims.iter().product::<u64>() as usize;
}

#[test]
fn fused_parts_with_a_wrong_split_but_the_right_total_are_refused() {
    // q_proj 80 rows and k_proj 16 instead of 64 and 32: q|k|v still has its 128 rows.
    let resize = |t: &mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>, name: &str, rows: usize| {
        let e = t.iter_mut().find(|(n, ..)| n == name).unwrap();
        e.2[0] = rows;
        e.3.resize(rows * e.2[1] * 4, 0);
    };
    let (_t, dir) = edit_weights(|t| {
        resize(t, "model.layers.1.self_attn.q_proj.weight", 80);
        resize(t, "model.layers.1.self_attn.k_proj.weight", 16);
    });
    build_fails(&dir, &["model.layers.1.self_attn.q_proj.weight", "[80, 64]", "expected [64, 64]"]);
    let (_t, dir) = edit_weights(|t| {
        resize(t, "model.layers.0.mlp.gate_proj.weight", 64);
        resize(t, "model.layers.0.mlp.up_proj.weight", 192);
    });
    build_fails(&dir, &["model.layers.0.mlp.gate_proj.weight", "[64, 64]", "expected [128, 64]"]);
}

#[test]
fn gguf_fused_parts_with_a_wrong_split_but_the_right_total_are_refused() {
    let (tmp, ok) = tiny_gguf(|_, _| {});
    let engine = tmp.path().join("engine");
    fastkv::builder::build(
        &fastkv::builder::BuildOptions {
            checkpoint: ok,
            output: engine.clone(),
            dtype: DType::F32,
            force: false,
            policy: Default::default(),
            calibrate: fastkv::builder::Calibrate::Never,
        },
        &fastkv::progress::Silent,
    )
    .unwrap();
    // attn_q 24 rows and attn_k 24 instead of 32 and 16 (q|k|v still 64 rows): not whole heads.
    let (_t, path) = tiny_gguf(|_, t| {
        set_dims(t, "blk.0.attn_q.weight", &[32, 24]);
        set_dims(t, "blk.0.attn_k.weight", &[32, 24]);
    });
    build_fails(&path, &["tiny.gguf", "blk.0.attn_q.weight", "[24, 32]", "expected [32, 32]"]);
}

#[test]
fn gguf_sizes_that_overflow_are_refused() {
    // 2^62 f32 values: 2^64 bytes, which wraps to 0 in unchecked arithmetic.
    let (_t, path) = tiny_gguf(|_, t| t.push(("huge.weight".into(), vec![1 << 62, 1], 0)));
    build_fails(&path, &["tiny.gguf", "huge.weight", "too large"]);
}

#[test]
fn a_tokenizer_that_panics_while_decoding_is_one_error_line() {
    let (_t, dir) = copy_fixture("llama");
    // tokenizers' Strip decoder indexes before the start of an empty token (Replace empties them all).
    edit_json(&dir.join("tokenizer.json"), |v| {
        v["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"Regex": "[\\s\\S]"}, "content": ""},
            {"type": "Strip", "content": " ", "start": 0, "stop": 1},
        ]});
    });
    let (_tmp, engine) = build_engine(&dir, DType::F32);
    run_fails_in_one_line(
        &engine,
        &["--prompt", "hello", "--max-new-tokens", "2"],
        "tokenizer.json: the tokenizer failed while decoding",
    );
}

#[test]
fn a_tokenizer_that_panics_while_loading_is_one_error_line() {
    let (_t, dir) = copy_fixture("llama");
    // Deeper than serde_json's recursion limit: tokenizers' decoder deserializer `expect`s.
    let path = dir.join("tokenizer.json");
    edit_json(&path, |v| v["decoder"] = "NESTED".into());
    let nested = format!("{}{}", "[".repeat(200), "]".repeat(200));
    std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("\"NESTED\"", &nested)).unwrap();
    build_fails(&dir, &["tokenizer.json"]);
}

/// An engine of the llama fixture with `template` as its chat template fails a `--chat` run with `needle`.
fn chat_template_fails(template: &str, needle: &str) {
    let (_t, dir) = copy_fixture("llama");
    edit_json(&dir.join("tokenizer_config.json"), |v| v["chat_template"] = template.into());
    let (_tmp, engine) = build_engine(&dir, DType::F32);
    run_fails_in_one_line(&engine, &["--chat", "--prompt", "hi"], needle);
}

#[test]
fn a_chat_template_that_never_ends_runs_out_of_fuel() {
    chat_template_fails(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "chat template exceeded its fuel budget",
    );
}

#[test]
fn a_chat_template_that_renders_megabytes_is_stopped() {
    chat_template_fails("{% for i in range(4) %}{{ 'x' * 1000000 }}{% endfor %}", "chat template rendered more than");
}

#[test]
fn absurd_config_values_are_refused_with_the_bound() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("num_hidden_layers", 100_000.into(), "num_hidden_layers = 100000 is above the supported 1024"),
        ("hidden_size", (1u64 << 40).into(), "hidden_size = 1099511627776 is above the supported"),
        ("vocab_size", 4_000_000_000u64.into(), "vocab_size = 4000000000 is above the supported"),
        ("max_position_embeddings", (1u64 << 40).into(), "max_position_embeddings = 1099511627776 is above"),
        ("rope_theta", (-1.0).into(), "rope_theta"),
    ];
    for (key, value, needle) in cases {
        let (_t, dir) = copy_fixture("llama");
        edit_json(&dir.join("config.json"), |v| v[key] = value);
        build_fails(&dir, &["config.json", needle]);
    }
    let (_t, dir) = copy_fixture("llama");
    edit_json(&dir.join("config.json"), |v| v["rope_scaling"]["factor"] = (-8.0).into());
    build_fails(&dir, &["config.json", "factor"]);
    let (_t, dir) = copy_fixture("mistral");
    edit_json(&dir.join("config.json"), |v| v["sliding_window"] = (1u64 << 40).into());
    build_fails(&dir, &["config.json", "sliding_window = 1099511627776 is above"]);

    let (_t, path) =
        tiny_gguf(|m, _| m.iter_mut().find(|(k, _)| *k == "llama.block_count").unwrap().1 = Meta::U32(100_000));
    build_fails(&path, &["tiny.gguf", "100000 is above the supported 1024"]);

    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    edit_json(&engine.join("engine.json"), |v| v["model"]["num_layers"] = 100_000.into());
    let msg = open_err(&engine);
    assert!(msg.contains("engine.json") && msg.contains("100000 is above the supported 1024"), "{msg}");
}

#[test]
fn a_huge_prompt_is_refused_before_it_is_tokenized() {
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    let req = Request::new(Prompt::Text("a ".repeat(1 << 20)));
    let start = std::time::Instant::now();
    let err = engine.generate(&req, |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("at least") && err.contains("at most 4096"), "{err}");
    assert!(start.elapsed().as_secs_f64() < 1.0, "took {:?}", start.elapsed());
}

#[test]
fn engine_files_outside_the_engine_directory_are_refused() {
    let (tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let outside = tmp.path().join("secret.txt");
    std::fs::write(&outside, "secret").unwrap();
    let entry = serde_json::json!({"bytes": 6, "sha256": "0"});
    let list = |name: &str| {
        edit_json(&engine.join("engine.json"), |v| {
            v["files"].as_object_mut().unwrap().retain(|k, _| !k.contains("secret"));
            v["files"][name] = entry.clone();
        })
    };
    for name in ["../secret.txt", outside.to_str().unwrap(), "sub/../../secret.txt"] {
        list(name);
        let msg = open_err(&engine);
        assert!(msg.contains("engine.json") && msg.contains(name) && msg.contains("plain file name"), "{msg}");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, engine.join("secret-link")).unwrap();
        list("secret-link");
        let msg = open_err(&engine);
        assert!(msg.contains("secret-link") && msg.contains("outside the engine directory"), "{msg}");
    }
}

// Found by fuzzing (tests/fuzz.rs, scripts/fuzz.sh): each input minimised from a crash.

#[test]
fn absurd_head_dim_in_config_is_refused() {
    // Validated as before, this spec made `Rope::new` allocate 2 TiB (an abort, not an error).
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "head_dim": 1u64 << 40, "vocab_size": 32, "max_position_embeddings": 64,
    });
    assert!(fastkv::spec::ModelSpec::from_hf_value(&config, Path::new("config.json")).is_err());
}

#[test]
fn tokenizer_json_with_a_broken_decoder_is_an_error() {
    // tokenizers 0.22 panics (decoders/mod.rs `expect`) on a syntax error inside the decoder object.
    let (_t, dir) = copy_fixture("llama");
    std::fs::write(dir.join("tokenizer.json"), r#"{"decoder":{]}"#).unwrap();
    build_fails(&dir, &["tokenizer.json"]);
}

#[test]
fn an_added_token_kilobytes_long_is_refused() {
    // tokenizers builds its added-token matcher in time quadratic in a token's length: a 16 KiB
    // token took over 10 s to load.
    let (_t, dir) = copy_fixture("llama");
    edit_json(&dir.join("tokenizer.json"), |v| {
        let added = v["added_tokens"].as_array_mut().unwrap();
        let id = added.iter().map(|t| t["id"].as_u64().unwrap()).max().unwrap() + 1;
        added.push(serde_json::json!({
            "id": id, "content": "A".repeat(4096), "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true,
        }));
    });
    build_fails(&dir, &["tokenizer.json", "added token is 4096 bytes", "up to 256 bytes"]);
}
