//! Checkpoints — HF directories (config, weights, tokenizer, chat template and EOS ids) or GGUF
//! files — validated and mapped onto the engine's normalised tensor names (fused q|k|v and gate|up).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::spec::ModelSpec;
use crate::tensors::{DType, TensorSet};
use crate::tokenizer_info::TokenizerInfo;

/// One engine tensor and the checkpoint tensors concatenated (along rows) to make it.
pub struct EngineTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub sources: Vec<Source>,
}

/// A checkpoint tensor and the shape the spec requires of it: each part of a fused tensor is
/// checked on its own, since parts of a wrong split can still add up to the right total.
pub struct Source {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Where the weights come from; tensors are named as in HF checkpoints either way.
pub enum Weights {
    Hf(TensorSet),
    Gguf(Box<Gguf>),
}

impl Weights {
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self {
            Weights::Hf(t) => Ok(t.get(name)?.shape.to_vec()),
            Weights::Gguf(g) => g.shape(name),
        }
    }

    /// The name the checkpoint's own file gives tensor `name`, for messages.
    fn file_name_of(&self, name: &str) -> String {
        match self {
            Weights::Hf(_) => name.to_string(),
            Weights::Gguf(g) => g.file_name_of(name),
        }
    }

    /// Appends tensor `name` converted to `dtype`.
    pub fn write_as(&self, name: &str, dtype: DType, out: &mut Vec<u8>) -> Result<()> {
        match self {
            Weights::Hf(t) => t.get(name)?.write_as(dtype, out),
            Weights::Gguf(g) => g.write_as(name, dtype, out)?,
        }
        Ok(())
    }
}

/// A validated checkpoint, ready to be converted.
pub struct Checkpoint {
    /// The checkpoint directory, or the GGUF file.
    pub path: PathBuf,
    pub spec: ModelSpec,
    pub weights: Weights,
    /// The `tokenizer.json` text the engine ships.
    pub tokenizer_json: String,
    pub tokenizer: TokenizerInfo,
    pub layout: Vec<EngineTensor>,
}

impl Checkpoint {
    /// Opens an HF checkpoint directory or a `.gguf` file and checks everything a build needs,
    /// before anything is written.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            let gguf = Gguf::open(path)?;
            let (tokenizer_json, tokenizer) = gguf.tokenizer()?;
            let spec = gguf.spec.clone();
            return Self::checked(path, spec, Weights::Gguf(Box::new(gguf)), tokenizer_json, tokenizer);
        }
        let dir = path;
        if !dir.is_dir() {
            return Err(Error::bad_file(dir, "checkpoint directory (or .gguf file) not found"));
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(Error::bad_file(&config_path, "missing: a checkpoint needs config.json"));
        }
        let spec = ModelSpec::from_hf_config(&config_path)?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(Error::bad_file(&tokenizer_path, "missing: a checkpoint needs tokenizer.json"));
        }
        let tokenizer_json = std::fs::read_to_string(&tokenizer_path).map_err(|e| Error::io(&tokenizer_path, e))?;
        let value = serde_json::from_str(&tokenizer_json).ok();
        let tok = crate::text::parse_tokenizer(&tokenizer_json, value.as_ref(), &tokenizer_path)?;
        let weights = Weights::Hf(TensorSet::open_checkpoint(dir)?);
        let tokenizer = TokenizerInfo::read_hf(dir, &spec, &tok)?;
        Self::checked(dir, spec, weights, tokenizer_json, tokenizer)
    }

    fn checked(
        path: &Path,
        spec: ModelSpec,
        weights: Weights,
        tokenizer_json: String,
        tokenizer: TokenizerInfo,
    ) -> Result<Self> {
        let layout = hf_layout(&spec);
        for t in &layout {
            check_sources(path, &weights, t)?;
        }
        Ok(Checkpoint { path: path.into(), spec, weights, tokenizer_json, tokenizer, layout })
    }
}

/// Engine tensor names → HF tensor names, for the Llama-style layout all four families share.
pub(crate) fn hf_layout(spec: &ModelSpec) -> Vec<EngineTensor> {
    let (e, d, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let one = |name: String, shape: Vec<usize>, source: String| EngineTensor {
        name,
        sources: vec![Source { name: source, shape: shape.clone() }],
        shape,
    };
    // Parts of `(name, rows)` stacked along rows; `tail` is the shape after the rows.
    let fused = |name: String, tail: &[usize], parts: Vec<(String, usize)>| EngineTensor {
        name,
        shape: [&[parts.iter().map(|p| p.1).sum()], tail].concat(),
        sources: parts.into_iter().map(|(name, rows)| Source { name, shape: [&[rows], tail].concat() }).collect(),
    };
    let mut out = vec![one("embed".into(), vec![spec.vocab_size, e], "model.embed_tokens.weight".into())];
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        let qkv = |suffix: &str| {
            let rows = [spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d];
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .zip(rows)
                .map(|(m, r)| (format!("{p}.self_attn.{m}.{suffix}"), r))
                .collect()
        };
        out.push(one(format!("layers.{l}.attn_norm"), vec![e], format!("{p}.input_layernorm.weight")));
        out.push(fused(format!("layers.{l}.wqkv"), &[e], qkv("weight")));
        if spec.qkv_bias {
            out.push(fused(format!("layers.{l}.bqkv"), &[], qkv("bias")));
        }
        if spec.qk_norm {
            out.push(one(format!("layers.{l}.q_norm"), vec![d], format!("{p}.self_attn.q_norm.weight")));
            out.push(one(format!("layers.{l}.k_norm"), vec![d], format!("{p}.self_attn.k_norm.weight")));
        }
        out.push(one(format!("layers.{l}.wo"), vec![e, spec.num_heads * d], format!("{p}.self_attn.o_proj.weight")));
        out.push(one(format!("layers.{l}.mlp_norm"), vec![e], format!("{p}.post_attention_layernorm.weight")));
        out.push(fused(
            format!("layers.{l}.w_gate_up"),
            &[e],
            vec![(format!("{p}.mlp.gate_proj.weight"), i), (format!("{p}.mlp.up_proj.weight"), i)],
        ));
        out.push(one(format!("layers.{l}.w_down"), vec![e, i], format!("{p}.mlp.down_proj.weight")));
    }
    out.push(one("final_norm".into(), vec![e], "model.norm.weight".into()));
    // Tied checkpoints may still ship lm_head.weight; it is the embedding and is not copied.
    if !spec.tie_word_embeddings {
        out.push(one("lm_head".into(), vec![spec.vocab_size, e], "lm_head.weight".into()));
    }
    out
}

/// Every source exists, is readable (HF: a float dtype) and has exactly the shape the spec gives it.
fn check_sources(path: &Path, weights: &Weights, t: &EngineTensor) -> Result<()> {
    for src in &t.sources {
        let shape = weights.shape(&src.name)?;
        if shape != src.shape {
            return Err(Error::TensorMismatch {
                path: path.into(),
                name: weights.file_name_of(&src.name),
                what: "shape",
                expected: format!("{:?}", src.shape),
                actual: format!("{shape:?}"),
            });
        }
    }
    Ok(())
}
