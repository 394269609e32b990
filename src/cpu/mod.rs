//! The CPU backend, the reference every other backend is checked against: a Llama-family decoder
//! (covering Mistral, Qwen2 and Qwen3) whose prefill applies FastKV (fastkv-spec §2–§6) or one of
//! the baselines of §12, and whose decode runs over the compressed cache.

pub mod amx;
pub mod attention;
pub mod kernels;
pub mod kv_cache;
pub mod linear;

use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::policy::{Method, Policy};
use crate::rope::{Rope, RopeTable};
use crate::select;
use crate::spec::ModelSpec;
use crate::tensors::TensorFile;
use attention::{attention, Heads, KvView};
use kernels::{rms_norm, rms_norm_row, swiglu};
use kv_cache::LayerCache;
use linear::Linear;

/// Rows of the MLP computed at once, bounding its 2·I-wide scratch for long prompts.
const MLP_CHUNK: usize = 512;

struct Layer {
    attn_norm: Vec<f32>,
    wqkv: Linear,
    bqkv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    wo: Linear,
    mlp_norm: Vec<f32>,
    w_gate_up: Linear,
    w_down: Linear,
}

pub struct Model {
    spec: ModelSpec,
    rope: Rope,
    embed: Linear,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Option<Linear>,
}

/// The per-request KV cache: one [`LayerCache`] per layer.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
}

/// What prefill produced besides the cache: the last token's logits and what TSP did.
pub struct Prefill {
    pub logits: Vec<f32>,
    pub cache: KvCache,
    /// Tokens each layer saw (L up to ℓ*, T after when TSP fired).
    pub seq_lens: Vec<usize>,
    /// Original positions propagated past ℓ*, ascending, when TSP fired.
    pub tsp_positions: Option<Vec<u32>>,
    /// GemFilter: the prompt positions it selected, ascending; the re-run saw only these tokens, at
    /// fresh positions 0..k−1.
    pub filtered_positions: Option<Vec<u32>>,
    /// Position of the first generated token: L, or k after GemFilter's re-run.
    pub next_position: u32,
    pub profile: PrefillProfile,
}

/// Where prefill time went, in seconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PrefillProfile {
    /// Norms, q|k|v, o, gate|up and down projections, RoPE, SwiGLU.
    pub projections_s: f64,
    pub attention_s: f64,
    /// Scores, pooling, top-k, the cache / propagation gathers, and GemFilter's filter pass.
    pub selection_s: f64,
}

fn vector(file: &TensorFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = file.get(name)?;
    if t.shape != [len] {
        return Err(Error::TensorMismatch {
            path: file.path().into(),
            name: name.into(),
            what: "shape",
            expected: format!("[{len}]"),
            actual: format!("{:?}", t.shape),
        });
    }
    let mut v = vec![0.0; len];
    t.to_f32(&mut v);
    Ok(v)
}

