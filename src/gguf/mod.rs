//! A GGUF file (llama.cpp's single-file format) as a checkpoint source: the model spec from its
//! metadata, its tensors dequantized to f32 under the HF names the checkpoint layout uses, and a
//! tokenizer built from `tokenizer.ggml.*`.

pub mod dequant;
pub mod reader;
pub mod tokenizer;

use std::path::Path;

use crate::error::{Error, Result};
use crate::spec::{Arch, ModelSpec, RopeScaling};
use crate::tensors::{DType, Tensor};
use crate::tokenizer_info::TokenizerInfo;

pub use reader::{GgufFile, TensorInfo, Value};

const SUPPORTED_ARCHS: &str = "llama, qwen2";

pub struct Gguf {
    pub file: GgufFile,
    pub spec: ModelSpec,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let spec = spec(&file)?;
        Ok(Gguf { file, spec })
    }

    /// `tokenizer.json` text and the manifest's tokenizer facts.
    pub fn tokenizer(&self) -> Result<(String, TokenizerInfo)> {
        tokenizer::build(&self.file)
    }

    /// The GGUF tensor behind an HF tensor name.
    fn info(&self, hf_name: &str) -> Result<&TensorInfo> {
        let name = gguf_name(hf_name)
            .ok_or_else(|| Error::bad_file(&self.file.path, format!("no GGUF tensor corresponds to `{hf_name}`")))?;
        self.file.tensors.get(&name).ok_or(Error::MissingTensor { path: self.file.path.clone(), name })
    }

    /// The GGUF name of an HF tensor name (itself if it has none), for messages.
    pub(crate) fn file_name_of(&self, hf_name: &str) -> String {
        gguf_name(hf_name).unwrap_or_else(|| hf_name.to_string())
    }

    /// Row-major shape of the tensor behind an HF tensor name.
    pub fn shape(&self, hf_name: &str) -> Result<Vec<usize>> {
        Ok(self.info(hf_name)?.shape())
    }

    /// Appends the tensor behind `hf_name` in `dtype`: dequantized to f32 row by row (llama.cpp's
    /// Q/K row permutation undone for the llama arch), then converted like any f32 checkpoint tensor.
    pub fn write_as(&self, hf_name: &str, dtype: DType, out: &mut Vec<u8>) -> Result<()> {
        let t = self.info(hf_name)?;
        let bytes = self.file.bytes(t);
        let cols = t.dims[0];
        let rows = t.dims[1..].iter().product::<usize>();
        let row_bytes = bytes.len() / rows;
        let permuted = self.spec.arch == Arch::Llama && matches!(hf_name.rsplit('.').nth(1), Some("q_proj" | "k_proj"));
        let mut wide = vec![0f32; rows * cols];
        for (r, dst) in wide.chunks_exact_mut(cols).enumerate() {
            let src = if permuted { permuted_row(r, self.spec.head_dim) } else { r };
            t.ggml_type.dequantize(&bytes[src * row_bytes..(src + 1) * row_bytes], dst);
        }
        let shape = t.shape();
        Tensor { dtype: DType::F32, shape: &shape, bytes: bytemuck::cast_slice(&wide) }.write_as(dtype, out);
        Ok(())
    }
}

/// llama.cpp stores each Llama q/k head's rows interleaved (row `2i + h` holds HF row `h·d/2 + i`
/// for rotary half `h`, head dim `d`) so its RoPE rotates adjacent pairs; the GGUF row holding HF
/// row `r`.
fn permuted_row(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    let (half, i) = (within / (head_dim / 2), within % (head_dim / 2));
    head * head_dim + 2 * i + half
}

/// HF tensor name → llama.cpp tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    const GLOBAL: [(&str, &str); 3] = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, part) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (module, kind) = part.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The model spec from `{arch}.*` metadata, validated like one read from `config.json`.
fn spec(file: &GgufFile) -> Result<ModelSpec> {
    let bad = |msg: String| Error::bad_file(&file.path, msg);
    let arch_name = file.metadata.get("general.architecture").and_then(Value::as_str).unwrap_or("(missing)");
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::UnsupportedModel {
                path: file.path.clone(),
                found: format!("GGUF general.architecture `{other}`"),
                supported: SUPPORTED_ARCHS,
            })
        }
    };
    let opt = |key: &str| file.metadata.get(&format!("{arch_name}.{key}"));
    let opt_usize = |key: &str| -> Result<Option<usize>> {
        opt(key)
            .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("`{arch_name}.{key}` is {v:?}"))))
            .transpose()
    };
    let usize = |key: &str| opt_usize(key)?.ok_or_else(|| bad(format!("missing `{arch_name}.{key}`")));
    let opt_f64 = |key: &str| -> Result<Option<f64>> {
        opt(key).map(|v| v.as_f64().ok_or_else(|| bad(format!("`{arch_name}.{key}` is {v:?}")))).transpose()
    };
    let hidden_size = usize("embedding_length")?;
    let num_heads = usize("attention.head_count")?;
    let head_dim = match opt_usize("attention.key_length")? {
        Some(d) => d,
        None if num_heads > 0 && hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => return Err(bad("embedding_length is not a multiple of head_count and key_length is not given".into())),
    };
    let rope_scaling = match opt("rope.scaling.type").map(|v| v.as_str().unwrap_or("?")) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: opt_f64("rope.scaling.factor")?.ok_or_else(|| bad("linear rope scaling needs a factor".into()))?,
        },
        Some(other) => return Err(bad(format!("rope scaling `{other}` is not supported (none, linear)"))),
    };
    if file.tensors.contains_key("rope_freqs.weight") {
        return Err(bad("per-frequency rope factors (rope_freqs.weight) are not supported".into()));
    }
    if arch == Arch::Llama && file.tensors.contains_key("blk.0.attn_q.bias") {
        // Their rows would need the same un-permutation as the weights; no such model is supported yet.
        return Err(bad("llama-arch q/k/v biases are not supported".into()));
    }
    let vocab_size = file
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(<[Value]>::len)
        .ok_or_else(|| bad("missing array `tokenizer.ggml.tokens`".into()))?;
    let spec = ModelSpec {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: usize("feed_forward_length")?,
        num_layers: usize("block_count")?,
        num_heads,
        num_kv_heads: opt_usize("attention.head_count_kv")?.unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: opt_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
        rope_theta: opt_f64("rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: usize("context_length")?,
        sliding_window: None,
        tie_word_embeddings: !file.tensors.contains_key("output.weight"),
        qkv_bias: arch == Arch::Qwen2,
        qk_norm: false,
    };
    spec.validate().map_err(bad)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_to_llama_cpp_names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.q_proj.bias").unwrap(), "blk.12.attn_q.bias");
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(), "blk.0.ffn_down.weight");
        assert_eq!(gguf_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }

    #[test]
    fn interleaved_rope_rows_map_back_to_halves() {
        // Head dim 4: HF rows [a0, a1, b0, b1] are stored as [a0, b0, a1, b1]; two heads.
        let stored: Vec<usize> = (0..8).map(|r| permuted_row(r, 4)).collect();
        assert_eq!(stored, [0, 2, 1, 3, 4, 6, 5, 7]);
    }
}
