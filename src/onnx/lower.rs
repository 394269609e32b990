//! The reference lowering: every FastKV custom op ([`super::ops`]) as standard ONNX ops (opset 18)
//! of the same semantics, so any ONNX runtime runs the graph. Written for clarity, not speed: GQA
//! attention materialises its `[Hk, G, M, N]` logits.

use super::{attr, attr_ints, AttentionMode, FastKvOp, Graph, PoolAttr};

/// The outputs of `op` applied to `inputs`, in the op's output order.
pub(super) fn lower(g: &mut Graph, op: &FastKvOp, inputs: &[&str]) -> Vec<String> {
    match *op {
        FastKvOp::Attention { n_heads, n_kv_heads, head_dim, mode, sliding_window } => {
            let heads = Heads { n_heads, n_kv_heads, head_dim };
            let (out, lse) = attention(g, &heads, mode, sliding_window, inputs);
            vec![out, lse]
        }
        FastKvOp::WindowScores { n_heads, n_kv_heads, head_dim, window, kernel, pool, tsp_sum } => {
            let heads = Heads { n_heads, n_kv_heads, head_dim };
            let grouped = window_scores(g, &heads, window, kernel, pool, inputs);
            let mut outs = vec![grouped.clone()];
            if tsp_sum {
                let axes = g.const_i64(&[0]);
                outs.push(g.op("ReduceSum", &[&grouped, &axes], vec![attr("keepdims", 0)]));
            }
            outs
        }
        FastKvOp::TopK { num, den, window } => vec![top_k(g, num, den, window, inputs[0])],
        FastKvOp::Gather => {
            let axes = g.const_i64(&[2]);
            let idx = g.op("Unsqueeze", &[inputs[1], &axes], vec![]);
            vec![g.op("GatherND", &[inputs[0], &idx], vec![attr("batch_dims", 1)])]
        }
        // Only decode_cached.onnx has it, and that graph is exported as plugin nodes alone.
        FastKvOp::CacheAttention { .. } => unreachable!("an in-place cache update has no lowering"),
    }
}

struct Heads {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Heads {
    fn group(&self) -> i64 {
        (self.n_heads / self.n_kv_heads) as i64
    }
}

/// `[1]` int64: the size of `x` along `axis`.
fn dim(g: &mut Graph, x: &str, axis: i64) -> String {
    g.op("Shape", &[x], vec![attr("start", axis), attr("end", axis + 1)])
}

/// `[Hk, G, M, N]` scaled logits of GQA queries `q` (`[H, M, D]`) against keys `k` (`[Hk, N, D]`).
fn gqa_logits(g: &mut Graph, heads: &Heads, q: &str, k: &str) -> String {
    let shape = g.const_i64(&[heads.n_kv_heads as i64, heads.group(), -1, heads.head_dim as i64]);
    let q4 = g.op("Reshape", &[q, &shape], vec![]);
    let kt = g.op("Transpose", &[k], vec![attr_ints("perm", &[0, 2, 1])]);
    let axes = g.const_i64(&[1]);
    let kt4 = g.op("Unsqueeze", &[&kt, &axes], vec![]);
    let raw = g.op("MatMul", &[&q4, &kt4], vec![]);
    let scale = g.const_f32(&[], &[1.0 / (heads.head_dim as f32).sqrt()]);
    g.op("Mul", &[&raw, &scale], vec![])
}

/// `[M, N]` bool, true where key j is after query i, query i being key row N − M + i.
fn causal_hidden(g: &mut Graph, q_rows: &str, keys: &str) -> String {
    let (zero, one) = (g.scalar_i64(0), g.scalar_i64(1));
    let m_dim = dim(g, q_rows, -2);
    let n_dim = dim(g, keys, -2);
    let squeeze = |g: &mut Graph, x: &str| g.op("Squeeze", &[x], vec![]);
    let (m, n) = (squeeze(g, &m_dim), squeeze(g, &n_dim));
    let rows = g.op("Range", &[&zero, &m, &one], vec![]);
    let cols = g.op("Range", &[&zero, &n, &one], vec![]);
    let offset = g.op("Sub", &[&n, &m], vec![]);
    let last_visible = g.op("Add", &[&rows, &offset], vec![]);
    let axes = g.const_i64(&[1]);
    let last_visible = g.op("Unsqueeze", &[&last_visible, &axes], vec![]);
    g.op("Greater", &[&cols, &last_visible], vec![])
}

/// `logits` with `hidden` entries set to −∞.
fn mask(g: &mut Graph, logits: &str, hidden: &str) -> String {
    let neg_inf = g.const_f32(&[], &[f32::NEG_INFINITY]);
    g.op("Where", &[hidden, &neg_inf, logits], vec![])
}

/// [`super::ops::ATTENTION`]: MatMul + mask + Softmax, and ReduceLogSumExp for the normalisers.
fn attention(
    g: &mut Graph,
    heads: &Heads,
    mode: AttentionMode,
    sliding_window: usize,
    inputs: &[&str],
) -> (String, String) {
    let [q, k, v, q_pos, k_pos] = [inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]];
    let mut logits = gqa_logits(g, heads, q, k);
    if mode == AttentionMode::Prefill {
        let hidden = causal_hidden(g, q, k);
        logits = mask(g, &logits, &hidden);
    }
    if sliding_window > 0 {
        let q_shape = g.const_i64(&[1, 1, -1, 1]);
        let qp = g.op("Reshape", &[q_pos, &q_shape], vec![]);
        let k_shape = g.const_i64(&[heads.n_kv_heads as i64, 1, 1, -1]);
        let kp = g.op("Reshape", &[k_pos, &k_shape], vec![]);
        let distance = g.op("Sub", &[&qp, &kp], vec![]);
        let window = g.const_i64(&[sliding_window as i64]);
        let hidden = g.op("GreaterOrEqual", &[&distance, &window], vec![]);
        logits = mask(g, &logits, &hidden);
    }
    let probs = g.op("Softmax", &[&logits], vec![attr("axis", -1)]);
    let axes = g.const_i64(&[1]);
    let v4 = g.op("Unsqueeze", &[v, &axes], vec![]);
    let out = g.op("MatMul", &[&probs, &v4], vec![]);
    let out_shape = g.const_i64(&[heads.n_heads as i64, -1, heads.head_dim as i64]);
    let out = g.op("Reshape", &[&out, &out_shape], vec![]);
    let last = g.const_i64(&[-1]);
    let lse = g.op("ReduceLogSumExp", &[&logits, &last], vec![attr("keepdims", 0)]);
    let lse_shape = g.const_i64(&[heads.n_heads as i64, -1]);
    let lse = g.op("Reshape", &[&lse, &lse_shape], vec![]);
    (out, lse)
}