impl Model {
    /// Maps an engine's weights; every tensor is checked against the spec.
    pub fn load(spec: &ModelSpec, file: &TensorFile) -> Result<Self> {
        let (e, d, inter) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
        let layers = (0..spec.num_layers)
            .map(|l| {
                let n = |s: &str| format!("layers.{l}.{s}");
                Ok(Layer {
                    attn_norm: vector(file, &n("attn_norm"), e)?,
                    wqkv: Linear::load(file, &n("wqkv"), spec.qkv_rows(), e)?,
                    bqkv: spec.qkv_bias.then(|| vector(file, &n("bqkv"), spec.qkv_rows())).transpose()?,
                    q_norm: spec.qk_norm.then(|| vector(file, &n("q_norm"), d)).transpose()?,
                    k_norm: spec.qk_norm.then(|| vector(file, &n("k_norm"), d)).transpose()?,
                    wo: Linear::load(file, &n("wo"), e, spec.num_heads * d)?,
                    mlp_norm: vector(file, &n("mlp_norm"), e)?,
                    w_gate_up: Linear::load(file, &n("w_gate_up"), 2 * inter, e)?,
                    w_down: Linear::load(file, &n("w_down"), e, inter)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            spec: spec.clone(),
            rope: Rope::new(spec),
            embed: Linear::load(file, "embed", spec.vocab_size, e)?,
            layers,
            final_norm: vector(file, "final_norm", e)?,
            lm_head: (!spec.tie_word_embeddings)
                .then(|| Linear::load(file, "lm_head", spec.vocab_size, e))
                .transpose()?,
        })
    }

    fn heads(&self) -> Heads {
        let s = &self.spec;
        Heads {
            n_heads: s.num_heads,
            n_kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            sliding_window: s.sliding_window,
        }
    }

    fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let e = self.spec.hidden_size;
        let mut x = vec![0f32; tokens.len() * e];
        x.par_chunks_mut(e).zip(tokens).for_each(|(row, &t)| self.embed.rows_f32(t as usize..t as usize + 1, row));
        x
    }

    /// q|k|v rows (`[m, qkv_rows]`) of `x`, biased, q/k-normed and rotated.
    fn qkv(&self, layer: &Layer, x: &[f32], rope: &RopeTable) -> Vec<f32> {
        let s = &self.spec;
        let (m, width) = (x.len() / s.hidden_size, s.qkv_rows());
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &layer.attn_norm, s.rms_norm_eps, &mut h);
        let mut qkv = vec![0f32; m * width];
        layer.wqkv.forward(&h, m, &mut qkv);
        if let Some(b) = &layer.bqkv {
            qkv.par_chunks_mut(width).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        let (hq, hk, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            qkv.par_chunks_mut(width).for_each(|row| {
                let mut tmp = vec![0f32; d];
                for (head, chunk) in row[..(hq + hk) * d].chunks_exact_mut(d).enumerate() {
                    tmp.copy_from_slice(chunk);
                    rms_norm_row(&tmp, if head < hq { qn } else { kn }, s.rms_norm_eps, chunk);
                }
            });
        }
        rope.apply(&mut qkv, width, 0, hq);
        rope.apply(&mut qkv, width, hq * d, hk);
        qkv
    }

    /// x += o·Woᵀ; x += MLP(RMSNorm(x)), in row chunks.
    fn finish_layer(&self, layer: &Layer, x: &mut [f32], o: &[f32]) {
        let s = &self.spec;
        let (e, inter) = (s.hidden_size, s.intermediate_size);
        let m = x.len() / e;
        let mut y = vec![0f32; m * e];
        layer.wo.forward(o, m, &mut y);
        x.par_iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        for chunk in x.chunks_mut(MLP_CHUNK * e) {
            let rows = chunk.len() / e;
            let mut h = vec![0f32; chunk.len()];
            rms_norm(chunk, &layer.mlp_norm, s.rms_norm_eps, &mut h);
            let mut gu = vec![0f32; rows * 2 * inter];
            layer.w_gate_up.forward(&h, rows, &mut gu);
            let mut act = vec![0f32; rows * inter];
            swiglu(&gu, inter, &mut act);
            layer.w_down.forward(&act, rows, &mut h);
            chunk.par_iter_mut().zip(&h).for_each(|(x, y)| *x += y);
        }
    }

    /// Final norm and LM head of one hidden row.
    fn logits(&self, x: &[f32]) -> Vec<f32> {
        let mut h = vec![0f32; x.len()];
        rms_norm_row(x, &self.final_norm, self.spec.rms_norm_eps, &mut h);
        let mut logits = vec![0f32; self.spec.vocab_size];
        self.lm_head.as_ref().unwrap_or(&self.embed).forward(&h, 1, &mut logits);
        logits
    }

    /// Runs the prompt through every layer under `policy`, reserving `max_new_tokens` of cache.
    pub fn prefill(&self, tokens: &[u32], policy: &Policy, max_new_tokens: usize) -> Result<Prefill> {
        let mut one = self.prefill_many(tokens, std::slice::from_ref(policy), max_new_tokens)?;
        Ok(one.pop().expect("one prefill per policy"))
    }

    /// Prefills one prompt under several policies at once, running each layer once per distinct
    /// sequence: policies share every layer until their propagated tokens part (FastKV after ℓ*,
    /// PyramidInfer), and GemFilter's filter pass (layers 0..f, then f's scores) rides along before
    /// it re-runs the model on its k tokens. Every result equals `prefill` of that policy alone;
    /// each profile counts the shared work as its own. This is what makes comparing methods on the
    /// same prompts (`fastkv eval`) cost little more than one full prefill.
    pub fn prefill_many(&self, tokens: &[u32], policies: &[Policy], max_new_tokens: usize) -> Result<Vec<Prefill>> {
        for policy in policies {
            policy.validate(&self.spec)?;
            policy.check_prompt(tokens.len())?;
        }
        let filter_k = |p: &Policy| {
            let k = p.kv_budget(0, tokens.len()).max(1);
            (p.method == Method::Gemfilter && k < tokens.len()).then_some(k)
        };
        let members = policies.iter().map(|p| Member::new(p, filter_k(p))).collect();
        let ran = self.run_layers(tokens, members, max_new_tokens)?;
        ran.into_iter()
            .zip(policies)
            .map(|(ran, policy)| match ran {
                Ran::Prefilled(pre) => Ok(pre),
                Ran::Filtered { keep, profile } => {
                    let ids: Vec<u32> = keep.iter().map(|&i| tokens[i as usize]).collect();
                    let full = Policy { method: Method::Full, ..*policy };
                    let mut pre = self.prefill(&ids, &full, max_new_tokens)?;
                    let p = &mut pre.profile;
                    p.selection_s += profile.projections_s + profile.attention_s + profile.selection_s;
                    pre.filtered_positions = Some(keep);
                    Ok(pre)
                }
            })
            .collect()
    }

    /// Causal attention of sequence rows `first..` over the layer's full K/V (`[Hk, S, D]`).
    fn self_attention(&self, q: &[f32], k: &[f32], v: &[f32], positions: &[u32], first: usize) -> Vec<f32> {
        let (hq, hk, d, seq) = (self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim, positions.len());
        let all_pos: Vec<u32> = (0..hk).flat_map(|_| positions.iter().copied()).collect();
        let kv = KvView { k, v, pos: &all_pos, len: seq, stride: seq };
        let mut o = vec![0f32; (seq - first) * hq * d];
        attention(&q[first * hq * d..], &positions[first..], first, true, &kv, &self.heads(), &mut o);
        o
    }

    /// The prefill loop: every layer of every stream attends over its full K/V, each member caches
    /// what its policy keeps, and the members that propagate a subset of the tokens (at their
    /// original positions) split off into a stream of their own.
    fn run_layers(&self, tokens: &[u32], mut members: Vec<Member>, max_new_tokens: usize) -> Result<Vec<Ran>> {
        let s = &self.spec;
        let (hq, hk, d, e) = (s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size);
        let prompt_len = tokens.len();
        let positions: Vec<u32> = (0..prompt_len as u32).collect();
        let rope = self.rope.table(&positions);
        let mut streams =
            vec![Stream { x: self.embed(tokens), positions, rope, members: (0..members.len()).collect() }];
        let mut clock = Instant::now();
        let mut lap = || {
            let now = Instant::now();
            let seconds = (now - clock).as_secs_f64();
            clock = now;
            seconds
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let last_layer = l + 1 == s.num_layers;
            let mut next = Vec::with_capacity(streams.len());
            for Stream { mut x, positions, rope, members: ids } in streams {
                let seq = positions.len();
                let qkv = self.qkv(layer, &x, &rope);
                let (q, k, v) = split_heads(&qkv, seq, hq, hk, d);
                drop(qkv);
                let shared = lap();
                ids.iter().for_each(|&m| members[m].profile.projections_s += shared);

                // Members that pass on every row, and the others grouped by the rows they pass on.
                let mut whole = Vec::new();
                let mut splits: Vec<(Vec<u32>, Vec<usize>)> = Vec::new();
                for &m in &ids {
                    let member = &mut members[m];
                    match member.filter {
                        Some(k_filter) if l == member.policy.filter_layer() => {
                            member.filtered = Some(self.gemfilter_select(&q, &k, seq, k_filter)?);
                        }
                        Some(_) => whole.push(m),
                        None => {
                            let inp = LayerInput {
                                policy: member.policy,
                                layer: l,
                                prompt_len,
                                q: &q,
                                k: &k,
                                seq,
                                last_layer,
                            };
                            let (keep, propagate) = self.select_layer(&inp)?;
                            member.caches.push(LayerCache::from_prefill(
                                &k,
                                &v,
                                &positions,
                                keep.as_deref(),
                                hk,
                                d,
                                max_new_tokens,
                            ));
                            member.seq_lens.push(seq);
                            match propagate {
                                None => whole.push(m),
                                Some(rows) => match splits.iter_mut().find(|(r, _)| *r == rows) {
                                    Some((_, group)) => group.push(m),
                                    None => splits.push((rows, vec![m])),
                                },
                            }
                        }
                    }
                    member.profile.selection_s += lap();
                }
                if whole.is_empty() && splits.is_empty() {
                    continue; // only GemFilter members, which left at this layer
                }

                // Attention sees this layer's full K/V; compression only changes what is stored.
                // Only the last row reaches the LM head, so the last layer computes just that row.
                let first = if last_layer { seq - 1 } else { 0 };
                let o = self.self_attention(&q, &k, &v, &positions, first);
                let shared = lap();
                ids.iter().for_each(|&m| members[m].profile.attention_s += shared);
                if last_layer {
                    x.drain(..first * e);
                }
                self.finish_layer(layer, &mut x, &o);
                let shared = lap();
                ids.iter().for_each(|&m| members[m].profile.projections_s += shared);

                for (rows, group) in splits {
                    let x = rows.iter().flat_map(|&i| x[i as usize * e..][..e].iter().copied()).collect();
                    let positions: Vec<u32> = rows.iter().map(|&i| positions[i as usize]).collect();
                    let rope = self.rope.table(&positions);
                    for &m in &group {
                        if members[m].policy.method == Method::Fastkv {
                            members[m].tsp_positions = Some(positions.clone());
                        }
                    }
                    let shared = lap();
                    group.iter().for_each(|&m| members[m].profile.selection_s += shared);
                    next.push(Stream { x, positions, rope, members: group });
                }
                if !whole.is_empty() {
                    next.push(Stream { x, positions, rope, members: whole });
                }
            }
            streams = next;
        }
        for stream in &streams {
            let logits = self.logits(&stream.x[stream.x.len() - e..]);
            stream.members.iter().for_each(|&m| members[m].logits = logits.clone());
        }
        Ok(members.into_iter().map(|m| m.finish(prompt_len)).collect())
    }

    /// GemFilter's choice at filter layer f from that layer's q and k (`[Hk, S, D]`): the top `k`
    /// positions by the last query's raw scores (fastkv-spec §12), ascending.
    fn gemfilter_select(&self, q: &[f32], keys: &[f32], seq: usize, k: usize) -> Result<Vec<u32>> {
        let s = &self.spec;
        let (hq, hk, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
        let shape = select::Shape { n_heads: hq, n_kv_heads: hk, head_dim: d, seq_len: seq, window: 1 };
        let invalid = |e: select::SelectError| Error::invalid("--kv-budget", e.to_string());
        let raw = select::last_query_scores(&q[(seq - 1) * hq * d..], keys, &shape).map_err(invalid)?;
        select::gemfilter_indices(&raw, hq, seq, k).map_err(invalid)
    }

    /// What layer `inp.layer` caches (entry rows per cache head; `None`: all rows of every KV head)
    /// and which rows it propagates (`None`: all), per `inp.policy`.
    #[allow(clippy::type_complexity)]
    fn select_layer(&self, inp: &LayerInput) -> Result<(Option<Vec<Vec<u32>>>, Option<Vec<u32>>)> {
        let s = &self.spec;
        let (hq, hk, d, n_layers) = (s.num_heads, s.num_kv_heads, s.head_dim, s.num_layers);
        let LayerInput { policy, layer, prompt_len, q, k, seq, last_layer } = *inp;
        let invalid = |flag: &'static str| move |e: select::SelectError| Error::invalid(flag, e.to_string());
        let shape = |window| select::Shape { n_heads: hq, n_kv_heads: hk, head_dim: d, seq_len: seq, window };
        if policy.method == Method::Pyramidinfer {
            let recent = policy.recent_len(prompt_len);
            if last_layer || seq <= recent {
                return Ok((None, None));
            }
            let q_recent = window_queries(q, seq, hq, d, recent);
            let scores = select::recent_scores(&q_recent, k, &shape(recent)).map_err(invalid("--recent-ratio"))?;
            let n = seq - recent;
            // Σ over heads (identity pooling): ranks like the paper's mean.
            let total = select::pool_group_scores(&scores, hq, 1, n, 1, select::Pool::Max)
                .map_err(invalid("--recent-ratio"))?;
            let context = n - policy.params.sink.min(n);
            let keep = policy.pyramid_keep(layer, n_layers, prompt_len, context);
            let propagate =
                (keep < context).then(|| select::pyramidinfer_indices(&total, seq, policy.params.sink, keep));
            return Ok((None, propagate));
        }
        let plan = policy.plan(layer, n_layers, prompt_len, seq);
        let Some(budget) = plan.kv_budget else { return Ok((None, None)) };
        let w = policy.window;
        let n = seq - w;
        let (kernel, pool) = (policy.kernel, policy.pool);
        let q_window = || window_queries(q, seq, hq, d, w);
        let keep = match policy.method {
            Method::Fastkv | Method::SnapkvGqa => {
                let scores =
                    select::group_scores(&q_window(), k, &shape(w), kernel, pool).map_err(invalid("--window"))?;
                let tsp = match plan.tsp_len.filter(|_| !last_layer) {
                    Some(t) => Some(select::tsp_indices(&scores, hk, seq, w, t).map_err(invalid("--tsp-len"))?),
                    None => None,
                };
                let idx = select::kv_indices(&scores, hk, seq, w, budget).map_err(invalid("--kv-budget"))?;
                return Ok((Some(idx.chunks_exact(budget).map(<[u32]>::to_vec).collect()), tsp));
            }
            Method::Streamingllm => vec![select::streaming_indices(seq, policy.params.sink, budget); hk],
            _ => {
                // Per query head: SnapKV, PyramidKV, AdaKV, HeadKV (pooled window scores) and H2O.
                let scores = if policy.method == Method::H2o {
                    select::h2o_scores(&window_queries(q, seq, hq, d, seq), k, &shape(w))
                } else {
                    select::window_scores(&q_window(), k, &shape(w))
                        .and_then(|s| select::pool_group_scores(&s, hq, hq, n, kernel, pool))
                }
                .map_err(invalid("--window"))?;
                let budgets = match policy.method {
                    Method::Adakv => select::ada_budgets(&scores, hq, n, budget - w, policy.params.ada_alpha)
                        .map_err(invalid("--kv-budget"))?,
                    Method::Headkv => policy.head_budgets(layer, budget, seq)?,
                    _ => vec![budget - w; hq],
                };
                select::head_indices(&scores, seq, w, &budgets).map_err(invalid("--kv-budget"))?
            }
        };
        Ok((Some(keep), None))
    }

    /// One new token at `position` through every layer, appending to the cache.
    pub fn decode(&self, token: u32, position: u32, cache: &mut KvCache) -> Vec<f32> {
        let s = &self.spec;
        let (hq, hk, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
        let heads = self.heads();
        let mut x = self.embed(&[token]);
        let rope = self.rope.table(&[position]);
        for (layer, lc) in self.layers.iter().zip(&mut cache.layers) {
            let qkv = self.qkv(layer, &x, &rope);
            let (q, kv_new) = qkv.split_at(hq * d);
            lc.push(&kv_new[..hk * d], &kv_new[hk * d..], position);
            let mut o = vec![0f32; hq * d];
            lc.attend(q, position, &heads, &mut o);
            self.finish_layer(layer, &mut x, &o);
        }
        self.logits(&x)
    }
}

/// One prefill layer's inputs to its cache / propagation choice.
#[derive(Clone, Copy)]
struct LayerInput<'a> {
    policy: &'a Policy,
    layer: usize,
    prompt_len: usize,
    q: &'a [f32],
    k: &'a [f32],
    seq: usize,
    last_layer: bool,
}

/// One policy's progress through [`Model::run_layers`].
struct Member<'a> {
    policy: &'a Policy,
    /// GemFilter: the k tokens it will pick at its filter layer (it caches nothing before).
    filter: Option<usize>,
    filtered: Option<Vec<u32>>,
    caches: Vec<LayerCache>,
    seq_lens: Vec<usize>,
    tsp_positions: Option<Vec<u32>>,
    logits: Vec<f32>,
    profile: PrefillProfile,
}

impl<'a> Member<'a> {
    fn new(policy: &'a Policy, filter: Option<usize>) -> Self {
        Member {
            policy,
            filter,
            filtered: None,
            caches: Vec::new(),
            seq_lens: Vec::new(),
            tsp_positions: None,
            logits: Vec::new(),
            profile: PrefillProfile::default(),
        }
    }

