//! Text in and out: the HF tokenizer, the chat template (Jinja, rendered with minijinja) and
//! incremental detokenization for streaming.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::tokenizer_info::TokenizerInfo;

pub struct TextCodec {
    tokenizer: Tokenizer,
    /// The `tokenizer.json` it was loaded from, named in errors.
    path: PathBuf,
    info: TokenizerInfo,
    /// [`max_token_bytes`] of the tokenizer.
    max_token_bytes: Option<usize>,
}

impl TextCodec {
    pub fn load(path: &Path, info: &TokenizerInfo) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Option<serde_json::Value> = serde_json::from_str(&json).ok();
        let tokenizer = parse_tokenizer(&json, value.as_ref(), path)?;
        let max_token_bytes = value.as_ref().and_then(max_token_bytes);
        Ok(TextCodec { tokenizer, path: path.into(), info: info.clone(), max_token_bytes })
    }

    /// The fewest tokens `text` can encode to, known without tokenizing it (0 where the tokenizer
    /// gives no bound), and the most bytes one token stands for that it is derived from.
    pub fn min_tokens(&self, text: &str) -> (usize, Option<usize>) {
        (self.max_token_bytes.map_or(0, |max| text.len().div_ceil(max)), self.max_token_bytes)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.info.eos_token_ids
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = tokenizer_call(&self.path, "encoding", || self.tokenizer.encode(text, add_special_tokens))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        tokenizer_call(&self.path, "decoding", || self.tokenizer.decode(ids, true))
    }

    /// The prompt for a single user turn with the generation prompt appended, as
    /// `tokenizer.apply_chat_template(..., add_generation_prompt=True)` renders it.
    pub fn chat_prompt(&self, user_message: &str) -> Result<String> {
        self.chat_messages(&[Message { role: "user".into(), content: user_message.into() }])
    }

    /// A conversation rendered by the chat template, with the generation prompt appended (the
    /// assistant's next turn), as `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.
    pub fn chat_messages(&self, messages: &[Message]) -> Result<String> {
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
        env.set_fuel(Some(TEMPLATE_FUEL));
        let bad = |e: minijinja::Error| Error::invalid("chat", format!("chat template failed: {e}"));
        env.add_template("chat", template).map_err(bad)?;
        let ctx = minijinja::context! {
            messages => messages.iter().map(|m| minijinja::context! { role => &m.role, content => &m.content }).collect::<Vec<_>>(),
            add_generation_prompt => true,
            bos_token => self.info.bos_token.clone().unwrap_or_default(),
            eos_token => self.info.eos_token.clone().unwrap_or_default(),
        };
        let input: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
        let mut out = BoundedWriter { buf: Vec::new(), limit: input + TEMPLATE_OUTPUT };
        match env.get_template("chat").and_then(|t| t.render_captured_to(ctx, &mut out).map(|_| ())) {
            Ok(_) => String::from_utf8(out.buf).map_err(|_| Error::invalid("chat", "chat template rendered invalid UTF-8")),
            Err(_) if out.buf.len() == out.limit => Err(Error::invalid(
                "chat",
                format!("chat template rendered more than {} bytes (the message plus {TEMPLATE_OUTPUT})", out.limit),
            )),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::invalid(
                "chat",
                format!("chat template exceeded its fuel budget of {TEMPLATE_FUEL} instructions (does it loop without end?)"),
            )),
            Err(e) => Err(bad(e)),
        }
    }

    /// Encodes a rendered chat prompt: the template already holds every special token.
    pub fn encode_chat(&self, rendered: &str) -> Result<Vec<u32>> {
        self.encode(rendered, false)
    }
}

/// One turn of a conversation: `role` is `system`, `user`, `assistant` (or what the template knows).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The most input bytes one token can stand for, where the tokenizer's configuration bounds it:
/// byte-level BPE with every byte in the vocabulary (so nothing is dropped as unknown), no
/// normalizer, no pre-tokenizer step that removes text, no truncation, and no added token that
/// swallows the whitespace beside it. Then a text of `n` bytes is at least `n / max` tokens.
fn max_token_bytes(json: &serde_json::Value) -> Option<usize> {
    use serde_json::Value;
    let unset = |key: &str| json.get(key).is_none_or(Value::is_null);
    if !unset("normalizer") || !unset("truncation") {
        return None;
    }
    let pre = json.get("pre_tokenizer")?;
    let steps: Vec<&Value> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let keeps_text = |step: &Value| match step["type"].as_str() {
        Some("ByteLevel" | "Digits" | "Metaspace") => true,
        Some("Split" | "Punctuation") => step["behavior"] != "Removed",
        _ => false,
    };
    if !steps.iter().all(|s| keeps_text(s)) || !steps.iter().any(|s| s["type"] == "ByteLevel") {
        return None;
    }
    let model = &json["model"];
    let vocab = model["vocab"].as_object()?;
    let every_byte = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
    if model["type"] != "BPE" || !every_byte.iter().all(|c| vocab.contains_key(&c.to_string())) {
        return None;
    }
    let added = json["added_tokens"].as_array()?;
    if added.iter().any(|t| t["lstrip"] == true || t["rstrip"] == true) {
        return None;
    }
    let added = added.iter().filter_map(|t| t["content"].as_str());
    vocab.keys().map(String::as_str).chain(added).map(str::len).max()
}

