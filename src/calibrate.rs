//! Calibration of FastKV's KV budget (retain rate r), TSP layer ℓ* and TSP rate t for one model. The
//! paper's authors choose ℓ* by hand per model and r = 0.1 for all; on small models the heads that
//! retrieve sit late, and at r = 0.1 SmolLM2-135M loses three quarters of its answers whatever
//! the method. Calibration measures both instead:
//!
//! Probes are essays with four synthetic facts (random names and numbers, never an evaluation's
//! needle) and a question about one of them. One full prefill per probe yields the rows TSP would
//! propagate at every candidate layer and rate ([`crate::backend::Backend::tsp_selections`]); a
//! candidate's *recall* is the share of the asked fact's tokens among them, averaged over probes.
//!
//! Recall is necessary, not sufficient: on Qwen2.5-0.5B at 8K, TSP at ℓ* = 11 keeps every fact
//! token, yet its answers lose the second half of two-part needles. So the [`VERIFIED`] candidates
//! with the largest ideal saving among those whose recall is at least [`MIN_RECALL`] (or with the
//! highest recall, if none reaches it) then answer the probes' questions, beside full KV and
//! SnapKV-GQA at the same budget (FastKV without TSP), in one shared prefill per probe
//! ([`Engine::generate_each`]). Each fact holds two codes, as needles hold two-part answers, and
//! an answer scores the share of "first and second" it gets right before its first wrong
//! character, so an answer that stops after the first code counts less than half.
//!
//! **The budget first**: full KV and SnapKV-GQA at every retain rate of the [`Grid`] answer the
//! probes' questions (one shared prefill, batched decode steps); r is the smallest whose answers
//! score at most [`TOLERANCE`] below full KV's (else the best answering).
//!
//! **Then ℓ* and t at that r**: the fastest verified candidate whose answers score at most
//! [`TOLERANCE`] below SnapKV-GQA's — TSP then loses nothing the KV budget has not already lost,
//! within the probes' noise; if none does, the one that answers best.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::engine::{BudgetScore, Calibration, Candidate, Engine, Verified};
use crate::error::{Error, Result};
use crate::eval::haystack::Haystack;
use crate::eval::Sample;
use crate::policy::{Budget, Method, Overrides, Policy};
use crate::prefill::cache_bytes_bound;
use crate::progress::Progress;
use crate::session::{Prompt, Request};
use crate::spec::ModelSpec;

/// A candidate qualifies when its TSP keeps at least this share of the asked facts' tokens: a fact the
/// deeper layers can answer from needs nearly every token (one lost in a hundred; at 95 %, SmolLM2's
/// choice lost half its needles).
pub const MIN_RECALL: f64 = 0.99;
/// TSP rates t tried (rate mode only): up to the largest retain rate, since layers after ℓ* keep
/// at most the T tokens TSP passes them.
pub const TSP_RATES: [f64; 6] = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7];
/// Retain rates r tried for the KV budget (rate mode only): from the paper's 0.1 down to half of
/// it, and up to most of the prompt for models that need it (SmolLM2-135M does).
pub const RETAIN_RATES: [f64; 7] = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7];
/// Candidates whose answers are checked: each costs its layers after ℓ* on the propagated tokens
/// and a few decoded tokens per probe, the shared full prefill is paid once.
pub const VERIFIED: usize = 8;
/// How far below full KV's answer score a budget, and below SnapKV-GQA's a TSP candidate, may fall
/// (eight probes tell 1–2 points from noise no better; it is also the evaluation's bar).
pub const TOLERANCE: f64 = 0.05;

/// The rates calibration chooses among, in rate mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub retain_rates: Vec<f64>,
    pub tsp_rates: Vec<f64>,
}

impl Default for Grid {
    fn default() -> Self {
        Grid { retain_rates: RETAIN_RATES.to_vec(), tsp_rates: TSP_RATES.to_vec() }
    }
}

impl Grid {
    /// The default grid without what `fixed` (a build's policy flags) fixes: a retain rate or KV
    /// budget fixes r, a TSP rate or length fixes t; `policy` is the policy with them applied.
    pub fn unless_fixed(fixed: &Overrides, policy: &Policy) -> Grid {
        let (r, t) = match policy.budget {
            Budget::Rate { retain_rate, tsp_rate } => (retain_rate, tsp_rate),
            Budget::Absolute { .. } => return Grid { retain_rates: vec![], tsp_rates: vec![] },
        };
        let grid = Grid::default();
        Grid {
            retain_rates: if fixed.retain_rate.is_some() || fixed.kv_budget.is_some() {
                vec![r]
            } else {
                grid.retain_rates
            },
            tsp_rates: if fixed.tsp_rate.is_some() || fixed.tsp_len.is_some() { vec![t] } else { grid.tsp_rates },
        }
    }
}

