//! The normalised model description. Every supported HF `config.json` dialect (Llama 3.x, Mistral
//! family, Qwen2/2.5, Qwen3; pre- and post-transformers-5 rope keys) is read into this one struct,
//! and every backend is driven by it alone.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Decoder families we know the weight layout of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

pub const SUPPORTED_MODEL_TYPES: &str = "llama, mistral, qwen2, qwen3";

/// How rotary frequencies are rescaled for long context.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Keys further back than this many positions are invisible (Mistral); `None` = full attention.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
}

impl ModelSpec {
    /// Reads and validates an HF `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_value(&cfg, path)
    }

    /// The spec of an HF config given as JSON; `path` names it in errors.
    pub fn from_hf_value(cfg: &Value, path: &Path) -> Result<Self> {
        let c = Config { path, v: cfg };
        let model_type = c.str("model_type")?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(Error::UnsupportedModel {
                    path: path.into(),
                    found: other.into(),
                    supported: SUPPORTED_MODEL_TYPES,
                })
            }
        };
        let hidden_size = c.usize("hidden_size")?;
        let num_heads = c.usize("num_attention_heads")?;
        let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match c.opt_usize("head_dim")? {
            Some(d) => d,
            None if num_heads > 0 && hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(c.bad("hidden_size is not a multiple of num_attention_heads and head_dim is not given")),
        };
        if let Some(act) = c.v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(c.bad(format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        // transformers 5 moved rope_theta / rope_scaling into one `rope_parameters` object.
        let rope = c.v.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")).or_else(|| c.v.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| c.bad("rope_theta is not a number"))?,
            None => 10000.0,
        };
        let scaling = rope.or_else(|| c.v.get("rope_scaling").filter(|v| v.is_object()));
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => c.rope_scaling(s)?,
        };
        let sliding_window = match arch {
            Arch::Mistral => c.opt_usize("sliding_window")?,
            // Qwen configs carry a sliding_window that is off unless use_sliding_window is set.
            Arch::Qwen2 | Arch::Qwen3 if c.v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
                return Err(c.bad("use_sliding_window=true is not supported"))
            }
            _ => None,
        };
        let spec = ModelSpec {
            arch,
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_layers: c.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.usize("max_position_embeddings")?,
            sliding_window,
            tie_word_embeddings: c.v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || c.v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
        };
        spec.validate().map_err(|msg| c.bad(msg))?;
        Ok(spec)
    }

    /// Checks the invariants every backend relies on. Runs wherever a spec is read (config.json, GGUF
    /// metadata, engine.json), before anything is sized from it.
    pub fn validate(&self) -> std::result::Result<(), String> {
        // Each size field (config.json names) and the largest value fastkv accepts: several times the
        // largest model of the supported families, and small enough that every tensor's byte size —
        // even all of them together — is far below `u64::MAX`, so no size computed from a spec overflows.
        let sizes = [
            ("vocab_size", self.vocab_size, 1 << 21),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_layers, 1024),
            ("num_attention_heads", self.num_heads, 1024),
            ("num_key_value_heads", self.num_kv_heads, 1024),
            ("head_dim", self.head_dim, 1024),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24),
        ];
        let window = self.sliding_window.map(|w| ("sliding_window", w, 1 << 24));
        for (name, value, limit) in sizes.into_iter().chain(window) {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
            if value > limit {
                return Err(format!("{name} = {value} is above the supported {limit}"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        let positive = |name: &str, x: f64| match x.is_finite() && x > 0.0 {
            true => Ok(()),
            false => Err(format!("{name} = {x} must be a positive finite number")),
        };
        positive("rope_theta", self.rope_theta)?;
        positive("rms_norm_eps", self.rms_norm_eps)?;
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("rope factor", factor)?,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("rope factor", factor)?;
                positive("rope low_freq_factor", low_freq_factor)?;
                positive("rope high_freq_factor", high_freq_factor)?;
                positive("rope original_max_position_embeddings", original_max_position_embeddings)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope high_freq_factor ({high_freq_factor}) must be above low_freq_factor ({low_freq_factor})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rows of the fused q|k|v projection.
    pub fn qkv_rows(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Weights a decode step reads: every layer's projections and the LM head (the embedding table
    /// gives one row per token).
    pub fn decode_weights(&self) -> usize {
        let (e, h, d, i) = (self.hidden_size, self.num_heads, self.head_dim, self.intermediate_size);
        self.num_layers * (e * self.qkv_rows() + h * d * e + 3 * e * i) + self.vocab_size * e
    }

    /// GEMM + causal attention FLOPs of a prefill whose layer `l` sees `seq_lens[l]` tokens: what
    /// an ideal speed-up of TSP is the ratio of.
    pub fn prefill_flops(&self, seq_lens: &[usize]) -> f64 {
        let (e, h, d, i) = (self.hidden_size, self.num_heads, self.head_dim, self.intermediate_size);
        let linear = 2.0 * (e * self.qkv_rows() + h * d * e + 3 * e * i) as f64;
        seq_lens.iter().map(|&n| linear * n as f64 + 2.0 * (n as f64).powi(2) * (h * d) as f64).sum()
    }
}

/// Typed access to config.json fields with errors that name the file and the key.
struct Config<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl Config<'_> {
    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::bad_file(self.path, msg)
    }

    fn str(&self, key: &str) -> Result<&str> {
        self.v.get(key).and_then(Value::as_str).ok_or_else(|| self.bad(format!("missing string field `{key}`")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(format!("`{key}` must be a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.bad(format!("missing field `{key}`")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(format!("`{key}` must be a number, found {v}"))),
        }
    }

    fn rope_scaling(&self, s: &Value) -> Result<RopeScaling> {
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
        let num = |key: &str| {
            s.get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| self.bad(format!("rope scaling `{kind}` needs numeric `{key}`")))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            other => Err(self.bad(format!("rope type `{other}` is not supported (default, linear, llama3)"))),
        }
    }
}
