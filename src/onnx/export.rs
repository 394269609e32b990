//! An engine directory as ONNX (`fastkv-build --export-onnx DIR`): `prefill.onnx` and `decode.onnx`
//! with FastKV plugin nodes, `prefill.reference.onnx` and `decode.reference.onnx` with those nodes
//! lowered to standard ops, and `decode_cached.onnx`, the decode step TensorRT builds (caches as inputs
//! at their capacity, updated in place by a plugin node), all five reading one `weights.bin` (f32, ONNX external data, so no 2 GB
//! protobuf limit). The graphs follow the CPU engine (`src/cpu/mod.rs`) op for op: the same
//! normalised spec, weights and the engine's default FastKV policy.
//!
//! FastKV's budgets are functions of the prompt length L alone (C = ⌊L·r⌋ up to ℓ*, T = ⌊L·t⌋,
//! C = ⌊T·r/t⌋ after), so the graph computes them from its input's shape with integer fractions
//! num/den. The export supports the prompt lengths for which that integer math equals
//! [`Policy::plan`]'s and every gate of docs/method.md §8 is open (every layer compresses, TSP fires,
//! every budget holds more than the window): L in `[min_prompt_len, max_position_embeddings]`,
//! recorded in each graph's metadata (`fastkv.min_prompt_len`, `fastkv.max_prompt_len`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{FLOAT, FLOAT16, INT32, INT64};
use super::{attr, attr_ints, AttentionMode, Dim, FastKvOp, Flavour, Graph, PoolAttr};
use crate::engine::{Manifest, WEIGHTS};
use crate::error::{Error, Result};
use crate::fraction::Fraction;
use crate::policy::{Budget, LayerPlan, Method, Policy};
use crate::rope::Rope;
use crate::select::Pool;
use crate::spec::ModelSpec;
use crate::tensors::TensorFile;

/// The external weight file beside the graphs.
pub const WEIGHTS_FILE: &str = "weights.bin";
/// The two graphs of each flavour.
pub const GRAPHS: [&str; 2] = ["prefill", "decode"];
/// The decode graph TensorRT builds: the caches are inputs at their capacity, updated in place by
/// [`super::ops::CACHE_ATTENTION`]; written as plugin nodes only (`decode_cached.onnx`).
pub const CACHED_DECODE: &str = "decode_cached";
/// Tensor data offsets in [`WEIGHTS_FILE`] are multiples of this.
const ALIGN: u64 = 64;

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub dir: PathBuf,
    /// Graph files, relative to `dir`.
    pub graphs: Vec<String>,
    /// Prompt lengths the graphs support (inclusive).
    pub min_prompt_len: usize,
    pub max_prompt_len: usize,
}

/// Writes the engine in `engine_dir` as ONNX into `out_dir` (created if missing; files replaced).
pub fn export(engine_dir: &Path, out_dir: &Path) -> Result<Exported> {
    let manifest = Manifest::read(engine_dir)?;
    manifest.check_files(engine_dir, false)?;
    let spec = &manifest.model;
    let policy = manifest.fastkv;
    policy.validate(spec)?;
    let budgets = Budgets::new(&policy, spec)?;
    std::fs::create_dir_all(out_dir).map_err(|e| io_error(out_dir, e))?;
    let weights = write_weights(spec, &TensorFile::open(&engine_dir.join(WEIGHTS))?, &out_dir.join(WEIGHTS_FILE))?;
    let exporter = Exporter { spec, policy, budgets: &budgets, inv_freq: Rope::new(spec).inv_freq().to_vec(), weights };
    let mut graphs = Vec::new();
    let flavours = [Flavour::Plugin, Flavour::Reference];
    let all = flavours.iter().flat_map(|&f| GRAPHS.map(|g| (g, f))).chain([(CACHED_DECODE, Flavour::Plugin)]);
    for (graph, flavour) in all {
        let model = exporter.graph(graph, flavour);
        let file = flavour.file_name(graph);
        let path = out_dir.join(&file);
        std::fs::write(&path, model.encode_to_vec()).map_err(|e| io_error(&path, e))?;
        graphs.push(file);
    }
    Ok(Exported {
        dir: out_dir.into(),
        graphs,
        min_prompt_len: budgets.min_prompt_len,
        max_prompt_len: budgets.max_prompt_len,
    })
}

