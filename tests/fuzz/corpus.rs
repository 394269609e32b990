//! Writes the fuzz seed corpora, one folder per target of `targets.rs`, from the repository's fixtures
//! and the installed GGUF models (`scripts/fuzz-corpus.sh` runs it; nothing of it is committed):
//! `cargo run --release --example fuzz_corpus -- OUT_DIR`. Every seed is under 2 MB so executions
//! stay fast: real GGUF files are shrunk to their metadata and tokenizer with tiny tensors.

#[path = "targets.rs"]
#[allow(dead_code)] // the corpus only packs inputs; the targets run elsewhere
mod targets;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use fastkv::builder::{build, BuildOptions};
use fastkv::checkpoint::Checkpoint;
use fastkv::gguf::dequant::GgmlType;
use fastkv::gguf::{GgufFile, Value};
use fastkv::tensors::DType;

const TARGETS: [&str; 5] = ["gguf", "hf_config", "safetensors", "engine", "tokenizer"];
const FIXTURES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];
/// Tokens a shrunk GGUF keeps (plus its control tokens).
const VOCAB: usize = 1024;
const MESSAGE: &[u8] = "Hello! What is 2+2? Grüße, 世界 🌍".as_bytes();

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/fuzz/corpus".into()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures");
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut corpus = Corpus::new(out);

    for name in FIXTURES {
        corpus.add("hf_config", name, &read(&fixtures.join(name).join("config.json")));
    }
    for entry in std::fs::read_dir(root.join("engines")).expect("engines/") {
        let path = entry.expect("engines/ entry").path();
        let preset: serde_json::Value = serde_json::from_slice(&read(&path)).expect("a preset is JSON");
        corpus.add("hf_config", &stem(&path), preset["config"].to_string().as_bytes());
    }

    for file in ["mistral/model.safetensors", "qwen2/model.safetensors", "qwen3/model-00001-of-00006.safetensors"] {
        corpus.add("safetensors", file.split('/').next().unwrap(), &read(&fixtures.join(file)));
    }
    corpus.add("safetensors", "dtypes", &dtypes_safetensors());

    let tokenizer = read(&fixtures.join("llama/tokenizer.json"));
    let config: serde_json::Value =
        serde_json::from_slice(&read(&fixtures.join("llama/tokenizer_config.json"))).unwrap();
    let template = config["chat_template"].as_str().expect("fixture chat template");
    corpus.add("tokenizer", "fixture", &targets::pack(&[&tokenizer, template.as_bytes(), MESSAGE]));

    let mut checkpoints: Vec<PathBuf> = FIXTURES.iter().map(|f| fixtures.join(f)).collect();
    for path in gguf_models(&root.join("target/models")) {
        let real = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let name = stem(&path);
        corpus.add("gguf", &format!("{name}-head"), &head(&path, 64 << 10));
        let tiny = tmp.path().join(format!("{name}.gguf"));
        std::fs::write(&tiny, tiny_gguf(&real)).expect("temp dir is writable");
        corpus.add("gguf", &name, &read(&tiny));
        let shrunk = Checkpoint::open(&tiny).unwrap_or_else(|e| panic!("shrunk {name}: {e}"));
        let template = shrunk.tokenizer.chat_template.unwrap_or_default();
        corpus.add(
            "tokenizer",
            &name,
            &targets::pack(&[shrunk.tokenizer_json.as_bytes(), template.as_bytes(), MESSAGE]),
        );
        checkpoints.push(tiny);
    }

    for (i, checkpoint) in checkpoints.iter().enumerate() {
        let engine = tmp.path().join(format!("engine-{i}"));
        let dtype = if i % 2 == 0 { DType::F32 } else { DType::Bf16 };
        let opts = BuildOptions {
            checkpoint: checkpoint.clone(),
            output: engine.clone(),
            dtype,
            force: false,
            policy: Default::default(),
            calibrate: fastkv::builder::Calibrate::Never,
        };
        build(&opts, &fastkv::progress::Silent).unwrap_or_else(|e| panic!("building {}: {e}", checkpoint.display()));
        let weights = read(&engine.join("weights.safetensors"));
        let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
        let input = targets::pack(&[
            &read(&engine.join("engine.json")),
            &read(&engine.join("tokenizer.json")),
            &weights[8..8 + header_len],
        ]);
        corpus.add("engine", &stem(checkpoint), &input);
    }
    println!("{} seeds in {}", corpus.count, corpus.out.display());
}

