//! Needle in a haystack (Kamradt's test, as the FastKV paper runs it): one sentence hidden at a depth of an essay
//! context of a given length; the model is asked about it.

use super::haystack::Haystack;
use super::Sample;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// The needle, the question about it and the phrases a right answer contains.
#[derive(Clone, Debug)]
pub struct Needle {
    pub sentence: String,
    pub question: String,
    /// Starts the assistant's answer.
    pub answer_prefix: String,
    pub answers: Vec<String>,
}

impl Default for Needle {
    /// The original test's needle.
    fn default() -> Self {
        Needle {
            sentence: "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
                .into(),
            question: "What is the best thing to do in San Francisco?".into(),
            answer_prefix: "The best thing to do in San Francisco is".into(),
            answers: vec!["sandwich".into(), "Dolores Park".into()],
        }
    }
}

/// One sample per (length, depth): the needle at `depth` of `length` prompt tokens of essays.
pub fn samples(
    engine: &Engine,
    haystack: &Haystack,
    needle: &Needle,
    lengths: &[usize],
    depths: &[f64],
) -> Result<Vec<Sample>> {
    let instruction = |context: &str| {
        format!(
            "Here is a document.\n<document>\n{context}\n</document>\n\n{} Answer from the document in one sentence.",
            needle.question
        )
    };
    let overhead = Sample::prompt(engine, &instruction(&needle.sentence), &needle.answer_prefix)?.len();
    let mut out = Vec::new();
    for &length in lengths {
        let tokens = length.checked_sub(overhead).filter(|&t| t > 0).ok_or_else(|| {
            Error::invalid("lengths", format!("{length} tokens leaves no room for text beside the question"))
        })?;
        for &depth in depths {
            let context = haystack.fill(engine, tokens, &[(depth, needle.sentence.clone())])?;
            out.push(Sample {
                task: "niah".into(),
                length,
                depth: Some(depth),
                prompt: Sample::prompt(engine, &instruction(&context), &needle.answer_prefix)?,
                answers: needle.answers.clone(),
                max_new_tokens: 32,
            });
        }
    }
    Ok(out)
}