/// FastKV's budgets as the fractions [`super::ops::TOP_K`] takes, and the prompt lengths for which
/// they reproduce [`Policy::plan`] with every gate open.
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    /// r: C = ⌊L·r⌋ in layers 0..=ℓ*.
    pub retain: (i64, i64),
    /// t: T = ⌊L·t⌋.
    pub tsp: (i64, i64),
    /// r/t: C = ⌊T·r/t⌋ after ℓ*.
    pub post_tsp: (i64, i64),
    pub min_prompt_len: usize,
    pub max_prompt_len: usize,
}

impl Budgets {
    /// Refuses policies the graph cannot express: anything but FastKV in rate mode, TSP at the last
    /// layer.
    pub fn new(policy: &Policy, spec: &ModelSpec) -> Result<Self> {
        let Budget::Rate { tsp_rate, retain_rate } = policy.budget else {
            return Err(invalid(
                "only FastKV in rate mode (tsp_rate, retain_rate) is supported; the engine's default policy uses \
                 absolute budgets (kv_budget, tsp_len)",
            ));
        };
        if policy.method != Method::Fastkv {
            return Err(invalid(format!(
                "only FastKV in rate mode is supported; the engine's default method is {:?}",
                policy.method
            )));
        }
        let n_layers = spec.num_layers;
        if policy.tsp_layer + 1 >= n_layers {
            return Err(invalid(format!(
                "the TSP layer ({}) must come before the last layer ({}); rebuild with another --tsp-layer",
                policy.tsp_layer,
                n_layers - 1
            )));
        }
        // The policy's own fractions: the graph computes the CPU engine's integers.
        let (r, t) = (Fraction::nearest(retain_rate), Fraction::nearest(tsp_rate));
        let pair = |f: Fraction| (f.num as i64, f.den as i64);
        let (retain, tsp, post_tsp) = (pair(r), pair(t), pair(r.over(t)));
        let (w, star) = (policy.window, policy.tsp_layer);
        // The rows a layer of `seq` keeps under `plan`: a budget of at least `seq` keeps them all, in
        // order, as the graph's top-k of every row does.
        let kept = |plan: LayerPlan, seq: usize| (plan.kv_budget.map_or(seq, |c| c.min(seq)), plan.tsp_len);
        let supported = |l: usize| {
            let c = budget(l, retain, w);
            let t = policy.tsp_len(l);
            let c_post = budget(t, post_tsp, w);
            c > w
                && t == budget(l, tsp, w)
                && t > w
                && c_post > w
                && (star == 0 || kept(policy.plan(0, n_layers, l, l), l) == (c, None))
                && policy.plan(star, n_layers, l, l) == LayerPlan { kv_budget: Some(c), tsp_len: Some(t) }
                && kept(policy.plan(star + 1, n_layers, l, t), t) == (c_post, None)
        };
        let max = spec.max_position_embeddings;
        let min = (1..=max).rev().find(|&l| !supported(l)).map_or(1, |l| l + 1);
        if min > max {
            return Err(invalid(format!(
                "no prompt length up to max_position_embeddings ({max}) compresses every layer and fires TSP \
                 under tsp_rate {tsp_rate}, retain_rate {retain_rate}, window {w}"
            )));
        }
        Ok(Budgets { retain, tsp, post_tsp, min_prompt_len: min, max_prompt_len: max })
    }

    /// KV entries layer `layer` keeps of a `prompt_len`-token prompt: the length of the prefill graph's `k_{layer}`.
    pub fn cache_len(&self, policy: &Policy, layer: usize, prompt_len: usize) -> usize {
        let w = policy.window;
        if layer <= policy.tsp_layer {
            budget(prompt_len, self.retain, w)
        } else {
            budget(budget(prompt_len, self.tsp, w), self.post_tsp, w)
        }
    }
}

/// clamp(⌊s·num/den⌋, window, s): what [`super::ops::TOP_K`] keeps of `s` rows.
fn budget(s: usize, (num, den): (i64, i64), window: usize) -> usize {
    ((s as i64 * num / den) as usize).max(window).min(s)
}

/// One weight in [`WEIGHTS_FILE`].
struct Weight {
    name: String,
    dims: Vec<usize>,
    offset: u64,
}

