//! fastkv's TensorRT plugin library (tensorrt/) inside the real TensorRT lean runtime's plugin registry
//! (`FASTKV_TRT_LEAN_LIB`, set by scripts/test.sh from scripts/install-trt-lean.sh): loaded the way trtexec loads
//! it, every creator found, plugins created for both phases, fields serialised and re-created, capabilities and
//! host-side queries answered, bad fields rejected with the plugin's message. No GPU is needed and none is used:
//! enqueue (the kernels) is not run here. Output shapes are evaluated with the bridge's constant-folding
//! IExprBuilder, since TensorRT's builder (the only real IExprBuilder) is not obtainable here.
#![cfg(feature = "tensorrt")]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use fastkv::policy::{Budget, Floor, Method, Params, Policy};
use fastkv::select::Pool;
use fastkv::trt::{DataType, Field, FieldValue, Phase, TensorDesc, TensorRt};

const NS: &str = "fastkv";
const VERSION: &str = "1";

/// Int32 fields by name, in schema order.
type Values = &'static [(&'static str, i32)];

/// Each plugin with valid fields and its number of outputs.
const PLUGINS: [(&str, Values, i32); 5] = [
    (
        "FastKVWindowScores",
        &[("n_heads", 8), ("n_kv_heads", 2), ("head_dim", 128), ("window", 8), ("kernel", 7), ("pool", 1), ("tsp", 1)],
        2,
    ),
    ("FastKVTopK", &[("rate_num", 1), ("rate_den", 10), ("window", 8)], 1),
    ("FastKVGather", &[], 1),
    ("FastKVAttention", &[("n_heads", 8), ("n_kv_heads", 2), ("head_dim", 128), ("mode", 0), ("sliding_window", 0)], 2),
    ("FastKVCacheAttention", &[("n_heads", 8), ("n_kv_heads", 2), ("head_dim", 128), ("sliding_window", 0)], 1),
];

/// Valid fields of a decode attention.
const DECODE: Values = &[("n_heads", 8), ("n_kv_heads", 2), ("head_dim", 128), ("mode", 1), ("sliding_window", 0)];

/// The lean runtime with our plugin library loaded, shared by all tests (the registry is process-wide); `None`
/// (test skipped) only when no runtime is configured or installed.
fn trt() -> Option<MutexGuard<'static, TensorRt>> {
    static TRT: OnceLock<Option<Mutex<TensorRt>>> = OnceLock::new();
    let shared = TRT.get_or_init(|| {
        let lib = match std::env::var_os("FASTKV_TRT_LEAN_LIB") {
            Some(path) => PathBuf::from(path),
            None => {
                let default = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/trt-lean/tensorrt_lean_libs/libnvinfer_lean.so.11");
                if !default.is_file() {
                    return None;
                }
                default
            }
        };
        let mut trt = TensorRt::open(&lib).expect("open the TensorRT lean runtime");
        trt.load_plugins(Path::new(env!("FASTKV_TRT_PLUGIN_LIB"))).expect("load libfastkv_trt_plugins.so");
        Some(Mutex::new(trt))
    });
    let guard = shared.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
    if guard.is_none() {
        eprintln!("skipped: no TensorRT runtime");
    }
    guard
}

fn fields(values: &[(&str, i32)]) -> Vec<Field> {
    values.iter().map(|(name, v)| Field::int(name, *v)).collect()
}

fn error_of<T>(r: fastkv::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_creator_is_found_by_name_version_namespace_with_its_fields() {
    let Some(trt) = trt() else { return };
    let creators = trt.creators();
    for (name, values, _) in PLUGINS {
        let c = creators.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{name} is not registered"));
        assert_eq!((c.version.as_str(), c.plugin_namespace.as_str()), (VERSION, NS));
        assert_eq!(c.interface_kind, "PLUGIN CREATOR_V3ONE");
        let specs = trt.field_names(name, VERSION, NS).unwrap();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, values.iter().map(|(n, _)| *n).collect::<Vec<_>>(), "{name}");
        assert!(specs.iter().all(|s| s.ty == 5 && s.length == 1), "{name}: every field is one int32");
    }
}

#[test]
fn loading_the_library_twice_is_an_error() {
    let Some(mut trt) = trt() else { return };
    let e = error_of(trt.load_plugins(Path::new(env!("FASTKV_TRT_PLUGIN_LIB"))));
    assert!(e.contains("already"), "{e}");
    let e = error_of(trt.load_plugins(Path::new("/nonexistent/libplugins.so")));
    assert!(e.contains("cannot open plugin library"), "{e}");
}

