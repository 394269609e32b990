//! Requests against an opened engine: tokenize, prefill under the request's compression policy,
//! decode with streaming, and measure. [`Engine::generate`] runs one request on the calling thread;
//! the batching engine ([`crate::scheduler`]) runs many, sharing every decode step. Both take a request
//! from its prefill to its last token through one [`Generation`]: sampling, stop strings, EOS and
//! length, log-probabilities and metrics are decided in one place.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{KvCache, Step};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::policy::{Method, Policy};
use crate::prefill::Prefill;
use crate::sampling::{Sampler, Sampling};
use crate::stop::StopText;
use crate::text::{Detokenizer, Message};

/// What to complete.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (e.g. BOS).
    Text(String),
    /// One user message, wrapped in the engine's chat template.
    Chat(String),
    /// A conversation, rendered by the engine's chat template with the assistant's turn to come.
    Messages(Vec<Message>),
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
    /// Generation ends where one of these appears in the text; the text ends before it.
    pub stop: Vec<String>,
    /// Report each token's log-probability and this many most likely alternatives ([`Token::logprob`]).
    pub logprobs: Option<usize>,
    /// Generate past EOS tokens, to exactly `max_new_tokens` (benchmarks measure fixed lengths).
    pub ignore_eos: bool,
}

impl Request {
    pub fn new(prompt: Prompt) -> Self {
        Request {
            prompt,
            max_new_tokens: 128,
            sampling: Sampling::default(),
            policy: None,
            record_selection: false,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

/// One generated token, as streamed.
#[derive(Clone, Debug)]
pub struct Token {
    pub id: u32,
    /// The text this token releases: what it completes (empty while a multi-byte character is
    /// unfinished), less what might still begin a stop string, plus what it frees of earlier held
    /// text. Released pieces always prefix [`Output::text`], so a stream that has sent `n` bytes
    /// finishes with `output.text[n..]`.
    pub text: String,
    /// With [`Request::logprobs`]: the token's log-probability and the most likely alternatives.
    pub logprob: Option<Logprob>,
}

/// A token's log-probability under the model (before temperature and truncation) and the most
/// likely tokens at its position, most likely first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Logprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Eos,
    Length,
    /// A stop string appeared ([`Request::stop`]).
    Stop,
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
pub(crate) struct Prepared {
    pub(crate) ids: Vec<u32>,
    /// Tokens that may follow it.
    pub(crate) max_new: usize,
}

impl Engine {
    /// The full-KV policy (every layer keeps everything): the baseline FastKV is compared with.
    pub fn full_policy(&self) -> Policy {
        Policy { method: Method::Full, ..self.default_policy() }
    }

    /// Runs `req`, calling `on_token` for every generated token; returning `Break` stops early.
    pub fn generate(&self, req: &Request, mut on_token: impl FnMut(&Token) -> ControlFlow<()>) -> Result<Output> {
        let start = Instant::now();
        let policy = req.policy.unwrap_or_else(|| self.default_policy());
        let prompt = self.prepare(req)?;
        let prefill = self.backend.prefill(&prompt.ids, &policy, prompt.max_new)?;
        let prefill_s = start.elapsed().as_secs_f64();
        let (mut gen, mut cache) = Generation::new(self, req, policy, prompt, prefill, (start, prefill_s))?;
        while let Some(token) = gen.sample()? {
            if on_token(&token).is_break() {
                gen.cancel();
            }
            if let Some((id, position)) = gen.to_decode() {
                gen.accept(self.backend.decode(id, position, &mut cache)?);
            }
        }
        Ok(gen.finish())
    }

    /// Runs `req` under each of `policies` (its own policy is ignored) with one shared prefill
    /// ([`crate::backend::Backend::prefill_many`]) and batched decode steps
    /// ([`crate::backend::Backend::decode_batch`]), so comparing methods on one prompt costs little
    /// more than its longest prefill and one generation. The outputs equal separate
    /// [`Engine::generate`] calls', except that every TTFT counts the whole shared prefill.
    pub fn generate_each(&self, req: &Request, policies: &[Policy]) -> Result<Vec<Output>> {
        let start = Instant::now();
        let prompt = self.prepare(req)?;
        let prefills = self.backend.prefill_many(&prompt.ids, policies, prompt.max_new)?;
        let prefill_s = start.elapsed().as_secs_f64();
        let mut runs = policies
            .iter()
            .zip(prefills)
            .map(|(&policy, prefill)| Generation::new(self, req, policy, prompt.clone(), prefill, (start, prefill_s)))
            .collect::<Result<Vec<_>>>()?;
        loop {
            let mut decoding = Vec::new();
            let mut steps = Vec::new();
            for (i, (gen, cache)) in runs.iter_mut().enumerate() {
                gen.sample()?;
                if let Some((token, position)) = gen.to_decode() {
                    decoding.push(i);
                    steps.push(Step { token, position, cache });
                }
            }
            if steps.is_empty() {
                break;
            }
            let logits = self.backend.decode_batch(&mut steps)?;
            drop(steps);
            for (i, logits) in decoding.into_iter().zip(logits) {
                runs[i].0.accept(logits);
            }
        }
        Ok(runs.into_iter().map(|(gen, _)| gen.finish()).collect())
    }

    /// Checks `req`'s sampling and tokenizes its prompt (its policies are checked where every
    /// prefill starts, [`crate::prefill`]).
    pub(crate) fn prepare(&self, req: &Request) -> Result<Prepared> {
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
            Prompt::Messages(m) => {
                let rendered = self.text.chat_messages(m)?;
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
}

/// One request from its prefill to its last token. [`Generation::sample`] picks the next token from
/// the latest logits and decides whether it ends the request (EOS, a stop string, the length);
/// [`Generation::to_decode`] names the token and position the backend must decode next, whose
/// logits come back through [`Generation::accept`]; [`Generation::finish`] measures it.
pub(crate) struct Generation<'e> {
    engine: &'e Engine,
    policy: Policy,
    prompt_ids: Vec<u32>,
    max_new: usize,
    next_position: u32,
    sampler: Sampler,
    detok: Detokenizer<'e>,
    stop: StopText,
    logprobs: Option<usize>,
    ignore_eos: bool,
    token_ids: Vec<u32>,
    logits: Vec<f32>,
    prompt_logits: Vec<f32>,
    finish: Option<FinishReason>,
    selection: Option<Selection>,
    start: Instant,
    first_token_at: Option<Instant>,
    prefill_s: f64,
    prefill_work_s: f64,
    kv_cache_bytes: usize,
}

impl<'e> Generation<'e> {
    /// The request `req` (its prompt `prompt`, received at `start`) after its prefill under `policy`,
    /// which took `prefill_s` seconds; also the cache the prefill made, to decode into.
    pub(crate) fn new(
        engine: &'e Engine,
        req: &Request,
        policy: Policy,
        prompt: Prepared,
        prefill: Prefill<KvCache>,
        (start, prefill_s): (Instant, f64),
    ) -> Result<(Self, KvCache)> {
        let cache = prefill.cache;
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
                tsp_positions: prefill.tsp_positions,
                filtered_positions: prefill.filtered_positions,
            }),
        };
        let p = &prefill.profile;
        let gen = Generation {
            engine,
            policy,
            max_new: prompt.max_new,
            prompt_ids: prompt.ids,
            next_position: prefill.next_position,
            sampler: Sampler::new(req.sampling),
            detok: Detokenizer::new(&engine.text),
            stop: StopText::new(req.stop.iter().filter(|s| !s.is_empty()).cloned().collect()),
            logprobs: req.logprobs,
            ignore_eos: req.ignore_eos,
            token_ids: Vec::new(),
            logits: prefill.logits.clone(),
            prompt_logits: prefill.logits,
            finish: (prompt.max_new == 0).then_some(FinishReason::Length),
            selection,
            start,
            first_token_at: None,
            prefill_s,
            prefill_work_s: p.projections_s + p.attention_s + p.selection_s,
            kv_cache_bytes: cache.bytes(),
        };
        Ok((gen, cache))
    }

    /// The next token from the latest logits, with the text it releases; `None` once the request
    /// is over. An EOS token ends it unreleased; a stop string, the length or a cancellation after
    /// the token end it after.
    pub(crate) fn sample(&mut self) -> Result<Option<Token>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let id = self.sampler.next(&self.logits);
        let logprob = self.logprobs.map(|top| logprob(&self.logits, id, top));
        self.first_token_at.get_or_insert_with(Instant::now);
        self.token_ids.push(id);
        if !self.ignore_eos && self.engine.text.eos_token_ids().contains(&id) {
            self.finish = Some(FinishReason::Eos);
            return Ok(None);
        }
        let (text, stopped) = self.stop.push(&self.detok.push(id)?);
        if stopped {
            self.finish = Some(FinishReason::Stop);
        } else if self.token_ids.len() >= self.max_new {
            self.finish = Some(FinishReason::Length);
        }
        Ok(Some(Token { id, text, logprob }))
    }

