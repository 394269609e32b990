//! The ONNX export (`fastkv-build --export-onnx`) against the CPU engine: every graph passes
//! `onnx.checker`, the lowered graphs run on onnxruntime (`scripts/onnx_run.py`) give the CPU
//! engine's last-token logits, kept KV positions, TSP positions and greedy tokens, and the plugin
//! graphs differ from the lowered ones only where a FastKV node was replaced.
//! The onnxruntime checks need `scripts/onnx-deps.sh` (scripts/test.sh runs it; `cargo test` skips them without).

mod common;

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use fastkv::engine::Manifest;
use fastkv::onnx::export::{export, Budgets, CACHED_DECODE, GRAPHS};
use fastkv::onnx::proto::{GraphProto, ModelProto, NodeProto, ATTR_INT};
use fastkv::onnx::{Flavour, DOMAIN};
use fastkv::select::Pool;
use fastkv::tensors::DType;
use fastkv::trt::plan::{bindings, profile, InputProfile, Limits};
use fastkv::{Budget, Engine, Method, Policy, Prompt, Request};
use prost::Message;
use serde::Deserialize;

/// Tokens chosen per prompt: the prefill's and four decode steps.
const NEW_TOKENS: usize = 5;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// onnx + onnxruntime for Python, if scripts/onnx-deps.sh installed them ([`resource`]).
fn onnx_deps() -> Option<PathBuf> {
    resource(root().join("target/onnx-py"), "scripts/onnx-deps.sh")
}

/// `python3 scripts/onnx_run.py ARGS` with the packages of scripts/onnx-deps.sh.
fn onnx_run(args: &[&str]) -> Output {
    let packages = root().join("target/onnx-py");
    Command::new("python3")
        .arg(root().join("scripts/onnx_run.py"))
        .args(args)
        .env("PYTHONPATH", &packages)
        .output()
        .expect("python3 runs")
}

fn succeed(out: Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn exported(engine: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("onnx");
    export(engine, &dir).unwrap_or_else(|e| panic!("exporting {}: {e}", engine.display()));
    (tmp, dir)
}

/// What `onnx_run.py run` wrote.
#[derive(Deserialize)]
struct OrtRun {
    logits: Vec<f32>,
    kept: Vec<Vec<Vec<u32>>>,
    tsp_positions: Vec<u32>,
    tokens: Vec<u32>,
}

/// Exports `engine`, checks every graph, runs the lowered one on `ids` and compares with
/// `Engine::generate`; returns the logits' relative error.
fn lowered_matches_cpu(name: &str, engine_dir: &Path, ids: &[u32]) -> f32 {
    let (tmp, dir) = exported(engine_dir);
    let dir_s = dir.to_str().unwrap();
    succeed(onnx_run(&["check", dir_s]), &format!("{name}: onnx.checker"));
    let ids_path = tmp.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(ids).unwrap()).unwrap();
    let out_path = tmp.path().join("ort.json");
    let n = NEW_TOKENS.to_string();
    let args =
        ["run", dir_s, "--ids", ids_path.to_str().unwrap(), "--new-tokens", &n, "--out", out_path.to_str().unwrap()];
    succeed(onnx_run(&args), &format!("{name}: onnxruntime"));
    let ort: OrtRun = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();

    let engine = Engine::open(engine_dir).unwrap();
    let mut req = Request::new(Prompt::Tokens(ids.to_vec()));
    req.max_new_tokens = NEW_TOKENS;
    req.record_selection = true;
    let cpu = engine.generate(&req, |_| ControlFlow::Continue(())).unwrap();
    let err = rel_err(&ort.logits, &cpu.prompt_logits);
    eprintln!("{name}, {} tokens: lowered ONNX logits relative error {err:.2e}", ids.len());
    assert!(err < 1e-4, "{name}: logits relative error {err:e}");
    let sel = cpu.selection.unwrap();
    assert_eq!(ort.kept.len(), sel.layers.len(), "{name}: layers");
    for (ls, kept) in sel.layers.iter().zip(&ort.kept) {
        assert_eq!(&ls.kept, kept, "{name}: kept positions of layer {}", ls.layer);
    }
    assert_eq!(sel.tsp_positions.as_ref(), Some(&ort.tsp_positions), "{name}: TSP positions");
    assert_eq!(cpu.token_ids.len(), NEW_TOKENS, "{name}: the CPU engine stopped early (EOS); pick another prompt");
    assert_eq!(cpu.token_ids, ort.tokens, "{name}: greedy tokens");
    err
}

