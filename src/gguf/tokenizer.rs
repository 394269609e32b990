//! `tokenizer.json` (HF tokenizers format) from a GGUF's `tokenizer.ggml.*` metadata: byte-level BPE
//! with the merges, the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`, and control /
//! user-defined tokens as added tokens, so the engine's tokenizer is the ordinary HF one.

use serde_json::{json, Value as Json};

use super::reader::{GgufFile, Value};
use crate::error::{Error, Result};
use crate::tokenizer_info::TokenizerInfo;

/// llama.cpp's token types (`enum llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

const SUPPORTED_PRE: &str = "smollm, qwen2, llama-bpe";

/// The Llama 3 pattern; Qwen2 differs only in taking digits one at a time instead of up to three.
fn llama3_split(digits: &str) -> String {
    format!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
}

/// The tokenizer as `tokenizer.json` text, and the special-token facts of the manifest.
pub fn build(file: &GgufFile) -> Result<(String, TokenizerInfo)> {
    let bad = |msg: String| Error::bad_file(&file.path, msg);
    let get = |key: &str| file.metadata.get(key);
    let model = get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(bad(format!("tokenizer.ggml.model `{model}` is not supported (only gpt2, i.e. byte-level BPE)")));
    }
    let strings = |key: &str| -> Result<Vec<&str>> {
        get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("missing array `{key}`")))?
            .iter()
            .map(|v| v.as_str().ok_or_else(|| bad(format!("`{key}` holds a non-string"))))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| if let Value::Int(t) = v { *t } else { 1 }).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let pre = get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("(missing)");
    let split = |pattern: &str, trim_offsets: bool| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": false},
        ]})
    };
    let (pre_tokenizer, ignore_merges) = match pre {
        // GPT-2's split (ByteLevel's own regex) after splitting digits one by one.
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]}),
            false,
        ),
        "qwen2" => (split(&llama3_split(""), false), false),
        "llama-bpe" => (split(&llama3_split("{1,3}"), true), true),
        other => {
            return Err(bad(format!("tokenizer.ggml.pre `{other}` is not supported (supported: {SUPPORTED_PRE})")))
        }
    };
    let id = |key: &str| -> Result<Option<u32>> {
        match get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                _ => Err(bad(format!("`{key}` = {v:?} is not a token id (vocabulary has {})", tokens.len()))),
            },
        }
    };
    let vocab: serde_json::Map<String, Json> =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    let added: Vec<Json> = (0..tokens.len())
        .filter(|&i| types[i] == CONTROL || types[i] == USER_DEFINED)
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == CONTROL})
        })
        .collect();
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let add_bos = matches!(get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    let post_processor = match bos {
        Some(b) if add_bos => {
            let bos = tokens[b as usize];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [b], "tokens": [bos]}}})
        }
        _ if add_bos => return Err(bad("add_bos_token is set but bos_token_id is missing".into())),
        _ => Json::Null,
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    });
    let text = tokenizer.to_string();
    crate::text::parse_tokenizer(&text, Some(&tokenizer), &file.path)?;
    // Generation ends at EOS and at the end-of-turn / end-of-message tokens where the file names them.
    let mut eos_token_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(i) = id(key)? {
            if !eos_token_ids.contains(&i) {
                eos_token_ids.push(i);
            }
        }
    }
    let name = |i: Option<u32>| i.map(|i| tokens[i as usize].to_string());
    let chat_template = get("tokenizer.chat_template").and_then(Value::as_str).map(String::from);
    let info = TokenizerInfo {
        eos_token: name(eos_token_ids.first().copied()),
        eos_token_ids,
        bos_token: name(bos),
        chat_template,
    };
    Ok((text, info))
}