/// Instructions a chat template may run for one prompt: real templates take a few thousand; this
/// stops one that would loop for minutes within about a second.
const TEMPLATE_FUEL: u64 = 10_000_000;

/// Bytes a chat template may add to the message it wraps. (minijinja bounds the rest itself:
/// recursion to 500 levels, a string repeated with `*` to 100 MB.)
const TEMPLATE_OUTPUT: usize = 1 << 20;

/// A rendering target that fills up to `limit` bytes and fails the write that would go past it.
struct BoundedWriter {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = self.limit - self.buf.len();
        if bytes.len() > room {
            self.buf.extend_from_slice(&bytes[..room]);
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Longest added token a tokenizer may declare, in bytes: `tokenizers` matches added tokens with an
/// aho-corasick automaton whose construction is quadratic in a token's length (a fuzzed 16 KiB
/// token took over 10 s to load, a 4 KiB one a second); real added tokens are a few dozen bytes.
const MAX_ADDED_TOKEN_BYTES: usize = 256;

/// The tokenizer of `tokenizer.json` text; `value` is that text parsed as JSON, by the caller so
/// that callers which read it too parse it once (5 MB take ~45 ms, a quarter of `tokenizers`' own
/// load), or `None` where it is not JSON (`tokenizers` then says what is wrong); `path` names it
/// in errors.
pub(crate) fn parse_tokenizer(json: &str, value: Option<&serde_json::Value>, path: &Path) -> Result<Tokenizer> {
    let added = value.and_then(|v| v["added_tokens"].as_array()).into_iter().flatten();
    if let Some(long) = added.filter_map(|t| t["content"].as_str()).find(|c| c.len() > MAX_ADDED_TOKEN_BYTES) {
        let start: String = long.chars().take(16).collect();
        return Err(Error::bad_file(
            path,
            format!(
                "an added token is {} bytes long (it starts {start:?}); fastkv loads added tokens of up to \
                 {MAX_ADDED_TOKEN_BYTES} bytes",
                long.len()
            ),
        ));
    }
    tokenizer_call(path, "loading", || json.parse::<Tokenizer>())
}

/// Runs a call into `tokenizers` on a tokenizer from `path`, while `doing` something. Its errors,
/// and its panics — a decoder that indexes out of bounds, an oniguruma regex that fails to match or
/// to allocate, a deserializer that `expect`s —, become one error naming the file.
fn tokenizer_call<T, E: std::fmt::Display>(
    path: &Path,
    doing: &str,
    call: impl FnOnce() -> std::result::Result<T, E>,
) -> Result<T> {
    let failed = |why: String| Error::bad_file(path, format!("the tokenizer failed while {doing}: {why}"));
    match isolate(call) {
        Ok(result) => result.map_err(|e| failed(e.to_string())),
        Err(panic) => Err(failed(panic)),
    }
}

thread_local! {
    /// How many [`isolate`] calls this thread is inside: the panic hook stays quiet while it is not 0.
    static ISOLATED: Cell<usize> = const { Cell::new(0) };
}

/// Runs `call`, turning a panic inside it into `Err(its message)` (one line). The process's panic
/// hook is wrapped once so that it prints nothing for panics inside `isolate` on the same thread,
/// and passes every other panic to the hook that was there before. A thread-local flag and not a
/// hook swapped in around each call, because the hook is process-wide: swapping it would race with
/// other threads' panics and requests. (A hook set later by the application replaces ours: then the
/// panic is still caught, only printed.) `AssertUnwindSafe`: `tokenizers` guards its caches with
/// locks it tolerates poisoned, and a failed call leaves nothing of ours half-updated.
fn isolate<T>(call: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if ISOLATED.with(Cell::get) == 0 {
                previous(info)
            }
        }));
    });
    ISOLATED.with(|n| n.set(n.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(call));
    ISOLATED.with(|n| n.set(n.get() - 1));
    result.map_err(|payload| {
        let msg = match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
            (Some(s), _) => s.to_string(),
            (_, Some(s)) => s.clone(),
            _ => "a panic without a message".into(),
        };
        msg.lines().collect::<Vec<_>>().join(" ")
    })
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
