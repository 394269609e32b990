//! `fastkv eval` and `fastkv bench`: prompts of the asked shape, deterministic tasks, one score or timing per method
//! and sample, and outputs (tables, JSON, charts) that say what they measured. Accuracy and speed themselves are
//! measured by running the commands, not asserted here.

mod common;

use std::path::Path;

use common::{build_engine, essays, fixture};
use fastkv::bench::{self, BenchConfig};
use fastkv::eval::haystack::Haystack;
use fastkv::eval::niah::{self, Needle};
use fastkv::eval::ruler::{self, Task};
use fastkv::eval::{self, contenders};
use fastkv::tensors::DType;
use fastkv::{Engine, Method};

fn engine() -> (tempfile::TempDir, Engine) {
    let (tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(dir).unwrap();
    (tmp, engine)
}

#[test]
fn niah_prompts_have_the_asked_length_and_each_needle_at_its_depth() {
    let Some(essays) = essays() else { return };
    let (_tmp, engine) = engine();
    let haystack = Haystack::load(&essays, &engine, 2048).unwrap();
    let needles = Needle::all();
    let depths = [0.0, 0.5, 1.0];
    let samples = niah::samples(&engine, &haystack, &needles, &[1024, 2048], &depths).unwrap();
    assert_eq!(samples.len(), 2 * depths.len() * needles.len());
    for (i, needle) in needles.iter().enumerate() {
        let mut last_offset = 0.0;
        for s in samples.iter().skip(i).step_by(needles.len()) {
            assert_eq!(s.task, format!("niah-{}", i + 1));
            let len = s.prompt.len() as f64;
            assert!((len - s.length as f64).abs() <= 0.02 * s.length as f64, "{len} tokens for {}", s.length);
            let text = engine.decode(&s.prompt).unwrap();
            let at = text.find(&needle.sentence).expect("the needle is in the prompt") as f64 / text.len() as f64;
            if s.depth == Some(0.0) {
                last_offset = 0.0;
            }
            assert!(at >= last_offset, "needle at {at:.2} of the text for depth {:?}", s.depth);
            last_offset = at;
            assert!(text.ends_with(&needle.answer_prefix), "the answer is started for the model");
            for answer in &s.answers {
                assert!(needle.sentence.contains(answer.as_str()), "{answer:?} answers {:?}", needle.question);
            }
        }
    }
}

#[test]
fn ruler_tasks_are_deterministic_fit_their_length_and_hold_their_answers() {
    let Some(essays) = essays() else { return };
    let (_tmp, engine) = engine();
    let haystack = Haystack::load(&essays, &engine, 1536).unwrap();
    for task in Task::ALL {
        let a = ruler::samples(&engine, &haystack, task, &[1536], 2, 7).unwrap();
        let b = ruler::samples(&engine, &haystack, task, &[1536], 2, 7).unwrap();
        let c = ruler::samples(&engine, &haystack, task, &[1536], 2, 8).unwrap();
        assert_eq!(a.iter().map(|s| &s.prompt).collect::<Vec<_>>(), b.iter().map(|s| &s.prompt).collect::<Vec<_>>());
        assert_ne!(a[0].prompt, c[0].prompt, "{task:?}: another seed gives another task");
        assert_ne!(a[0].prompt, a[1].prompt, "{task:?}: samples differ");
        for s in &a {
            assert!(s.prompt.len() <= 1536 && s.prompt.len() >= 1536 * 9 / 10, "{task:?}: {} tokens", s.prompt.len());
            let text = engine.decode(&s.prompt).unwrap();
            assert!(!s.answers.is_empty());
            for answer in &s.answers {
                assert!(text.contains(answer.as_str()), "{task:?}: answer {answer:?} is not in the prompt");
            }
        }
    }
}

#[test]
fn eval_scores_every_method_on_every_sample() {
    let Some(essays) = essays() else { return };
    let (_tmp, engine) = engine();
    let haystack = Haystack::load(&essays, &engine, 1024).unwrap();
    let samples = niah::samples(&engine, &haystack, &[Needle::default()], &[512, 1024], &[0.5]).unwrap();
    let methods = contenders(&engine, &[Method::Full, Method::Fastkv], &[0.1, 0.2], &[]).unwrap();
    let names: Vec<&str> = methods.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["full", "fastkv r=0.1", "fastkv r=0.2"]);
    let layers = contenders(&engine, &[Method::Snapkv, Method::Fastkv], &[0.1], &[0, 2]).unwrap();
    let names: Vec<&str> = layers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["snapkv r=0.1", "fastkv l*=0 r=0.1", "fastkv l*=2 r=0.1"]);
    assert_eq!(layers[2].policy.tsp_layer, 2);
    assert!(contenders(&engine, &[Method::Fastkv], &[], &[99]).unwrap_err().to_string().contains("tsp_layer"));
    let scores = eval::run(&engine, &samples, &methods, &fastkv::progress::Silent).unwrap();
    assert_eq!(scores.len(), 6);
    for s in &scores {
        assert!((0.0..=1.0).contains(&s.score));
        assert_eq!(s.score, eval::string_match_all(&s.output, &Needle::default().answers));
    }
    let kv = |m: &str| scores.iter().find(|s| s.method == m && s.length == 1024).unwrap().kv_cache_bytes;
    assert!(kv("fastkv r=0.1") < kv("fastkv r=0.2") && kv("fastkv r=0.2") < kv("full"));
}

#[test]
fn bench_reports_each_method_and_length_with_spread() {
    let (_tmp, engine) = engine();
    let cfg = BenchConfig {
        lengths: vec![256, 512],
        contenders: contenders(&engine, &[Method::Full, Method::Fastkv], &[], &[]).unwrap(),
        warmup: 0,
        repeats: 3,
        new_tokens: 4,
    };
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/long_prompt.txt")).unwrap();
    let rows = bench::run(&engine, &text, &cfg, &fastkv::progress::Silent).unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.method.as_str(), r.length)).collect::<Vec<_>>(),
        [("full", 256), ("fastkv", 256), ("full", 512), ("fastkv", 512)]
    );
    for r in &rows {
        assert_eq!(r.runs.len(), 3);
        assert!(r.ttft_s.min <= r.ttft_s.median && r.ttft_s.median <= r.ttft_s.max && r.ttft_s.min > 0.0);
        assert!(r.runs.iter().all(|run| run.kv_cache_bytes == r.kv_cache_bytes), "same prompt, same cache");
    }
    assert!(rows[1].kv_cache_bytes * 5 < rows[0].kv_cache_bytes, "fastkv keeps ~10 % of the KV cache");
    assert_eq!(bench::format_table(&rows).lines().count(), 5);
}
