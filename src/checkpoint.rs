//! Checkpoints — HF directories (config, weights, tokenizer, chat template and EOS ids) or GGUF
//! files — validated and mapped onto the engine's normalised tensor names (fused q|k|v and gate|up).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::spec::ModelSpec;
use crate::tensors::{DType, TensorSet};

/// Tokenizer-side facts the runtime needs besides `tokenizer.json`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerInfo {
    pub eos_token_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

/// One engine tensor and the checkpoint tensors concatenated (along rows) to make it.
pub struct EngineTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub sources: Vec<String>,
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
        let tok = tokenizer_json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| Error::bad_file(&tokenizer_path, format!("cannot load tokenizer: {e}")))?;
        let weights = Weights::Hf(TensorSet::open_checkpoint(dir)?);
        let tokenizer = read_tokenizer_info(dir, &spec, &tok)?;
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
fn hf_layout(spec: &ModelSpec) -> Vec<EngineTensor> {
    let (e, d, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let t = |name: String, shape: Vec<usize>, sources: Vec<String>| EngineTensor { name, shape, sources };
    let mut out = vec![t("embed".into(), vec![spec.vocab_size, e], vec!["model.embed_tokens.weight".into()])];
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        let qkv = |suffix: &str| ["q_proj", "k_proj", "v_proj"].map(|m| format!("{p}.self_attn.{m}.{suffix}")).to_vec();
        out.push(t(format!("layers.{l}.attn_norm"), vec![e], vec![format!("{p}.input_layernorm.weight")]));
        out.push(t(format!("layers.{l}.wqkv"), vec![spec.qkv_rows(), e], qkv("weight")));
        if spec.qkv_bias {
            out.push(t(format!("layers.{l}.bqkv"), vec![spec.qkv_rows()], qkv("bias")));
        }
        if spec.qk_norm {
            out.push(t(format!("layers.{l}.q_norm"), vec![d], vec![format!("{p}.self_attn.q_norm.weight")]));
            out.push(t(format!("layers.{l}.k_norm"), vec![d], vec![format!("{p}.self_attn.k_norm.weight")]));
        }
        out.push(t(
            format!("layers.{l}.wo"),
            vec![e, spec.num_heads * d],
            vec![format!("{p}.self_attn.o_proj.weight")],
        ));
        out.push(t(format!("layers.{l}.mlp_norm"), vec![e], vec![format!("{p}.post_attention_layernorm.weight")]));
        out.push(t(
            format!("layers.{l}.w_gate_up"),
            vec![2 * i, e],
            vec![format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight")],
        ));
        out.push(t(format!("layers.{l}.w_down"), vec![e, i], vec![format!("{p}.mlp.down_proj.weight")]));
    }
    out.push(t("final_norm".into(), vec![e], vec!["model.norm.weight".into()]));
    // Tied checkpoints may still ship lm_head.weight; it is the embedding and is not copied.
    if !spec.tie_word_embeddings {
        out.push(t("lm_head".into(), vec![spec.vocab_size, e], vec!["lm_head.weight".into()]));
    }
    out
}

/// Every source exists, has a float dtype, and the row blocks add up to the engine tensor's shape.
fn check_sources(dir: &Path, weights: &Weights, t: &EngineTensor) -> Result<()> {
    let mut rows = 0;
    for name in &t.sources {
        let shape = weights.shape(name)?;
        let expected_tail = &t.shape[1..];
        let ok = shape.len() == t.shape.len() && &shape[1..] == expected_tail;
        if !ok || shape.is_empty() {
            let mut expected = t.shape.clone();
            if t.sources.len() > 1 {
                expected[0] = shape.first().copied().unwrap_or(0);
            }
            return Err(Error::TensorMismatch {
                path: dir.into(),
                name: name.clone(),
                what: "shape",
                expected: format!("{expected:?}"),
                actual: format!("{shape:?}"),
            });
        }
        rows += shape[0];
    }
    if rows != t.shape[0] {
        let shapes: Vec<String> =
            t.sources.iter().map(|n| format!("{n} {:?}", weights.shape(n).unwrap_or_default())).collect();
        return Err(Error::TensorMismatch {
            path: dir.into(),
            name: t.sources.join(" + "),
            what: "total rows",
            expected: t.shape[0].to_string(),
            actual: format!("{rows} ({})", shapes.join(", ")),
        });
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))
}

/// A special-token entry is either a string or `{"content": "..."}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Option<Vec<u32>> {
    match v? {
        Value::Number(n) => n.as_u64().map(|n| vec![n as u32]),
        Value::Array(a) => a.iter().map(|x| x.as_u64().map(|n| n as u32)).collect(),
        _ => None,
    }
}

fn read_tokenizer_info(dir: &Path, spec: &ModelSpec, tok: &tokenizers::Tokenizer) -> Result<TokenizerInfo> {
    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg = read_json(&tok_cfg_path)?.unwrap_or(Value::Null);
    let gen_cfg = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let eos_token = token_string(tok_cfg.get("eos_token"));
    let mut eos_token_ids = ids(gen_cfg.get("eos_token_id"))
        .or_else(|| ids(config.get("eos_token_id")))
        .or_else(|| eos_token.as_deref().and_then(|t| tok.token_to_id(t)).map(|id| vec![id]))
        .unwrap_or_default();
    eos_token_ids.dedup();
    if let Some(bad) = eos_token_ids.iter().find(|&&id| id as usize >= spec.vocab_size) {
        return Err(Error::bad_file(
            dir,
            format!("eos_token_id {bad} is outside the vocabulary ({})", spec.vocab_size),
        ));
    }
    // transformers >= 4.47 writes the template to its own file.
    let jinja = dir.join("chat_template.jinja");
    let chat_template = if jinja.exists() {
        Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
    } else {
        match tok_cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(String::from),
            _ => None,
        }
    };
    Ok(TokenizerInfo { eos_token_ids, bos_token: token_string(tok_cfg.get("bos_token")), eos_token, chat_template })
}
