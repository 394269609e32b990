//! The backend-neutral prefill driver: **where TSP and KV compression are decided**. Per layer and
//! per policy it chooses what the layer caches and which rows go on to the next layer (docs/method.md
//! §2–§4, §8 and the baselines of §12), and runs the layer's pieces through [`Ops`], which each
//! backend implements over its own buffers. The driver owns the neutral types ([`Prefill`],
//! [`PrefillProfile`]) and imports no backend, so the CPU, CUDA and any later backend share one
//! decision path that cannot drift.
//!
//! Several policies can prefill one prompt at once: each layer runs once per distinct sequence of
//! tokens, and a policy's stream splits off only where its propagated rows part (FastKV after its
//! ℓ*, PyramidInfer per layer); GemFilter's filter pass rides along until its filter layer, then
//! re-runs the model on the tokens it picked. Every result equals a prefill of that policy alone.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::{Method, Policy};
use crate::select;
use crate::spec::ModelSpec;

/// The pieces of a decoder layer a backend provides, over its own buffers. Layouts are the
/// backend's; the driver only passes values between calls.
pub trait Ops {
    /// Hidden states of one sequence (`[S, E]`).
    type Hidden;
    /// Original positions of one sequence's rows, with what the backend derives from them (RoPE).
    type Positions;
    /// One layer's rotated q, k and v of one sequence.
    type Qkv;
    /// One layer's attention output of one sequence.
    type Attention;
    /// Pooled GQA group scores `[Hk, S−W]` (docs/method.md §3.3).
    type Scores;
    /// Row indices of one sequence, ascending.
    type Rows;
    /// Cache entries to keep, per cache head.
    type Keep;
    /// One layer's KV cache.
    type LayerCache;

    /// The backend's name in messages (`cpu`, `cuda`).
    const NAME: &'static str;
    /// Whether [`Ops::host_qk`] gives host q and k, which the selection math that exists only on
    /// the host needs (per-query-head baselines, H2O, PyramidInfer, GemFilter).
    const HOST_SELECTION: bool;

