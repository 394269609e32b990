//! RULER-style synthetic tasks (Hsieh et al., 2024), generated deterministically from a seed: needles with one or
//! several keys or values hidden in essays, variable tracking through chains of assignments, and common-word
//! extraction from a long list. Each prompt is fitted to a target length in tokens.

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::haystack::Haystack;
use super::Sample;
use crate::engine::Engine;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// One key → number needle in essays.
    NiahSingle,
    /// Four needles with different keys; one is asked for.
    NiahMultikey,
    /// Four numbers for the same key; all are asked for.
    NiahMultivalue,
    /// A chain of four variable assignments in repeated noise; all names holding the value are asked for.
    VariableTracking,
    /// Ten words repeated far more often than the others in a long numbered list; the ten are asked for.
    CommonWords,
}

impl Task {
    pub const ALL: [Task; 5] =
        [Task::NiahSingle, Task::NiahMultikey, Task::NiahMultivalue, Task::VariableTracking, Task::CommonWords];

    pub fn name(self) -> &'static str {
        match self {
            Task::NiahSingle => "niah_single",
            Task::NiahMultikey => "niah_multikey",
            Task::NiahMultivalue => "niah_multivalue",
            Task::VariableTracking => "variable_tracking",
            Task::CommonWords => "common_words",
        }
    }
}

/// `per_length` samples of `task` for each length; the same seed gives the same prompts.
pub fn samples(
    engine: &Engine,
    haystack: &Haystack,
    task: Task,
    lengths: &[usize],
    per_length: usize,
    seed: u64,
) -> Result<Vec<Sample>> {
    let words = vocabulary(haystack.text());
    if words.len() < 200 {
        return Err(Error::invalid("haystack", "the haystack has too few distinct words for RULER tasks"));
    }
    let mut out = Vec::new();
    for &length in lengths {
        for i in 0..per_length {
            let mut rng = StdRng::seed_from_u64(seed ^ (length as u64) << 20 ^ (i as u64) << 8 ^ task as u64);
            let (prompt, answers, max_new_tokens) = match task {
                Task::NiahSingle | Task::NiahMultikey | Task::NiahMultivalue => {
                    needles(engine, haystack, task, length, &words, &mut rng)?
                }
                Task::VariableTracking => variable_tracking(engine, length, &mut rng)?,
                Task::CommonWords => common_words(engine, length, &words, &mut rng)?,
            };
            out.push(Sample { task: task.name().into(), length, depth: None, prompt, answers, max_new_tokens });
        }
    }
    Ok(out)
}

type Built = (Vec<u32>, Vec<String>, usize);

fn needles(
    engine: &Engine,
    haystack: &Haystack,
    task: Task,
    length: usize,
    words: &[&str],
    rng: &mut StdRng,
) -> Result<Built> {
    let key = |rng: &mut StdRng| format!("{}-{}", words.choose(rng).unwrap(), words.choose(rng).unwrap());
    let number = |rng: &mut StdRng| rng.random_range(1_000_000..10_000_000u32).to_string();
    let asked = key(rng);
    let (pairs, answers): (Vec<(String, String)>, Vec<String>) = match task {
        Task::NiahMultivalue => {
            let values: Vec<String> = (0..4).map(|_| number(rng)).collect();
            (values.iter().map(|v| (asked.clone(), v.clone())).collect(), values)
        }
        Task::NiahMultikey => {
            let value = number(rng);
            let mut pairs = vec![(asked.clone(), value.clone())];
            pairs.extend((0..3).map(|_| (key(rng), number(rng))));
            (pairs, vec![value])
        }
        _ => {
            let value = number(rng);
            (vec![(asked.clone(), value.clone())], vec![value])
        }
    };
    let needles: Vec<(f64, String)> = pairs
        .iter()
        .map(|(k, v)| (rng.random_range(0.0..1.0), format!("One of the special magic numbers for {k} is: {v}.")))
        .collect();
    let (question, prefix) = if task == Task::NiahMultivalue {
        (
            format!("What are all the special magic numbers for {asked} mentioned in the provided text?"),
            format!(" The special magic numbers for {asked} mentioned in the provided text are"),
        )
    } else {
        (
            format!("What is the special magic number for {asked} mentioned in the provided text?"),
            format!(" The special magic number for {asked} mentioned in the provided text is"),
        )
    };
    let instruction = |context: &str| {
        format!(
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. I will \
             quiz you about the numbers afterwards.\n{context}\n{question}"
        )
    };
    let fixed: String = needles.iter().map(|(_, n)| format!(" {n} ")).collect();
    let overhead = Sample::prompt(engine, &instruction(&fixed), &prefix)?.len();
    let tokens = room(length, overhead)?;
    let context = haystack.fill(engine, tokens, &needles)?;
    let max_new_tokens = 16 * answers.len();
    Ok((Sample::prompt(engine, &instruction(&context), &prefix)?, answers, max_new_tokens))
}

