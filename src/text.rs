//! Text in and out: the HF tokenizer, the chat template (Jinja, rendered with minijinja) and
//! incremental detokenization for streaming.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::tokenizer_info::TokenizerInfo;

pub struct TextCodec {
    tokenizer: Tokenizer,
    info: TokenizerInfo,
}

impl TextCodec {
    pub fn load(path: &Path, info: &TokenizerInfo) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_file(path).map_err(|e| Error::bad_file(path, format!("cannot load tokenizer: {e}")))?;
        Ok(TextCodec { tokenizer, info: info.clone() })
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.info.eos_token_ids
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(format!("cannot decode tokens: {e}")))
    }

    /// The prompt for a single user turn with the generation prompt appended, as
    /// `tokenizer.apply_chat_template(..., add_generation_prompt=True)` renders it.
    pub fn chat_prompt(&self, user_message: &str) -> Result<String> {
        let template = self
            .info
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::invalid("chat", "this engine's tokenizer has no chat template"))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let bad = |e: minijinja::Error| Error::invalid("chat", format!("chat template failed: {e}"));
        env.add_template("chat", template).map_err(bad)?;
        let ctx = minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => user_message }],
            add_generation_prompt => true,
            bos_token => self.info.bos_token.clone().unwrap_or_default(),
            eos_token => self.info.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(bad)
    }

    /// Encodes a rendered chat prompt: the template already holds every special token.
    pub fn encode_chat(&self, rendered: &str) -> Result<Vec<u32>> {
        self.encode(rendered, false)
    }
}

/// Turns a growing list of token ids into text pieces, holding back bytes of an unfinished UTF-8
/// character (byte-level BPE splits characters across tokens).
pub struct Detokenizer<'a> {
    codec: &'a TextCodec,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> Detokenizer<'a> {
    pub fn new(codec: &'a TextCodec) -> Self {
        Detokenizer { codec, ids: Vec::new(), emitted: 0 }
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.codec.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}