/// What to probe with.
#[derive(Clone, Debug)]
pub struct Probes {
    /// Essays to hide the facts in (a folder of .txt files, a .txt or a RULER .json).
    pub haystack: PathBuf,
    pub count: usize,
    /// Prompt length in tokens (capped by the model's context).
    pub tokens: usize,
    pub seed: u64,
}

impl Probes {
    /// The defaults: eight 2K-token probes from the essays `scripts/models.sh` installs.
    pub fn new(haystack: PathBuf) -> Self {
        Probes { haystack, count: 8, tokens: 2048, seed: 0 }
    }
}

/// The share of `code`'s characters (a probe's "first and second") `output` reproduces before its
/// first wrong one.
pub fn answer_score(output: &str, code: &str) -> f64 {
    let right = output.trim_start().chars().zip(code.chars()).take_while(|(a, b)| a == b).count();
    right as f64 / code.chars().count().max(1) as f64
}

/// One probe prompt and where its answer's tokens are.
#[derive(Clone, Debug)]
pub struct Probe {
    pub sample: Sample,
    /// Every fact sentence hidden in it; the first is the one asked about.
    pub facts: Vec<String>,
    /// Prompt positions of the asked fact's tokens: the key and the value with the words that tie them,
    /// all of which the layers after ℓ* need to answer.
    pub fact_positions: Vec<u32>,
}

const FIRST: [&str; 12] =
    ["Anika", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kalani", "Lucia"];
const LAST: [&str; 12] = [
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Petrov",
    "Alvarez",
    "Novak",
    "Brennan",
    "Haddad",
    "Kowalski",
    "Reyes",
    "Sato",
];
const THINGS: [&str; 8] =
    ["bicycle lock", "garden shed", "storage unit", "mailbox", "safe", "locker", "boathouse", "cellar"];

/// `count` probes of `tokens` tokens; the same seed gives the same probes.
pub fn probes(engine: &Engine, haystack: &Haystack, count: usize, tokens: usize, seed: u64) -> Result<Vec<Probe>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            // Four distinct (person, thing) keys, each with two six-digit codes; the first is asked about.
            let mut keys: Vec<(String, &str)> = Vec::new();
            while keys.len() < 4 {
                let person = format!("{} {}", FIRST.choose(&mut rng).unwrap(), LAST.choose(&mut rng).unwrap());
                let thing = *THINGS.choose(&mut rng).unwrap();
                if !keys.iter().any(|(p, t)| *p == person || *t == thing) {
                    keys.push((person, thing));
                }
            }
            let mut code = || rng.random_range(100_000..1_000_000u32);
            let codes: Vec<String> = (0..4).map(|_| format!("{} and {}", code(), code())).collect();
            let facts: Vec<String> =
                keys.iter().zip(&codes).map(|((p, t), c)| format!("The codes to {p}'s {t} are {c}.")).collect();
            // The asked fact sits at a depth spread over the probes; the others at random depths.
            let depth = (i as f64 + 0.5) / count as f64;
            let placed: Vec<(f64, String)> = facts
                .iter()
                .enumerate()
                .map(|(j, f)| (if j == 0 { depth } else { rng.random_range(0.0..1.0) }, f.clone()))
                .collect();
            let (person, thing) = &keys[0];
            let question = format!("What are the codes to {person}'s {thing}?");
            let prefix = format!("The codes to {person}'s {thing} are");
            let instruction = |context: &str| {
                format!("Read the document and answer the question.\n<document>\n{context}\n</document>\n\n{question}")
            };
            let fixed: String = facts.iter().map(|f| format!(" {f} ")).collect();
            let overhead = Sample::prompt(engine, &instruction(&fixed), &prefix)?.len();
            let room = tokens.checked_sub(overhead).filter(|&t| t > 0).ok_or_else(|| {
                Error::invalid("probe_tokens", format!("{tokens} tokens leave no room for text beside the facts"))
            })?;
            let context = haystack.fill(engine, room, &placed)?;
            let prompt = Sample::prompt(engine, &instruction(&context), &prefix)?;
            let fact_positions = find(engine, &prompt, &facts[0])?;
            let sample = Sample {
                task: "calibration".into(),
                length: tokens,
                depth: Some(depth),
                prompt,
                answers: vec![codes[0].clone()],
                // " 123456 and 654321." is 16 tokens where every digit is one.
                max_new_tokens: 20,
            };
            Ok(Probe { sample, facts, fact_positions })
        })
        .collect()
}

/// Positions of `sentence`'s tokens in `prompt` (its only occurrence, after a space).
fn find(engine: &Engine, prompt: &[u32], sentence: &str) -> Result<Vec<u32>> {
    let ids = engine.encode(&format!(" {sentence}"))?;
    let at = prompt.windows(ids.len()).position(|w| w == ids.as_slice()).ok_or_else(|| {
        Error::invalid("probe_tokens", format!("the tokenizer splits the probe fact {sentence:?} unlike in the prompt"))
    })?;
    Ok((at..at + ids.len()).map(|p| p as u32).collect())
}

