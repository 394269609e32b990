//! Accuracy harness: long-context retrieval tasks — needle in a haystack ([`niah`]) and RULER-style synthetic tasks
//! ([`ruler`]) — run through one engine under several compression methods and scored by string match, so methods
//! are compared on exactly the same prompts.

pub mod haystack;
pub mod niah;
pub mod ruler;

use serde::Serialize;

use crate::engine::Engine;
use crate::error::Result;
use crate::policy::{Method, Overrides, Policy};
use crate::progress::Progress;
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
    pub(crate) fn prompt(engine: &Engine, instruction: &str, answer_prefix: &str) -> Result<Vec<u32>> {
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
                let mut name = method.name().to_string();
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

/// A grid of values in 0..=1 with labelled rows and columns, drawn as one heat-map panel.
pub struct Grid {
    pub title: String,
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    /// `cells[row][col]`; `NaN` = not measured (drawn grey).
    pub cells: Vec<Vec<f64>>,
}

/// One heat-map grid per method: rows by `row`, columns by prompt length, cells the mean score.
pub fn grids(scores: &[Score], row: impl Fn(&Score) -> String) -> Vec<Grid> {
    let (_, methods, _) = mean_table(scores, |s| s.method.clone());
    methods
        .iter()
        .map(|m| {
            let mine: Vec<Score> = scores.iter().filter(|s| &s.method == m).cloned().collect();
            let (rows, lengths, cells) = mean_table_by(&mine, &row, |s| s.length.to_string());
            let cells = cells.iter().map(|r| r.iter().map(|c| c.mean).collect()).collect();
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
    /// This method's prefill work on the sample ([`crate::session::Metrics::prefill_s`]).
    pub prefill_s: f64,
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
/// ([`Engine::generate_each`]), reporting each sample to `progress`.
pub fn run(
    engine: &Engine,
    samples: &[Sample],
    contenders: &[Contender],
    progress: &dyn Progress,
) -> Result<Vec<Score>> {
    progress.begin("samples", samples.len() as u64, false);
    let policies: Vec<Policy> = contenders.iter().map(|c| c.policy).collect();
    let mut scores = Vec::with_capacity(samples.len() * contenders.len());
    for sample in samples {
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
                prefill_s: out.metrics.prefill_s,
            });
        }
        progress.advance(1, &format!("{} @ {} tokens", sample.task, sample.length));
    }
    progress.end();
    Ok(scores)
}

/// The mean of some scores and how many there were.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cell {
    pub mean: f64,
    pub n: usize,
}

impl Cell {
    /// The 95 % Wilson score interval of the mean, taking the scores' sum as the successes (exact for 0/1 scores).
    pub fn interval(&self) -> (f64, f64) {
        wilson(self.mean, self.n)
    }
}

/// The 95 % Wilson score interval of a proportion `p` observed over `n` trials.
pub fn wilson(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 1.959_963_984_540_054;
    let n = n as f64;
    let denom = 1.0 + Z * Z / n;
    let center = (p + Z * Z / (2.0 * n)) / denom;
    let half = Z * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Mean score per (row key, method), rows and methods in first-seen order: the tables `fastkv eval` prints.
pub fn mean_table(scores: &[Score], row: impl Fn(&Score) -> String) -> (Vec<String>, Vec<String>, Vec<Vec<Cell>>) {
    mean_table_by(scores, row, |s| s.method.clone())
}

/// Keys in first-seen order.
fn first_seen<K: PartialEq>(scores: &[Score], key: impl Fn(&Score) -> K) -> Vec<K> {
    scores.iter().map(key).fold(Vec::new(), |mut seen, k| {
        if !seen.contains(&k) {
            seen.push(k);
        }
        seen
    })
}

/// Mean score per (row key, column key), keys in first-seen order; `NaN` where nothing was scored.
fn mean_table_by(
    scores: &[Score],
    row: impl Fn(&Score) -> String,
    col: impl Fn(&Score) -> String,
) -> (Vec<String>, Vec<String>, Vec<Vec<Cell>>) {
    let (rows, cols) = (first_seen(scores, &row), first_seen(scores, &col));
    let cells = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| {
                    let hits: Vec<f64> =
                        scores.iter().filter(|s| &row(s) == r && &col(s) == c).map(|s| s.score).collect();
                    Cell { mean: hits.iter().sum::<f64>() / hits.len() as f64, n: hits.len() }
                })
                .collect()
        })
        .collect();
    (rows, cols, cells)
}