#[test]
fn plugins_answer_every_capability_in_both_phases() {
    let Some(trt) = trt() else { return };
    for (name, values, nb_outputs) in PLUGINS {
        for phase in [Phase::Build, Phase::Runtime] {
            let p = trt.create_plugin(name, VERSION, NS, &fields(values), phase).unwrap();
            for q in [p.try_clone().unwrap(), p.attach_to_context().unwrap(), p] {
                let i = q.info().unwrap();
                assert_eq!((i.name.as_str(), i.version.as_str(), i.plugin_namespace.as_str()), (name, VERSION, NS));
                assert!(i.has_build && i.has_runtime, "{name} {phase:?}");
                assert_eq!(i.nb_outputs, nb_outputs, "{name}");
            }
        }
    }
}

#[test]
fn serialized_fields_recreate_the_same_plugin() {
    let Some(trt) = trt() else { return };
    for (name, values, _) in PLUGINS {
        let given = fields(values);
        let p = trt.create_plugin(name, VERSION, NS, &given, Phase::Build).unwrap();
        let saved = p.serialized_fields().unwrap();
        assert_eq!(saved, given, "{name}");
        let again = trt.create_plugin(name, VERSION, NS, &saved, Phase::Runtime).unwrap();
        assert_eq!(again.serialized_fields().unwrap(), given, "{name}");
        assert_eq!(again.try_clone().unwrap().serialized_fields().unwrap(), given, "{name}");
    }
    // ONNX integer attributes may arrive as int64: accepted, stored as int32.
    let as_i64: Vec<_> = PLUGINS[1]
        .1
        .iter()
        .map(|(n, v)| Field { name: n.to_string(), value: FieldValue::Int64(vec![*v as i64]) })
        .collect();
    let p = trt.create_plugin("FastKVTopK", VERSION, NS, &as_i64, Phase::Build).unwrap();
    assert_eq!(p.serialized_fields().unwrap(), fields(PLUGINS[1].1));
}

#[test]
fn bad_fields_are_errors_that_name_the_field() {
    let Some(trt) = trt() else { return };
    let scores = PLUGINS[0].1;
    let with = |name: &str, v: i32| -> Vec<Field> {
        scores.iter().map(|(n, x)| Field::int(n, if *n == name { v } else { *x })).collect()
    };
    let create = |plugin: &str, f: &[Field]| error_of(trt.create_plugin(plugin, VERSION, NS, f, Phase::Build));
    let cases: Vec<(Vec<Field>, &str)> = vec![
        (fields(&scores[..6]), "field `tsp` is missing"),
        (with("window", 0), "field `window` = 0 is out of range [1, 1048576]"),
        (with("n_kv_heads", 3), "n_heads (8) must be a multiple of n_kv_heads (3)"),
        (with("kernel", 4), "kernel must be odd"),
        (with("head_dim", 100), "head_dim must be a multiple of 8"),
        (with("pool", 2), "field `pool` = 2 is out of range [0, 1]"),
        ([fields(scores), vec![Field::int("window", 8)]].concat(), "field `window` given twice"),
        ([fields(scores), vec![Field::int("windw", 8)]].concat(), "unknown field `windw`"),
        (
            scores
                .iter()
                .map(|(n, v)| match *n {
                    "window" => Field { name: "window".into(), value: FieldValue::Float32(vec![8.0]) },
                    _ => Field::int(n, *v),
                })
                .collect(),
            "field `window` must be an int32 (or int64) scalar",
        ),
        (
            scores
                .iter()
                .map(|(n, v)| match *n {
                    "kernel" => Field { name: "kernel".into(), value: FieldValue::Int32(vec![7, 7]) },
                    _ => Field::int(n, *v),
                })
                .collect(),
            "field `kernel` must be one scalar, got length 2",
        ),
    ];
    for (f, want) in cases {
        let e = create("FastKVWindowScores", &f);
        assert!(e.contains(&format!("FastKVWindowScores: {want}")), "got `{e}`, want `{want}`");
    }
    let attention = |h: i32, hk: i32, d: i32, mode: i32| {
        let values = [("n_heads", h), ("n_kv_heads", hk), ("head_dim", d), ("mode", mode), ("sliding_window", 0)];
        create("FastKVAttention", &fields(&values))
    };
    assert!(attention(8, 2, 80, 0).contains("head_dim 80 is not supported by the attention kernels"));
    assert!(attention(32, 2, 128, 1).contains("decode needs n_heads / n_kv_heads <= 8"));
    let step = |h: i32, hk: i32, d: i32| {
        create(
            "FastKVCacheAttention",
            &fields(&[("n_heads", h), ("n_kv_heads", hk), ("head_dim", d), ("sliding_window", 0)]),
        )
    };
    assert!(step(32, 2, 128).contains("FastKVCacheAttention: decode needs n_heads / n_kv_heads <= 8"));
    assert!(step(8, 3, 128).contains("must be a multiple of n_kv_heads (3)"));
    assert!(step(8, 2, 96).contains("head_dim 96 is not supported"));
    assert!(create("FastKVTopK", &fields(&[("rate_num", 1), ("rate_den", 0), ("window", 8)])).contains("rate_den"));
    assert!(create("FastKVGather", &fields(&[("window", 8)])).contains("unknown field `window`"));
    let e = error_of(trt.create_plugin("FastKVTopK", "2", NS, &[], Phase::Build));
    assert!(e.contains("no plugin creator FastKVTopK version 2 in namespace \"fastkv\""), "{e}");
    let e = error_of(trt.create_plugin("FastKVTopK", VERSION, "", &[], Phase::Build));
    assert!(e.contains("no plugin creator"), "{e}");
}