/// [`super::ops::WINDOW_SCORES`]: window softmax (or exp(logit − lse)), ReduceSum over the window
/// rows, MaxPool / AveragePool(count_include_pad) per query head, ReduceSum over each GQA group.
fn window_scores(
    g: &mut Graph,
    heads: &Heads,
    window: usize,
    kernel: usize,
    pool: PoolAttr,
    inputs: &[&str],
) -> String {
    let (q_window, keys) = (inputs[0], inputs[1]);
    let w = window as i64;
    let logits = gqa_logits(g, heads, q_window, keys);
    let hidden = causal_hidden(g, q_window, keys);
    let logits = mask(g, &logits, &hidden);
    let probs = match inputs.get(2) {
        Some(lse) => {
            let (start, end, axes) = (g.const_i64(&[-w]), g.const_i64(&[i64::MAX]), g.const_i64(&[1]));
            let lse_w = g.op("Slice", &[lse, &start, &end, &axes], vec![]);
            let shape = g.const_i64(&[heads.n_kv_heads as i64, heads.group(), w, 1]);
            let lse_w = g.op("Reshape", &[&lse_w, &shape], vec![]);
            let shifted = g.op("Sub", &[&logits, &lse_w], vec![]);
            g.op("Exp", &[&shifted], vec![])
        }
        None => g.op("Softmax", &[&logits], vec![attr("axis", -1)]),
    };
    let (start, end, axes) = (g.const_i64(&[0]), g.const_i64(&[-w]), g.const_i64(&[3]));
    let candidates = g.op("Slice", &[&probs, &start, &end, &axes], vec![]);
    let rows = g.const_i64(&[2]);
    let per_head = g.op("ReduceSum", &[&candidates, &rows], vec![attr("keepdims", 0)]);
    let shape = g.const_i64(&[1, heads.n_heads as i64, -1]);
    let per_head = g.op("Reshape", &[&per_head, &shape], vec![]);
    let half = (kernel / 2) as i64;
    let mut pool_attrs =
        vec![attr_ints("kernel_shape", &[kernel as i64]), attr_ints("pads", &[half, half]), attr_ints("strides", &[1])];
    let pooled = match pool {
        PoolAttr::Max => g.op("MaxPool", &[&per_head], pool_attrs),
        PoolAttr::Avg => {
            pool_attrs.push(attr("count_include_pad", 1));
            g.op("AveragePool", &[&per_head], pool_attrs)
        }
    };
    let shape = g.const_i64(&[heads.n_kv_heads as i64, heads.group(), -1]);
    let grouped = g.op("Reshape", &[&pooled, &shape], vec![]);
    let group_axis = g.const_i64(&[1]);
    g.op("ReduceSum", &[&grouped, &group_axis], vec![attr("keepdims", 0)])
}

/// [`super::ops::TOP_K`]: k from the scores' shape, TopK (ties to the lower index), the indices
/// sorted ascending by a second TopK, then the window appended.
fn top_k(g: &mut Graph, num: i64, den: i64, window: usize, scores: &str) -> String {
    let w = g.const_i64(&[window as i64]);
    let n = dim(g, scores, 1);
    let seq = g.op("Add", &[&n, &w], vec![]);
    let (num, den) = (g.const_i64(&[num]), g.const_i64(&[den]));
    let scaled = g.op("Mul", &[&seq, &num], vec![]);
    let budget = g.op("Div", &[&scaled, &den], vec![]);
    let budget = g.op("Max", &[&budget, &w], vec![]);
    let budget = g.op("Min", &[&budget, &seq], vec![]);
    let k = g.op("Sub", &[&budget, &w], vec![]);
    let best = g.op_n("TopK", &[scores, &k], 2, vec![attr("axis", -1), attr("largest", 1), attr("sorted", 1)]);
    let ascending = g.op_n("TopK", &[&best[1], &k], 2, vec![attr("axis", -1), attr("largest", 0), attr("sorted", 1)]);
    let one = g.scalar_i64(1);
    let squeeze = |g: &mut Graph, x: &str| g.op("Squeeze", &[x], vec![]);
    let (first, end) = (squeeze(g, &n), squeeze(g, &seq));
    let tail = g.op("Range", &[&first, &end, &one], vec![]);
    let axes = g.const_i64(&[0]);
    let tail = g.op("Unsqueeze", &[&tail, &axes], vec![]);
    let rows = dim(g, scores, 0);
    let tail_shape = g.op("Concat", &[&rows, &w], vec![attr("axis", 0)]);
    let tail = g.op("Expand", &[&tail, &tail_shape], vec![]);
    g.op("Concat", &[&ascending[0], &tail], vec![attr("axis", 1)])
}