    fn spec(&self) -> &ModelSpec;
    /// Called before anything is allocated, with the prompt length and the KV entries per KV head
    /// (over every layer and policy) the caches will hold at most: a device checks they fit.
    fn reserve(&self, prompt_len: usize, cache_entries: usize) -> Result<()>;
    fn embed(&self, tokens: &[u32]) -> Result<Self::Hidden>;
    fn positions(&self, positions: &[u32]) -> Result<Self::Positions>;
    /// RMSNorm, the q|k|v projection (+ bias, q/k norm) and RoPE at the rows' positions. A backend
    /// that projects the rows in pieces calls `pause` between them ([`prefill_pausing`]).
    fn qkv(
        &self,
        layer: usize,
        x: &Self::Hidden,
        pos: &Self::Positions,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Self::Qkv>;
    /// Causal attention over the layer's full K/V; with `last_row_only`, of the last row alone.
    /// `pause` as in [`Ops::qkv`].
    fn attention(
        &self,
        qkv: &Self::Qkv,
        pos: &Self::Positions,
        last_row_only: bool,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Self::Attention>;
    /// `x += o·Woᵀ; x += MLP(RMSNorm(x))`. With `last_row_only`, `x` keeps only its last row first.
    /// `pause` as in [`Ops::qkv`].
    fn output_and_mlp(
        &self,
        layer: usize,
        x: &mut Self::Hidden,
        o: Self::Attention,
        last_row_only: bool,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()>;
    /// Logits of the last row of `x` (final norm and LM head).
    fn logits(&self, x: &Self::Hidden) -> Result<Vec<f32>>;

    /// FastKV's window scores, pooled per query head and summed per GQA group (docs/method.md §3.2–3.3); the
    /// layer's attention is at hand for backends that reuse its softmax normalisers.
    fn group_scores(&self, qkv: &Self::Qkv, attention: &Self::Attention, policy: &Policy) -> Result<Self::Scores>;
    /// Per KV head: the top `budget − W` of its group scores, then the window (docs/method.md §3.4).
    fn kv_keep(&self, scores: &Self::Scores, budget: usize, window: usize) -> Result<Self::Keep>;
    /// TSP: the top `tsp_len − W` of the group scores summed over KV heads, plus the window,
    /// ascending (docs/method.md §3.5).
    fn tsp_rows(&self, scores: &Self::Scores, tsp_len: usize, window: usize) -> Result<Self::Rows>;
    /// Entries chosen on the host, one list per cache head (KV heads, or query heads for
    /// per-query-head methods).
    fn keep_from_host(&self, keep: Vec<Vec<u32>>) -> Result<Self::Keep>;
    fn rows_from_host(&self, rows: Vec<u32>) -> Result<Self::Rows>;
    fn same_rows(&self, a: &Self::Rows, b: &Self::Rows) -> Result<bool>;
    /// The layer's cache: the `keep` entries of every cache head (`None`: all rows of every KV
    /// head), with room for `reserve` more tokens.
    fn store(
        &self,
        qkv: &Self::Qkv,
        pos: &Self::Positions,
        keep: Option<&Self::Keep>,
        reserve: usize,
    ) -> Result<Self::LayerCache>;
    /// The hidden rows and positions of `rows`: what goes on to the next layer.
    fn propagate(
        &self,
        x: &Self::Hidden,
        pos: &Self::Positions,
        rows: &Self::Rows,
    ) -> Result<(Self::Hidden, Self::Positions)>;
    fn positions_to_host(&self, pos: &Self::Positions) -> Result<Vec<u32>>;
    /// Host q (token-major `[S, H·D]`) and k (head-major `[Hk, S, D]`); `None` when the backend
    /// keeps them on a device ([`Ops::HOST_SELECTION`] is false).
    fn host_qk<'a>(&self, qkv: &'a Self::Qkv) -> Option<(&'a [f32], &'a [f32])>;
    /// Waits for the work enqueued so far, so the profile's clock measures it (no-op on the CPU).
    fn fence(&self) -> Result<()>;
}

/// What prefill produced besides the cache: the last token's logits and what TSP did.
pub struct Prefill<C> {
    pub logits: Vec<f32>,
    pub cache: C,
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

impl<C> Prefill<C> {
    pub fn map_cache<D>(self, f: impl FnOnce(C) -> D) -> Prefill<D> {
        let Prefill { logits, cache, seq_lens, tsp_positions, filtered_positions, next_position, profile } = self;
        Prefill { logits, cache: f(cache), seq_lens, tsp_positions, filtered_positions, next_position, profile }
    }
}

/// Where prefill time went, in seconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PrefillProfile {
    /// Norms, q|k|v, o, gate|up and down projections, RoPE, SwiGLU.
    pub projections_s: f64,
    pub attention_s: f64,
    /// Scores, pooling, top-k, the cache / propagation gathers, and GemFilter's filter pass.
    pub selection_s: f64,
}

/// The methods whose selection runs on any backend; the others need [`Ops::HOST_SELECTION`].
pub const ANY_BACKEND_METHODS: [Method; 4] = [Method::Full, Method::Fastkv, Method::SnapkvGqa, Method::Streamingllm];

/// Prefills `tokens` under every policy (one result per policy, in order), reserving cache for
/// `reserve` generated tokens.
pub fn prefill_many<O: Ops>(
    ops: &O,
    tokens: &[u32],
    policies: &[Policy],
    reserve: usize,
) -> Result<Vec<Prefill<Vec<O::LayerCache>>>> {
    prefill_pausing(ops, tokens, policies, reserve, &mut || Ok(()))
}

/// [`prefill_many`], calling `pause` between the pieces of every layer (its q|k|v, its attention,
/// its output and MLP, and on the CPU blocks of rows within those): a batching engine runs the decode
/// steps of other requests there, so a long prefill does not stall them for longer than one piece;
/// an error from `pause` (the request was cancelled) ends the prefill with it.
pub fn prefill_pausing<O: Ops>(
    ops: &O,
    tokens: &[u32],
    policies: &[Policy],
    reserve: usize,
    pause: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<Prefill<Vec<O::LayerCache>>>> {
    for policy in policies {
        check::<O>(ops.spec(), policy, tokens.len())?;
    }
    let filter_k = |p: &Policy| {
        let k = p.kv_budget(0, tokens.len()).max(1);
        (p.method == Method::Gemfilter && p.compresses(tokens.len()) && k < tokens.len()).then_some(k)
    };
    let entries: usize = policies.iter().map(|p| planned_cache_entries(ops.spec(), p, tokens.len(), reserve)).sum();
    ops.reserve(tokens.len(), entries)?;
    let runs = policies.iter().map(|p| PolicyRun::new(p, filter_k(p))).collect();
    let ends = run_layers(ops, tokens, runs, reserve, pause)?;
    ends.into_iter()
        .zip(policies)
        .map(|(end, policy)| match end {
            RunEnd::Prefilled(pre) => Ok(pre),
            RunEnd::Filtered { keep, profile } => {
                let ids: Vec<u32> = keep.iter().map(|&i| tokens[i as usize]).collect();
                let full = Policy { method: Method::Full, ..*policy };
                let mut pre =
                    prefill_pausing(ops, &ids, std::slice::from_ref(&full), reserve, pause)?.pop().expect("one");
                let p = &mut pre.profile;
                p.selection_s += profile.projections_s + profile.attention_s + profile.selection_s;
                pre.filtered_positions = Some(keep);
                Ok(pre)
            }
        })
        .collect()
}

/// Whether `policy` can prefill a `prompt_len`-token prompt on backend `O`.
fn check<O: Ops>(spec: &ModelSpec, policy: &Policy, prompt_len: usize) -> Result<()> {
    check_policy(spec, policy, prompt_len, O::NAME, O::HOST_SELECTION)
}

/// Whether `policy` can prefill a `prompt_len`-token prompt on the backend `name`, whose selection
/// runs on the host (`host_selection`) or only for [`ANY_BACKEND_METHODS`]: the one check every
/// prefill passes, also made where a batching engine takes a request, before it queues it.
pub fn check_policy(
    spec: &ModelSpec,
    policy: &Policy,
    prompt_len: usize,
    name: &'static str,
    host_selection: bool,
) -> Result<()> {
    policy.validate(spec)?;
    policy.check_prompt(prompt_len)?;
    if !host_selection && !ANY_BACKEND_METHODS.contains(&policy.method) {
        return Err(Error::Unsupported {
            backend: name,
            what: format!("method `{}`", policy.method.name()),
            supported: ANY_BACKEND_METHODS.map(Method::name).join(", "),
        });
    }
    Ok(())
}

/// The prompt positions each FastKV policy's TSP propagates past its ℓ* (ascending; `None` where TSP
/// does not fire), from one shared prefill in which every policy stops at its ℓ* and caches nothing:
/// the candidates of calibration (every layer, every rate) for the cost of one full prefill.
pub fn tsp_selections<O: Ops>(ops: &O, tokens: &[u32], policies: &[Policy]) -> Result<Vec<Option<Vec<u32>>>> {
    for policy in policies {
        check::<O>(ops.spec(), policy, tokens.len())?;
        if policy.method != Method::Fastkv {
            return Err(Error::invalid("method", "TSP selections need FastKV policies"));
        }
    }
    ops.reserve(tokens.len(), 0)?;
    let runs = policies.iter().map(|p| PolicyRun { selection_only: true, ..PolicyRun::new(p, None) }).collect();
    let ends = run_layers(ops, tokens, runs, 0, &mut || Ok(()))?;
    Ok(ends
        .into_iter()
        .map(|end| match end {
            RunEnd::Prefilled(pre) => pre.tsp_positions,
            RunEnd::Filtered { .. } => unreachable!("FastKV does not filter"),
        })
        .collect())
}

/// The KV entries per KV head `policy`'s caches hold at most over all layers of a `prompt_len`
/// prompt with room for `reserve` more tokens: its plan's budgets, the sequence shrinking to T after a
/// TSP layer (an upper bound for the methods that shrink it otherwise).
fn planned_cache_entries(spec: &ModelSpec, policy: &Policy, prompt_len: usize, reserve: usize) -> usize {
    let n = spec.num_layers;
    let mut seq = prompt_len;
    (0..n)
        .map(|l| {
            let plan = policy.plan(l, n, prompt_len, seq);
            let kept = plan.kv_budget.unwrap_or(seq).min(seq);
            if let Some(t) = plan.tsp_len.filter(|_| l + 1 < n) {
                seq = t;
            }
            kept + reserve
        })
        .sum()
}

/// The bytes `policy`'s KV cache of a `prompt_len`-token prompt holds at most with room for
/// `reserve` more tokens, at `element_bytes` per K or V value (and a u32 position per entry): what a
/// batching engine sets aside before the prefill. Exact for the methods with one budget per layer and
/// head; AdaKV's and HeadKV's heads, whose budgets move between heads, are bounded by the prompt.
pub fn cache_bytes_bound(
    spec: &ModelSpec,
    policy: &Policy,
    prompt_len: usize,
    reserve: usize,
    element_bytes: usize,
) -> usize {
    let heads = if policy.method.per_query_head() { spec.num_heads } else { spec.num_kv_heads };
    let entries = match policy.method {
        Method::Adakv | Method::Headkv => spec.num_layers * (prompt_len + reserve),
        _ => planned_cache_entries(spec, policy, prompt_len, reserve),
    };
    entries * heads * (2 * spec.head_dim * element_bytes + 4)
}

/// One policy's progress through the layers.
struct PolicyRun<'a, O: Ops> {
    policy: &'a Policy,
    /// GemFilter: the k tokens it will pick at its filter layer (it caches nothing before).
    filter: Option<usize>,
    filtered: Option<Vec<u32>>,
    /// Stops at its TSP layer, caching nothing ([`tsp_selections`]).
    selection_only: bool,
    caches: Vec<O::LayerCache>,
    seq_lens: Vec<usize>,
    tsp_positions: Option<Vec<u32>>,
    logits: Vec<f32>,
    profile: PrefillProfile,
}

impl<'a, O: Ops> PolicyRun<'a, O> {
    fn new(policy: &'a Policy, filter: Option<usize>) -> Self {
        PolicyRun {
            policy,
            filter,
            filtered: None,
            selection_only: false,
            caches: Vec::new(),
            seq_lens: Vec::new(),
            tsp_positions: None,
            logits: Vec::new(),
            profile: PrefillProfile::default(),
        }
    }

    fn finish(self, prompt_len: usize) -> RunEnd<Vec<O::LayerCache>> {
        match self.filtered {
            Some(keep) => RunEnd::Filtered { keep, profile: self.profile },
            None => RunEnd::Prefilled(Prefill {
                logits: self.logits,
                cache: self.caches,
                seq_lens: self.seq_lens,
                tsp_positions: self.tsp_positions,
                filtered_positions: None,
                next_position: prompt_len as u32,
                profile: self.profile,
            }),
        }
    }
}

/// How a policy's run ended: a whole prefill, or GemFilter's choice of tokens to re-run.
enum RunEnd<C> {
    Prefilled(Prefill<C>),
    Filtered { keep: Vec<u32>, profile: PrefillProfile },
}

/// Hidden states of one sequence of tokens (at original positions) and the runs that see it.
struct Stream<O: Ops> {
    x: O::Hidden,
    pos: O::Positions,
    seq: usize,
    runs: Vec<usize>,
}

/// What one layer does for one policy.
struct LayerChoice<O: Ops> {
    /// Entries each cache head keeps; `None`: every row of every KV head.
    keep: Option<O::Keep>,
    /// Rows passed on to the next layer; `None`: all.
    propagate: Option<O::Rows>,
}

/// A stopwatch whose laps are charged to the runs that shared the work.
struct Clock {
    last: Instant,
}

impl Clock {
    fn lap<O: Ops>(&mut self, ops: &O) -> Result<f64> {
        ops.fence()?;
        let now = Instant::now();
        let seconds = (now - self.last).as_secs_f64();
        self.last = now;
        Ok(seconds)
    }

    /// Runs `pause` (the work of other requests) off the profile's clock.
    fn paused<O: Ops>(&mut self, ops: &O, pause: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        ops.fence()?;
        pause()?;
        self.last = Instant::now();
        Ok(())
    }
}

/// The prefill loop: every layer of every stream attends over its full K/V, each run caches what
/// its policy keeps, and the runs that propagate a subset of the tokens (at their original
/// positions) split off into a stream of their own.
fn run_layers<'a, O: Ops>(
    ops: &O,
    tokens: &[u32],
    mut runs: Vec<PolicyRun<'a, O>>,
    reserve: usize,
    pause: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<RunEnd<Vec<O::LayerCache>>>> {
    let n_layers = ops.spec().num_layers;
    let prompt_len = tokens.len();
    let positions: Vec<u32> = (0..prompt_len as u32).collect();
    let mut clock = Clock { last: Instant::now() };
    let mut streams = vec![Stream::<O> {
        x: ops.embed(tokens)?,
        pos: ops.positions(&positions)?,
        seq: prompt_len,
        runs: (0..runs.len()).collect(),
    }];
    for layer in 0..n_layers {
        let last_layer = layer + 1 == n_layers;
        let mut next = Vec::with_capacity(streams.len());
        for Stream { mut x, pos, seq, runs: ids } in streams {
            let qkv = ops.qkv(layer, &x, &pos, &mut *pause)?;
            let shared = clock.lap(ops)?;
            ids.iter().for_each(|&r| runs[r].profile.projections_s += shared);
            clock.paused(ops, &mut *pause)?;

            // Attention sees this layer's full K/V; compression only changes what is stored. Only
            // the last row reaches the LM head, so the last layer computes just that row. GemFilter
            // runs that leave at this layer need none.
            let leaving = |r: usize| runs[r].filter.is_some() && layer == runs[r].policy.filter_layer();
            let o = match ids.iter().all(|&r| leaving(r)) {
                true => None,
                false => Some(ops.attention(&qkv, &pos, last_layer, &mut *pause)?),
            };
            let shared = clock.lap(ops)?;
            ids.iter().for_each(|&r| runs[r].profile.attention_s += shared);
            clock.paused(ops, &mut *pause)?;

            // Runs that pass on every row, and the others grouped by the rows they pass on.
            let mut whole = Vec::new();
            let mut splits: Vec<(O::Rows, Vec<usize>)> = Vec::new();
            for &r in &ids {
                let run = &mut runs[r];
                match (run.filter, &o) {
                    (Some(k), _) if layer == run.policy.filter_layer() => {
                        let (q, keys) = ops.host_qk(&qkv).expect("checked: GemFilter needs host selection");
                        run.filtered = Some(gemfilter_select(ops.spec(), q, keys, seq, k)?);
                    }
                    (Some(_), _) => whole.push(r),
                    (None, Some(o)) => {
                        let step = LayerStep { policy: run.policy, layer, prompt_len, seq, last_layer };
                        let choice = match run.selection_only {
                            false => choose(ops, &step, &qkv, o)?,
                            true => choose_tsp(ops, &step, &qkv, o)?,
                        };
                        if !run.selection_only {
                            run.caches.push(ops.store(&qkv, &pos, choice.keep.as_ref(), reserve)?);
                        }
                        run.seq_lens.push(seq);
                        match choice.propagate {
                            None => whole.push(r),
                            Some(rows) => {
                                let mut group = None;
                                for (i, (other, _)) in splits.iter().enumerate() {
                                    if ops.same_rows(other, &rows)? {
                                        group = Some(i);
                                        break;
                                    }
                                }
                                match group {
                                    Some(i) => splits[i].1.push(r),
                                    None => splits.push((rows, vec![r])),
                                }
                            }
                        }
                    }
                    (None, None) => unreachable!("attention runs unless every run leaves here"),
                }
                runs[r].profile.selection_s += clock.lap(ops)?;
            }
            drop(qkv);
            clock.paused(ops, &mut *pause)?;
            let Some(o) = o else { continue }; // only GemFilter runs, which left at this layer
            ops.output_and_mlp(layer, &mut x, o, last_layer, &mut *pause)?;
            let shared = clock.lap(ops)?;
            ids.iter().for_each(|&r| runs[r].profile.projections_s += shared);
            clock.paused(ops, &mut *pause)?;

            for (rows, group) in splits {
                let (x, pos) = ops.propagate(&x, &pos, &rows)?;
                let kept = ops.positions_to_host(&pos)?;
                for &r in &group {
                    if runs[r].policy.method == Method::Fastkv {
                        runs[r].tsp_positions = Some(kept.clone());
                    }
                }
                let shared = clock.lap(ops)?;
                group.iter().for_each(|&r| runs[r].profile.selection_s += shared);
                let group: Vec<usize> = group.into_iter().filter(|&r| !runs[r].selection_only).collect();
                if !group.is_empty() {
                    next.push(Stream { x, pos, seq: kept.len(), runs: group });
                }
            }
            if !whole.is_empty() {
                next.push(Stream { x, pos, seq: if last_layer { 1 } else { seq }, runs: whole });
            }
        }
        streams = next;
    }
    for stream in &streams {
        let logits = ops.logits(&stream.x)?;
        stream.runs.iter().for_each(|&r| runs[r].logits = logits.clone());
    }
    Ok(runs.into_iter().map(|r| r.finish(prompt_len)).collect())
}

/// One prefill layer as one policy sees it.
#[derive(Clone, Copy)]
struct LayerStep<'a> {
    policy: &'a Policy,
    layer: usize,
    prompt_len: usize,
    seq: usize,
    last_layer: bool,
}

/// What layer `step.layer` caches and which rows it propagates, per `step.policy`.
fn choose<O: Ops>(ops: &O, step: &LayerStep, qkv: &O::Qkv, attention: &O::Attention) -> Result<LayerChoice<O>> {
    let s = ops.spec();
    let (hq, hk, d, n_layers) = (s.num_heads, s.num_kv_heads, s.head_dim, s.num_layers);
    let LayerStep { policy, layer, prompt_len, seq, last_layer } = *step;
    let all = LayerChoice { keep: None, propagate: None };
    let invalid = |field: &'static str| move |e: select::SelectError| Error::invalid(field, e.to_string());
    let shape = |window| select::Shape { n_heads: hq, n_kv_heads: hk, head_dim: d, seq_len: seq, window };
    let host = || ops.host_qk(qkv).expect("checked: this method needs host selection");
    if policy.method == Method::Pyramidinfer {
        let recent = policy.recent_len(prompt_len);
        if last_layer || seq <= recent || !policy.compresses(prompt_len) {
            return Ok(all);
        }
        let (q, k) = host();
        let q_recent = select::last_rows_per_head(q, seq, hq, d, recent);
        let scores = select::recent_scores(&q_recent, k, &shape(recent)).map_err(invalid("recent_ratio"))?;
        let n = seq - recent;
        // Σ over heads (identity pooling): ranks like the paper's mean.
        let total =
            select::pool_group_scores(&scores, hq, 1, n, 1, select::Pool::Max).map_err(invalid("recent_ratio"))?;
        let context = n - policy.params.sink.min(n);
        let keep = policy.pyramid_keep(layer, n_layers, prompt_len, context);
        let propagate = (keep < context)
            .then(|| ops.rows_from_host(select::pyramidinfer_indices(&total, seq, policy.params.sink, keep)))
            .transpose()?;
        return Ok(LayerChoice { keep: None, propagate });
    }
    let plan = policy.plan(layer, n_layers, prompt_len, seq);
    let Some(budget) = plan.kv_budget else { return Ok(all) };
    let w = policy.window;
    let keep = match policy.method {
        Method::Fastkv | Method::SnapkvGqa => {
            let scores = ops.group_scores(qkv, attention, policy)?;
            let propagate = match plan.tsp_len.filter(|_| !last_layer) {
                Some(t) => Some(ops.tsp_rows(&scores, t, w)?),
                None => None,
            };
            return Ok(LayerChoice { keep: Some(ops.kv_keep(&scores, budget, w)?), propagate });
        }
        Method::Streamingllm => vec![select::streaming_indices(seq, policy.params.sink, budget); hk],
        _ => {
            // Per query head: SnapKV, PyramidKV, AdaKV, HeadKV (pooled window scores) and H2O.
            let (q, k) = host();
            let n = seq - w;
            let scores = if policy.method == Method::H2o {
                select::h2o_scores(&select::last_rows_per_head(q, seq, hq, d, seq), k, &shape(w))
            } else {
                select::window_scores(&select::last_rows_per_head(q, seq, hq, d, w), k, &shape(w))
                    .and_then(|s| select::pool_group_scores(&s, hq, hq, n, policy.kernel, policy.pool))
            }
            .map_err(invalid("window"))?;
            let budgets = match policy.method {
                Method::Adakv => select::ada_budgets(&scores, hq, n, budget - w, policy.params.ada_alpha)
                    .map_err(invalid("kv_budget"))?,
                Method::Headkv => policy.head_budgets(layer, budget, seq)?,
                _ => vec![budget - w; hq],
            };
            select::head_indices(&scores, seq, w, &budgets).map_err(invalid("kv_budget"))?
        }
    };
    Ok(LayerChoice { keep: Some(ops.keep_from_host(keep)?), propagate: None })
}

/// [`choose`] for a selection-only FastKV run: only its TSP rows, at its ℓ*.
fn choose_tsp<O: Ops>(ops: &O, step: &LayerStep, qkv: &O::Qkv, attention: &O::Attention) -> Result<LayerChoice<O>> {
    let LayerStep { policy, layer, prompt_len, seq, last_layer } = *step;
    let plan = policy.plan(layer, ops.spec().num_layers, prompt_len, seq);
    let propagate = match plan.tsp_len.filter(|_| !last_layer) {
        Some(t) => Some(ops.tsp_rows(&ops.group_scores(qkv, attention, policy)?, t, policy.window)?),
        None => None,
    };
    Ok(LayerChoice { keep: None, propagate })
}

/// GemFilter's choice at its filter layer from that layer's host q (`[S, H·D]`) and k
/// (`[Hk, S, D]`): the top `k` positions by the last query's raw scores (docs/method.md §12), ascending.
fn gemfilter_select(spec: &ModelSpec, q: &[f32], keys: &[f32], seq: usize, k: usize) -> Result<Vec<u32>> {
    let (hq, hk, d) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
    let shape = select::Shape { n_heads: hq, n_kv_heads: hk, head_dim: d, seq_len: seq, window: 1 };
    let invalid = |e: select::SelectError| Error::invalid("kv_budget", e.to_string());
    let raw = select::last_query_scores(&q[(seq - 1) * hq * d..], keys, &shape).map_err(invalid)?;
    select::gemfilter_indices(&raw, hq, seq, k).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Budget, Floor};

