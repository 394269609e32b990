//! Accuracy harness: long-context retrieval tasks — needle in a haystack ([`niah`]) and RULER-style synthetic tasks
//! ([`ruler`]) — run through one engine under several compression methods and scored by string match, so methods
//! are compared on exactly the same prompts.

pub mod haystack;
pub mod niah;
pub mod ruler;

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::engine::Engine;
use crate::error::Result;
use crate::plot::Grid;
use crate::policy::{Method, Overrides, Policy};
use crate::session::{Prompt, Request};

/// One prompt and what a right answer contains.
#[derive(Clone, Debug)]
pub struct Sample {
    pub task: String,
    /// Nominal prompt length in tokens (the actual length is within a few tokens of it).
    pub length: usize,
    /// Where the needle sits (0 = start, 1 = end), for needle tasks.
    pub depth: Option<f64>,
    pub prompt: Vec<u32>,
    /// Every one of these should appear in the answer.
    pub answers: Vec<String>,
    pub max_new_tokens: usize,
}

impl Sample {
    /// The chat-formatted prompt for `instruction`, with the assistant's answer started by `answer_prefix` (which
    /// steers small models to answer at once, as RULER does).
    fn prompt(engine: &Engine, instruction: &str, answer_prefix: &str) -> Result<Vec<u32>> {
        let rendered = engine.text.chat_prompt(instruction)? + answer_prefix;
        engine.text.encode_chat(&rendered)
    }
}

/// A method under test: its name in reports and its policy.
#[derive(Clone, Debug)]
pub struct Contender {
    pub name: String,
    pub policy: Policy,
}

/// One contender per method, retain rate and — FastKV only — TSP layer ℓ* (the engine's default where a list is
/// empty; `full` once), each an [`Overrides`] of the engine's default policy, so it is the policy the CLI and the
/// Triton backend would run for the same request.
pub fn contenders(
    engine: &Engine,
    methods: &[Method],
    retain_rates: &[f64],
    tsp_layers: &[usize],
) -> Result<Vec<Contender>> {
    fn some_or_default<T>(list: Vec<Option<T>>) -> Vec<Option<T>> {
        if list.is_empty() {
            vec![None]
        } else {
            list
        }
    }
    let mut out = Vec::new();
    for &method in methods {
        let layers = some_or_default(match method {
            Method::Fastkv => tsp_layers.iter().copied().map(Some).collect(),
            _ => Vec::new(),
        });
        let rates = some_or_default(match method {
            Method::Full => Vec::new(),
            _ => retain_rates.iter().copied().map(Some).collect(),
        });
        for &tsp_layer in &layers {
            for &retain_rate in &rates {
                let mut name = method.name();
                if let Some(layer) = tsp_layer {
                    name += &format!(" l*={layer}");
                }
                if let Some(rate) = retain_rate {
                    name += &format!(" r={rate}");
                }
                let overrides = Overrides { method: Some(method), tsp_layer, retain_rate, ..Overrides::default() };
                out.push(Contender { name, policy: overrides.apply(engine.default_policy(), engine.spec())? });
            }
        }
    }
    Ok(out)
}

/// One heat-map grid per method: rows by `row`, columns by prompt length, cells the mean score.
pub fn grids(scores: &[Score], row: impl Fn(&Score) -> String) -> Vec<Grid> {
    let (_, methods, _) = mean_table(scores, |s| s.method.clone());
    methods
        .iter()
        .map(|m| {
            let mine: Vec<Score> = scores.iter().filter(|s| &s.method == m).cloned().collect();
            let (rows, lengths, cells) = mean_table_by(&mine, &row, |s| s.length.to_string());
            Grid { title: m.clone(), rows, cols: lengths, cells }
        })
        .collect()
}

/// The score of one method on one sample.
#[derive(Clone, Debug, Serialize)]
pub struct Score {
    pub task: String,
    pub method: String,
    pub length: usize,
    pub prompt_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<f64>,
    /// Fraction of the expected answers found in the output, 0..=1.
    pub score: f64,
    pub output: String,
    pub kv_cache_bytes: usize,
}

/// Fraction of `answers` that occur in `output`, ignoring case (RULER's `string_match_all`).
pub fn string_match_all(output: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let out = output.to_lowercase();
    answers.iter().filter(|a| out.contains(&a.to_lowercase())).count() as f64 / answers.len() as f64
}

