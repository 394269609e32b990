//! Requests against an opened engine: tokenize, prefill under the request's compression policy,
//! decode with streaming, and measure. Many requests may run on one engine at once.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::KvCache;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::policy::{Method, Policy};
use crate::prefill::Prefill;
use crate::sampling::{Sampler, Sampling};
use crate::text::Detokenizer;

/// What to complete.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (e.g. BOS).
    Text(String),
    /// One user message, wrapped in the engine's chat template.
    Chat(String),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub prompt: Prompt,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// `None`: the engine's default FastKV policy.
    pub policy: Option<Policy>,
    /// Record which KV entries each layer kept (see [`Selection`]).
    pub record_selection: bool,
}

impl Request {
    pub fn new(prompt: Prompt) -> Self {
        Request { prompt, max_new_tokens: 128, sampling: Sampling::default(), policy: None, record_selection: false }
    }
}

/// One generated token, as streamed.
#[derive(Clone, Debug)]
pub struct Token {
    pub id: u32,
    /// The text this token completes (empty while a multi-byte character is unfinished).
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Eos,
    Length,
    Cancelled,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Request start to first token, seconds.
    pub ttft_s: f64,
    pub prefill_tokens_per_s: f64,
    /// Seconds of prefill work under this policy (in a shared prefill, the shared layers counted
    /// whole): what compares methods' prefill speed in one [`Engine::generate_each`].
    pub prefill_s: f64,
    /// Tokens after the first per second of decoding (0 with fewer than two tokens).
    pub decode_tokens_per_s: f64,
    /// K+V bytes cached after prefill.
    pub kv_cache_bytes: usize,
    /// What a full cache of the same prompt would hold.
    pub kv_cache_bytes_full: usize,
}

/// What the policy kept, per layer; positions are original prompt positions (after GemFilter:
/// positions in the re-run over `filtered_positions`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Selection {
    pub layers: Vec<LayerSelection>,
    pub tsp_layer: Option<usize>,
    pub tsp_positions: Option<Vec<u32>>,
    /// GemFilter: the prompt positions whose tokens were re-run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filtered_positions: Option<Vec<u32>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerSelection {
    pub layer: usize,
    pub seq_len: usize,
    /// Kept positions per cache head (KV heads; query heads for per-query-head methods), ascending.
    pub kept: Vec<Vec<u32>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Output {
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub metrics: Metrics,
    /// The compression policy the request ran under.
    pub policy: Policy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
    /// Last-position logits of the prompt (for parity checks); not serialized.
    #[serde(skip)]
    pub prompt_logits: Vec<f32>,
}

/// A checked, tokenized prompt.
#[derive(Clone)]
struct Prepared {
    ids: Vec<u32>,
    /// Tokens that may follow it.
    max_new: usize,
}

impl Engine {
    /// The full-KV policy (every layer keeps everything): the baseline FastKV is compared with.
    pub fn full_policy(&self) -> Policy {
        Policy { method: Method::Full, ..self.default_policy() }
    }

    /// Runs `req`, calling `on_token` for every generated token; returning `Break` stops early.
    pub fn generate(&self, req: &Request, on_token: impl FnMut(&Token) -> ControlFlow<()>) -> Result<Output> {
        let start = Instant::now();
        let policy = req.policy.unwrap_or_else(|| self.default_policy());
        let prompt = self.prepare(req)?;
        let prefill = self.backend.prefill(&prompt.ids, &policy, prompt.max_new)?;
        self.complete(req, &policy, prompt, prefill, start.elapsed().as_secs_f64(), on_token)
    }

    /// Runs `req` under each of `policies` (its own policy is ignored) with one shared prefill
    /// ([`crate::backend::Backend::prefill_many`]), so comparing methods on one prompt costs little more
    /// than its longest prefill. The outputs equal separate [`Engine::generate`] calls', except
    /// that every TTFT counts the whole shared prefill.
    pub fn generate_each(&self, req: &Request, policies: &[Policy]) -> Result<Vec<Output>> {
        let start = Instant::now();
        let prompt = self.prepare(req)?;
        let prefills = self.backend.prefill_many(&prompt.ids, policies, prompt.max_new)?;
        let prefill_s = start.elapsed().as_secs_f64();
        policies
            .iter()
            .zip(prefills)
            .map(|(policy, prefill)| {
                self.complete(req, policy, prompt.clone(), prefill, prefill_s, |_| ControlFlow::Continue(()))
            })
            .collect()
    }

