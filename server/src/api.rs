//! The OpenAI API as fastkv serves it: the request bodies of `/v1/chat/completions` and
//! `/v1/completions`, checked field by field (the field named in every error), turned into a
//! [`fastkv::Request`]; and the response objects built from fastkv's events. Unknown fields are
//! ignored, as OpenAI does; the optional `fastkv` object carries a request's compression policy
//! through the library's one override rule ([`fastkv::Overrides::apply`]).

use fastkv::{Engine, Message, Overrides, Prompt, Request};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// `stop`: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A chat message's `content`: text, or a list of parts of which fastkv takes the text ones.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// `prompt` of `/v1/completions`: text or token ids, alone or in a list of one.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// The fields both endpoints share.
#[derive(Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    /// Generate past end-of-sequence tokens (vLLM's extension; load generators send it).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Each choice also carries the ids of its tokens (vLLM's extension; the Dynamo worker streams
    /// them on, so its frontend detokenizes as it does for every engine).
    #[serde(default)]
    pub return_token_ids: bool,
    /// The compression policy: `method`, `tsp_layer`, `tsp_rate`, `retain_rate`, `kv_budget`, …
    pub fastkv: Option<Overrides>,
}

/// `/v1/chat/completions`' own fields.
#[derive(Deserialize)]
pub struct ChatFields {
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
}

/// `/v1/completions`' own fields.
#[derive(Deserialize)]
pub struct CompletionFields {
    pub prompt: PromptInput,
    /// The log-probabilities of this many most likely tokens at each position (0–5).
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
}

pub struct ChatRequest {
    pub common: Common,
    pub chat: ChatFields,
}

pub struct CompletionRequest {
    pub common: Common,
    pub completion: CompletionFields,
}

impl ChatRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let v = json_object(body)?;
        Ok(ChatRequest { common: fields(&v)?, chat: fields(&v)? })
    }
}

impl CompletionRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let v = json_object(body)?;
        Ok(CompletionRequest { common: fields(&v)?, completion: fields(&v)? })
    }
}

/// The body as a JSON object.
fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(ApiError::invalid(None, "the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(None, format!("the body is not JSON: {e}"))),
    }
}

/// Some of the object's fields as `T`; an error names the field at fault (`temperature`,
/// `messages[2].content`).
fn fields<T: for<'de> Deserialize<'de>>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        ApiError::invalid(field.as_deref(), e.inner().to_string())
    })
}

/// How a request asks for its tokens back.
pub struct Shape {
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token for the log-probabilities, when asked for.
    pub logprobs: Option<usize>,
    pub token_ids: bool,
}

/// What the server fixes for every request.
pub struct Limits {
    pub default_max_tokens: usize,
}

impl Common {
    /// The request for `prompt`, its sampling, stops and policy checked.
    fn request(
        &self,
        engine: &Engine,
        prompt: Prompt,
        max_tokens: Option<u64>,
        limits: &Limits,
    ) -> Result<Request, ApiError> {
        let mut req = Request::new(prompt);
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                Some("n"),
                format!("{n} choices were asked for; this server returns one (n = 1)"),
            ));
        }
        req.max_new_tokens = match max_tokens {
            Some(0) => return Err(ApiError::invalid(Some("max_tokens"), "must be at least 1")),
            Some(n) => n.min(u32::MAX as u64) as usize,
            None => limits.default_max_tokens,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(Some("temperature"), format!("{temperature} is not in [0, 2]")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&top_p) {
            return Err(ApiError::invalid(Some("top_p"), format!("{top_p} is not in [0, 1]")));
        }
        // top_p = 0 keeps only the most likely token, as OpenAI's range allows: greedy.
        let (temperature, top_p) = if top_p == 0.0 { (0.0, 1.0) } else { (temperature, top_p) };
        req.sampling.temperature = temperature;
        req.sampling.top_p = top_p;
        req.sampling.seed = self.seed.unwrap_or_else(rand::random);
        req.ignore_eos = self.ignore_eos;
        req.stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() > 4 => {
                return Err(ApiError::invalid(Some("stop"), format!("{} stop strings; at most 4", v.len())))
            }
            Some(Stop::Many(v)) => v.clone(),
        };
        if let Some(overrides) = &self.fastkv {
            let policy = overrides
                .apply(engine.default_policy(), engine.spec())
                .map_err(|e| ApiError::from_library(&e, Some("fastkv")))?;
            req.policy = Some(policy);
        }
        Ok(req)
    }

    fn shape(&self, logprobs: Option<usize>) -> Shape {
        Shape {
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            logprobs,
            token_ids: self.return_token_ids,
        }
    }
}

