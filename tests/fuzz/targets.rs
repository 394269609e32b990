//! The fuzz targets: each feeds one untrusted input format to the public fastkv API, ignores the
//! errors it returns (a clear error is the right answer to a bad file) and lets panics through.
//! Shared by the smoke run (tests/fuzz.rs), the libFuzzer targets (fuzz/fuzz_targets/) and the seed
//! corpus writer (tests/fuzz/corpus.rs).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use fastkv::checkpoint::Checkpoint;
use fastkv::spec::ModelSpec;
use fastkv::tensors::{DType, TensorFile};
use fastkv::text::{Detokenizer, TextCodec};
use fastkv::tokenizer_info::TokenizerInfo;
use fastkv::{Engine, Prompt, Request};

/// Zeroed tensor data the engine target writes at most per input; larger headers are skipped.
const MAX_WEIGHT_BYTES: u64 = 64 << 20;

/// (a) A GGUF file: header, metadata, tensor table and model spec, the tokenizer built from its
/// `tokenizer.ggml.*` metadata (and used like an engine uses it), every tensor's shape checked and
/// each tensor dequantized.
pub fn gguf(data: &[u8]) {
    let (dir, path) = temp_file("model.gguf", data);
    let Ok(checkpoint) = Checkpoint::open(&path) else { return };
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, &checkpoint.tokenizer_json).expect("temp dir is writable");
    use_text(&tokenizer, &checkpoint.tokenizer, "Hello, world! 123");
    let mut out = Vec::new();
    for source in checkpoint.layout.iter().flat_map(|t| &t.sources) {
        out.clear();
        let _ = checkpoint.weights.write_as(&source.name, DType::F32, &mut out);
    }
}

/// (b) An HF `config.json`: the model spec, its default FastKV policy and rotary frequencies.
pub fn hf_config(data: &[u8]) {
    let Ok(config) = serde_json::from_slice(data) else { return };
    let Ok(spec) = ModelSpec::from_hf_value(&config, Path::new("config.json")) else { return };
    let (policy, _) = fastkv::builder::default_policy(&spec);
    let _ = policy.validate(&spec);
    fastkv::rope::Rope::new(&spec);
}

/// (c) A safetensors file read by `fastkv::tensors`: every tensor fetched, converted to each
/// dtype and mapped.
pub fn safetensors(data: &[u8]) {
    let (_dir, path) = temp_file("model.safetensors", data);
    let Ok(file) = TensorFile::open(&path) else { return };
    let Ok((_, meta)) = ::safetensors::SafeTensors::read_metadata(data) else { return };
    let mut out = Vec::new();
    for name in meta.tensors().keys() {
        let Ok(tensor) = file.get(name) else { continue };
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            out.clear();
            tensor.write_as(dtype, &mut out);
        }
        let _ = file.mapped(name);
    }
}

/// (d) An engine directory, as three sections: `engine.json`, `tokenizer.json` and the JSON header
/// of `weights.safetensors`. The weights file gets zeroed tensor data of the length the header
/// declares, and the manifest's recorded file sizes are set to the written ones, so inputs reach the
/// weight and model checks instead of all stopping at the size check. Opened, then asked for two
/// tokens and a chat prompt.
pub fn engine(data: &[u8]) {
    let parts = sections(data, 3);
    let (manifest, tokenizer, header) = (parts[0], parts[1], parts[2]);
    let Some(data_len) = declared_data_len(header) else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut weights = (header.len() as u64).to_le_bytes().to_vec();
    weights.extend_from_slice(header);
    weights.resize(weights.len() + data_len, 0);
    let manifest =
        with_file_sizes(manifest, &[("tokenizer.json", tokenizer.len()), ("weights.safetensors", weights.len())]);
    for (name, bytes) in
        [("engine.json", &manifest[..]), ("tokenizer.json", tokenizer), ("weights.safetensors", &weights)]
    {
        std::fs::write(dir.path().join(name), bytes).expect("temp dir is writable");
    }
    let Ok(engine) = Engine::open(dir.path()) else { return };
    let mut request = Request::new(Prompt::Text("Hello world".into()));
    request.max_new_tokens = 2;
    let _ = engine.generate(&request, |_| ControlFlow::Continue(()));
    let _ = engine.chat_prompt("Hi");
}

/// (e) A `tokenizer.json` and a chat template, then the user message (three sections): the
/// template rendered for the message, the result encoded, decoded and streamed back.
pub fn tokenizer(data: &[u8]) {
    let parts = sections(data, 3);
    let (_dir, path) = temp_file("tokenizer.json", parts[0]);
    let info = TokenizerInfo {
        eos_token_ids: Vec::new(),
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        chat_template: Some(String::from_utf8_lossy(parts[1]).into_owned()),
    };
    use_text(&path, &info, &String::from_utf8_lossy(parts[2]));
}

/// Loads a tokenizer and uses it as a request does: chat prompt, encode, decode, streaming.
fn use_text(path: &Path, info: &TokenizerInfo, message: &str) {
    let Ok(codec) = TextCodec::load(path, info) else { return };
    let _ = codec.encode(message, true);
    let prompt = codec.chat_prompt(message).unwrap_or_else(|_| message.to_string());
    let Ok(ids) = codec.encode_chat(&prompt) else { return };
    let _ = codec.decode(&ids);
    let mut detokenizer = Detokenizer::new(&codec);
    for &id in ids.iter().take(64) {
        let _ = detokenizer.push(id);
    }
}

/// An input made of `n` files: each section but the last is a u32 little-endian length and that
/// many bytes; the last takes the rest. A length past the end takes what is left, so any bytes
/// split into `n` sections.
pub fn sections(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut rest = data;
    let mut parts = Vec::with_capacity(n);
    for _ in 1..n {
        let (len, tail) = match rest.split_first_chunk::<4>() {
            Some((len, tail)) => (u32::from_le_bytes(*len) as usize, tail),
            None => (0, &[][..]),
        };
        let (part, tail) = tail.split_at(len.min(tail.len()));
        parts.push(part);
        rest = tail;
    }
    parts.push(rest);
    parts
}

/// The inverse of [`sections`].
pub fn pack(parts: &[&[u8]]) -> Vec<u8> {
    let (last, init) = parts.split_last().expect("at least one section");
    let mut out = Vec::new();
    for part in init {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(last);
    out
}

/// `data` as the only file of a new temp dir.
fn temp_file(name: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, data).expect("temp dir is writable");
    (dir, path)
}

/// The data length a safetensors JSON header declares (its largest end offset), if at most
/// [`MAX_WEIGHT_BYTES`]; 0 when the header is no JSON object (the reader then rejects it).
fn declared_data_len(header: &[u8]) -> Option<usize> {
    let Ok(serde_json::Value::Object(entries)) = serde_json::from_slice(header) else { return Some(0) };
    let end = entries.values().filter_map(|e| e.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0);
    (end <= MAX_WEIGHT_BYTES).then_some(end as usize)
}

/// `manifest` with `files.<name>.bytes` set to the given sizes where those entries exist.
fn with_file_sizes(manifest: &[u8], sizes: &[(&str, usize)]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(manifest) else { return manifest.to_vec() };
    for (name, size) in sizes {
        if let Some(entry) = v.get_mut("files").and_then(|f| f.get_mut(*name)).and_then(|e| e.as_object_mut()) {
            entry.insert("bytes".into(), (*size).into());
        }
    }
    serde_json::to_vec(&v).expect("a JSON value serializes")
}
