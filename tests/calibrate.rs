//! Calibration of ℓ*: the driver's selection-only runs propagate exactly what FastKV propagates, the
//! choice is deterministic and recorded in engine.json, the probes share no text with the evaluation's
//! needles, and `fastkv calibrate` writes only without --dry-run.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::{build_engine, essays, fixture};
use fastkv::builder::{build, BuildOptions, Calibrate};
use fastkv::calibrate::{self, Probes};
use fastkv::eval::haystack::Haystack;
use fastkv::eval::niah::Needle;
use fastkv::tensors::DType;
use fastkv::{Engine, Method, Policy, Prompt, Request};

/// The fixture built into `output` under `policy`, calibrated as `calibrate` says.
fn try_build(
    policy: fastkv::Overrides,
    calibrate: Calibrate,
    output: &Path,
) -> fastkv::Result<fastkv::engine::Manifest> {
    let options = BuildOptions {
        checkpoint: fixture("llama"),
        output: output.into(),
        dtype: DType::F32,
        force: false,
        policy,
        calibrate,
    };
    build(&options, &fastkv::progress::Silent)
}

fn build_with(calibrate: Calibrate, output: &Path) -> fastkv::engine::Manifest {
    try_build(common::paper(), calibrate, output).unwrap()
}

fn small_probes(essays: PathBuf) -> Probes {
    Probes { count: 3, tokens: 512, ..Probes::new(essays) }
}

#[test]
fn tsp_selections_are_what_fastkv_propagates() {
    let Some(essays) = essays() else { return };
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(dir).unwrap();
    let haystack = Haystack::load(&essays, &engine, 600).unwrap();
    let prompt = engine.encode(&haystack.fill(&engine, 600, &[]).unwrap()).unwrap();
    let base = Policy { method: Method::Fastkv, ..engine.default_policy() };
    let policies: Vec<Policy> = (0..engine.spec().num_layers - 1)
        .flat_map(|tsp_layer| {
            calibrate::TSP_RATES.map(|tsp_rate| Policy {
                tsp_layer,
                budget: fastkv::policy::Budget::Rate { tsp_rate, retain_rate: 0.1 },
                ..base
            })
        })
        .collect();
    let selections = engine.backend().tsp_selections(&prompt, &policies).unwrap();
    for (policy, selection) in policies.iter().zip(selections) {
        let mut req = Request::new(Prompt::Tokens(prompt.clone()));
        req.max_new_tokens = 1;
        req.policy = Some(*policy);
        req.record_selection = true;
        let out = engine.generate(&req, |_| ControlFlow::Continue(())).unwrap();
        let expected = out.selection.unwrap().tsp_positions;
        assert!(expected.is_some(), "TSP fires at ℓ* = {}", policy.tsp_layer);
        assert_eq!(selection, expected, "ℓ* = {}, {:?}", policy.tsp_layer, policy.budget);
    }
}

#[test]
fn calibration_is_deterministic_and_becomes_the_engine_default() {
    let Some(essays) = essays() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let a = build_with(Calibrate::Always(small_probes(essays.clone())), &tmp.path().join("a"));
    let b = build_with(Calibrate::Always(small_probes(essays.clone())), &tmp.path().join("b"));
    let c = a.calibration.clone().expect("calibrated");
    assert_eq!(a.calibration, b.calibration, "same engine, same probes: same choice");
    assert_eq!((c.probes, c.probe_tokens, c.min_recall), (3, 512, calibrate::MIN_RECALL));
    let engine = Engine::open(tmp.path().join("a")).unwrap();
    let policy = engine.default_policy();
    assert_eq!((policy.tsp_layer, policy.budget), (c.tsp_layer, c.budget));
    assert_eq!(engine.manifest.calibration, a.calibration, "engine.json keeps the evidence");
    let n = engine.spec().num_layers;
    assert_eq!(c.candidates.len(), calibrate::TSP_RATES.len());
    for cand in &c.candidates {
        assert_eq!(cand.recall.len(), n - 1, "one recall per candidate layer");
        assert!(cand.recall.iter().all(|r| (0.0..=1.0).contains(r)));
    }
    assert!((c.ideal_speedup - calibrate::ideal_speedup(engine.spec(), &policy, 512)).abs() < 1e-4);
    // The criterion: the verified candidates are the fastest that qualify, fastest first, and the
    // choice is the first that answers about as well as SnapKV-GQA (else the first of the best answering).
    let speedup =
        |tsp_layer, budget| calibrate::ideal_speedup(engine.spec(), &Policy { tsp_layer, budget, ..policy }, 512);
    let recall = |layer: usize, budget| c.candidates.iter().find(|k| k.budget == budget).unwrap().recall[layer];
    assert!(!c.verified.is_empty() && c.verified.len() <= calibrate::VERIFIED);
    let qualified: Vec<f64> = c
        .candidates
        .iter()
        .flat_map(|k| (0..n - 1).filter(|&l| k.recall[l] >= c.min_recall).map(|l| speedup(l, k.budget)))
        .collect();
    for (i, v) in c.verified.iter().enumerate() {
        assert!(recall(v.tsp_layer, v.budget) >= c.min_recall || qualified.is_empty());
        let faster_unverified = qualified.iter().filter(|&&s| s > speedup(v.tsp_layer, v.budget) + 1e-9).count();
        assert!(faster_unverified <= i, "verified candidate {i} has {faster_unverified} faster qualified candidates");
    }
    let pick = c.verified.iter().position(|v| (v.tsp_layer, v.budget) == (c.tsp_layer, c.budget)).expect("verified");
    let best = c.verified.iter().map(|v| v.score).fold(0.0, f64::max);
    let first_good = c.verified.iter().position(|v| v.score >= c.snapkv_gqa_score - calibrate::TOLERANCE);
    assert_eq!(Some(pick), first_good.or(c.verified.iter().position(|v| v.score == best)));
    assert!([c.full_score, c.snapkv_gqa_score].iter().all(|s| (0.0..=1.0).contains(s)));
    // The budget: every retain rate tried, the smallest within the tolerance of full KV chosen (else
    // the best answering), its SnapKV-GQA score the bar above.
    let rates: Vec<f64> = c.budgets.iter().map(|b| b.retain_rate).collect();
    assert_eq!(rates, calibrate::RETAIN_RATES);
    let fastkv::Budget::Rate { retain_rate, .. } = c.budget else { panic!("rate mode") };
    let best = c.budgets.iter().map(|b| b.snapkv_gqa_score).fold(0.0, f64::max);
    let expected = c
        .budgets
        .iter()
        .find(|b| b.snapkv_gqa_score >= c.full_score - calibrate::TOLERANCE)
        .or(c.budgets.iter().find(|b| b.snapkv_gqa_score == best))
        .unwrap();
    assert_eq!((retain_rate, c.snapkv_gqa_score), (expected.retain_rate, expected.snapkv_gqa_score));
    assert!(c
        .verified
        .iter()
        .all(|v| matches!(v.budget, fastkv::Budget::Rate { retain_rate: r, .. } if r == retain_rate)));
    // KV kept grows with r (the window and the rounding aside).
    assert!(c.budgets.windows(2).all(|w| w[0].kv_fraction <= w[1].kv_fraction), "{:?}", c.budgets);
    assert!(c.kv_fraction > 0.0 && c.kv_fraction < 1.0);
}