/// Copies every weight the graphs use, widened to f32, into `path`; checks each shape.
fn write_weights(spec: &ModelSpec, file: &TensorFile, path: &Path) -> Result<Vec<Weight>> {
    let (e, d, inter, v) = (spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.vocab_size);
    let mut wanted: Vec<(String, Vec<usize>)> = vec![("embed".into(), vec![v, e])];
    for l in 0..spec.num_layers {
        let n = |s: &str| format!("layers.{l}.{s}");
        wanted.push((n("attn_norm"), vec![e]));
        wanted.push((n("wqkv"), vec![spec.qkv_rows(), e]));
        if spec.qkv_bias {
            wanted.push((n("bqkv"), vec![spec.qkv_rows()]));
        }
        if spec.qk_norm {
            wanted.push((n("q_norm"), vec![d]));
            wanted.push((n("k_norm"), vec![d]));
        }
        wanted.push((n("wo"), vec![e, spec.num_heads * d]));
        wanted.push((n("mlp_norm"), vec![e]));
        wanted.push((n("w_gate_up"), vec![2 * inter, e]));
        wanted.push((n("w_down"), vec![e, inter]));
    }
    wanted.push(("final_norm".into(), vec![e]));
    if !spec.tie_word_embeddings {
        wanted.push(("lm_head".into(), vec![v, e]));
    }
    let out = File::create(path).map_err(|err| io_error(path, err))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut offset = 0u64;
    let mut table = Vec::with_capacity(wanted.len());
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for (name, dims) in wanted {
        let t = file.get(&name)?;
        if t.shape != dims.as_slice() {
            return Err(Error::TensorMismatch {
                path: file.path().into(),
                name,
                what: "shape",
                expected: format!("{dims:?}"),
                actual: format!("{:?}", t.shape),
            });
        }
        values.resize(dims.iter().product(), 0f32);
        t.to_f32(&mut values);
        bytes.clear();
        bytes.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        bytes.resize(bytes.len().next_multiple_of(ALIGN as usize), 0);
        out.write_all(&bytes).map_err(|err| io_error(path, err))?;
        table.push(Weight { name, dims, offset });
        offset += bytes.len() as u64;
    }
    out.flush().map_err(|err| io_error(path, err))?;
    Ok(table)
}

/// Builds the graphs of one engine.
struct Exporter<'a> {
    spec: &'a ModelSpec,
    policy: Policy,
    budgets: &'a Budgets,
    inv_freq: Vec<f32>,
    weights: Vec<Weight>,
}