/// Runs every sample under every contender with greedy decoding, one shared prefill per sample
/// ([`Engine::generate_each`]); a progress bar shows how far it got.
pub fn run(engine: &Engine, samples: &[Sample], contenders: &[Contender], progress: bool) -> Result<Vec<Score>> {
    let bar = if progress { ProgressBar::new(samples.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} samples, {msg} [{elapsed} < {eta}]")
            .expect("static template")
            .progress_chars("=> "),
    );
    // Off a terminal the bar stays hidden; a line per sample shows that a long run is alive.
    let log_lines = progress && !std::io::stderr().is_terminal();
    let policies: Vec<Policy> = contenders.iter().map(|c| c.policy).collect();
    let mut scores = Vec::with_capacity(samples.len() * contenders.len());
    for (i, sample) in samples.iter().enumerate() {
        bar.set_message(format!("{} @ {} tokens", sample.task, sample.length));
        let mut req = Request::new(Prompt::Tokens(sample.prompt.clone()));
        req.max_new_tokens = sample.max_new_tokens;
        for (c, out) in contenders.iter().zip(engine.generate_each(&req, &policies)?) {
            scores.push(Score {
                task: sample.task.clone(),
                method: c.name.clone(),
                length: sample.length,
                prompt_tokens: out.metrics.prompt_tokens,
                depth: sample.depth,
                score: string_match_all(&out.text, &sample.answers),
                output: out.text,
                kv_cache_bytes: out.metrics.kv_cache_bytes,
            });
        }
        bar.inc(1);
        if log_lines {
            eprintln!("{}/{} samples done ({} @ {} tokens)", i + 1, samples.len(), sample.task, sample.length);
        }
    }
    bar.finish_and_clear();
    Ok(scores)
}

/// Mean score per (row key, method), rows and methods in first-seen order: the tables `fastkv eval` prints.
pub fn mean_table(scores: &[Score], row: impl Fn(&Score) -> String) -> (Vec<String>, Vec<String>, Vec<Vec<f64>>) {
    mean_table_by(scores, row, |s| s.method.clone())
}

/// Mean score per (row key, column key), keys in first-seen order; `NaN` where nothing was scored.
fn mean_table_by(
    scores: &[Score],
    row: impl Fn(&Score) -> String,
    col: impl Fn(&Score) -> String,
) -> (Vec<String>, Vec<String>, Vec<Vec<f64>>) {
    let first_seen = |key: &dyn Fn(&Score) -> String| {
        scores.iter().map(key).fold(Vec::<String>::new(), |mut seen, k| {
            if !seen.contains(&k) {
                seen.push(k);
            }
            seen
        })
    };
    let (rows, cols) = (first_seen(&row), first_seen(&col));
    let cells = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| {
                    let hits: Vec<f64> =
                        scores.iter().filter(|s| &row(s) == r && &col(s) == c).map(|s| s.score).collect();
                    hits.iter().sum::<f64>() / hits.len() as f64
                })
                .collect()
        })
        .collect();
    (rows, cols, cells)
}

/// A plain-text table of percentages with an "all" row of column means.
pub fn format_table(corner: &str, rows: &[String], methods: &[String], cells: &[Vec<f64>]) -> String {
    let width = methods.iter().map(|m| m.len()).max().unwrap_or(0).max(7);
    let first = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(corner.len()).max(3);
    let mut out = format!("{corner:<first$}");
    for m in methods {
        out += &format!("  {m:>width$}");
    }
    out.push('\n');
    let mut line = |label: &str, values: &mut dyn Iterator<Item = f64>| {
        out += &format!("{label:<first$}");
        for v in values {
            out += &format!("  {:>width$.1}", 100.0 * v);
        }
        out.push('\n');
    };
    for (r, values) in rows.iter().zip(cells) {
        line(r, &mut values.iter().copied());
    }
    let n = cells.len().max(1) as f64;
    line("all", &mut (0..methods.len()).map(|j| cells.iter().map(|row| row[j]).sum::<f64>() / n));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_match_all_counts_each_answer_once_ignoring_case() {
        let answers = vec!["Dolores Park".to_string(), "sandwich".to_string()];
        assert_eq!(string_match_all("eat a SANDWICH in dolores park", &answers), 1.0);
        assert_eq!(string_match_all("eat a sandwich", &answers), 0.5);
        assert_eq!(string_match_all("", &answers), 0.0);
        assert_eq!(string_match_all("anything", &[]), 0.0);
    }

    #[test]
    fn tables_average_per_row_and_method() {
        let s = |method: &str, length, score| Score {
            task: "t".into(),
            method: method.into(),
            length,
            prompt_tokens: length,
            depth: None,
            score,
            output: String::new(),
            kv_cache_bytes: 0,
        };
        let scores =
            [s("full", 1, 1.0), s("fastkv", 1, 0.0), s("full", 1, 0.5), s("full", 2, 1.0), s("fastkv", 2, 1.0)];
        let (rows, methods, cells) = mean_table(&scores, |s| s.length.to_string());
        assert_eq!(rows, ["1", "2"]);
        assert_eq!(methods, ["full", "fastkv"]);
        assert_eq!(cells, [[0.75, 0.0], [1.0, 1.0]]);
        let table = format_table("tokens", &rows, &methods, &cells);
        assert_eq!(table.lines().last().unwrap().split_whitespace().collect::<Vec<_>>(), ["all", "87.5", "50.0"]);
    }
}
