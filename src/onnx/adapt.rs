//! The plugin flavour of a FastKV step: its custom-op node with the adapters between the graph's
//! tensor contract ([`super::ops`]: head-major f32 activations, int64 indices) and the TensorRT
//! plugins' (tensorrt/README.md: token-major f16/bf16 activations, int32 indices). The adapters are
//! standard nodes in the step's scope, so the flavours still differ only inside FastKV steps; TensorRT
//! fuses the casts and transposes into the neighbouring layers. Activations are fed as f16 for every
//! engine: the graph computes in f32 (bf16 engines widened), and f16 keeps three more mantissa bits
//! than bf16 at the attention and scoring inputs, whose ranges (normed, rotated q/k; v) fit it.

use super::proto::{FLOAT, FLOAT16, INT32, INT64};
use super::{attr, attr_ints, AttentionMode, Dim, FastKvOp, Graph};

/// The outputs of the step `op` (custom-op node `name`) on `inputs`, in the graph's contract.
pub(super) fn plugin(g: &mut Graph, op: &FastKvOp, name: &str, inputs: &[&str]) -> Vec<String> {
    use Dim::{Any, Fixed};
    match *op {
        FastKvOp::Attention { n_heads: h, n_kv_heads: hk, head_dim: d, mode: AttentionMode::Prefill, .. } => {
            let q = half_token_major(g, inputs[0]);
            let k = half_token_major(g, inputs[1]);
            let v = half_token_major(g, inputs[2]);
            let (q_pos, k_pos) = (int32(g, inputs[3]), int32(g, inputs[4]));
            let declared = [
                (FLOAT16, vec![Any, Fixed(h), Fixed(d)]),
                (FLOAT16, vec![Any, Fixed(hk), Fixed(d)]),
                (FLOAT16, vec![Any, Fixed(hk), Fixed(d)]),
                (INT32, vec![Any]),
                (INT32, vec![Fixed(hk), Any]),
                (FLOAT16, vec![Any, Fixed(h), Fixed(d)]),
                (FLOAT, vec![Fixed(h), Any]),
            ];
            let outs = g.plugin_node(op, name, &[&q, &k, &v, &q_pos, &k_pos], &declared);
            let out = float(g, &outs[0]);
            vec![token_major(g, &out), outs[1].clone()]
        }
        FastKvOp::Attention { n_heads: h, n_kv_heads: hk, head_dim: d, mode: AttentionMode::Decode, .. } => {
            // The one query row: q [H, 1, D] is the plugin's [H, D].
            let q = g.op("Flatten", &[inputs[0]], vec![attr("axis", 1)]);
            let q = half(g, &q);
            let (k, v) = (half(g, inputs[1]), half(g, inputs[2]));
            let (q_pos, k_pos) = (int32(g, inputs[3]), int32(g, inputs[4]));
            let declared = [
                (FLOAT16, vec![Fixed(h), Fixed(d)]),
                (FLOAT16, vec![Fixed(hk), Any, Fixed(d)]),
                (FLOAT16, vec![Fixed(hk), Any, Fixed(d)]),
                (INT32, vec![Fixed(1)]),
                (INT32, vec![Fixed(hk), Any]),
                (FLOAT16, vec![Fixed(h), Fixed(d)]),
            ];
            let outs = g.plugin_node(op, name, &[&q, &k, &v, &q_pos, &k_pos], &declared);
            let out = float(g, &outs[0]);
            let axes = g.const_i64(&[1]);
            vec![g.op("Unsqueeze", &[&out, &axes], vec![])]
        }
        FastKvOp::CacheAttention { n_heads: h, n_kv_heads: hk, head_dim: d, .. } => {
            // The caches are the graph's own inputs in the plugin's types: a Cast would update a copy.
            let qkv = half(g, inputs[0]);
            let pos = int32(g, inputs[5]);
            let declared = [
                (FLOAT16, vec![Fixed(1), Fixed((h + 2 * hk) * d)]),
                (FLOAT16, vec![Fixed(hk), Any, Fixed(d)]),
                (FLOAT16, vec![Fixed(hk), Any, Fixed(d)]),
                (INT32, vec![Fixed(hk), Any]),
                (INT32, vec![Fixed(1)]),
                (INT32, vec![Fixed(1)]),
                (FLOAT16, vec![Fixed(h), Fixed(d)]),
            ];
            let outs = g.plugin_node(op, name, &[&qkv, inputs[1], inputs[2], inputs[3], inputs[4], &pos], &declared);
            let out = float(g, &outs[0]);
            let axes = g.const_i64(&[1]);
            vec![g.op("Unsqueeze", &[&out, &axes], vec![])]
        }
        FastKvOp::WindowScores { n_heads: h, n_kv_heads: hk, head_dim: d, window, tsp_sum, .. } => {
            let q_window = half(g, inputs[0]);
            let keys = half_token_major(g, inputs[1]);
            let mut adapted = vec![q_window.as_str(), keys.as_str()];
            let mut declared =
                vec![(FLOAT16, vec![Fixed(h), Fixed(window), Fixed(d)]), (FLOAT16, vec![Any, Fixed(hk), Fixed(d)])];
            if let Some(lse) = inputs.get(2) {
                adapted.push(lse);
                declared.push((FLOAT, vec![Fixed(h), Any]));
            }
            declared.push((FLOAT, vec![Fixed(hk), Any]));
            if tsp_sum {
                declared.push((FLOAT, vec![Any]));
            }
            g.plugin_node(op, name, &adapted, &declared)
        }
        FastKvOp::TopK { .. } => {
            let declared = [(FLOAT, vec![Any, Any]), (INT32, vec![Any, Any])];
            let idx = g.plugin_node(op, name, inputs, &declared).remove(0);
            vec![g.op("Cast", &[&idx], vec![attr("to", INT64 as i64)])]
        }
        FastKvOp::Gather => {
            // The plugin reads src row-major by row: [R, B, E].
            let src = token_major(g, inputs[0]);
            let idx = int32(g, inputs[1]);
            let declared = [(FLOAT, vec![Any, Any, Any]), (INT32, vec![Any, Any]), (FLOAT, vec![Any, Any, Any])];
            g.plugin_node(op, name, &[&src, &idx], &declared)
        }
    }
}

/// `[A, B, E]` → `[B, A, E]` (head-major ↔ token-major).
fn token_major(g: &mut Graph, x: &str) -> String {
    g.op("Transpose", &[x], vec![attr_ints("perm", &[1, 0, 2])])
}

fn half_token_major(g: &mut Graph, x: &str) -> String {
    let t = token_major(g, x);
    half(g, &t)
}

fn half(g: &mut Graph, x: &str) -> String {
    g.op("Cast", &[x], vec![attr("to", FLOAT16 as i64)])
}

fn float(g: &mut Graph, x: &str) -> String {
    g.op("Cast", &[x], vec![attr("to", FLOAT as i64)])
}

fn int32(g: &mut Graph, x: &str) -> String {
    g.op("Cast", &[x], vec![attr("to", INT32 as i64)])
}