struct Corpus {
    out: PathBuf,
    count: usize,
}

impl Corpus {
    /// Starts the targets' folders in `out` afresh.
    fn new(out: PathBuf) -> Self {
        for target in TARGETS {
            let _ = std::fs::remove_dir_all(out.join(target));
        }
        Corpus { out, count: 0 }
    }

    fn add(&mut self, target: &str, name: &str, bytes: &[u8]) {
        assert!(bytes.len() < 2 << 20, "{target}/{name} is {} bytes; seeds stay under 2 MB", bytes.len());
        let dir = self.out.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("corpus dir is writable");
        self.count += 1;
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first `n` bytes of a file.
fn head(path: &Path, n: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::Read::read_to_end(&mut std::io::Read::take(file, n), &mut bytes).expect("readable");
    bytes
}

fn stem(path: &Path) -> String {
    path.file_stem().expect("a file name").to_string_lossy().into_owned()
}

/// The `.gguf` files in `dir` (none when it does not exist).
fn gguf_models(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.expect("models/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    found
}

/// A small safetensors file with one tensor of each float dtype, an integer one and metadata.
fn dtypes_safetensors() -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let data = (0u8..48).collect::<Vec<u8>>();
    let views = [
        ("a.f32", Dtype::F32, vec![2, 3], &data[..24]),
        ("b.f16", Dtype::F16, vec![4, 3], &data[..24]),
        ("c.bf16", Dtype::BF16, vec![3], &data[..6]),
        ("d.i32", Dtype::I32, vec![2, 2], &data[..16]),
        ("e.empty", Dtype::F32, vec![0, 4], &data[..0]),
    ]
    .map(|(name, dtype, shape, bytes)| (name, TensorView::new(dtype, shape, bytes).expect("valid view")));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).expect("serializes")
}

/// A small valid GGUF of `real`'s architecture and tokenizer: its metadata with the vocabulary cut to
/// the first [`VOCAB`] tokens plus its control tokens (ids remapped) and the merges among them, the
/// model shrunk to 2 layers of 32-wide heads, each tensor in the real file's ggml type holding the
/// start of the real tensor's bytes.
fn tiny_gguf(real: &GgufFile) -> Vec<u8> {
    let meta = &real.metadata;
    let arch = meta["general.architecture"].as_str().expect("general.architecture").to_string();
    let arch_int = |key: &str| meta.get(&format!("{arch}.{key}")).and_then(Value::as_u64).map(|n| n as usize);
    let real_usize = |key: &str| arch_int(key).unwrap_or_else(|| panic!("{arch}.{key}"));
    let tokens = meta["tokenizer.ggml.tokens"].as_array().expect("tokens");
    let types = meta.get("tokenizer.ggml.token_type").and_then(Value::as_array);
    let control = |i: usize| types.is_some_and(|t| t[i] == Value::Int(3));
    let kept: Vec<usize> = (0..tokens.len()).filter(|&i| i < VOCAB || control(i)).collect();
    let new_id: HashMap<usize, usize> = kept.iter().enumerate().map(|(new, &old)| (old, new)).collect();
    let kept_text: HashSet<&str> = kept.iter().map(|&i| tokens[i].as_str().expect("token")).collect();
    let merges: Vec<Value> = meta["tokenizer.ggml.merges"]
        .as_array()
        .expect("merges")
        .iter()
        .filter(|m| {
            let (a, b) = m.as_str().and_then(|m| m.split_once(' ')).expect("a merge is `a b`");
            kept_text.contains(a) && kept_text.contains(b) && kept_text.contains(format!("{a}{b}").as_str())
        })
        .cloned()
        .collect();

    // Widths: every ggml block divides a row, heads of 32, one KV head.
    let block = real.tensors.values().map(|t| t.ggml_type.block().0).max().unwrap_or(1);
    let hidden = block.max(64);
    let (head_dim, ff, layers) = (32, 2 * hidden, 2);
    let real_head_dim = real_usize("embedding_length") / real_usize("attention.head_count");
    let real_kv = arch_int("attention.head_count_kv").unwrap_or(real_usize("attention.head_count")) * real_head_dim;
    let dims = HashMap::from([
        (real_usize("embedding_length"), hidden),
        (real_usize("feed_forward_length"), ff),
        (tokens.len(), kept.len()),
        (real_kv, head_dim),
    ]);
    let shape = |arch_key: &str| match arch_key {
        "embedding_length" => Some(hidden),
        "feed_forward_length" => Some(ff),
        "block_count" => Some(layers),
        "attention.head_count" => Some(hidden / head_dim),
        "attention.head_count_kv" => Some(1),
        "vocab_size" => Some(kept.len()),
        "rope.dimension_count" | "attention.key_length" | "attention.value_length" => Some(head_dim),
        _ => None,
    };

    let mut metadata: Vec<(String, Value)> = Vec::new();
    for (key, value) in meta {
        let value = match key.as_str() {
            "tokenizer.ggml.tokens" => Value::Array(kept.iter().map(|&i| tokens[i].clone()).collect()),
            "tokenizer.ggml.token_type" => Value::Array(kept.iter().map(|&i| types.unwrap()[i].clone()).collect()),
            "tokenizer.ggml.merges" => Value::Array(merges.clone()),
            "general.alignment" => continue, // written with the default alignment
            k if k.starts_with("tokenizer.ggml.") && k.ends_with("_token_id") => {
                match value.as_u64().and_then(|id| new_id.get(&(id as usize))) {
                    Some(&id) => Value::Int(id as i64),
                    None => continue,
                }
            }
            k => match k.strip_prefix(&format!("{arch}.")).and_then(shape) {
                Some(n) => Value::Int(n as i64),
                None => value.clone(),
            },
        };
        metadata.push((key.clone(), value));
    }
    metadata.sort_by(|a, b| a.0.cmp(&b.0));

    // The global tensors and layer 0's, repeated for each layer, with every dimension shrunk.
    let mut tensors: Vec<(String, Vec<usize>, GgmlType, &[u8])> = Vec::new();
    let mut names: Vec<&String> = real.tensors.keys().collect();
    names.sort();
    for name in names {
        let info = &real.tensors[name];
        let tiny_dims: Vec<usize> = info.dims.iter().map(|d| dims[d]).collect();
        let (block, block_bytes) = info.ggml_type.block();
        let len = tiny_dims.iter().product::<usize>() / block * block_bytes;
        let bytes = &real.bytes(info)[..len];
        match name.strip_prefix("blk.") {
            None => tensors.push((name.clone(), tiny_dims, info.ggml_type, bytes)),
            Some(rest) if rest.starts_with("0.") => {
                for l in 0..layers {
                    tensors.push((format!("blk.{l}.{}", &rest[2..]), tiny_dims.clone(), info.ggml_type, bytes));
                }
            }
            Some(_) => {}
        }
    }
    write_gguf(&metadata, &tensors)
}

/// A GGUF v3 file (default 32-byte alignment).
fn write_gguf(metadata: &[(String, Value)], tensors: &[(String, Vec<usize>, GgmlType, &[u8])]) -> Vec<u8> {
    const ALIGN: usize = 32;
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        out.extend_from_slice(&value_type(value).to_le_bytes());
        put_value(&mut out, value, value_type(value));
    }
    let mut offset = 0;
    for (name, dims, ggml_type, bytes) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|&d| out.extend_from_slice(&(d as u64).to_le_bytes()));
        let id = (0..64).find(|&id| GgmlType::from_id(id) == Some(*ggml_type)).expect("a ggml id");
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + bytes.len()).next_multiple_of(ALIGN);
    }
    for (_, _, _, bytes) in tensors {
        out.resize(out.len().next_multiple_of(ALIGN), 0);
        out.extend_from_slice(bytes);
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF value type a value is written as: u32 or i64 integers, f32 floats.
fn value_type(value: &Value) -> u32 {
    match value {
        Value::Int(n) if u32::try_from(*n).is_ok() => 4,
        Value::Int(_) => 11,
        Value::Float(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value, ty: u32) {
    match value {
        Value::Int(n) if ty == 4 => out.extend_from_slice(&(*n as u32).to_le_bytes()),
        Value::Int(n) => out.extend_from_slice(&n.to_le_bytes()),
        Value::Float(x) => out.extend_from_slice(&(*x as f32).to_le_bytes()),
        Value::Bool(b) => out.push(*b as u8),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            // One element type for all: the widest any element needs.
            let elem = items.iter().map(value_type).max().unwrap_or(4);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| put_value(out, v, elem));
        }
    }
}
