//! Compression policies: which prompt tokens each layer keeps in its KV cache, and which tokens
//! Token-Selective Propagation passes on. The budget formulas and gates follow fastkv-spec §4 and §8.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::select::Pool;
use crate::spec::ModelSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Keep every KV entry; every layer sees the whole prompt.
    Full,
    /// Token-Selective Propagation + GQA-aware KV compression.
    Fastkv,
}

/// How big the KV budget C and the TSP length T are.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Budget {
    /// Proportional (paper v3): T = ⌊L·t⌋, C = ⌊L·r⌋ up to ℓ*, ⌊T·(r/t)⌋ after.
    Rate { tsp_rate: f64, retain_rate: f64 },
    /// Constant (paper v1/v2): C = kv_budget in every layer, T = tsp_len.
    Absolute { kv_budget: usize, tsp_len: usize },
}

/// A complete per-request compression policy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub method: Method,
    /// ℓ*: the last layer that sees the whole prompt (0-based).
    pub tsp_layer: usize,
    pub budget: Budget,
    /// W: the observation window, always kept.
    pub window: usize,
    /// K: the pooling kernel (odd).
    pub kernel: usize,
    pub pool: Pool,
}

/// What one prefill layer does with its sequence of `seq_len` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    /// Entries kept per KV head; `None` keeps all `seq_len` in order (no scoring).
    pub kv_budget: Option<usize>,
    /// Tokens propagated past this layer; `Some` only at ℓ* when TSP fires.
    pub tsp_len: Option<usize>,
}

impl Policy {
    /// FastKV's defaults for a model: ℓ* = N/2 − 1, t = 0.2, r = 0.1, W = 8, K = 7, maxpool.
    pub fn fastkv_default(spec: &ModelSpec) -> Self {
        Policy {
            method: Method::Fastkv,
            tsp_layer: (spec.num_layers / 2).saturating_sub(1),
            budget: Budget::Rate { tsp_rate: 0.2, retain_rate: 0.1 },
            window: 8,
            kernel: 7,
            pool: Pool::Max,
        }
    }

    /// Rejects values no prompt could make sense of, naming the flag.
    pub fn validate(&self, spec: &ModelSpec) -> Result<()> {
        if self.tsp_layer >= spec.num_layers {
            return Err(Error::invalid(
                "--tsp-layer",
                format!("{} is not a layer of this model (0..{})", self.tsp_layer, spec.num_layers),
            ));
        }
        if self.window == 0 {
            return Err(Error::invalid("--window", "must be at least 1"));
        }
        if self.kernel == 0 || self.kernel % 2 == 0 {
            return Err(Error::invalid("--kernel", format!("{} must be odd and positive", self.kernel)));
        }
        match self.budget {
            Budget::Rate { tsp_rate, retain_rate } => {
                let in_range = |x: f64| x > 0.0 && x <= 1.0;
                if !in_range(tsp_rate) {
                    return Err(Error::invalid("--tsp-rate", format!("{tsp_rate} is not in (0, 1]")));
                }
                if !in_range(retain_rate) {
                    return Err(Error::invalid("--retain-rate", format!("{retain_rate} is not in (0, 1]")));
                }
            }
            Budget::Absolute { kv_budget, tsp_len } => {
                if kv_budget == 0 {
                    return Err(Error::invalid("--kv-budget", "must be at least 1"));
                }
                if tsp_len == 0 {
                    return Err(Error::invalid("--tsp-len", "must be at least 1"));
                }
            }
        }
        Ok(())
    }

    /// T for a prompt of `prompt_len` tokens, never below the window.
    pub fn tsp_len(&self, prompt_len: usize) -> usize {
        let t = match self.budget {
            Budget::Rate { tsp_rate, .. } => (prompt_len as f64 * tsp_rate) as usize,
            Budget::Absolute { tsp_len, .. } => tsp_len,
        };
        t.max(self.window)
    }

    /// C of `layer` before the gate (spec §4), as the paper's code computes it.
    pub fn kv_budget(&self, layer: usize, prompt_len: usize) -> usize {
        match self.budget {
            Budget::Rate { tsp_rate, retain_rate } if layer > self.tsp_layer => {
                (self.tsp_len(prompt_len) as f64 * (retain_rate / tsp_rate)) as usize
            }
            Budget::Rate { retain_rate, .. } => (prompt_len as f64 * retain_rate) as usize,
            Budget::Absolute { kv_budget, .. } => kv_budget,
        }
    }

    /// The plan of `layer` when it sees `seq_len` tokens of a `prompt_len`-token prompt, with the
    /// gates of spec §8: a sequence shorter than C (or no longer than W) is stored whole and never
    /// propagates; TSP fires only at ℓ* and only if it shrinks the sequence.
    pub fn plan(&self, layer: usize, prompt_len: usize, seq_len: usize) -> LayerPlan {
        let whole = LayerPlan { kv_budget: None, tsp_len: None };
        if self.method == Method::Full {
            return whole;
        }
        let c = self.kv_budget(layer, prompt_len);
        if seq_len < c || seq_len <= self.window {
            return whole;
        }
        let t = self.tsp_len(prompt_len);
        LayerPlan {
            kv_budget: Some(c.max(self.window)),
            tsp_len: (layer == self.tsp_layer && seq_len > t).then_some(t),
        }
    }
}