/// Runs the probes on `engine` and chooses the KV budget, ℓ* and the TSP budget by the module's
/// criterion, over `grid` (an engine with absolute budgets keeps them and chooses ℓ* only).
pub fn calibrate(engine: &Engine, probes_cfg: &Probes, grid: &Grid, progress: &dyn Progress) -> Result<Calibration> {
    let spec = engine.spec();
    let n = spec.num_layers;
    if n < 2 {
        return Err(Error::invalid("tsp_layer", "a model of one layer has no layer to propagate to"));
    }
    if probes_cfg.count == 0 {
        return Err(Error::invalid("probes", "calibration needs at least one probe"));
    }
    let base = Policy { method: Method::Fastkv, ..engine.default_policy() };
    let tokens = probes_cfg.tokens.min(spec.max_position_embeddings);
    if tokens < base.floor.prompt_len {
        return Err(Error::invalid(
            "probe_tokens",
            format!(
                "{tokens}-token probes are below the engine's min_prompt_len ({}): nothing would be compressed",
                base.floor.prompt_len
            ),
        ));
    }
    // (retain rates, TSP rates) of rate mode; an absolute budget is the only candidate.
    let (retain_rates, tsp_rates) = match base.budget {
        Budget::Rate { retain_rate, tsp_rate } => {
            let or = |v: &[f64], x: f64| {
                let mut v = if v.is_empty() { vec![x] } else { v.to_vec() };
                v.sort_by(f64::total_cmp);
                v
            };
            (or(&grid.retain_rates, retain_rate), or(&grid.tsp_rates, tsp_rate))
        }
        Budget::Absolute { .. } => (vec![], vec![]),
    };
    let with_r = |budget: Budget, r: Option<f64>| match (budget, r) {
        (Budget::Rate { tsp_rate, .. }, Some(retain_rate)) => Budget::Rate { tsp_rate, retain_rate },
        (b, _) => b,
    };
    let haystack = Haystack::load(&probes_cfg.haystack, engine, tokens)?;
    let probes = probes(engine, &haystack, probes_cfg.count, tokens, probes_cfg.seed)?;
    let runs_per_probe = 3 * probes.len() as u64;
    progress.begin("calibrating (probe runs)", runs_per_probe, false);
    let step = |what: &str, i: usize| progress.advance(1, &format!("probe {}/{}: {what}", i + 1, probes.len()));
    let answers = |what: &str, runs: &[Policy]| -> Result<Vec<f64>> {
        let mut sums = vec![0.0; runs.len()];
        for (i, probe) in probes.iter().enumerate() {
            let mut req = Request::new(Prompt::Tokens(probe.sample.prompt.clone()));
            req.max_new_tokens = probe.sample.max_new_tokens;
            for (sum, out) in sums.iter_mut().zip(engine.generate_each(&req, runs)?) {
                *sum += answer_score(&out.text, &probe.sample.answers[0]);
            }
            step(what, i);
        }
        Ok(sums.iter().map(|s| round(s / probes.len() as f64)).collect())
    };

    // The budget: full KV and SnapKV-GQA at every retain rate.
    let snapkv = |r: Option<f64>| Policy { method: Method::SnapkvGqa, budget: with_r(base.budget, r), ..base };
    let rates: Vec<Option<f64>> =
        if retain_rates.is_empty() { vec![None] } else { retain_rates.iter().map(|&r| Some(r)).collect() };
    let mut runs = vec![Policy { method: Method::Full, ..base }];
    runs.extend(rates.iter().map(|&r| snapkv(r)));
    let scores = answers("budget", &runs)?;
    let (full_score, snapkv_scores) = (scores[0], &scores[1..]);
    let best = snapkv_scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pick_r = snapkv_scores
        .iter()
        .position(|&s| s >= full_score - TOLERANCE)
        .unwrap_or_else(|| snapkv_scores.iter().position(|&s| s == best).expect("one rate at least"));
    let (retain, snapkv_gqa_score) = (rates[pick_r], snapkv_scores[pick_r]);
    let kv_fraction = |p: &Policy| {
        let element = engine.backend.kv_element_bytes();
        let full = Policy { method: Method::Full, ..*p };
        round(
            cache_bytes_bound(spec, p, tokens, 0, element) as f64
                / cache_bytes_bound(spec, &full, tokens, 0, element) as f64,
        )
    };
    let budgets: Vec<BudgetScore> = rates
        .iter()
        .zip(snapkv_scores)
        .filter_map(|(&r, &score)| {
            r.map(|retain_rate| BudgetScore {
                retain_rate,
                snapkv_gqa_score: score,
                kv_fraction: kv_fraction(&snapkv(Some(retain_rate))),
            })
        })
        .collect();

    // ℓ* and t at that budget: recall of every candidate, then the answers of the fastest.
    let candidate_budgets: Vec<Budget> = match base.budget {
        Budget::Rate { .. } => tsp_rates
            .iter()
            .map(|&tsp_rate| Budget::Rate { tsp_rate, retain_rate: retain.expect("rate mode has rates") })
            .collect(),
        absolute => vec![absolute],
    };
    let policies: Vec<Policy> = candidate_budgets
        .iter()
        .flat_map(|&budget| (0..n - 1).map(move |tsp_layer| Policy { tsp_layer, budget, ..base }))
        .collect();
    let mut recall_sums = vec![0.0; policies.len()];
    for (i, probe) in probes.iter().enumerate() {
        let kept = engine.backend.tsp_selections(&probe.sample.prompt, &policies)?;
        for (sum, kept) in recall_sums.iter_mut().zip(kept) {
            let hits = match kept {
                Some(rows) => probe.fact_positions.iter().filter(|p| rows.binary_search(p).is_ok()).count(),
                None => probe.fact_positions.len(), // TSP did not fire: everything goes on
            };
            *sum += hits as f64 / probe.fact_positions.len() as f64;
        }
        step("recall", i);
    }
    let recall: Vec<f64> = recall_sums.iter().map(|s| round(s / probes.len() as f64)).collect();
    let speedup = |i: usize| ideal_speedup(spec, &policies[i], tokens);
    let qualifies = |i: usize| recall[i] >= MIN_RECALL;
    let mut order: Vec<usize> = (0..policies.len()).collect();
    if order.iter().any(|&i| qualifies(i)) {
        order.retain(|&i| qualifies(i));
        order.sort_by(|&a, &b| speedup(b).total_cmp(&speedup(a)));
    } else {
        order.sort_by(|&a, &b| recall[b].total_cmp(&recall[a]).then(speedup(b).total_cmp(&speedup(a))));
    }
    order.truncate(VERIFIED);
    let runs: Vec<Policy> = order.iter().map(|&i| policies[i]).collect();
    let scores = answers("TSP", &runs)?;
    progress.end();
    let verified: Vec<Verified> = order
        .iter()
        .zip(&scores)
        .map(|(&i, &score)| Verified { tsp_layer: policies[i].tsp_layer, budget: policies[i].budget, score })
        .collect();
    // The first (fastest) that answers about as well as SnapKV-GQA; else the first of the best answering.
    let best = verified.iter().map(|v| v.score).fold(f64::NEG_INFINITY, f64::max);
    let pick = verified
        .iter()
        .position(|v| v.score >= snapkv_gqa_score - TOLERANCE)
        .unwrap_or_else(|| verified.iter().position(|v| v.score == best).expect("at least one candidate is verified"));
    let chosen = policies[order[pick]];
    Ok(Calibration {
        tsp_layer: chosen.tsp_layer,
        budget: chosen.budget,
        min_recall: MIN_RECALL,
        probes: probes.len(),
        probe_tokens: tokens,
        seed: probes_cfg.seed,
        candidates: candidate_budgets
            .iter()
            .zip(recall.chunks(n - 1))
            .map(|(&budget, r)| Candidate { budget, recall: r.to_vec() })
            .collect(),
        ideal_speedup: round(speedup(order[pick])),
        kv_fraction: kv_fraction(&chosen),
        full_score,
        snapkv_gqa_score,
        budgets,
        verified,
    })
}

/// Four decimals: evidence to read, and values that survive engine.json's round trip exactly.
fn round(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Full-KV over FastKV prefill FLOPs of a `tokens`-token prompt under `policy`: TSP's ideal speed-up.
pub fn ideal_speedup(spec: &ModelSpec, policy: &Policy, tokens: usize) -> f64 {
    let t = policy.tsp_len(tokens);
    let seq: Vec<usize> = (0..spec.num_layers).map(|l| if l <= policy.tsp_layer { tokens } else { t }).collect();
    spec.prefill_flops(&vec![tokens; spec.num_layers]) / spec.prefill_flops(&seq)
}

#[cfg(test)]
mod tests {
    use super::answer_score;

    #[test]
    fn answer_score_counts_the_code_right_up_to_the_first_wrong_character() {
        let codes = "851949 and 230117";
        assert_eq!(answer_score(" 851949 and 230117.", codes), 1.0);
        assert_eq!(answer_score(" 8519999", codes), 4.0 / 17.0);
        assert_eq!(answer_score(" 851949.", codes), 6.0 / 17.0);
        assert_eq!(answer_score("972043 and 230117", codes), 0.0);
        assert_eq!(answer_score("", codes), 0.0);
    }
}