/// A plain-text table of percentages with their 95 % intervals and counts, and an "all" row over every score.
pub fn format_table(corner: &str, rows: &[String], methods: &[String], cells: &[Vec<Cell>]) -> String {
    let width = methods.iter().map(|m| m.len()).max().unwrap_or(0).max(17);
    let first = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(corner.len()).max(3);
    let mut out = format!("{corner:<first$}  {:>5}", "n");
    for m in methods {
        out += &format!("  {m:>width$}");
    }
    out.push('\n');
    let mut line = |label: &str, values: &[Cell]| {
        out += &format!("{label:<first$}  {:>5}", values.first().map_or(0, |c| c.n));
        for c in values {
            let (lo, hi) = c.interval();
            out += &format!("  {:>width$}", format!("{:.1} [{:.0}–{:.0}]", 100.0 * c.mean, 100.0 * lo, 100.0 * hi));
        }
        out.push('\n');
    };
    for (r, values) in rows.iter().zip(cells) {
        line(r, values);
    }
    let all: Vec<Cell> = (0..methods.len())
        .map(|j| {
            let n: usize = cells.iter().map(|row| row[j].n).sum();
            let sum: f64 = cells.iter().map(|row| row[j].mean * row[j].n as f64).sum();
            Cell { mean: sum / n.max(1) as f64, n }
        })
        .collect();
    line("all", &all);
    out
}

