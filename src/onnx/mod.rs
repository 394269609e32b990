//! The network as ONNX, for TensorRT's ONNX parser (docs/architecture.md, "Decisions": TensorRT through ONNX).
//!
//! [`export`] writes an engine's model in two flavours from one graph description: with the FastKV
//! steps as custom-op nodes of domain [`DOMAIN`] (what TensorRT builds with the plugin library), and
//! with each of those nodes lowered to standard ONNX ops of identical semantics ([`lower`]), which
//! stock onnxruntime runs on a CPU — so the network definition is checked against the CPU engine here
//! even though no TensorRT builder exists here. This module is the graph builder both use: it names
//! every node after its scope with a per-scope counter, so a lowering (emitted in the scope of the
//! node it replaces) leaves every other node of the graph byte-identical between the flavours.

mod adapt;
pub mod export;
mod lower;
pub mod proto;

use std::collections::HashMap;

use proto::{
    AttributeProto, DimValue, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
};

/// Standard ONNX opset of every exported graph.
pub const OPSET: i64 = 18;
/// IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 8;
/// Domain of the FastKV custom ops (the TensorRT plugins' namespace).
pub const DOMAIN: &str = "fastkv";
/// Version of [`DOMAIN`] imported by the graphs.
pub const DOMAIN_VERSION: i64 = 1;

/// The FastKV custom ops, named as the TensorRT plugins are (one place, so a rename is one edit).
/// Attributes are all integers.
pub mod ops {
    /// `(q_window [H, W, D], keys [Hk, S, D], lse [H, S] optional)` → `group scores [Hk, S−W]` f32
    /// (+ the TSP sum over KV heads `[S−W]` when two outputs are asked for). Softmax rows span all
    /// S keys, causal inside the W×W tail; `lse`, when given, is that normaliser of each query row
    /// (the causal attention's, columns S−W.. are read). Attributes: n_heads, n_kv_heads, head_dim,
    /// window, kernel, pool (0 avg with zero padding divided by K, 1 max), pooled per query head then
    /// summed over the GQA group.
    pub const WINDOW_SCORES: &str = "FastKVWindowScores";
    /// `(scores [rows, n])` → `indices [rows, k+W]` int64: the top k = clamp(⌊S·num/den⌋, W, S) − W
    /// (S = n + W) of each row, ties to the lower index, ascending, then the window n..n+W−1.
    /// Attributes: rate_num, rate_den (num, den), window — the plugin's field names.
    pub const TOP_K: &str = "FastKVTopK";
    /// `(src [B, R, E], idx [B, K] int64)` → `dst [B, K, E]`, `dst[b, r, :] = src[b, idx[b, r], :]`.
    pub const GATHER: &str = "FastKVGather";
    /// `(q [H, M, D], k [Hk, N, D], v [Hk, N, D], q_pos [M] int64, k_pos [Hk, N] int64)` →
    /// `(out [H, M, D], lse [H, M])` (decode: `out` only): GQA attention (query head h reads KV head h/(H/Hk)), scaled by
    /// 1/√D, `lse` the natural-log normaliser of each row. mode 0 (prefill): causal by index, query
    /// row i is key row N−M+i; mode 1 (decode): every key is visible. sliding_window > 0 also hides
    /// keys with q_pos − k_pos ≥ sliding_window. Attributes: n_heads, n_kv_heads, head_dim, mode,
    /// sliding_window.
    pub const ATTENTION: &str = "FastKVAttention";
    /// `(qkv [1, (H+2·Hk)·D], k_cache, v_cache [Hk, C, D], cache_pos [Hk, C], cache_len [1], pos [1])` →
    /// `out [H, D]`: one decode step on a preallocated cache, updated in place (the new K/V go to slot
    /// `cache_len`, which grows by one; q attends over the entries). Only in `decode_cached.onnx`, which
    /// has no lowered flavour: an in-place update is not an ONNX operation. Attributes: n_heads,
    /// n_kv_heads, head_dim, sliding_window.
    pub const CACHE_ATTENTION: &str = "FastKVCacheAttention";
}

