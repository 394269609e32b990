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
        Needle::new(
            "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
            "What is the best thing to do in San Francisco?",
            "The best thing to do in San Francisco is",
            &["sandwich", "Dolores Park"],
        )
    }
}

impl Needle {
    fn new(sentence: &str, question: &str, answer_prefix: &str, answers: &[&str]) -> Self {
        Needle {
            sentence: sentence.into(),
            question: question.into(),
            answer_prefix: answer_prefix.into(),
            answers: answers.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// The needles `fastkv eval niah` hides, the original test's first: unrelated facts, so a score
    /// does not hang on one sentence.
    pub fn all() -> Vec<Needle> {
        vec![
            Needle::default(),
            Needle::new(
                "The secret ingredient in Marguerite's famous lentil soup is a spoonful of smoked paprika.",
                "What is the secret ingredient in Marguerite's famous lentil soup?",
                "The secret ingredient in Marguerite's famous lentil soup is",
                &["smoked paprika"],
            ),
            Needle::new(
                "The lighthouse keeper on Harrow Island spends every winter evening carving wooden owls.",
                "What does the lighthouse keeper on Harrow Island do every winter evening?",
                "Every winter evening, the lighthouse keeper on Harrow Island",
                &["wooden owls"],
            ),
            Needle::new(
                "The oldest tree in the Veldmoor botanical garden is a ginkgo planted in 1791.",
                "What is the oldest tree in the Veldmoor botanical garden?",
                "The oldest tree in the Veldmoor botanical garden is",
                &["ginkgo", "1791"],
            ),
        ]
    }
}

/// One sample per (length, depth, needle): the needle at `depth` of `length` prompt tokens of essays.
pub fn samples(
    engine: &Engine,
    haystack: &Haystack,
    needles: &[Needle],
    lengths: &[usize],
    depths: &[f64],
) -> Result<Vec<Sample>> {
    let instruction = |needle: &Needle, context: &str| {
        format!(
            "Here is a document.\n<document>\n{context}\n</document>\n\n{} Answer from the document in one sentence.",
            needle.question
        )
    };
    // Tokens each needle's prompt takes beside the essays, the same at every length and depth.
    let overheads = needles
        .iter()
        .map(|n| Ok(Sample::prompt(engine, &instruction(n, &n.sentence), &n.answer_prefix)?.len()))
        .collect::<Result<Vec<usize>>>()?;
    let mut out = Vec::new();
    for &length in lengths {
        for &depth in depths {
            for (i, (needle, &overhead)) in needles.iter().zip(&overheads).enumerate() {
                let tokens = length.checked_sub(overhead).filter(|&t| t > 0).ok_or_else(|| {
                    Error::invalid("lengths", format!("{length} tokens leaves no room for text beside the question"))
                })?;
                let context = haystack.fill(engine, tokens, &[(depth, needle.sentence.clone())])?;
                out.push(Sample {
                    task: format!("niah-{}", i + 1),
                    length,
                    depth: Some(depth),
                    prompt: Sample::prompt(engine, &instruction(needle, &context), &needle.answer_prefix)?,
                    answers: needle.answers.clone(),
                    max_new_tokens: 32,
                });
            }
        }
    }
    Ok(out)
}
