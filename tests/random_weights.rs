//! Engines of a preset's shape with weights generated from a seed when opened
//! (`fastkv-build --random-weights`): no weight file, the same model for the same seed.

use fastkv::builder::build_random;
use fastkv::engine::Manifest;
use fastkv::tensors::DType;
use fastkv::{Budget, Engine, Overrides};

fn logits(engine: &Engine, ids: &[u32]) -> Vec<f32> {
    engine.backend().prefill(ids, &engine.default_policy(), 0).unwrap().logits
}

#[test]
fn random_weight_engines_are_deterministic_and_have_no_weight_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    build_random("smollm2-135m", 1, DType::Bf16, &Default::default(), &a, false).unwrap();
    build_random("smollm2-135m", 1, DType::Bf16, &Default::default(), &b, false).unwrap();
    build_random("smollm2-135m", 2, DType::Bf16, &Default::default(), &c, false).unwrap();
    let mut files: Vec<String> =
        std::fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["engine.json", "tokenizer.json"]);
    let m = Manifest::read(&a).unwrap();
    assert_eq!((m.model.num_layers, m.model.hidden_size, m.model.head_dim), (30, 576, 64));
    let (ea, eb, ec) = (Engine::open(&a).unwrap(), Engine::open(&b).unwrap(), Engine::open(&c).unwrap());
    let ids = ea.encode("Random weights, real shapes: speed depends on shapes only. ").unwrap().repeat(8);
    let la = logits(&ea, &ids);
    assert!(la.iter().all(|x| x.is_finite()));
    assert_eq!(la, logits(&eb, &ids), "same seed, same model");
    assert_ne!(la, logits(&ec, &ids), "another seed, another model");
    // Activations keep their scale through 30 layers: the logits neither vanish nor blow up.
    let max = la.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max > 0.1 && max < 1e3, "max |logit| {max}");
}

#[test]
fn presets_are_named_and_an_unknown_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = build_random("llama-9", 0, DType::Bf16, &Default::default(), &tmp.path().join("x"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("llama-9") && err.contains("llama-3.1-8b") && err.contains("smollm2-135m"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

/// Policy flags change a random-weight engine's default policy as they do a checkpoint's; a value out of range is
/// refused by name and nothing is built.
#[test]
fn policy_flags_set_the_default_policy_of_random_weight_engines() {
    let tmp = tempfile::tempdir().unwrap();
    let changes = Overrides { tsp_layer: Some(9), retain_rate: Some(0.25), ..Default::default() };
    let m = build_random("smollm2-135m", 0, DType::Bf16, &changes, &tmp.path().join("a"), false).unwrap();
    assert_eq!(m.fastkv.tsp_layer, 9);
    assert!(matches!(m.fastkv.budget, Budget::Rate { retain_rate, .. } if retain_rate == 0.25), "{:?}", m.fastkv);
    assert_eq!(Manifest::read(&tmp.path().join("a")).unwrap().fastkv, m.fastkv);
    let bad = Overrides { tsp_layer: Some(99), ..Default::default() };
    let err = build_random("smollm2-135m", 0, DType::Bf16, &bad, &tmp.path().join("b"), false).unwrap_err();
    assert!(err.to_string().contains("tsp_layer"), "{err}");
    assert!(!tmp.path().join("b").exists());
}