/// Pooling of [`ops::WINDOW_SCORES`] (its `pool` attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolAttr {
    Avg = 0,
    Max = 1,
}

/// Masking of [`ops::ATTENTION`] (its `mode` attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMode {
    Prefill = 0,
    Decode = 1,
}

/// One FastKV step with its attributes (see [`ops`] for the semantics).
#[derive(Clone, Copy, Debug)]
pub enum FastKvOp {
    WindowScores {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        window: usize,
        kernel: usize,
        pool: PoolAttr,
        tsp_sum: bool,
    },
    TopK {
        num: i64,
        den: i64,
        window: usize,
    },
    Gather,
    Attention {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        mode: AttentionMode,
        sliding_window: usize,
    },
    CacheAttention {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        sliding_window: usize,
    },
}

impl FastKvOp {
    pub fn op_type(&self) -> &'static str {
        match self {
            FastKvOp::WindowScores { .. } => ops::WINDOW_SCORES,
            FastKvOp::TopK { .. } => ops::TOP_K,
            FastKvOp::Gather => ops::GATHER,
            FastKvOp::Attention { .. } => ops::ATTENTION,
            FastKvOp::CacheAttention { .. } => ops::CACHE_ATTENTION,
        }
    }

    pub fn outputs(&self) -> usize {
        match self {
            FastKvOp::WindowScores { tsp_sum, .. } => 1 + *tsp_sum as usize,
            FastKvOp::TopK { .. } | FastKvOp::Gather | FastKvOp::CacheAttention { .. } => 1,
            FastKvOp::Attention { mode, .. } => 1 + (*mode == AttentionMode::Prefill) as usize,
        }
    }

    pub fn attrs(&self) -> Vec<AttributeProto> {
        let n = |v: usize| v as i64;
        match *self {
            FastKvOp::WindowScores { n_heads, n_kv_heads, head_dim, window, kernel, pool, tsp_sum } => vec![
                attr("n_heads", n(n_heads)),
                attr("n_kv_heads", n(n_kv_heads)),
                attr("head_dim", n(head_dim)),
                attr("window", n(window)),
                attr("kernel", n(kernel)),
                attr("pool", pool as i64),
                attr("tsp", tsp_sum as i64),
            ],
            FastKvOp::TopK { num, den, window } => {
                vec![attr("rate_num", num), attr("rate_den", den), attr("window", n(window))]
            }
            FastKvOp::Gather => Vec::new(),
            FastKvOp::Attention { n_heads, n_kv_heads, head_dim, mode, sliding_window } => vec![
                attr("n_heads", n(n_heads)),
                attr("n_kv_heads", n(n_kv_heads)),
                attr("head_dim", n(head_dim)),
                attr("mode", mode as i64),
                attr("sliding_window", n(sliding_window)),
            ],
            FastKvOp::CacheAttention { n_heads, n_kv_heads, head_dim, sliding_window } => vec![
                attr("n_heads", n(n_heads)),
                attr("n_kv_heads", n(n_kv_heads)),
                attr("head_dim", n(head_dim)),
                attr("sliding_window", n(sliding_window)),
            ],
        }
    }
}

/// Which graph [`Graph`] writes for a FastKV step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// Custom-op nodes of domain [`DOMAIN`] (TensorRT with the plugin library).
    Plugin,
    /// Standard ONNX ops of the same semantics (onnxruntime, any ONNX runtime).
    Reference,
}

impl Flavour {
    /// File name of a graph (`prefill`, `decode`) in this flavour.
    pub fn file_name(self, graph: &str) -> String {
        match self {
            Flavour::Plugin => format!("{graph}.onnx"),
            Flavour::Reference => format!("{graph}.reference.onnx"),
        }
    }
}