    #[test]
    fn planned_cache_entries_follow_the_budgets_and_tsp() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/config.json");
        let spec = ModelSpec::from_hf_config(&path).unwrap(); // 4 layers
        let fastkv = Policy { tsp_layer: 1, floor: Floor::NONE, ..Policy::fastkv_default(&spec) }; // t = 0.2, r = 0.1
                                                                                                   // Layers 0–1: C = 100 of L = 1000; TSP keeps T = 200; layers 2–3: C = ⌊200 · 0.1/0.2⌋ = 100.
        assert_eq!(planned_cache_entries(&spec, &fastkv, 1000, 5), 4 * (100 + 5));
        let full = Policy { method: Method::Full, ..fastkv };
        assert_eq!(planned_cache_entries(&spec, &full, 1000, 5), 4 * (1000 + 5));
        // The default floor: below 1024 tokens nothing is compressed; above, no layer keeps fewer
        // than 128 entries (⌊1100 · 0.1⌋ = 110 → 128; T = 220).
        let floored = Policy { floor: Floor::DEFAULT, ..fastkv };
        assert_eq!(planned_cache_entries(&spec, &floored, 1000, 5), 4 * (1000 + 5));
        assert_eq!(planned_cache_entries(&spec, &floored, 1100, 0), 4 * 128);
        assert_eq!(planned_cache_entries(&spec, &floored, 4000, 0), 4 * 400);
        // A prompt shorter than the budget keeps everything (docs/method.md §8.1).
        let absolute = Policy { budget: Budget::Absolute { kv_budget: 64, tsp_len: 16 }, ..fastkv };
        assert_eq!(planned_cache_entries(&spec, &absolute, 40, 0), 4 * 40);
    }
}