#[test]
fn output_types_follow_the_activation_type() {
    let Some(trt) = trt() else { return };
    use DataType::*;
    let cases: &[(usize, Values, &[DataType], &[DataType])] = &[
        (0, PLUGINS[0].1, &[Half, Half, Float], &[Float, Float]),
        (0, PLUGINS[0].1, &[BFloat16, BFloat16], &[Float, Float]),
        (1, PLUGINS[1].1, &[Float], &[Int32]),
        (2, &[], &[BFloat16, Int32], &[BFloat16]),
        (2, &[], &[Int32, Int32], &[Int32]),
        (3, PLUGINS[3].1, &[Half, Half, Half, Int32, Int32], &[Half, Float]),
        (3, DECODE, &[BFloat16, BFloat16, BFloat16, Int32, Int32], &[BFloat16]),
        (4, PLUGINS[4].1, &[BFloat16, BFloat16, BFloat16, Int32, Int32, Int32], &[BFloat16]),
        (4, PLUGINS[4].1, &[Half, Half, Half, Int32, Int32, Int32], &[Half]),
    ];
    for (i, values, inputs, want) in cases {
        let p = trt.create_plugin(PLUGINS[*i].0, VERSION, NS, &fields(values), Phase::Build).unwrap();
        assert_eq!(p.output_types(inputs).unwrap(), *want, "{} {inputs:?}", PLUGINS[*i].0);
    }
    let p = trt.create_plugin("FastKVWindowScores", VERSION, NS, &fields(PLUGINS[0].1), Phase::Build).unwrap();
    let e = error_of(p.output_types(&[Half, BFloat16]));
    assert!(e.contains("q_window and keys must both be f16 or both bf16 (getOutputDataTypes)"), "{e}");
    let p = trt.create_plugin("FastKVTopK", VERSION, NS, &fields(PLUGINS[1].1), Phase::Build).unwrap();
    assert!(error_of(p.output_types(&[Half])).contains("one f32 input"));
    let p = trt.create_plugin("FastKVCacheAttention", VERSION, NS, &fields(PLUGINS[4].1), Phase::Build).unwrap();
    let e = error_of(p.output_types(&[Half, BFloat16, BFloat16, Int32, Int32, Int32]));
    assert!(e.contains("qkv and the caches must share f16 or bf16"), "{e}");
    assert!(error_of(p.output_types(&[Half, Half, Half, Int32, Int32, Float])).contains("must be int32"));
}

/// TopK's width k + W is policy.rs's budget for the row's L = n + W tokens: C = ⌊L·r⌋ (KV) and T = max(⌊L·t⌋, W)
/// (TSP), with k = C − W clamped to [0, n]; also far beyond ITopKLayer's 3840.
#[test]
fn top_k_width_is_the_policy_budget_of_the_input_length() {
    let Some(trt) = trt() else { return };
    let window = 8;
    for (num, den) in [(1, 10), (1, 5), (1, 20), (1, 4), (1, 2), (3, 20), (2, 5)] {
        let rate = num as f64 / den as f64;
        let policy = Policy {
            method: Method::Fastkv,
            tsp_layer: 0,
            budget: Budget::Rate { tsp_rate: rate, retain_rate: rate },
            window,
            kernel: 7,
            pool: Pool::Max,
            floor: Floor::NONE,
            params: Params::default(),
        };
        let f = fields(&[("rate_num", num), ("rate_den", den), ("window", window as i32)]);
        let p = trt.create_plugin("FastKVTopK", VERSION, NS, &f, Phase::Build).unwrap();
        for n in (0..3000).chain([40_000, 131_064, 1 << 20]) {
            let l = n + window;
            let c = policy.kv_budget(0, l).saturating_sub(window).min(n) + window;
            assert_eq!(policy.tsp_len(l).min(l), c, "TSP and KV agree at rate {rate}, L {l}");
            let shapes = p.output_shapes(&[vec![4, n as i64]]).unwrap();
            assert_eq!(shapes, [vec![4, c as i64]], "rate {num}/{den}, L {l}");
            assert_eq!(p.output_shapes(&[vec![n as i64]]).unwrap(), [vec![c as i64]], "1-D scores");
        }
    }
}