/// A dimension of a graph input or output.
#[derive(Clone, Debug)]
pub enum Dim {
    Fixed(usize),
    /// Dynamic, named (e.g. `L`).
    Named(String),
    /// Dynamic, unnamed (a plugin node's tensor whose extent the op's attributes do not fix).
    Any,
}

/// An integer attribute of a node.
pub fn attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: proto::ATTR_INT, i: value, ..Default::default() }
}

/// An integer-list attribute of a node.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: proto::ATTR_INTS, ints: values.to_vec(), ..Default::default() }
}

/// A graph under construction. Values are tensor names.
pub struct Graph {
    flavour: Flavour,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    value_info: Vec<ValueInfoProto>,
    /// Name prefix of the nodes being emitted ("" at the top), and each scope's node counter.
    scope: String,
    counters: HashMap<String, usize>,
}

impl Graph {
    pub fn new(flavour: Flavour) -> Self {
        Graph {
            flavour,
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            value_info: Vec::new(),
            scope: String::new(),
            counters: HashMap::new(),
        }
    }

    /// Runs `body` with nodes named `name/…`, e.g. one transformer layer.
    pub fn scoped<R>(&mut self, name: &str, body: impl FnOnce(&mut Self) -> R) -> R {
        let inner = self.child(name);
        let outer = std::mem::replace(&mut self.scope, inner);
        let r = body(self);
        self.scope = outer;
        r
    }

    fn child(&self, name: &str) -> String {
        if self.scope.is_empty() {
            name.into()
        } else {
            format!("{}/{name}", self.scope)
        }
    }

    /// A fresh node name in the current scope.
    fn fresh(&mut self, what: &str) -> String {
        let n = self.counters.entry(self.scope.clone()).or_default();
        *n += 1;
        let local = format!("{what}{n}");
        self.child(&local)
    }

    /// Appends a node of the standard domain with one output.
    pub fn op(&mut self, op_type: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.op_n(op_type, inputs, 1, attrs).remove(0)
    }

    /// Appends a node of the standard domain with `outputs` outputs.
    pub fn op_n(&mut self, op_type: &str, inputs: &[&str], outputs: usize, attrs: Vec<AttributeProto>) -> Vec<String> {
        let name = self.fresh(op_type);
        let output = output_names(&name, outputs);
        self.push_node(name, "", op_type, inputs, output, attrs)
    }