    /// Ends the request after the tokens sampled so far.
    pub(crate) fn cancel(&mut self) {
        self.finish.get_or_insert(FinishReason::Cancelled);
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The token the backend must decode next and its position: the last one sampled, while the
    /// request goes on.
    pub(crate) fn to_decode(&self) -> Option<(u32, u32)> {
        match (self.finish, self.token_ids.last()) {
            (None, Some(&id)) => Some((id, self.next_position + self.token_ids.len() as u32 - 1)),
            _ => None,
        }
    }

    /// The logits of the token [`Generation::to_decode`] named.
    pub(crate) fn accept(&mut self, logits: Vec<f32>) {
        self.logits = logits;
    }

    pub(crate) fn finish(self) -> Output {
        let spec = self.engine.spec();
        let n = self.token_ids.len();
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        let decode_s = first.elapsed().as_secs_f64();
        let metrics = Metrics {
            prompt_tokens: self.prompt_ids.len(),
            generated_tokens: n,
            ttft_s: (first - self.start).as_secs_f64(),
            prefill_tokens_per_s: self.prompt_ids.len() as f64 / self.prefill_s,
            prefill_s: self.prefill_work_s,
            decode_tokens_per_s: if n > 1 && decode_s > 0.0 { (n - 1) as f64 / decode_s } else { 0.0 },
            kv_cache_bytes: self.kv_cache_bytes,
            kv_cache_bytes_full: 2
                * spec.num_layers
                * self.prompt_ids.len()
                * spec.num_kv_heads
                * spec.head_dim
                * self.engine.backend.kv_element_bytes(),
        };
        Output {
            text: self.stop.text().to_string(),
            prompt_ids: self.prompt_ids,
            token_ids: self.token_ids,
            finish_reason: self.finish.unwrap_or(FinishReason::Cancelled),
            metrics,
            policy: self.policy,
            selection: self.selection,
            prompt_logits: self.prompt_logits,
        }
    }
}

/// `id`'s log-probability under `logits` and the `top` most likely tokens', most likely first.
fn logprob(logits: &[f32], id: u32, top: usize) -> Logprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        best = idx.into_iter().map(|i| (i, logits[i as usize] - log_sum)).collect();
    }
    Logprob { logprob: logits[id as usize] - log_sum, top: best }
}