fn variable_tracking(engine: &Engine, length: usize, rng: &mut StdRng) -> Result<Built> {
    const NOISE: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
    let names: Vec<String> =
        (0..5).map(|_| (0..5).map(|_| rng.random_range(b'A'..=b'Z') as char).collect::<String>()).collect();
    let value = rng.random_range(10_000..100_000u32).to_string();
    let mut chain = vec![format!("VAR {} = {value}.", names[0])];
    chain.extend(names.windows(2).map(|w| format!("VAR {} = VAR {}.", w[1], w[0])));
    let question = format!(
        "Find all variables that are assigned the value {value} in the text above. Answer with their names only."
    );
    let prefix = format!(
        " According to the chain(s) of variable assignment in the text above, {} variables are assigned the value \
         {value}, they are:",
        names.len()
    );
    let build = |n: usize| {
        // The chain's statements go in order, evenly spread through n noise sentences.
        let mut lines: Vec<&str> = vec![NOISE; n];
        for (i, stmt) in chain.iter().enumerate().rev() {
            lines.insert(i * n / chain.len(), stmt);
        }
        format!(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{}\n\n{question}",
            lines.join("\n")
        )
    };
    let prompt = fit(engine, length, &prefix, build)?;
    Ok((prompt, names, 48))
}

fn common_words(engine: &Engine, length: usize, words: &[&str], rng: &mut StdRng) -> Result<Built> {
    let mut pool: Vec<&str> = words.to_vec();
    pool.shuffle(rng);
    let (common, rare) = pool.split_at(10);
    let question = "What are the 10 most common words in the above list?";
    let prefix = " Answer: The top 10 words that appear most often in the list are:";
    let build = |n: usize| {
        // n rare words appear twice each; the ten common ones ≥ 4 times and more often than any rare one.
        let repeat = (2 * n / 40).clamp(4, 30);
        let mut list: Vec<&str> = common.iter().flat_map(|w| std::iter::repeat_n(*w, repeat)).collect();
        list.extend(rare.iter().take(n).flat_map(|w| [*w, *w]));
        list.shuffle(&mut StdRng::seed_from_u64(n as u64));
        let numbered: Vec<String> = list.iter().enumerate().map(|(i, w)| format!("{}. {w}", i + 1)).collect();
        format!(
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize the \
             ones that appear most often.\n{}\n{question}",
            numbered.join(" ")
        )
    };
    let prompt = fit(engine, length, prefix, build)?;
    Ok((prompt, common.iter().map(|w| w.to_string()).collect(), 96))
}

/// Tokens left for filler text in a `length`-token prompt whose fixed parts take `overhead`.
fn room(length: usize, overhead: usize) -> Result<usize> {
    length.checked_sub(overhead).filter(|&t| t > 0).ok_or_else(|| {
        Error::invalid("lengths", format!("{length} tokens leaves no room for text beside the task ({overhead})"))
    })
}

/// The longest prompt `build(n)` (n filler units) that fits in `length` tokens, found by bisection.
fn fit(engine: &Engine, length: usize, prefix: &str, build: impl Fn(usize) -> String) -> Result<Vec<u32>> {
    let tokens = |n: usize| Sample::prompt(engine, &build(n), prefix);
    room(length, tokens(0)?.len())?;
    let (mut lo, mut hi) = (0usize, length);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if tokens(mid)?.len() <= length {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    tokens(lo)
}

/// Distinct lowercase words of 4–10 letters from the haystack, sorted: the source of keys and list words.
fn vocabulary(text: &str) -> Vec<&str> {
    let mut words: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| (4..=10).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase()))
        .collect();
    words.sort_unstable();
    words.dedup();
    words
}