    fn push_node(
        &mut self,
        name: String,
        domain: &str,
        op_type: &str,
        inputs: &[&str],
        output: Vec<String>,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: output.clone(),
            name,
            op_type: op_type.into(),
            domain: domain.into(),
            attribute: attrs,
        });
        output
    }

    /// A FastKV step, as nodes in the scope of the step's name ending in the same output names in both
    /// flavours: the custom-op node (named as the step) with the adapters to the plugin's tensor
    /// contract ([`Flavour::Plugin`], [`adapt`]), or its lowering to standard ops ([`Flavour::Reference`]).
    pub fn fastkv(&mut self, op: &FastKvOp, inputs: &[&str]) -> Vec<String> {
        let name = self.fresh(op.op_type());
        let names = output_names(&name, op.outputs());
        let local = name.rsplit('/').next().unwrap_or(&name).to_string();
        let flavour = self.flavour;
        self.scoped(&local, |g| {
            let values = match flavour {
                Flavour::Plugin => adapt::plugin(g, op, &name, inputs),
                Flavour::Reference => lower::lower(g, op, inputs),
            };
            for (value, target) in values.iter().zip(&names) {
                g.rename(value, target);
            }
        });
        names
    }

    /// The custom-op node `name` of `op` on `inputs`, declaring its inputs and outputs (value_info) as
    /// `declared` says: (element type, dims) of each input, then of each output.
    fn plugin_node(&mut self, op: &FastKvOp, name: &str, inputs: &[&str], declared: &[(i32, Vec<Dim>)]) -> Vec<String> {
        let output = output_names(&format!("{name}/plugin"), op.outputs());
        let output = self.push_node(name.into(), DOMAIN, op.op_type(), inputs, output, op.attrs());
        for (value, (elem_type, dims)) in inputs.iter().copied().chain(output.iter().map(String::as_str)).zip(declared)
        {
            self.value_info.push(value_info(value, *elem_type, dims));
        }
        output
    }

    /// An Identity node from `value` to the tensor called `target`.
    fn rename(&mut self, value: &str, target: &str) {
        let name = self.fresh("Identity");
        self.nodes.push(NodeProto {
            input: vec![value.into()],
            output: vec![target.into()],
            name,
            op_type: "Identity".into(),
            ..Default::default()
        });
    }

    /// An int64 constant of shape `[values.len()]`, in the current scope.
    pub fn const_i64(&mut self, values: &[i64]) -> String {
        self.constant(proto::INT64, vec![values.len() as i64], values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// An int64 scalar constant.
    pub fn scalar_i64(&mut self, value: i64) -> String {
        self.constant(proto::INT64, vec![], value.to_le_bytes().to_vec())
    }

    /// An f32 constant of shape `dims`.
    pub fn const_f32(&mut self, dims: &[usize], values: &[f32]) -> String {
        let dims = dims.iter().map(|&d| d as i64).collect();
        self.constant(proto::FLOAT, dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn constant(&mut self, data_type: i32, dims: Vec<i64>, raw_data: Vec<u8>) -> String {
        let name = self.fresh("const");
        self.initializers.push(TensorProto { dims, data_type, name: name.clone(), raw_data, ..Default::default() });
        name
    }

    /// An f32 initializer whose data lies in `location` (beside the graph) at `offset`.
    pub fn external_f32(&mut self, name: &str, dims: &[usize], location: &str, offset: u64) -> String {
        let length = dims.iter().product::<usize>() * 4;
        let entry = |key: &str, value: String| StringStringEntryProto { key: key.into(), value };
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: proto::FLOAT,
            name: name.into(),
            external_data: vec![
                entry("location", location.into()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ],
            data_location: proto::EXTERNAL,
            ..Default::default()
        });
        name.into()
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem_type, dims));
        name.into()
    }

    /// Declares `value` a graph output called `name` (through an Identity node).
    pub fn output(&mut self, value: &str, name: &str, elem_type: i32, dims: &[Dim]) {
        self.rename(value, name);
        self.outputs.push(value_info(name, elem_type, dims));
    }

    /// The finished model, with `metadata` as its metadata_props.
    pub fn into_model(self, name: &str, metadata: &[(String, String)]) -> ModelProto {
        let mut opset_import = vec![OperatorSetIdProto { domain: String::new(), version: OPSET }];
        if self.nodes.iter().any(|n| n.domain == DOMAIN) {
            opset_import.push(OperatorSetIdProto { domain: DOMAIN.into(), version: DOMAIN_VERSION });
        }
        ModelProto {
            ir_version: IR_VERSION,
            opset_import,
            producer_name: "fastkv".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: String::new(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.into(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                value_info: self.value_info,
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto { key: k.clone(), value: v.clone() })
                .collect(),
        }
    }
}

/// Output tensor names of node `name`: the name itself, or `name:i` for several.
fn output_names(name: &str, outputs: usize) -> Vec<String> {
    if outputs == 1 {
        vec![name.into()]
    } else {
        (0..outputs).map(|i| format!("{name}:{i}")).collect()
    }
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: match d {
                Dim::Fixed(n) => Some(DimValue::Value(*n as i64)),
                Dim::Named(s) => Some(DimValue::Param(s.clone())),
                Dim::Any => None,
            },
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type, shape: Some(TensorShapeProto { dim }) }),
        }),
    }
}