impl ChatRequest {
    pub fn request(&self, engine: &Engine, limits: &Limits) -> Result<(Request, Shape), ApiError> {
        let chat = &self.chat;
        if chat.messages.is_empty() {
            return Err(ApiError::invalid(Some("messages"), "at least one message is needed"));
        }
        let messages = chat
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .map(|p| match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => Ok(t.as_str()),
                            (kind, _) => Err(ApiError::invalid(
                                Some(&format!("messages[{i}].content")),
                                format!("content parts of type {kind:?} are not supported (only text)"),
                            )),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .concat(),
                };
                Ok(Message { role: m.role.clone(), content })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let top = match (chat.logprobs, chat.top_logprobs) {
            (Some(true), n) => Some(n.unwrap_or(0)),
            (_, Some(n)) if n > 0 => {
                return Err(ApiError::invalid(Some("top_logprobs"), "needs logprobs: true"));
            }
            _ => None,
        };
        if let Some(n) = top.filter(|&n| n > 20) {
            return Err(ApiError::invalid(Some("top_logprobs"), format!("{n} is not in [0, 20]")));
        }
        let max = chat.max_completion_tokens.or(self.common.max_tokens);
        let mut req = self.common.request(engine, Prompt::Messages(messages), max, limits)?;
        req.logprobs = top.map(|n| n as usize);
        let shape = self.common.shape(req.logprobs);
        Ok((req, shape))
    }
}

impl CompletionRequest {
    pub fn request(&self, engine: &Engine, limits: &Limits) -> Result<(Request, Shape), ApiError> {
        let completion = &self.completion;
        let one = |n: usize| {
            ApiError::invalid(Some("prompt"), format!("{n} prompts were sent; this server completes one per request"))
        };
        let prompt = match &completion.prompt {
            PromptInput::Text(t) => Prompt::Text(t.clone()),
            PromptInput::Texts(v) if v.len() == 1 => Prompt::Text(v[0].clone()),
            PromptInput::Texts(v) => return Err(one(v.len())),
            PromptInput::Tokens(ids) => Prompt::Tokens(ids.clone()),
            PromptInput::TokenLists(v) if v.len() == 1 => Prompt::Tokens(v[0].clone()),
            PromptInput::TokenLists(v) => return Err(one(v.len())),
        };
        if completion.echo == Some(true) {
            return Err(ApiError::invalid(Some("echo"), "echoing the prompt is not supported"));
        }
        if let Some(n) = completion.logprobs.filter(|&n| n > 5) {
            return Err(ApiError::invalid(Some("logprobs"), format!("{n} is not in [0, 5]")));
        }
        let mut req = self.common.request(engine, prompt, self.common.max_tokens, limits)?;
        req.logprobs = completion.logprobs.map(|n| n as usize);
        let shape = self.common.shape(req.logprobs);
        Ok((req, shape))
    }
}

/// OpenAI's finish reason: EOS and stop strings are `stop`.
pub fn finish_reason(out: &fastkv::Output) -> &'static str {
    match out.finish_reason {
        fastkv::FinishReason::Length => "length",
        _ => "stop",
    }
}

pub fn usage(out: &fastkv::Output) -> Value {
    let m = &out.metrics;
    json!({
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.generated_tokens,
        "total_tokens": m.prompt_tokens + m.generated_tokens,
    })
}

/// fastkv's extension of a response: what the request's prefill and cache cost.
pub fn extension(out: &fastkv::Output) -> Value {
    let m = &out.metrics;
    json!({
        "ttft_s": m.ttft_s,
        "kv_cache_bytes": m.kv_cache_bytes,
        "kv_cache_bytes_full": m.kv_cache_bytes_full,
        "method": out.policy.method.name(),
    })
}

/// A token as the logprobs objects spell it: its text and UTF-8 bytes.
pub fn token_text(engine: &Engine, id: u32) -> (String, Vec<u8>) {
    let text = engine.decode(&[id]).unwrap_or_default();
    let bytes = text.as_bytes().to_vec();
    (text, bytes)
}

/// One token's entry of a chat `logprobs.content` list.
pub fn chat_logprob(engine: &Engine, id: u32, lp: &fastkv::Logprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let (token, bytes) = token_text(engine, id);
        json!({ "token": token, "logprob": logprob, "bytes": bytes })
    };
    let mut e = entry(id, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
    e
}