    /// Checks `req`'s sampling and tokenizes its prompt (its policies are checked where every
    /// prefill starts, [`crate::prefill`]).
    fn prepare(&self, req: &Request) -> Result<Prepared> {
        let spec = self.spec();
        req.sampling.validate()?;
        let max_pos = spec.max_position_embeddings;
        // A text too long for the model is refused before it is tokenized, where its length in
        // bytes already proves it: tokenizing megabytes takes seconds and gigabytes.
        let fits = |text: &str| {
            match self.text.min_tokens(text) {
            (tokens, Some(max)) if tokens > max_pos => Err(Error::invalid(
                "prompt",
                format!(
                    "the prompt is at least {tokens} tokens ({} bytes, no token of this tokenizer is longer than {max}); this model takes at most {max_pos}",
                    text.len()
                ),
            )),
            _ => Ok(()),
        }
        };
        let ids = match &req.prompt {
            Prompt::Text(t) => {
                fits(t)?;
                self.text.encode(t, true)?
            }
            Prompt::Chat(m) => {
                let rendered = self.text.chat_prompt(m)?;
                fits(&rendered)?;
                self.text.encode_chat(&rendered)?
            }
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(Error::invalid("prompt", "the prompt is empty"));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= spec.vocab_size) {
            return Err(Error::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary ({})", spec.vocab_size),
            ));
        }
        if ids.len() > max_pos {
            return Err(Error::invalid(
                "prompt",
                format!("the prompt is {} tokens; this model takes at most {max_pos}", ids.len()),
            ));
        }
        // New tokens take positions L, L+1, …; stop at the model's last position.
        let max_new = req.max_new_tokens.min(max_pos - ids.len() + 1);
        Ok(Prepared { ids, max_new })
    }

    /// Decodes after `prefill` (which took `prefill_s` seconds) and measures the request.
    fn complete(
        &self,
        req: &Request,
        policy: &Policy,
        prompt: Prepared,
        prefill: Prefill<KvCache>,
        prefill_s: f64,
        mut on_token: impl FnMut(&Token) -> ControlFlow<()>,
    ) -> Result<Output> {
        let spec = self.spec();
        let Prepared { ids, max_new } = prompt;
        let mut cache = prefill.cache;
        let kv_cache_bytes = cache.bytes();
        let kv_cache_bytes_full =
            2 * spec.num_layers * ids.len() * spec.num_kv_heads * spec.head_dim * self.backend.kv_element_bytes();
        let selection = match req.record_selection {
            false => None,
            true => Some(Selection {
                layers: (0..cache.num_layers())
                    .map(|l| {
                        let kept = cache.positions(l)?.into_iter().map(|mut p| {
                            p.sort_unstable();
                            p
                        });
                        Ok(LayerSelection { layer: l, seq_len: prefill.seq_lens[l], kept: kept.collect() })
                    })
                    .collect::<Result<_>>()?,
                tsp_layer: prefill.tsp_positions.as_ref().map(|_| policy.tsp_layer),
                tsp_positions: prefill.tsp_positions.clone(),
                filtered_positions: prefill.filtered_positions.clone(),
            }),
        };

        let start = Instant::now();
        let mut sampler = Sampler::new(req.sampling);
        let mut detok = Detokenizer::new(&self.text);
        let mut out_ids = Vec::new();
        let mut text = String::new();
        let mut logits = prefill.logits.clone();
        let mut finish = FinishReason::Length;
        let mut ttft = prefill_s;
        let mut first_token_at = start;
        for step in 0..max_new {
            let id = sampler.next(&logits);
            if step == 0 {
                first_token_at = Instant::now();
                ttft = prefill_s + (first_token_at - start).as_secs_f64();
            }
            out_ids.push(id);
            if self.text.eos_token_ids().contains(&id) {
                finish = FinishReason::Eos;
                break;
            }
            let piece = detok.push(id)?;
            text.push_str(&piece);
            if on_token(&Token { id, text: piece }).is_break() {
                finish = FinishReason::Cancelled;
                break;
            }
            if step + 1 < max_new {
                logits = self.backend.decode(id, prefill.next_position + step as u32, &mut cache)?;
            }
        }
        let decode_s = first_token_at.elapsed().as_secs_f64();
        let n = out_ids.len();
        let metrics = Metrics {
            prompt_tokens: ids.len(),
            generated_tokens: n,
            ttft_s: ttft,
            prefill_tokens_per_s: ids.len() as f64 / prefill_s,
            prefill_s: {
                let p = &prefill.profile;
                p.projections_s + p.attention_s + p.selection_s
            },
            decode_tokens_per_s: if n > 1 && decode_s > 0.0 { (n - 1) as f64 / decode_s } else { 0.0 },
            kv_cache_bytes,
            kv_cache_bytes_full,
        };
        Ok(Output {
            text,
            prompt_ids: ids,
            token_ids: out_ids,
            finish_reason: finish,
            metrics,
            policy: *policy,
            selection,
            prompt_logits: prefill.logits,
        })
    }
}