impl Exporter<'_> {
    fn graph(&self, graph: &str, flavour: Flavour) -> super::proto::ModelProto {
        let mut g = Graph::new(flavour);
        for w in &self.weights {
            g.external_f32(&w.name, &w.dims, WEIGHTS_FILE, w.offset);
        }
        match graph {
            "prefill" => self.prefill(&mut g),
            CACHED_DECODE => self.decode_cached(&mut g),
            _ => self.decode(&mut g),
        }
        let b = self.budgets;
        let metadata = [
            ("fastkv.graph", graph.to_string()),
            ("fastkv.num_layers", self.spec.num_layers.to_string()),
            ("fastkv.tsp_layer", self.policy.tsp_layer.to_string()),
            ("fastkv.window", self.policy.window.to_string()),
            ("fastkv.min_prompt_len", b.min_prompt_len.to_string()),
            ("fastkv.max_prompt_len", b.max_prompt_len.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v));
        g.into_model(&format!("fastkv_{graph}"), &metadata)
    }

    fn heads(&self) -> (usize, usize, usize) {
        (self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim)
    }

    fn attention_op(&self, mode: AttentionMode) -> FastKvOp {
        let (n_heads, n_kv_heads, head_dim) = self.heads();
        FastKvOp::Attention {
            n_heads,
            n_kv_heads,
            head_dim,
            mode,
            sliding_window: self.spec.sliding_window.unwrap_or(0),
        }
    }

    /// input_ids [L] → logits [V], per layer k_l, v_l [Hk, C_l, D] and pos_l [Hk, C_l], tsp_positions [T].
    fn prefill(&self, g: &mut Graph) {
        let (n_heads, n_kv_heads, head_dim) = self.heads();
        let (w, star, n_layers) = (self.policy.window, self.policy.tsp_layer, self.spec.num_layers);
        let ids = g.input("input_ids", INT64, &[Dim::Named("L".into())]);
        let mut x = g.op("Gather", &["embed", &ids], vec![attr("axis", 0)]);
        let mut pos = {
            let len = g.op("Shape", &[&ids], vec![]);
            let len = g.op("Squeeze", &[&len], vec![]);
            let (zero, one) = (g.scalar_i64(0), g.scalar_i64(1));
            g.op("Range", &[&zero, &len, &one], vec![])
        };
        let mut rope = self.rope(g, &pos);
        let pool = match self.policy.pool {
            Pool::Avg => PoolAttr::Avg,
            Pool::Max => PoolAttr::Max,
        };
        for l in 0..n_layers {
            g.scoped(&format!("layers.{l}"), |g| {
                let last = l + 1 == n_layers;
                let (q, k, v) = self.qkv(g, l, &x, &rope);
                let kv_shape = g.const_i64(&[n_kv_heads as i64, 1]);
                let row = {
                    let axes = g.const_i64(&[0]);
                    g.op("Unsqueeze", &[&pos, &axes], vec![])
                };
                let k_pos = g.op("Tile", &[&row, &kv_shape], vec![]);
                // Only the last row reaches the LM head, so the last layer attends for it alone.
                let (q_rows, q_pos) =
                    if last { (slice_last(g, &q, 1), slice_last(g, &pos, 0)) } else { (q.clone(), pos.clone()) };
                let att = g.fastkv(&self.attention_op(AttentionMode::Prefill), &[&q_rows, &k, &v, &q_pos, &k_pos]);
                let q_window = {
                    let (start, end, axes) = (g.const_i64(&[-(w as i64)]), g.const_i64(&[i64::MAX]), g.const_i64(&[1]));
                    g.op("Slice", &[&q, &start, &end, &axes], vec![])
                };
                // The attention's normalisers are the window softmax's only without a sliding window.
                let mut score_inputs = vec![q_window.as_str(), k.as_str()];
                if self.spec.sliding_window.is_none() && !last {
                    score_inputs.push(&att[1]);
                }
                let tsp = l == star;
                let scores_op = FastKvOp::WindowScores {
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    window: w,
                    kernel: self.policy.kernel,
                    pool,
                    tsp_sum: tsp,
                };
                let scores = g.fastkv(&scores_op, &score_inputs);
                let (num, den) = if l <= star { self.budgets.retain } else { self.budgets.post_tsp };
                let keep = g.fastkv(&FastKvOp::TopK { num, den, window: w }, &[&scores[0]]).remove(0);
                let k_kept = g.fastkv(&FastKvOp::Gather, &[&k, &keep]).remove(0);
                let v_kept = g.fastkv(&FastKvOp::Gather, &[&v, &keep]).remove(0);
                let pos_kept = g.op("Gather", &[&pos, &keep], vec![attr("axis", 0)]);
                let c = Dim::Named(if l <= star { "C".into() } else { "C_after_tsp".into() });
                let kv_dims = [Dim::Fixed(n_kv_heads), c.clone(), Dim::Fixed(head_dim)];
                g.output(&k_kept, &format!("k_{l}"), FLOAT, &kv_dims);
                g.output(&v_kept, &format!("v_{l}"), FLOAT, &kv_dims);
                g.output(&pos_kept, &format!("pos_{l}"), INT64, &[Dim::Fixed(n_kv_heads), c]);

                let x_rows = if last { slice_last(g, &x, 0) } else { x.clone() };
                x = self.finish_layer(g, l, &x_rows, &att[0]);
                if tsp {
                    let axes = g.const_i64(&[0]);
                    let total = g.op("Unsqueeze", &[&scores[1], &axes], vec![]);
                    let (num, den) = self.budgets.tsp;
                    let rows = g.fastkv(&FastKvOp::TopK { num, den, window: w }, &[&total]).remove(0);
                    let x3 = g.op("Unsqueeze", &[&x, &axes], vec![]);
                    let kept = g.fastkv(&FastKvOp::Gather, &[&x3, &rows]).remove(0);
                    x = g.op("Squeeze", &[&kept, &axes], vec![]);
                    let flat = g.op("Squeeze", &[&rows, &axes], vec![]);
                    pos = g.op("Gather", &[&pos, &flat], vec![attr("axis", 0)]);
                    g.output(&pos, "tsp_positions", INT64, &[Dim::Named("T".into())]);
                    rope = self.rope(g, &pos);
                }
            });
        }
        let logits = self.logits(g, &x);
        g.output(&logits, "logits", FLOAT, &[Dim::Fixed(self.spec.vocab_size)]);
    }

    /// The inputs both decode graphs start from, `input_id` [1] and `position` [1]: the token's embedding
    /// row, the position and its RoPE tables.
    fn one_token(&self, g: &mut Graph) -> (String, String, RopeTables) {
        let id = g.input("input_id", INT64, &[Dim::Fixed(1)]);
        let position = g.input("position", INT64, &[Dim::Fixed(1)]);
        let x = g.op("Gather", &["embed", &id], vec![attr("axis", 0)]);
        let rope = self.rope(g, &position);
        (x, position, rope)
    }

    /// input_id [1], position [1], per layer past_k_l, past_v_l [Hk, N_l, D], past_pos_l [Hk, N_l]
    /// → logits [V], present_k_l, present_v_l, present_pos_l (one entry appended).
    fn decode(&self, g: &mut Graph) {
        let (_, n_kv_heads, head_dim) = self.heads();
        let (mut x, position, rope) = self.one_token(g);
        for l in 0..self.spec.num_layers {
            let (past, present) = (Dim::Named(format!("N_{l}")), Dim::Named(format!("N_{l}_plus_1")));
            let kv = |n: &Dim| [Dim::Fixed(n_kv_heads), n.clone(), Dim::Fixed(head_dim)];
            let past_k = g.input(&format!("past_k_{l}"), FLOAT, &kv(&past));
            let past_v = g.input(&format!("past_v_{l}"), FLOAT, &kv(&past));
            let past_pos = g.input(&format!("past_pos_{l}"), INT64, &[Dim::Fixed(n_kv_heads), past.clone()]);
            g.scoped(&format!("layers.{l}"), |g| {
                let (q, k, v) = self.qkv(g, l, &x, &rope);
                let append = |g: &mut Graph, a: &str, b: &str| g.op("Concat", &[a, b], vec![attr("axis", 1)]);
                let k_all = append(g, &past_k, &k);
                let v_all = append(g, &past_v, &v);
                let new_pos = {
                    let (axes, reps) = (g.const_i64(&[0]), g.const_i64(&[n_kv_heads as i64, 1]));
                    let row = g.op("Unsqueeze", &[&position, &axes], vec![]);
                    g.op("Tile", &[&row, &reps], vec![])
                };
                let pos_all = append(g, &past_pos, &new_pos);
                let att =
                    g.fastkv(&self.attention_op(AttentionMode::Decode), &[&q, &k_all, &v_all, &position, &pos_all]);
                g.output(&k_all, &format!("present_k_{l}"), FLOAT, &kv(&present));
                g.output(&v_all, &format!("present_v_{l}"), FLOAT, &kv(&present));
                g.output(&pos_all, &format!("present_pos_{l}"), INT64, &[Dim::Fixed(n_kv_heads), present.clone()]);
                x = self.finish_layer(g, l, &x, &att[0]);
            });
        }
        let logits = self.logits(g, &x);
        g.output(&logits, "logits", FLOAT, &[Dim::Fixed(self.spec.vocab_size)]);
    }

    /// input_id [1], position [1], per layer k_cache_l, v_cache_l [Hk, C_l, D] f16, cache_pos_l [Hk, C_l] and
    /// cache_len_l [1] int32 → logits [V]; each layer's step appends to its cache in place.
    fn decode_cached(&self, g: &mut Graph) {
        let (n_heads, n_kv_heads, head_dim) = self.heads();
        let (mut x, position, rope) = self.one_token(g);
        let step = FastKvOp::CacheAttention {
            n_heads,
            n_kv_heads,
            head_dim,
            sliding_window: self.spec.sliding_window.unwrap_or(0),
        };
        for l in 0..self.spec.num_layers {
            let c = Dim::Named(format!("C_{l}"));
            let kv = [Dim::Fixed(n_kv_heads), c.clone(), Dim::Fixed(head_dim)];
            let k_cache = g.input(&format!("k_cache_{l}"), FLOAT16, &kv);
            let v_cache = g.input(&format!("v_cache_{l}"), FLOAT16, &kv);
            let cache_pos = g.input(&format!("cache_pos_{l}"), INT32, &[Dim::Fixed(n_kv_heads), c]);
            let cache_len = g.input(&format!("cache_len_{l}"), INT32, &[Dim::Fixed(1)]);
            g.scoped(&format!("layers.{l}"), |g| {
                let (q, k, v) = self.qkv(g, l, &x, &rope);
                // q | k | v of the one token as one row, heads in order: [1, (H + 2·Hk)·D].
                let row = g.const_i64(&[1, -1]);
                let parts = [&q, &k, &v].map(|t| g.op("Reshape", &[t, &row], vec![]));
                let qkv = g.op("Concat", &[&parts[0], &parts[1], &parts[2]], vec![attr("axis", 1)]);
                let att = g.fastkv(&step, &[&qkv, &k_cache, &v_cache, &cache_pos, &cache_len, &position]);
                x = self.finish_layer(g, l, &x, &att[0]);
            });
        }
        let logits = self.logits(g, &x);
        g.output(&logits, "logits", FLOAT, &[Dim::Fixed(self.spec.vocab_size)]);
    }

    /// RMSNorm over the last axis of `x` with weight `weight`, as `cpu::kernels::rms_norm_row`.
    fn rms_norm(&self, g: &mut Graph, x: &str, weight: &str) -> String {
        let sq = g.op("Mul", &[x, x], vec![]);
        let axes = g.const_i64(&[-1]);
        let mean = g.op("ReduceMean", &[&sq, &axes], vec![attr("keepdims", 1)]);
        let eps = g.const_f32(&[], &[self.spec.rms_norm_eps as f32]);
        let var = g.op("Add", &[&mean, &eps], vec![]);
        let rms = g.op("Sqrt", &[&var], vec![]);
        let inv = g.op("Reciprocal", &[&rms], vec![]);
        let scaled = g.op("Mul", &[x, &inv], vec![]);
        g.op("Mul", &[weight, &scaled], vec![])
    }

    /// cos, sin `[S, 1, D/2]` of positions `pos` (`[S]` int64).
    fn rope(&self, g: &mut Graph, pos: &str) -> RopeTables {
        let p = g.op("Cast", &[pos], vec![attr("to", FLOAT as i64)]);
        let axes = g.const_i64(&[1]);
        let p = g.op("Unsqueeze", &[&p, &axes], vec![]);
        let freq = g.const_f32(&[1, self.inv_freq.len()], &self.inv_freq);
        let angle = g.op("Mul", &[&p, &freq], vec![]);
        let cos = g.op("Cos", &[&angle], vec![]);
        let sin = g.op("Sin", &[&angle], vec![]);
        RopeTables { cos: g.op("Unsqueeze", &[&cos, &axes], vec![]), sin: g.op("Unsqueeze", &[&sin, &axes], vec![]) }
    }

    /// Rotate-half RoPE of `x` (`[S, heads, D]`).
    fn rotate(&self, g: &mut Graph, x: &str, rope: &RopeTables) -> String {
        let half = (self.spec.head_dim / 2) as i64;
        let a = slice(g, x, 2, 0, half);
        let b = slice(g, x, 2, half, 2 * half);
        let (a_cos, b_sin) = (g.op("Mul", &[&a, &rope.cos], vec![]), g.op("Mul", &[&b, &rope.sin], vec![]));
        let (b_cos, a_sin) = (g.op("Mul", &[&b, &rope.cos], vec![]), g.op("Mul", &[&a, &rope.sin], vec![]));
        let ra = g.op("Sub", &[&a_cos, &b_sin], vec![]);
        let rb = g.op("Add", &[&b_cos, &a_sin], vec![]);
        g.op("Concat", &[&ra, &rb], vec![attr("axis", 2)])
    }

    /// q `[H, S, D]`, k and v `[Hk, S, D]` of layer `l` for hidden rows `x` (`[S, E]`): norm, fused
    /// projection (+ bias), q/k norm, RoPE.
    fn qkv(&self, g: &mut Graph, l: usize, x: &str, rope: &RopeTables) -> (String, String, String) {
        let (h, hk, d) = self.heads();
        let (h, hk, d) = (h as i64, hk as i64, d as i64);
        let w = |s: &str| format!("layers.{l}.{s}");
        let normed = self.rms_norm(g, x, &w("attn_norm"));
        let (wqkv, bqkv) = (w("wqkv"), w("bqkv"));
        let mut inputs = vec![normed.as_str(), wqkv.as_str()];
        if self.spec.qkv_bias {
            inputs.push(&bqkv);
        }
        let fused = g.op("Gemm", &inputs, vec![attr("transB", 1)]);
        let split = |g: &mut Graph, from: i64, heads: i64| {
            let part = slice(g, &fused, 1, from * d, (from + heads) * d);
            let shape = g.const_i64(&[-1, heads, d]);
            g.op("Reshape", &[&part, &shape], vec![])
        };
        let (mut q, mut k, v) = (split(g, 0, h), split(g, h, hk), split(g, h + hk, hk));
        if self.spec.qk_norm {
            q = self.rms_norm(g, &q, &w("q_norm"));
            k = self.rms_norm(g, &k, &w("k_norm"));
        }
        let (q, k) = (self.rotate(g, &q, rope), self.rotate(g, &k, rope));
        let heads_first = |g: &mut Graph, x: &str| g.op("Transpose", &[x], vec![attr_ints("perm", &[1, 0, 2])]);
        (heads_first(g, &q), heads_first(g, &k), heads_first(g, &v))
    }

    /// x + o·Woᵀ, then + MLP(RMSNorm(x)) (SwiGLU), for rows `x` (`[M, E]`) and attention `o` (`[H, M, D]`).
    fn finish_layer(&self, g: &mut Graph, l: usize, x: &str, o: &str) -> String {
        let w = |s: &str| format!("layers.{l}.{s}");
        let (h, _, d) = self.heads();
        let inter = self.spec.intermediate_size as i64;
        let rows = g.op("Transpose", &[o], vec![attr_ints("perm", &[1, 0, 2])]);
        let shape = g.const_i64(&[-1, (h * d) as i64]);
        let rows = g.op("Reshape", &[&rows, &shape], vec![]);
        let proj = g.op("Gemm", &[&rows, &w("wo")], vec![attr("transB", 1)]);
        let x = g.op("Add", &[x, &proj], vec![]);
        let normed = self.rms_norm(g, &x, &w("mlp_norm"));
        let gate_up = g.op("Gemm", &[&normed, &w("w_gate_up")], vec![attr("transB", 1)]);
        let gate = slice(g, &gate_up, 1, 0, inter);
        let up = slice(g, &gate_up, 1, inter, 2 * inter);
        let sig = g.op("Sigmoid", &[&gate], vec![]);
        let silu = g.op("Mul", &[&gate, &sig], vec![]);
        let act = g.op("Mul", &[&silu, &up], vec![]);
        let down = g.op("Gemm", &[&act, &w("w_down")], vec![attr("transB", 1)]);
        g.op("Add", &[&x, &down], vec![])
    }

    /// Final norm and LM head of the one row `x` (`[1, E]`): `[V]`.
    fn logits(&self, g: &mut Graph, x: &str) -> String {
        let normed = self.rms_norm(g, x, "final_norm");
        let head = if self.spec.tie_word_embeddings { "embed" } else { "lm_head" };
        let logits = g.op("Gemm", &[&normed, head], vec![attr("transB", 1)]);
        let shape = g.const_i64(&[-1]);
        g.op("Reshape", &[&logits, &shape], vec![])
    }
}

/// RoPE tables of one sequence of positions.
struct RopeTables {
    cos: String,
    sin: String,
}

/// `x[.., start..end, ..]` along `axis`.
fn slice(g: &mut Graph, x: &str, axis: i64, start: i64, end: i64) -> String {
    let (s, e, a) = (g.const_i64(&[start]), g.const_i64(&[end]), g.const_i64(&[axis]));
    g.op("Slice", &[x, &s, &e, &a], vec![])
}

/// The last entry of `x` along `axis`, keeping the axis.
fn slice_last(g: &mut Graph, x: &str, axis: i64) -> String {
    slice(g, x, axis, -1, i64::MAX)
}

/// The flag every export error names (one place, to follow the library's error type).
fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid("export_onnx", msg.into())
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::io(path, e)
}
