//! The CPU backend, the reference every other backend is checked against: a Llama-family decoder
//! (covering Mistral, Qwen2 and Qwen3) that implements the prefill driver's [`Ops`] over host
//! buffers — so FastKV (docs/method.md §2–§6) and every baseline of §12 run on it — and decodes over
//! its per-request KV cache ([`kv_cache`]).

pub mod attention;
pub mod bf16_gemm;
pub mod gemv;
pub mod isa;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod tile_attention;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::prefill::Ops;
use crate::rope::{Rope, RopeTable};
use crate::select;
use crate::spec::ModelSpec;
use crate::tensors::{DType, TensorFile};
use attention::{attention, Heads, KvView};
use bf16_gemm::Kernel;
use kernels::{rms_norm, rms_norm_row, swiglu};
use kv_cache::LayerCache;
use linear::Linear;

/// Rows a prefill projects at once (q|k|v, output and MLP): bounds the MLP's 2·I-wide scratch for
/// long prompts, and a pausing prefill pauses between them.
const PREFILL_ROWS: usize = 512;
/// Query rows of prefill attention between the pauses of a pausing prefill (a multiple of the tile
/// attention's 32-row blocks; the result is the same as in one piece).
const ATTENTION_ROWS: usize = 256;

/// Which products a pass runs: a prefill's GEMMs, or a decode step's [`gemv`] products, whose
/// every row is computed the same whatever else is in the batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Prefill,
    Decode,
}

impl Linear {
    fn apply(&self, pass: Pass, x: &[f32], m: usize, out: &mut [f32]) {
        match pass {
            Pass::Prefill => self.forward(x, m, out),
            Pass::Decode => self.forward_decode(x, m, out),
        }
    }
}

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
    /// bf16 weights: the KV cache is stored in bf16 too.
    bf16: bool,
    /// The bf16 kernel prefill attention runs on: bf16 engines on a CPU with bf16 units (f32
    /// engines compute in f32 throughout, so they stay exact against an f32 reference).
    tiles: Option<Kernel>,
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