    fn finish(self, prompt_len: usize) -> Ran {
        match self.filtered {
            Some(keep) => Ran::Filtered { keep, profile: self.profile },
            None => Ran::Prefilled(Prefill {
                logits: self.logits,
                cache: KvCache { layers: self.caches },
                seq_lens: self.seq_lens,
                tsp_positions: self.tsp_positions,
                filtered_positions: None,
                next_position: prompt_len as u32,
                profile: self.profile,
            }),
        }
    }
}

/// What [`Model::run_layers`] did for one policy: a whole prefill, or GemFilter's choice of tokens.
enum Ran {
    Prefilled(Prefill),
    Filtered { keep: Vec<u32>, profile: PrefillProfile },
}

/// Hidden states of one sequence of tokens (at original `positions`) and the members that see it.
struct Stream {
    x: Vec<f32>,
    positions: Vec<u32>,
    rope: RopeTable,
    members: Vec<usize>,
}

/// Splits fused q|k|v rows into q (token-major `[S, H·D]`) and head-major k, v (`[Hk, S, D]`).
fn split_heads(qkv: &[f32], seq: usize, hq: usize, hk: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = (hq + 2 * hk) * d;
    let mut q = vec![0f32; seq * hq * d];
    q.par_chunks_mut(hq * d).zip(qkv.par_chunks(width)).for_each(|(q, row)| q.copy_from_slice(&row[..hq * d]));
    let head_major = |offset: usize| {
        let mut out = vec![0f32; hk * seq * d];
        out.par_chunks_mut(seq * d).enumerate().for_each(|(g, head)| {
            for (i, dst) in head.chunks_exact_mut(d).enumerate() {
                let src = i * width + offset + g * d;
                dst.copy_from_slice(&qkv[src..src + d]);
            }
        });
        out
    };
    (q, head_major(hq * d), head_major((hq + hk) * d))
}

/// The last `w` query rows of every head, `[H, W, D]`, as the selection API takes them.
fn window_queries(q: &[f32], seq: usize, hq: usize, d: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(hq * w * d);
    for h in 0..hq {
        for i in seq - w..seq {
            out.extend_from_slice(&q[(i * hq + h) * d..][..d]);
        }
    }
    out
}
