//! The prefill driver's [`Ops`] on the GPU, for one request: the model's weights on the request's
//! [`Lane`]. Within a request nothing waits for the host inside a layer (budgets depend only on L);
//! the host reads the device only for the logits and, once at ℓ*, the positions TSP kept.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaSlice;
use half::bf16;

use super::gpu::{driver, Gpu};
use super::kernels::{window_scores_workspace_len, AttentionInputs, Gather, Keys, SlidingWindow};
use super::kv_cache::{KvCache, LayerCache};
use super::model::{ptr, ptr_mut, Lane, Model};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::prefill::{self, Ops, Prefill};
use crate::select::Shape;
use crate::spec::ModelSpec;

/// The prefill driver's view of the model for one request: the model's weights on the request's lane.
pub struct LaneModel<'m> {
    model: &'m Model,
    lane: Arc<Lane>,
    /// `0..L` for the prompt's L, uploaded once: the gather indices that store a whole layer.
    iota: OnceLock<CudaSlice<u32>>,
}

/// Hidden states `[rows, E]`, f32.
pub struct Hidden {
    x: CudaSlice<f32>,
    rows: usize,
}

/// Positions of a sequence's rows on the device.
pub struct Positions {
    pos: CudaSlice<u32>,
    len: usize,
}

/// One layer's fused, rotated q|k|v rows `[S, (H + 2·Hk)·D]`.
pub struct Qkv {
    rows: CudaSlice<bf16>,
    seq: usize,
}

/// Attention output `[rows, H·D]` and, when every row was computed, the normalisers `[H, S]` the
/// window scoring reuses.
pub struct Attention {
    o: CudaSlice<bf16>,
    lse: Option<CudaSlice<f32>>,
}

/// Group scores `[Hk, S−W]` of a sequence of `seq` rows.
pub struct Scores {
    a: CudaSlice<f32>,
    seq: usize,
}

/// Row indices on the device.
pub struct Rows {
    idx: CudaSlice<u32>,
    len: usize,
}

/// Entries to keep per KV head: `[Hk, count]` indices.
pub struct Keep {
    idx: CudaSlice<u32>,
    count: usize,
}

/// The driver calls `Ops::reserve` before it stores anything; a store without it is a bug.
fn not_reserved() -> Error {
    Error::Device {
        backend: "cuda",
        operation: "store".into(),
        code: None,
        message: "the prefill did not reserve its prompt length first".into(),
    }
}

/// The scored entries of a selection of `count` rows (window included) from `seq`: `count − W`,
/// which must fit between 0 and the `seq − W` candidates.
fn scored(count: usize, window: usize, seq: usize, field: &'static str) -> Result<usize> {
    count.checked_sub(window).filter(|&k| k <= seq.saturating_sub(window)).ok_or_else(|| {
        Error::invalid(field, format!("{count} must lie between the window ({window}) and the sequence ({seq})"))
    })
}

impl<'m> LaneModel<'m> {
    pub(super) fn new(model: &'m Model, lane: Arc<Lane>) -> Self {
        LaneModel { model, lane, iota: OnceLock::new() }
    }

    /// Wraps prefilled layers into a cache that decodes on this request's lane.
    pub fn cache(&self, layers: Vec<LayerCache>) -> KvCache {
        KvCache::new(layers, self.lane.clone())
    }

    fn dev(&self) -> &Gpu {
        &self.lane.dev
    }
}