fn vector(file: &TensorFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = file.get_shaped(name, &[len])?;
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
        let bf16 = layers.first().is_some_and(|l| l.wqkv.dtype() == DType::Bf16);
        Ok(Model {
            tiles: bf16.then(|| bf16_gemm::kernel(isa::path())).flatten(),
            bf16,
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

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Bytes of one cached K or V element: bf16 engines cache in bf16, f32 engines in f32.
    pub fn kv_element_bytes(&self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
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

    fn embed_rows(&self, tokens: &[u32]) -> Vec<f32> {
        let e = self.spec.hidden_size;
        let mut x = vec![0f32; tokens.len() * e];
        x.par_chunks_mut(e).zip(tokens).for_each(|(row, &t)| self.embed.rows_f32(t as usize..t as usize + 1, row));
        x
    }

    /// q|k|v rows (`[m, qkv_rows]`) of `x`, biased, q/k-normed and rotated by `rope` (from its row
    /// `first_row`), [`PREFILL_ROWS`] rows at a time with `pause` between them.
    fn fused_qkv(
        &self,
        pass: Pass,
        layer: &Layer,
        x: &[f32],
        (rope, first_row): (&RopeTable, usize),
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<f32>> {
        let s = &self.spec;
        let (e, width) = (s.hidden_size, s.qkv_rows());
        let (hq, hk, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
        let mut qkv = vec![0f32; x.len() / e * width];
        let mut h = vec![0f32; x.len().min(PREFILL_ROWS * e)];
        for (c, (x, qkv)) in x.chunks(PREFILL_ROWS * e).zip(qkv.chunks_mut(PREFILL_ROWS * width)).enumerate() {
            let (m, h) = (x.len() / e, &mut h[..x.len()]);
            rms_norm(x, &layer.attn_norm, s.rms_norm_eps, h);
            layer.wqkv.apply(pass, h, m, qkv);
            if let Some(b) = &layer.bqkv {
                qkv.par_chunks_mut(width).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                qkv.par_chunks_mut(width).for_each_init(
                    || vec![0f32; d],
                    |tmp, row| {
                        for (head, chunk) in row[..(hq + hk) * d].chunks_exact_mut(d).enumerate() {
                            tmp.copy_from_slice(chunk);
                            rms_norm_row(tmp, if head < hq { qn } else { kn }, s.rms_norm_eps, chunk);
                        }
                    },
                );
            }
            let row = first_row + c * PREFILL_ROWS;
            rope.apply(qkv, width, row, 0, hq);
            rope.apply(qkv, width, row, hq * d, hk);
            pause()?;
        }
        Ok(qkv)
    }

    /// x += o·Woᵀ; x += MLP(RMSNorm(x)), [`PREFILL_ROWS`] rows at a time (the scratch allocated
    /// once), with `pause` between them.
    fn apply_output_and_mlp(
        &self,
        pass: Pass,
        layer: &Layer,
        x: &mut [f32],
        o: &[f32],
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let s = &self.spec;
        let (e, inter, hd) = (s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim);
        let rows = (x.len() / e).min(PREFILL_ROWS);
        let (mut h, mut gu, mut act) = (vec![0f32; rows * e], vec![0f32; rows * 2 * inter], vec![0f32; rows * inter]);
        for (chunk, o) in x.chunks_mut(PREFILL_ROWS * e).zip(o.chunks(PREFILL_ROWS * hd)) {
            let rows = chunk.len() / e;
            let (h, gu, act) = (&mut h[..chunk.len()], &mut gu[..rows * 2 * inter], &mut act[..rows * inter]);
            layer.wo.apply(pass, o, rows, h);
            chunk.par_iter_mut().zip(&*h).for_each(|(x, y)| *x += y);
            rms_norm(chunk, &layer.mlp_norm, s.rms_norm_eps, h);
            layer.w_gate_up.apply(pass, h, rows, gu);
            swiglu(gu, inter, act);
            layer.w_down.apply(pass, act, rows, h);
            chunk.par_iter_mut().zip(&*h).for_each(|(x, y)| *x += y);
            pause()?;
        }
        Ok(())
    }

    /// Final norm and LM head of each hidden row of `x` (`[m, E]`): `[m, V]` logits, computed with
    /// the decode products, the same for a row whatever else is in `x`.
    fn logits_of(&self, x: &[f32]) -> Vec<f32> {
        let (e, v) = (self.spec.hidden_size, self.spec.vocab_size);
        let m = x.len() / e;
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &self.final_norm, self.spec.rms_norm_eps, &mut h);
        let mut logits = vec![0f32; m * v];
        self.lm_head.as_ref().unwrap_or(&self.embed).forward_decode(&h, m, &mut logits);
        logits
    }

    /// One new token at `position` through every layer, appending to the cache: [`Model::decode_batch`]
    /// of one request.
    pub fn decode(&self, token: u32, position: u32, cache: &mut KvCache) -> Vec<f32> {
        self.decode_batch(&[token], &[position], &mut [cache]).pop().expect("one request")
    }

    /// One decode step of several requests at once — `tokens[b]` at `positions[b]` appended to
    /// `caches[b]` — and their logits. Every weight is read once for the whole batch (the decode
    /// products), attention runs per request over its own cache, and each request's logits are the
    /// same bits as when it decodes alone. The step runs on a thread of rayon's pool: its hundreds of
    /// small parallel loops then start from a worker, which takes its share at once, instead of
    /// waking the pool and sleeping on a latch each time.
    pub fn decode_batch(&self, tokens: &[u32], positions: &[u32], caches: &mut [&mut KvCache]) -> Vec<Vec<f32>> {
        assert!(
            tokens.len() == positions.len() && tokens.len() == caches.len(),
            "one token, position and cache per request"
        );
        if tokens.is_empty() {
            return Vec::new();
        }
        rayon::scope(|_| self.decode_step(tokens, positions, caches))
    }

    fn decode_step(&self, tokens: &[u32], positions: &[u32], caches: &mut [&mut KvCache]) -> Vec<Vec<f32>> {
        let s = &self.spec;
        let (hq, hk, d, width) = (s.num_heads, s.num_kv_heads, s.head_dim, s.qkv_rows());
        let heads = self.heads();
        let mut x = self.embed_rows(tokens);
        let rope = self.rope.table(positions);
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = self.fused_qkv(Pass::Decode, layer, &x, (&rope, 0), &mut || Ok(())).expect("no pause to fail");
            let mut o = vec![0f32; tokens.len() * hq * d];
            o.par_chunks_mut(hq * d).zip(qkv.par_chunks(width)).zip(caches.par_iter_mut()).zip(positions).for_each(
                |(((o, row), cache), &position)| {
                    let (q, kv_new) = row.split_at(hq * d);
                    let lc = &mut cache.layers[l];
                    lc.push(&kv_new[..hk * d], &kv_new[hk * d..2 * hk * d], position);
                    lc.attend(q, position, &heads, o);
                },
            );
            self.apply_output_and_mlp(Pass::Decode, layer, &mut x, &o, &mut || Ok(())).expect("no pause to fail");
        }
        self.logits_of(&x).chunks_exact(s.vocab_size).map(<[f32]>::to_vec).collect()
    }
}

/// Bytes of host memory available now: Linux's MemAvailable, else (another OS, no /proc) 4 GiB.
pub fn available_memory() -> usize {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib =
        meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse().ok());
    kib.map_or(4 << 30, |k: usize| k * 1024)
}

/// A sequence's original positions and their RoPE table.
pub struct Positions {
    pos: Vec<u32>,
    rope: RopeTable,
}

/// One layer's q (token-major `[S, H·D]`) and head-major k, v (`[Hk, S, D]`).
pub struct Qkv {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Ops for Model {
    type Hidden = Vec<f32>;
    type Positions = Positions;
    type Qkv = Qkv;
    type Attention = Vec<f32>;
    type Scores = Vec<f32>;
    type Rows = Vec<u32>;
    type Keep = Vec<Vec<u32>>;
    type LayerCache = LayerCache;

    const NAME: &'static str = "cpu";
    const HOST_SELECTION: bool = true;

    fn spec(&self) -> &ModelSpec {
        Model::spec(self)
    }

    fn reserve(&self, _: usize, _: usize) -> Result<()> {
        Ok(()) // host memory: the allocator reports what does not fit
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(self.embed_rows(tokens))
    }

    fn positions(&self, positions: &[u32]) -> Result<Positions> {
        Ok(Positions { pos: positions.to_vec(), rope: self.rope.table(positions) })
    }

    fn qkv(&self, layer: usize, x: &Vec<f32>, pos: &Positions, pause: &mut dyn FnMut() -> Result<()>) -> Result<Qkv> {
        let s = &self.spec;
        let fused = self.fused_qkv(Pass::Prefill, &self.layers[layer], x, (&pos.rope, 0), pause)?;
        let (q, k, v) = split_heads(&fused, pos.pos.len(), s.num_heads, s.num_kv_heads, s.head_dim);
        Ok(Qkv { q, k, v })
    }

    fn attention(
        &self,
        qkv: &Qkv,
        pos: &Positions,
        last_row_only: bool,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<f32>> {
        let (hq, hk, d) = (self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim);
        let (positions, seq) = (&pos.pos, pos.pos.len());
        let first = if last_row_only { seq - 1 } else { 0 };
        let mut o = vec![0f32; (seq - first) * hq * d];
        let heads = self.heads();
        match self.tiles {
            Some(kernel) if !last_row_only => {
                let packed = tile_attention::pack(&qkv.k, &qkv.v, seq, &heads);
                for start in (0..seq).step_by(ATTENTION_ROWS) {
                    let rows = start..(start + ATTENTION_ROWS).min(seq);
                    tile_attention::attend(kernel, &packed, &qkv.q, positions, &heads, rows, &mut o);
                    pause()?;
                }
            }
            _ => {
                let all_pos: Vec<u32> = (0..hk).flat_map(|_| positions.iter().copied()).collect();
                let kv = KvView { k: &qkv.k, v: &qkv.v, pos: &all_pos, len: seq, stride: seq };
                for start in (first..seq).step_by(ATTENTION_ROWS) {
                    let end = (start + ATTENTION_ROWS).min(seq);
                    let out = &mut o[(start - first) * hq * d..(end - first) * hq * d];
                    attention(&qkv.q[start * hq * d..end * hq * d], &positions[start..end], start, &kv, &heads, out);
                    pause()?;
                }
            }
        }
        Ok(o)
    }

    fn output_and_mlp(
        &self,
        layer: usize,
        x: &mut Vec<f32>,
        o: Vec<f32>,
        last_row_only: bool,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let e = self.spec.hidden_size;
        if last_row_only {
            x.drain(..x.len() - e);
        }
        self.apply_output_and_mlp(Pass::Prefill, &self.layers[layer], x, &o, pause)
    }

    fn logits(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(self.logits_of(&x[x.len() - self.spec.hidden_size..]))
    }

    fn group_scores(&self, qkv: &Qkv, _: &Vec<f32>, policy: &Policy) -> Result<Vec<f32>> {
        let s = &self.spec;
        let (hq, hk, d, w) = (s.num_heads, s.num_kv_heads, s.head_dim, policy.window);
        let seq = qkv.q.len() / (hq * d);
        let shape = select::Shape { n_heads: hq, n_kv_heads: hk, head_dim: d, seq_len: seq, window: w };
        let q_window = select::last_rows_per_head(&qkv.q, seq, hq, d, w);
        select::group_scores(&q_window, &qkv.k, &shape, policy.kernel, policy.pool)
            .map_err(|e| Error::invalid("window", e.to_string()))
    }

    fn kv_keep(&self, scores: &Vec<f32>, budget: usize, window: usize) -> Result<Vec<Vec<u32>>> {
        let hk = self.spec.num_kv_heads;
        let seq = scores.len() / hk + window;
        let idx = select::kv_indices(scores, hk, seq, window, budget)
            .map_err(|e| Error::invalid("kv_budget", e.to_string()))?;
        Ok(idx.chunks_exact(budget).map(<[u32]>::to_vec).collect())
    }

    fn tsp_rows(&self, scores: &Vec<f32>, tsp_len: usize, window: usize) -> Result<Vec<u32>> {
        let hk = self.spec.num_kv_heads;
        let seq = scores.len() / hk + window;
        select::tsp_indices(scores, hk, seq, window, tsp_len).map_err(|e| Error::invalid("tsp_len", e.to_string()))
    }

    fn keep_from_host(&self, keep: Vec<Vec<u32>>) -> Result<Vec<Vec<u32>>> {
        Ok(keep)
    }

    fn rows_from_host(&self, rows: Vec<u32>) -> Result<Vec<u32>> {
        Ok(rows)
    }

    fn same_rows(&self, a: &Vec<u32>, b: &Vec<u32>) -> Result<bool> {
        Ok(a == b)
    }

    fn store(&self, qkv: &Qkv, pos: &Positions, keep: Option<&Vec<Vec<u32>>>, reserve: usize) -> Result<LayerCache> {
        let (hk, d) = (self.spec.num_kv_heads, self.spec.head_dim);
        Ok(LayerCache::from_prefill(&qkv.k, &qkv.v, &pos.pos, keep.map(Vec::as_slice), hk, d, reserve, self.bf16))
    }

    fn propagate(&self, x: &Vec<f32>, pos: &Positions, rows: &Vec<u32>) -> Result<(Vec<f32>, Positions)> {
        let e = self.spec.hidden_size;
        let x = rows.iter().flat_map(|&i| x[i as usize * e..][..e].iter().copied()).collect();
        let kept: Vec<u32> = rows.iter().map(|&i| pos.pos[i as usize]).collect();
        Ok((x, self.positions(&kept)?))
    }

    fn positions_to_host(&self, pos: &Positions) -> Result<Vec<u32>> {
        Ok(pos.pos.clone())
    }

    fn host_qk<'a>(&self, qkv: &'a Qkv) -> Option<(&'a [f32], &'a [f32])> {
        Some((&qkv.q, &qkv.k))
    }

    fn fence(&self) -> Result<()> {
        Ok(())
    }
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