#[test]
fn output_shapes_of_scores_gather_and_attention() {
    let Some(trt) = trt() else { return };
    let make = |i: usize, values: &[(&str, i32)]| {
        trt.create_plugin(PLUGINS[i].0, VERSION, NS, &fields(values), Phase::Build).unwrap()
    };
    let scores = make(0, PLUGINS[0].1);
    let (s, w) = (1000, 8);
    assert_eq!(
        scores.output_shapes(&[vec![8, w, 128], vec![s, 2, 128], vec![8, s]]).unwrap(),
        [vec![2, s - w], vec![s - w]]
    );
    assert!(error_of(scores.output_shapes(&[vec![4, w, 128], vec![s, 2, 128]])).contains("do not match"));
    let gather = make(2, &[]);
    assert_eq!(gather.output_shapes(&[vec![s, 2, 128], vec![2, 99]]).unwrap(), [vec![2, 99, 128]]);
    assert_eq!(gather.output_shapes(&[vec![s, 576], vec![200]]).unwrap(), [vec![200, 576]]);
    assert_eq!(gather.output_shapes(&[vec![s], vec![200]]).unwrap(), [vec![200]]);
    assert!(error_of(gather.output_shapes(&[vec![s, 2, 128], vec![99]])).contains("needs idx [B, C]"));
    let prefill = make(3, PLUGINS[3].1);
    assert_eq!(
        prefill.output_shapes(&[vec![s, 8, 128], vec![s, 2, 128], vec![s, 2, 128], vec![s], vec![2, s]]).unwrap(),
        [vec![s, 8, 128], vec![8, s]]
    );
    let decode = make(3, DECODE);
    let cache = vec![2, s, 128];
    let decode_inputs = [vec![8, 128], cache.clone(), cache, vec![1], vec![2, s]];
    assert_eq!(decode.output_shapes(&decode_inputs).unwrap(), [vec![8, 128]]);
    let in_place = make(4, PLUGINS[4].1);
    let cache = vec![2, 4096, 128];
    let inputs = [vec![1, 12 * 128], cache.clone(), cache, vec![2, 4096], vec![1], vec![1]];
    assert_eq!(in_place.output_shapes(&inputs).unwrap(), [vec![8, 128]], "[H, D] whatever the capacity");
}

