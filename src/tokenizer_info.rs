//! Tokenizer-side facts the runtime needs besides `tokenizer.json` (EOS ids, BOS/EOS strings, chat
//! template), and how an HF checkpoint states them. A leaf module: the checkpoint reader, the GGUF
//! importer and the text codec all use it, and it uses none of them.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::spec::ModelSpec;

/// Tokenizer-side facts the runtime needs besides `tokenizer.json`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerInfo {
    pub eos_token_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
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

impl TokenizerInfo {
    /// Reads them from an HF checkpoint directory: EOS ids from generation_config.json / config.json /
    /// the EOS token, BOS/EOS strings and the chat template from tokenizer_config.json (or chat_template.jinja).
    pub fn read_hf(dir: &Path, spec: &ModelSpec, tok: &tokenizers::Tokenizer) -> Result<Self> {
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
}