#[test]
fn lowered_graphs_match_the_cpu_engine_on_every_architecture() {
    let Some(_) = onnx_deps() else { return };
    let prompt = expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    // Lengths that round differently under t = 0.2, r = 0.1; the sliding window (mistral, 128) is
    // shorter than each.
    for (name, len) in [("llama", 400), ("mistral", 333), ("qwen2", 257), ("qwen3", 512)] {
        let (_tmp, engine) = build_engine(&fixture(name), DType::F32);
        lowered_matches_cpu(name, &engine, &prompt[..len]);
    }
}

/// Average pooling (zero padding, divided by K), another kernel, window and rates: the engine's
/// default policy is what both sides run.
#[test]
fn lowered_graphs_match_the_cpu_engine_with_avg_pooling_and_other_budgets() {
    let Some(_) = onnx_deps() else { return };
    let prompt = expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let (_tmp, engine) = build_engine(&fixture("qwen2"), DType::F32);
    let mut manifest = Manifest::read(&engine).unwrap();
    manifest.fastkv = Policy {
        pool: Pool::Avg,
        kernel: 5,
        window: 16,
        budget: Budget::Rate { tsp_rate: 0.25, retain_rate: 0.125 },
        ..manifest.fastkv
    };
    std::fs::write(engine.join("engine.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
    lowered_matches_cpu("qwen2, avg pooling", &engine, &prompt[..450]);
}

/// Every budget calibration may choose (its grid of retain rates × TSP rates) exports, and the
/// graph computes the CPU engine's budgets, selections and tokens — r = 0.1, t = 0.3 among them,
/// whose r/t is no f64 a graph can hold.
#[test]
fn every_budget_calibration_may_choose_exports_and_matches_the_cpu_engine() {
    let Some(_) = onnx_deps() else { return };
    let prompt = expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let base = Manifest::read(&engine).unwrap();
    for retain_rate in fastkv::calibrate::RETAIN_RATES {
        for tsp_rate in fastkv::calibrate::TSP_RATES {
            let mut manifest = base.clone();
            manifest.fastkv.budget = Budget::Rate { tsp_rate, retain_rate };
            std::fs::write(engine.join("engine.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
            lowered_matches_cpu(&format!("r = {retain_rate}, t = {tsp_rate}"), &engine, &prompt[..600]);
        }
    }
}

#[test]
fn lowered_graphs_match_the_cpu_engine_on_smollm2() {
    let Some(_) = onnx_deps() else { return };
    let Some(model) = resource(root().join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf"), "scripts/models.sh")
    else {
        return;
    };
    let (_tmp, engine_dir) = build_engine(&model, DType::F32);
    let text = expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().text;
    let ids = Engine::open(&engine_dir).unwrap().encode(&text).unwrap();
    assert!(ids.len() >= 480, "{} tokens", ids.len());
    lowered_matches_cpu("SmolLM2-135M", &engine_dir, &ids[..480]);
}

fn read_model(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

/// The nodes of FastKV step `p` in `graph`: `p` itself (the plugin flavour's custom node) and every
/// node in its scope (`<p>/…`: the plugin's adapters, or the reference lowering).
fn step_nodes<'g>(graph: &'g GraphProto, p: &NodeProto) -> Vec<&'g NodeProto> {
    let scope = format!("{}/", p.name);
    graph.node.iter().filter(|n| n.name == p.name || n.name.starts_with(&scope)).collect()
}

/// What the nodes `step` of `graph` read from outside themselves (their own constants aside), and
/// what they produce for the rest of the graph.
fn step_io(graph: &GraphProto, p: &NodeProto, step: &[&NodeProto]) -> (HashSet<String>, HashSet<String>) {
    let produced: HashSet<&str> = step.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    let names: HashSet<&str> = step.iter().map(|n| n.name.as_str()).collect();
    let own_constant =
        |v: &str| v.starts_with(&format!("{}/", p.name)) && graph.initializer.iter().any(|t| t.name == v);
    let inputs = step.iter().flat_map(|n| &n.input).filter(|v| !produced.contains(v.as_str()) && !own_constant(v));
    let read_outside = graph.node.iter().filter(|n| !names.contains(n.name.as_str())).flat_map(|n| &n.input);
    let graph_outputs = graph.output.iter().map(|o| &o.name);
    let outputs = read_outside.chain(graph_outputs).filter(|v| produced.contains(v.as_str()));
    (inputs.cloned().collect(), outputs.cloned().collect())
}

/// Checks that `reference` is `plugin` with every FastKV step (custom node and its adapters) replaced
/// by standard nodes in the custom node's scope (`<node name>/…`) that read only the step's inputs
/// and their own constants and produce the step's outputs; returns the FastKV op types seen.
fn only_fastkv_nodes_differ(plugin: &ModelProto, reference: &ModelProto) -> HashSet<String> {
    let (pg, rg) = (plugin.graph.as_ref().unwrap(), reference.graph.as_ref().unwrap());
    assert_eq!(pg.input, rg.input);
    assert_eq!(pg.output, rg.output);
    let ref_nodes: HashMap<&str, &NodeProto> = rg.node.iter().map(|n| (n.name.as_str(), n)).collect();
    assert_eq!(ref_nodes.len(), rg.node.len(), "node names are unique");
    let plugins: Vec<&NodeProto> = pg.node.iter().filter(|n| n.domain == DOMAIN).collect();
    assert!(pg.node.iter().all(|n| n.domain.is_empty() || n.domain == DOMAIN));
    let in_a_step = |name: &str| plugins.iter().any(|p| name.starts_with(&format!("{}/", p.name)));
    for node in pg.node.iter().filter(|n| n.domain.is_empty() && !in_a_step(&n.name)) {
        assert_eq!(ref_nodes.get(node.name.as_str()).copied(), Some(node), "standard node {} differs", node.name);
    }
    assert!(rg.node.iter().all(|n| n.domain.is_empty()), "a FastKV node is left in the reference graph");
    assert!(rg.initializer.iter().all(|t| pg.initializer.contains(t) || in_a_step(&t.name)));
    assert!(pg.initializer.iter().all(|t| rg.initializer.contains(t) || in_a_step(&t.name)));
    let plugin_names: HashSet<&str> = pg.node.iter().filter(|n| !in_a_step(&n.name)).map(|n| n.name.as_str()).collect();
    for node in rg.node.iter().filter(|n| !plugin_names.contains(n.name.as_str())) {
        let owners = plugins.iter().filter(|p| node.name.starts_with(&format!("{}/", p.name))).count();
        assert_eq!(owners, 1, "{} replaces no FastKV node", node.name);
    }
    for p in &plugins {
        assert!(p.attribute.iter().all(|a| a.r#type == ATTR_INT), "{}: attributes are integers", p.name);
        let (inputs, outputs) = step_io(pg, p, &step_nodes(pg, p));
        let (lowering_reads, lowering_produces) = step_io(rg, p, &step_nodes(rg, p));
        assert!(lowering_reads.is_subset(&inputs), "{}: its lowering reads {lowering_reads:?} from outside", p.name);
        assert_eq!(lowering_produces, outputs, "{}: the flavours' steps produce the same", p.name);
    }
    let imports = |m: &ModelProto| m.opset_import.iter().any(|o| o.domain == DOMAIN);
    assert!(imports(plugin) && !imports(reference));
    plugins.iter().map(|p| p.op_type.clone()).collect()
}

#[test]
fn the_flavours_differ_only_in_the_fastkv_nodes() {
    for name in FIXTURES {
        let (_tmp, engine) = build_engine(&fixture(name), DType::F32);
        let (_otmp, dir) = exported(&engine);
        for graph in GRAPHS {
            let plugin = read_model(&dir.join(Flavour::Plugin.file_name(graph)));
            let reference = read_model(&dir.join(Flavour::Reference.file_name(graph)));
            let ops = only_fastkv_nodes_differ(&plugin, &reference);
            let expected: &[&str] = match graph {
                "prefill" => &["FastKVAttention", "FastKVWindowScores", "FastKVTopK", "FastKVGather"],
                _ => &["FastKVAttention"],
            };
            assert_eq!(ops, expected.iter().map(|s| s.to_string()).collect(), "{name} {graph}");
        }
    }
}

#[test]
fn export_refuses_policies_it_cannot_express() {
    let (_tmp, engine) = build_engine(&fixture("qwen3"), DType::F32);
    let path = engine.join("engine.json");
    let default = Manifest::read(&engine).unwrap().fastkv;
    let out = tempfile::tempdir().unwrap();
    let last_layer = Manifest::read(&engine).unwrap().model.num_layers - 1;
    let refused = [
        (Policy { budget: Budget::Absolute { kv_budget: 64, tsp_len: 128 }, ..default }, "rate mode"),
        (Policy { method: Method::SnapkvGqa, ..default }, "default method is SnapkvGqa"),
        (Policy { tsp_layer: last_layer, ..default }, "before the last layer"),
        // T = L: TSP never fires, so no prompt length opens every gate.
        (Policy { budget: Budget::Rate { tsp_rate: 1.0, retain_rate: 0.1 }, ..default }, "no prompt length"),
    ];
    for (policy, message) in refused {
        let mut manifest = Manifest::read(&engine).unwrap();
        manifest.fastkv = policy;
        std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
        let err = export(&engine, out.path()).unwrap_err().to_string();
        assert!(err.contains("export_onnx") && err.contains(message), "{err}");
    }
}

#[test]
fn the_harness_refuses_prompts_shorter_than_the_export_supports() {
    let Some(_) = onnx_deps() else { return };
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let (tmp, dir) = exported(&engine);
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]").unwrap();
    let out = tmp.path().join("out.json");
    let run = onnx_run(&["run", dir.to_str().unwrap(), "--ids", ids.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("the prompt has 10 tokens; this export takes 90..="), "{stderr}");
}

/// TensorRT's optimisation profiles (`fastkv::trt::plan::profile`) name every input of the exported graphs, and
/// each layer's cache range is what the CPU engine's policy keeps of the shortest and of the longest prompt (plus
/// the appended tokens); limits outside the export's range are refused by name.
#[test]
fn tensorrt_profiles_cover_every_input_with_the_cpu_engines_cache_lengths() {
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let (_out, dir) = exported(&engine);
    let m = Manifest::read(&engine).unwrap();
    let (policy, n) = (m.fastkv, m.model.num_layers);
    let budgets = Budgets::new(&policy, &m.model).unwrap();
    let (min, max) = (budgets.min_prompt_len, budgets.min_prompt_len + 97);
    let limits = Limits { max_input_len: max, max_output_len: 16 };
    let prefill = profile(&dir.join("prefill.onnx"), &budgets, &policy, limits).unwrap();
    let ids =
        InputProfile { name: "input_ids".into(), min: vec![min as i64], opt: vec![max as i64], max: vec![max as i64] };
    assert_eq!(prefill, [ids]);

    // What Policy::plan (the CPU engine's) keeps in layer l of a prompt of len tokens.
    let kept = |l: usize, len: usize| {
        let seq = if l > policy.tsp_layer { policy.tsp_len(len) } else { len };
        policy.plan(l, n, len, seq).kv_budget.map_or(seq, |c| c.min(seq)) as i64
    };
    let decode = profile(&dir.join("decode.onnx"), &budgets, &policy, limits).unwrap();
    let by_name: HashMap<&str, &InputProfile> = decode.iter().map(|p| (p.name.as_str(), p)).collect();
    assert_eq!(by_name.len(), 2 + 3 * n, "input_id, position and three cache inputs per layer");
    for name in ["input_id", "position"] {
        assert_eq!((&by_name[name].min, &by_name[name].max), (&vec![1], &vec![1]), "{name}");
    }
    let (hk, d) = (m.model.num_kv_heads as i64, m.model.head_dim as i64);
    for l in 0..n {
        let (lo, hi) = (kept(l, min), kept(l, max) + 15);
        for (name, min_dims, max_dims) in [
            (format!("past_k_{l}"), vec![hk, lo, d], vec![hk, hi, d]),
            (format!("past_v_{l}"), vec![hk, lo, d], vec![hk, hi, d]),
            (format!("past_pos_{l}"), vec![hk, lo], vec![hk, hi]),
        ] {
            let p = by_name[name.as_str()];
            assert_eq!((&p.min, &p.opt, &p.max), (&min_dims, &max_dims, &max_dims), "{name}");
        }
    }

    // TensorRT's decode: the same caches at their capacity, one more entry than the longest they hold before a step.
    let cached = profile(&dir.join("decode_cached.onnx"), &budgets, &policy, limits).unwrap();
    let by_name: HashMap<&str, &InputProfile> = cached.iter().map(|p| (p.name.as_str(), p)).collect();
    assert_eq!(by_name.len(), 2 + 4 * n, "input_id, position and four cache inputs per layer");
    for l in 0..n {
        let (lo, hi) = (kept(l, min) + 1, kept(l, max) + 16);
        for (name, min_dims, max_dims) in [
            (format!("k_cache_{l}"), vec![hk, lo, d], vec![hk, hi, d]),
            (format!("v_cache_{l}"), vec![hk, lo, d], vec![hk, hi, d]),
            (format!("cache_pos_{l}"), vec![hk, lo], vec![hk, hi]),
            (format!("cache_len_{l}"), vec![1], vec![1]),
        ] {
            let p = by_name[name.as_str()];
            assert_eq!((&p.min, &p.opt, &p.max), (&min_dims, &max_dims, &max_dims), "{name}");
        }
    }

    let refused = |limits: Limits, flag: &str| {
        let e = profile(&dir.join("prefill.onnx"), &budgets, &policy, limits).unwrap_err().cli_message();
        assert!(e.contains(flag), "{e}");
    };
    refused(Limits { max_input_len: min - 1, max_output_len: 16 }, "--max-input-len");
    refused(Limits { max_input_len: budgets.max_prompt_len + 1, max_output_len: 16 }, "--max-input-len");
    refused(Limits { max_input_len: max, max_output_len: 0 }, "--max-output-len");
}

/// What the TensorRT runner binds (`fastkv::trt::plan::bindings`) is exactly what the exported prefill and in-place
/// decode graphs declare: every input and output, by name, direction and element type (a runner that bound a name
/// the graph lacks, or a type it does not have, would fail only on a GPU with TensorRT).
#[test]
fn the_tensorrt_runner_binds_every_input_and_output_of_the_exported_graphs() {
    let (_tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let (_out, dir) = exported(&engine);
    let n = Manifest::read(&engine).unwrap().model.num_layers;
    for graph in ["prefill", CACHED_DECODE] {
        let g = read_model(&dir.join(Flavour::Plugin.file_name(graph))).graph.unwrap();
        let declared = |values: &[fastkv::onnx::proto::ValueInfoProto], input: bool| {
            values
                .iter()
                .map(|v| {
                    let ty = v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).map_or(0, |t| t.elem_type);
                    (v.name.clone(), input, ty)
                })
                .collect::<Vec<_>>()
        };
        let mut graph_io: HashSet<_> = declared(&g.input, true).into_iter().collect();
        graph_io.extend(declared(&g.output, false));
        let bound: HashSet<_> = bindings(graph, n).into_iter().map(|b| (b.name, b.input, b.element.onnx())).collect();
        assert_eq!(bound, graph_io, "{graph}");
    }
}