/// One line per contender: accuracy with its interval and count, as a share of full KV's and in
/// points against SnapKV-GQA at the same budget (the like-for-like GQA baseline), and the prefill
/// speed-up over full KV measured in the same run (and per prompt length, when there are several).
pub fn summary(scores: &[Score], contenders: &[Contender]) -> String {
    let of = |name: &str| scores.iter().filter(|s| s.method == name).collect::<Vec<_>>();
    let accuracy = |name: &str| {
        let mine = of(name);
        Cell { mean: mine.iter().map(|s| s.score).sum::<f64>() / mine.len().max(1) as f64, n: mine.len() }
    };
    let prefill_s = |name: &str, length: Option<usize>| {
        of(name).iter().filter(|s| length.is_none_or(|l| s.length == l)).map(|s| s.prefill_s).sum::<f64>()
    };
    let lengths = first_seen(scores, |s| s.length);
    let full = contenders.iter().find(|c| c.policy.method == Method::Full);
    let mut out = String::new();
    for c in contenders {
        let a = accuracy(&c.name);
        let (lo, hi) = a.interval();
        out += &format!("{}: {:.1} % [{:.1}, {:.1}] of {}", c.name, 100.0 * a.mean, 100.0 * lo, 100.0 * hi, a.n);
        if let Some(full) = full.filter(|f| f.name != c.name) {
            let f = accuracy(&full.name);
            out += &format!("; {:.0} % of full ({:.1} %)", 100.0 * a.mean / f.mean, 100.0 * f.mean);
            let speedup = |length| prefill_s(&full.name, length) / prefill_s(&c.name, length);
            out += &format!("; prefill {:.2}× full", speedup(None));
            if lengths.len() > 1 {
                let each: Vec<String> = lengths.iter().map(|&l| format!("{:.2}× at {l}", speedup(Some(l)))).collect();
                out += &format!(" ({})", each.join(", "));
            }
        }
        let snap = contenders
            .iter()
            .find(|o| o.policy.method == Method::SnapkvGqa && o.policy.budget == c.policy.budget && o.name != c.name);
        if let Some(snap) = snap.filter(|_| c.policy.method != Method::Full) {
            out += &format!("; {:+.1} points vs {}", 100.0 * (a.mean - accuracy(&snap.name).mean), snap.name);
        }
        out.push('\n');
    }
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

    fn score(method: &str, length: usize, score: f64, prefill_s: f64) -> Score {
        Score {
            task: "t".into(),
            method: method.into(),
            length,
            prompt_tokens: length,
            depth: None,
            score,
            output: String::new(),
            kv_cache_bytes: 0,
            prefill_s,
        }
    }

    #[test]
    fn tables_average_per_row_and_method_with_counts() {
        let s = |method, length, x| score(method, length, x, 1.0);
        let scores =
            [s("full", 1, 1.0), s("fastkv", 1, 0.0), s("full", 1, 0.5), s("full", 2, 1.0), s("fastkv", 2, 1.0)];
        let (rows, methods, cells) = mean_table(&scores, |s| s.length.to_string());
        assert_eq!(rows, ["1", "2"]);
        assert_eq!(methods, ["full", "fastkv"]);
        let cell = |mean, n| Cell { mean, n };
        assert_eq!(cells, [[cell(0.75, 2), cell(0.0, 1)], [cell(1.0, 1), cell(1.0, 1)]]);
        let table = format_table("tokens", &rows, &methods, &cells);
        let all: Vec<&str> = table.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(all, ["all", "3", "83.3", "[31–98]", "50.0", "[9–91]"]);
    }

    #[test]
    fn wilson_intervals_match_the_closed_form() {
        let close = |(a, b): (f64, f64), (x, y): (f64, f64)| (a - x).abs() < 1e-4 && (b - y).abs() < 1e-4;
        assert!(close(wilson(0.5, 10), (0.236_6, 0.763_4)), "{:?}", wilson(0.5, 10));
        assert!(close(wilson(0.0, 10), (0.0, 0.277_5)), "{:?}", wilson(0.0, 10));
        assert!(close(wilson(1.0, 40), (0.912_4, 1.0)), "{:?}", wilson(1.0, 40));
        assert_eq!(wilson(0.3, 0), (0.0, 1.0));
    }

    #[test]
    fn summary_compares_with_full_and_snapkv_gqa_at_the_same_budget() {
        let spec_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/config.json");
        let spec = crate::spec::ModelSpec::from_hf_config(&spec_path).unwrap();
        let fastkv = Policy::fastkv_default(&spec);
        let contender = |name: &str, method| Contender { name: name.into(), policy: Policy { method, ..fastkv } };
        let contenders = [
            contender("full", Method::Full),
            contender("fastkv", Method::Fastkv),
            contender("snapkv-gqa", Method::SnapkvGqa),
        ];
        let scores = [
            score("full", 1, 1.0, 4.0),
            score("full", 2, 1.0, 4.0),
            score("fastkv", 1, 1.0, 1.0),
            score("fastkv", 2, 0.0, 2.0),
            score("snapkv-gqa", 1, 1.0, 3.0),
            score("snapkv-gqa", 2, 1.0, 3.0),
        ];
        let lines: Vec<String> = summary(&scores, &contenders).lines().map(str::to_owned).collect();
        assert_eq!(lines[0], "full: 100.0 % [34.2, 100.0] of 2");
        assert_eq!(
            lines[1],
            "fastkv: 50.0 % [9.5, 90.5] of 2; 50 % of full (100.0 %); prefill 2.67× full (4.00× at 1, 2.00× at 2); \
             -50.0 points vs snapkv-gqa"
        );
        assert!(lines[2].starts_with("snapkv-gqa: 100.0 %") && lines[2].contains("prefill 1.33× full"), "{}", lines[2]);
    }
}