impl Ops for LaneModel<'_> {
    type Hidden = Hidden;
    type Positions = Positions;
    type Qkv = Qkv;
    type Attention = Attention;
    type Scores = Scores;
    type Rows = Rows;
    type Keep = Keep;
    type LayerCache = LayerCache;

    const NAME: &'static str = "cuda";
    const HOST_SELECTION: bool = false;

    fn spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    fn reserve(&self, prompt_len: usize, cache_entries: usize) -> Result<()> {
        self.model.check_fits(prompt_len, cache_entries)?;
        if self.iota.get().is_none() {
            let idx: Vec<u32> = (0..prompt_len as u32).collect();
            let _ = self.iota.set(self.dev().upload(&idx)?);
        }
        Ok(())
    }

    fn embed(&self, tokens: &[u32]) -> Result<Hidden> {
        let e = self.model.spec.hidden_size;
        let ids = self.dev().upload(tokens)?;
        let mut x = self.dev().zeros::<f32>(tokens.len() * e)?;
        self.dev().embed_into(&ids, &self.model.embed, e, &mut x)?;
        Ok(Hidden { x, rows: tokens.len() })
    }

    fn positions(&self, positions: &[u32]) -> Result<Positions> {
        Ok(Positions { pos: self.dev().upload(positions)?, len: positions.len() })
    }

    fn qkv(&self, layer: usize, x: &Hidden, pos: &Positions, _pause: &mut dyn FnMut() -> Result<()>) -> Result<Qkv> {
        let s = &self.model.spec;
        let dev = self.dev();
        let mut h = dev.zeros::<bf16>(x.rows * s.hidden_size)?;
        let mut rows = dev.zeros::<bf16>(x.rows * s.qkv_rows())?;
        self.model.qkv_rows(&self.lane, &self.model.layers[layer], &x.x, x.rows, &pos.pos, &mut h, &mut rows)?;
        Ok(Qkv { rows, seq: x.rows })
    }

    /// One launch: `pause` runs between the driver's pieces (a GPU prefill is short).
    fn attention(
        &self,
        qkv: &Qkv,
        pos: &Positions,
        last_row_only: bool,
        _pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Attention> {
        let s = &self.model.spec;
        let (hq, d, seq) = (s.num_heads, s.head_dim, qkv.seq);
        let dev = self.dev();
        let mut a = AttentionInputs::fused(&qkv.rows, seq, hq, s.num_kv_heads, d);
        let first = if last_row_only { seq - 1 } else { 0 };
        if last_row_only {
            a.q = qkv.rows.slice((seq - 1) * s.qkv_rows()..);
            a.n_queries = 1;
        }
        if let Some(size) = s.sliding_window {
            a.window = Some(SlidingWindow { size, q_pos: pos.pos.slice(first..), k_pos: pos.pos.slice(..) });
        }
        let mut o = dev.zeros::<bf16>((seq - first) * hq * d)?;
        let mut lse = (!last_row_only).then(|| dev.zeros::<f32>(hq * seq)).transpose()?;
        dev.flash_attention_into(&a, &mut o, hq * d, lse.as_mut())?;
        Ok(Attention { o, lse })
    }

    fn output_and_mlp(
        &self,
        layer: usize,
        x: &mut Hidden,
        o: Attention,
        last_row_only: bool,
        _pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let e = self.model.spec.hidden_size;
        if last_row_only && x.rows > 1 {
            let mut last = self.dev().zeros::<f32>(e)?;
            self.dev()
                .stream
                .memcpy_dtod(&x.x.slice((x.rows - 1) * e..x.rows * e), &mut last)
                .map_err(driver("cuMemcpyDtoD"))?;
            *x = Hidden { x: last, rows: 1 };
        }
        self.model.output_and_mlp_rows(&self.lane, &self.model.layers[layer], &mut x.x, &o.o, x.rows)
    }

    fn logits(&self, x: &Hidden) -> Result<Vec<f32>> {
        let s = &self.model.spec;
        let (e, dev) = (s.hidden_size, self.dev());
        let mut h = dev.zeros::<bf16>(e)?;
        let last = x.x.slice((x.rows - 1) * e..x.rows * e);
        dev.rms_norm_f32_into(&last, &self.model.final_norm, 1, s.rms_norm_eps as f32, &mut h)?;
        let mut logits = dev.zeros::<f32>(s.vocab_size)?;
        let head = self.model.lm_head.as_ref().unwrap_or(&self.model.embed);
        self.model.gemm(&self.lane, ptr(dev, &h), 1, head, s.vocab_size, e, ptr_mut(dev, &mut logits), true, false)?;
        dev.download(&logits)
    }

    fn group_scores(&self, qkv: &Qkv, attention: &Attention, policy: &Policy) -> Result<Scores> {
        let s = &self.model.spec;
        let (hq, hk, d, w, seq) = (s.num_heads, s.num_kv_heads, s.head_dim, policy.window, qkv.seq);
        let dev = self.dev();
        let shape = Shape { n_heads: hq, n_kv_heads: hk, head_dim: d, seq_len: seq, window: w };
        let mut q_window = dev.zeros::<bf16>(hq * w * d)?;
        dev.pack_window_into(&qkv.rows, s.qkv_rows(), &shape, &mut q_window)?;
        let keys = Keys { data: qkv.rows.slice(hq * d..), head: d, row: s.qkv_rows() };
        let n = seq - w;
        let mut window = dev.zeros::<f32>(hq * n)?;
        match &attention.lse {
            Some(lse) => dev.window_scores_into(
                &q_window,
                &keys,
                Some(lse.slice(n..)),
                &shape,
                &mut dev.zeros::<f32>(1)?,
                &mut window,
            )?,
            None => {
                let mut workspace = dev.zeros::<f32>(window_scores_workspace_len(&shape)?)?;
                dev.window_scores_into(&q_window, &keys, None, &shape, &mut workspace, &mut window)?
            }
        }
        let mut a = dev.zeros::<f32>(hk * n)?;
        dev.pool_group_into(&window, hq, hk, n, (policy.kernel, policy.pool), &mut a)?;
        Ok(Scores { a, seq })
    }

    fn kv_keep(&self, scores: &Scores, budget: usize, window: usize) -> Result<Keep> {
        let hk = self.model.spec.num_kv_heads;
        let n = scores.seq - window;
        let k = scored(budget, window, scores.seq, "kv_budget")?;
        let mut idx = self.dev().zeros::<u32>(hk * budget)?;
        self.dev().top_k_into(&scores.a, (hk, n), k, window, &mut idx)?;
        Ok(Keep { idx, count: budget })
    }

    fn tsp_rows(&self, scores: &Scores, tsp_len: usize, window: usize) -> Result<Rows> {
        let hk = self.model.spec.num_kv_heads;
        let n = scores.seq - window;
        let k = scored(tsp_len, window, scores.seq, "tsp_len")?;
        let dev = self.dev();
        let mut total = dev.zeros::<f32>(n)?;
        dev.sum_heads_into(&scores.a, hk, n, &mut total)?;
        let mut idx = dev.zeros::<u32>(tsp_len)?;
        dev.top_k_into(&total, (1, n), k, window, &mut idx)?;
        Ok(Rows { idx, len: tsp_len })
    }

    fn keep_from_host(&self, keep: Vec<Vec<u32>>) -> Result<Keep> {
        let hk = self.model.spec.num_kv_heads;
        let count = keep.first().map_or(0, Vec::len);
        if keep.len() != hk || keep.iter().any(|k| k.len() != count) {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: "per-query-head or ragged KV caches".into(),
                supported: format!("{hk} KV heads of equal length"),
            });
        }
        Ok(Keep { idx: self.dev().upload(&keep.concat())?, count })
    }

    fn rows_from_host(&self, rows: Vec<u32>) -> Result<Rows> {
        Ok(Rows { len: rows.len(), idx: self.dev().upload(&rows)? })
    }

    fn same_rows(&self, a: &Rows, b: &Rows) -> Result<bool> {
        Ok(a.len == b.len && self.dev().download(&a.idx)? == self.dev().download(&b.idx)?)
    }

    fn store(&self, qkv: &Qkv, pos: &Positions, keep: Option<&Keep>, reserve: usize) -> Result<LayerCache> {
        let s = &self.model.spec;
        let (hq, hk, d, width, seq) = (s.num_heads, s.num_kv_heads, s.head_dim, s.qkv_rows(), qkv.seq);
        let dev = self.dev();
        // A whole layer reads the same `0..S` row of the iota for every KV head (index stride 0).
        let (idx, count, idx_batch) = match keep {
            Some(k) => (&k.idx, k.count, k.count),
            None => (self.iota.get().filter(|i| i.len() >= seq).ok_or_else(not_reserved)?, seq, 0),
        };
        let capacity = count + reserve;
        let mut kv = dev.kv_cache::<bf16>(hk, capacity, d)?;
        let rows = |row, src_batch, src_row| Gather {
            batches: hk,
            count,
            row,
            src_rows: seq,
            src_batch,
            src_row,
            idx_batch,
            dst_batch: capacity * row,
            dst_row: row,
        };
        dev.gather_into(&qkv.rows.slice(hq * d..), idx, &rows(d, d, width), &mut kv.k)?;
        dev.gather_into(&qkv.rows.slice((hq + hk) * d..), idx, &rows(d, d, width), &mut kv.v)?;
        dev.gather_into(&pos.pos, idx, &rows(1, 0, 1), &mut kv.pos)?;
        dev.write(&[count as u32], &mut kv.len)?;
        Ok(LayerCache { kv, len: count })
    }

    fn propagate(&self, x: &Hidden, pos: &Positions, rows: &Rows) -> Result<(Hidden, Positions)> {
        let e = self.model.spec.hidden_size;
        let dev = self.dev();
        let gather = |row| Gather {
            batches: 1,
            count: rows.len,
            row,
            src_rows: x.rows,
            src_batch: 0,
            src_row: row,
            idx_batch: 0,
            dst_batch: 0,
            dst_row: row,
        };
        let mut kept = dev.zeros::<f32>(rows.len * e)?;
        dev.gather_into(&x.x, &rows.idx, &gather(e), &mut kept)?;
        let mut kept_pos = dev.zeros::<u32>(rows.len)?;
        dev.gather_into(&pos.pos, &rows.idx, &gather(1), &mut kept_pos)?;
        Ok((Hidden { x: kept, rows: rows.len }, Positions { pos: kept_pos, len: rows.len }))
    }

    fn positions_to_host(&self, pos: &Positions) -> Result<Vec<u32>> {
        let mut host = self.dev().download(&pos.pos)?;
        host.truncate(pos.len);
        Ok(host)
    }

    fn host_qk<'a>(&self, _: &'a Qkv) -> Option<(&'a [f32], &'a [f32])> {
        None
    }

    fn fence(&self) -> Result<()> {
        if self.model.profile.load(Ordering::Relaxed) {
            self.dev().synchronize()?;
        }
        Ok(())
    }
}

impl Model {
    /// Prefills `tokens` under every policy on a new lane ([`crate::prefill::prefill_pausing`]); the
    /// caches decode on that lane.
    pub fn prefill_pausing(
        &self,
        tokens: &[u32],
        policies: &[Policy],
        reserve: usize,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Prefill<KvCache>>> {
        let lane = self.request()?;
        Ok(prefill::prefill_pausing(&lane, tokens, policies, reserve, pause)?
            .into_iter()
            .map(|p| p.map_cache(|layers| lane.cache(layers)))
            .collect())
    }

    /// The positions each FastKV policy's TSP keeps ([`crate::prefill::tsp_selections`]).
    pub fn tsp_selections(&self, tokens: &[u32], policies: &[Policy]) -> Result<Vec<Option<Vec<u32>>>> {
        prefill::tsp_selections(&self.request()?, tokens, policies)
    }
}