#[test]
fn a_fixed_budget_is_not_calibrated() {
    let Some(essays) = essays() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let fixed = fastkv::Overrides { retain_rate: Some(0.25), tsp_rate: Some(0.3), ..common::paper() };
    let m = try_build(fixed, Calibrate::Always(small_probes(essays)), &tmp.path().join("e")).unwrap();
    let c = m.calibration.expect("ℓ* is still calibrated");
    assert_eq!(c.budget, fastkv::Budget::Rate { tsp_rate: 0.3, retain_rate: 0.25 });
    assert_eq!(c.budgets.len(), 1);
    assert_eq!(c.candidates.len(), 1);
    assert_eq!(m.fastkv.budget, c.budget);
}

#[test]
fn probes_shorter_than_the_floor_are_refused() {
    let Some(essays) = essays() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let always = Calibrate::Always(small_probes(essays));
    let err = try_build(fastkv::Overrides::default(), always, &tmp.path().join("e")).unwrap_err();
    assert!(err.to_string().contains("min_prompt_len"), "{err}");
    assert!(!tmp.path().join("e").exists(), "nothing is left behind");
}

#[test]
fn auto_calibration_falls_back_to_the_rule_without_essays() {
    let Some(essays) = essays() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let missing = Probes::new(tmp.path().join("no-essays"));
    let m = build_with(Calibrate::Auto(missing), &tmp.path().join("e"));
    assert_eq!(m.calibration, None);
    assert_eq!(m.fastkv.tsp_layer, m.model.num_layers / 2 - 1);
    let m = build_with(Calibrate::Auto(small_probes(essays.clone())), &tmp.path().join("f"));
    assert!(m.calibration.is_some(), "no preset matches the fixture, so the build calibrates");
}

#[test]
fn probes_share_no_text_with_the_evaluation_needles() {
    let Some(essays) = essays() else { return };
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(dir).unwrap();
    let haystack = Haystack::load(&essays, &engine, 512).unwrap();
    let probes = calibrate::probes(&engine, &haystack, 8, 512, 0).unwrap();
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
    };
    let trigrams = |s: &str| -> Vec<String> { words(s).windows(3).map(|w| w.join(" ")).collect() };
    for needle in Needle::all() {
        let needle_text = format!("{} {} {}", needle.sentence, needle.question, needle.answer_prefix);
        for probe in &probes {
            for fact in &probe.facts {
                for t in trigrams(fact) {
                    assert!(!trigrams(&needle_text).contains(&t), "probe fact {fact:?} shares {t:?} with a needle");
                }
                for answer in &needle.answers {
                    assert!(!fact.to_lowercase().contains(&answer.to_lowercase()), "{fact:?} holds {answer:?}");
                }
            }
        }
    }
    for probe in &probes {
        let at: Vec<u32> = probe.fact_positions.iter().map(|&p| probe.sample.prompt[p as usize]).collect();
        let fact = engine.decode(&at).unwrap();
        assert_eq!(fact.trim(), probe.facts[0], "the recorded positions hold the asked fact");
        assert!(probe.facts[0].contains(&probe.sample.answers[0]));
    }
}