#[test]
fn formats_and_shapes_are_checked_before_enqueue() {
    let Some(trt) = trt() else { return };
    use DataType::*;
    let t = TensorDesc::new;
    let scores = trt.create_plugin("FastKVWindowScores", VERSION, NS, &fields(PLUGINS[0].1), Phase::Build).unwrap();
    let ins = [t(&[8, 8, 128], Half), t(&[-1, 2, 128], Half), t(&[8, -1], Float)];
    let outs = [t(&[2, -1], Float), t(&[-1], Float)];
    for pos in 0..5 {
        assert!(scores.supports(pos, &ins, &outs).unwrap(), "pos {pos}");
    }
    assert!(!scores.supports(1, &[t(&[8, 8, 128], Half), t(&[-1, 2, 128], BFloat16)], &outs).unwrap());
    assert!(!scores.supports(0, &[t(&[8, 8, 128], Float)], &[]).unwrap());
    scores.configure(&ins, &outs).unwrap();
    let run = |s: i64| [t(&[8, 8, 128], Half), t(&[s, 2, 128], Half), t(&[8, s], Float)];
    scores.shape_change(&run(100), &[t(&[2, 92], Float), t(&[92], Float)]).unwrap();
    assert!(error_of(scores.shape_change(&run(4), &outs)).contains("fewer than the window"));
    assert!(error_of(scores.configure(&ins, &outs[..1])).contains("expects 2 outputs"));
    let lse = scores.workspace_size(&run(100), &outs).unwrap();
    assert!(lse >= 8 * 92 * 4, "room for the [H, S-W] scores: {lse}");
    assert!(scores.workspace_size(&run(100)[..2], &outs).unwrap() > lse, "without lse the normaliser needs room");

    let gather = trt.create_plugin("FastKVGather", VERSION, NS, &[], Phase::Runtime).unwrap();
    assert!(gather.supports(1, &[t(&[10, 4], BFloat16), t(&[3], Int32)], &[t(&[3, 4], BFloat16)]).unwrap());
    assert!(!gather.supports(1, &[t(&[10, 4], BFloat16), t(&[3], Float)], &[t(&[3, 4], BFloat16)]).unwrap());
    let e = error_of(gather.shape_change(&[t(&[10, 2, 4], Half), t(&[3, 5], Int32)], &[t(&[3, 5, 4], Half)]));
    assert!(e.contains("must have src's B rows"), "{e}");

    let attention = trt.create_plugin("FastKVAttention", VERSION, NS, &fields(PLUGINS[3].1), Phase::Runtime).unwrap();
    let qkv = |s: i64, sk: i64| {
        [t(&[s, 8, 128], Half), t(&[sk, 2, 128], Half), t(&[sk, 2, 128], Half), t(&[s], Int32), t(&[2, sk], Int32)]
    };
    let outs = [t(&[16, 8, 128], Half), t(&[8, 16], Float)];
    attention.shape_change(&qkv(16, 32), &outs).unwrap();
    assert!(error_of(attention.shape_change(&qkv(16, 8), &outs)).contains("k has fewer rows than q"));
    assert!(error_of(attention.shape_change(&[&[t(&[16, 8, 64], Half)], &qkv(16, 32)[1..]].concat(), &outs))
        .contains("must be [S, n_heads, head_dim]"));
    let mut short_k_pos = qkv(16, 32);
    short_k_pos[4] = t(&[2, 16], Int32);
    assert!(error_of(attention.shape_change(&short_k_pos, &outs)).contains("k_pos [2, 16] must be [n_kv_heads, Sk]"));
    assert!(!attention.supports(3, &[qkv(16, 32)[..3].to_vec(), vec![t(&[16], Float)]].concat(), &outs).unwrap());

    // The in-place decode step: caches at their capacity C, lengths and positions int32, one [H, D] output.
    let step = trt.create_plugin("FastKVCacheAttention", VERSION, NS, &fields(PLUGINS[4].1), Phase::Runtime).unwrap();
    let inputs = |c: i64, ty: DataType| {
        [
            t(&[1, 12 * 128], ty),
            t(&[2, c, 128], ty),
            t(&[2, c, 128], ty),
            t(&[2, c], Int32),
            t(&[1], Int32),
            t(&[1], Int32),
        ]
    };
    let outs = [t(&[8, 128], BFloat16)];
    for pos in 0..7 {
        assert!(step.supports(pos, &inputs(4096, BFloat16), &outs).unwrap(), "pos {pos}");
    }
    let mut mixed = inputs(4096, BFloat16);
    mixed[2] = t(&[2, 4096, 128], Half);
    assert!(!step.supports(2, &mixed, &outs).unwrap(), "v_cache must have qkv's type");
    let mut float_len = inputs(4096, BFloat16);
    float_len[4] = t(&[1], Float);
    assert!(!step.supports(4, &float_len, &outs).unwrap(), "cache_len is int32");
    step.configure(
        &[&inputs(4096, BFloat16)[..1], &[t(&[2, -1, 128], BFloat16)], &inputs(4096, BFloat16)[2..]].concat(),
        &outs,
    )
    .unwrap();
    step.shape_change(&inputs(4096, BFloat16), &outs).unwrap();
    let ws = step.workspace_size(&inputs(4096, BFloat16), &outs).unwrap();
    assert!(ws >= 8 * 4, "room for the split-K partials of 8 heads: {ws}");
    assert!(step.workspace_size(&inputs(32768, BFloat16), &outs).unwrap() >= ws, "grows with the capacity");
    let mut short_pos = inputs(4096, BFloat16);
    short_pos[3] = t(&[2, 100], Int32);
    assert!(error_of(step.shape_change(&short_pos, &outs)).contains("cache_pos [2, 100] must be [n_kv_heads, C]"));
    let mut wide_qkv = inputs(4096, BFloat16);
    wide_qkv[0] = t(&[1, 8 * 128], BFloat16);
    assert!(error_of(step.shape_change(&wide_qkv, &outs)).contains("must be [1, (n_heads + 2·n_kv_heads)·head_dim]"));
    assert!(error_of(step.shape_change(&inputs(0, BFloat16), &outs)).contains("no capacity"));
}
