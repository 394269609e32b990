//! One request's KV cache on the GPU — per layer K and V `[Hk, capacity, D]` with their original
//! positions — and decode over it: the step is launched eagerly once, then captured as a CUDA graph
//! and replayed per token (token, position and cache lengths are read on the device).
//!
//! Several requests decode as one batched step: every GEMM with M = the batch (one pass over the weights), K/V
//! appends and attention over a device table of the requests' caches ([`CacheRef`]), on one lane of the model's.
//! The batch is padded to a power of two and the caches' largest capacity rounded up to one, so a step captured
//! as a CUDA graph for that bucket is replayed for any batch that falls in it (tokens, positions and the table
//! are written before each launch).

use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice};
use half::bf16;

use super::ffi::CacheRef;
use super::gpu::{driver, Gpu};
use super::kernels::{decode_batch_workspace_len, decode_workspace_len, LayerKv};
use super::model::{ptr, ptr_mut, Lane, Model};
use crate::error::{Error, Result};
use crate::spec::ModelSpec;

/// One layer's cache on the device and its length as the host knows it.
pub struct LayerCache {
    pub(super) kv: LayerKv<bf16>,
    pub(super) len: usize,
}

/// One request's KV cache: every layer's, the lane it lives on, and its decode state.
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) lane: Arc<Lane>,
    decode: Option<Box<DecodeState>>,
}

/// Buffers of one decode step, allocated once per cache so a captured graph can replay them.
struct DecodeState {
    /// `[token, position]` of the step, written before each launch.
    step: CudaSlice<u32>,
    x: CudaSlice<f32>,
    h: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
    graph: Option<CudaGraph>,
    /// Replay a captured graph from the second step on.
    graphs: bool,
    steps: usize,
}

/// The batched decode: its lane and a step per bucket (rows, capacity).
pub struct Batches {
    lane: Arc<Lane>,
    steps: HashMap<(usize, usize), BatchStep>,
}

// SAFETY: cudarc leaves CudaGraph !Send for its raw handles, but CUDA graphs may be launched from any thread; the
// steps are used only under the model's mutex, on the lane's stream.
unsafe impl Send for Batches {}

/// Buffers of a batched step for `rows` requests whose caches hold at most `capacity` entries, and its graph.
struct BatchStep {
    rows: usize,
    capacity: usize,
    tokens: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    /// `[layers, rows]`: each layer's table of the requests' caches.
    caches: CudaSlice<CacheRef>,
    x: CudaSlice<f32>,
    h: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
    graph: Option<CudaGraph>,
    steps: usize,
}

impl BatchStep {
    fn new(s: &ModelSpec, dev: &Gpu, rows: usize, capacity: usize) -> Result<Self> {
        let (e, inter, hd) = (s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim);
        Ok(BatchStep {
            rows,
            capacity,
            tokens: dev.zeros(rows)?,
            positions: dev.zeros(rows)?,
            caches: dev.zeros(s.num_layers * rows)?,
            x: dev.zeros(rows * e)?,
            h: dev.zeros(rows * e)?,
            qkv: dev.zeros(rows * s.qkv_rows())?,
            o: dev.zeros(rows * hd)?,
            gate_up: dev.zeros(rows * 2 * inter)?,
            act: dev.zeros(rows * inter)?,
            logits: dev.zeros(rows * s.vocab_size)?,
            workspace: dev.zeros(decode_batch_workspace_len(rows, s.num_heads, capacity, s.head_dim)?)?,
            graph: None,
            steps: 0,
        })
    }
}

/// Rows and capacities of the batched steps: powers of two, capacities from the attention's split size.
fn bucket(n: usize, least: usize) -> usize {
    n.max(least).next_power_of_two()
}

impl Model {
    /// One decode step of several requests: one alone on its own lane ([`Model::decode`]), more as one batched
    /// step. Their logits, in order.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Vec<f32>>> {
        match caches {
            [] => Ok(Vec::new()),
            [one] => Ok(vec![self.decode(tokens[0], positions[0], one)?]),
            _ => self.decode_batched(tokens, positions, caches),
        }
    }

    fn decode_batched(&self, tokens: &[u32], positions: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Vec<f32>>> {
        let s = &self.spec;
        for c in caches.iter() {
            check_room(c)?;
        }
        let capacity = caches.iter().flat_map(|c| c.layers.iter().map(|l| l.kv.capacity)).max().unwrap_or(1);
        let (rows, capacity) = (bucket(caches.len(), 1), bucket(capacity, 256));
        let mut guard = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Batches { lane: self.lane()?, steps: HashMap::new() });
        }
        let Batches { lane, steps } = guard.as_mut().expect("set above");
        let lane = lane.clone();
        let dev = &lane.dev;
        let st = match steps.entry((rows, capacity)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(BatchStep::new(s, dev, rows, capacity)?),
        };
        // This batch in the bucket's buffers: padding rows decode token 0 at position 0 against no cache.
        let pad = |v: &[u32]| v.iter().copied().chain(std::iter::repeat(0)).take(rows).collect::<Vec<u32>>();
        dev.write(&pad(tokens), &mut st.tokens)?;
        dev.write(&pad(positions), &mut st.positions)?;
        let mut table = vec![CacheRef::default(); s.num_layers * rows];
        for (b, c) in caches.iter().enumerate() {
            for (l, layer) in c.layers.iter().enumerate() {
                table[l * rows + b] = layer.kv.cache_ref(dev);
            }
        }
        dev.write(&table, &mut st.caches)?;
        // Captured once, at the bucket's second step; a failed capture leaves it eager.
        let replay = self.graphs.load(Ordering::Relaxed) && st.steps >= 1;
        if replay && st.steps == 1 {
            let graph = dev.capture(|| self.batch_step(&lane, st));
            st.graph = graph;
        }
        match &st.graph {
            Some(graph) if replay => graph.launch().map_err(driver("cuGraphLaunch"))?,
            _ => self.batch_step(&lane, st)?,
        }
        st.steps += 1;
        let logits = dev.download(&st.logits)?;
        for c in caches.iter_mut() {
            c.layers.iter_mut().for_each(|l| l.len += 1);
        }
        Ok(logits.chunks(s.vocab_size).take(caches.len()).map(<[f32]>::to_vec).collect())
    }

    /// Enqueues one batched step on the lane: every projection with M = the bucket's rows, the appends and the
    /// attention through each layer's cache table.
    fn batch_step(&self, lane: &Lane, st: &mut BatchStep) -> Result<()> {
        let s = &self.spec;
        let (e, hq, hk, d, width) = (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.qkv_rows());
        let (inter, rows, dev) = (s.intermediate_size, st.rows, &lane.dev);
        let BatchStep { tokens, positions, caches, x, h, qkv, o, gate_up, act, logits, workspace, .. } = st;
        dev.embed_into(tokens, &self.embed, e, x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let table = caches.slice(l * rows..(l + 1) * rows);
            self.qkv_rows(lane, layer, x, rows, positions, h, qkv)?;
            let window = s.sliding_window.map(|w| (w, &*positions));
            // SAFETY: the table holds this batch's caches of this layer (cache_ref, capacities ≤ st.capacity),
            // alive for the step, and padding rows.
            unsafe {
                dev.kv_append_batch(qkv, width, &table, (hq, hk, d), positions)?;
                dev.decode_attention_batch_into(qkv, width, &table, st.capacity, (hq, hk, d), window, o, workspace)?;
            }
            let xp = ptr_mut(dev, x);
            self.gemm(lane, ptr(dev, o), rows, &layer.wo, e, hq * d, xp, true, true)?;
            dev.rms_norm_f32_into(x, &layer.mlp_norm, rows, s.rms_norm_eps as f32, h)?;
            self.gemm(lane, ptr(dev, h), rows, &layer.w_gate_up, 2 * inter, e, ptr_mut(dev, gate_up), false, false)?;
            dev.swiglu_into(gate_up, rows, inter, act)?;
            self.gemm(lane, ptr(dev, act), rows, &layer.w_down, e, inter, xp, true, true)?;
        }
        dev.rms_norm_f32_into(x, &self.final_norm, rows, s.rms_norm_eps as f32, h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.gemm(lane, ptr(dev, h), rows, head, s.vocab_size, e, ptr_mut(dev, logits), true, false)
    }

    /// One decode step: token and position to the device, the step (eager the first time, then
    /// captured once and replayed), and its logits back.
    pub fn decode(&self, token: u32, position: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let s = &self.spec;
        check_room(cache)?;
        let lane = cache.lane.clone();
        let dev = &lane.dev;
        if cache.decode.is_none() {
            let capacity = cache.layers.iter().map(|l| l.kv.capacity).max().unwrap_or(1);
            let (e, inter, hd) = (s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim);
            cache.decode = Some(Box::new(DecodeState {
                step: dev.zeros(2)?,
                x: dev.zeros(e)?,
                h: dev.zeros(e)?,
                qkv: dev.zeros(s.qkv_rows())?,
                o: dev.zeros(hd)?,
                gate_up: dev.zeros(2 * inter)?,
                act: dev.zeros(inter)?,
                logits: dev.zeros(s.vocab_size)?,
                workspace: dev.zeros(decode_workspace_len(s.num_heads, capacity, s.head_dim)?)?,
                graph: None,
                graphs: self.graphs.load(Ordering::Relaxed),
                steps: 0,
            }));
        }
        let KvCache { layers, decode, .. } = cache;
        let st = decode.as_mut().expect("set above");
        dev.write(&[token, position], &mut st.step)?;
        let replay = st.graphs && st.steps >= 1;
        if replay && st.steps == 1 {
            let graph = lane.dev.capture(|| self.decode_step(&lane, layers, st));
            st.graph = graph;
        }
        match &st.graph {
            Some(graph) if replay => graph.launch().map_err(driver("cuGraphLaunch"))?,
            _ => self.decode_step(&lane, layers, st)?,
        }
        layers.iter_mut().for_each(|l| l.len += 1);
        st.steps += 1;
        dev.download(&st.logits)
    }

    /// Enqueues one decode step on the lane, reading token, position and cache lengths from the
    /// device, so the same launches serve every step.
    fn decode_step(&self, lane: &Lane, layers: &mut [LayerCache], st: &mut DecodeState) -> Result<()> {
        let s = &self.spec;
        let (e, hq, d) = (s.hidden_size, s.num_heads, s.head_dim);
        let dev = &lane.dev;
        let DecodeState { step, x, h, qkv, o, gate_up, act, logits, workspace, .. } = st;
        let (token, position) = (step.slice(0..1), step.slice(1..2));
        dev.embed_into(&token, &self.embed, e, x)?;
        for (layer, lc) in self.layers.iter().zip(layers.iter_mut()) {
            self.qkv_rows(lane, layer, x, 1, &position, h, qkv)?;
            dev.kv_append(qkv, hq, &mut lc.kv, &position)?;
            let window = s.sliding_window.map(|w| (w, step.slice(1..2)));
            dev.decode_attention_into(&qkv.slice(..hq * d), &lc.kv, hq, window, o, workspace)?;
            let xp = ptr_mut(dev, x);
            self.gemm(lane, ptr(dev, o), 1, &layer.wo, e, hq * d, xp, true, true)?;
            dev.rms_norm_f32_into(x, &layer.mlp_norm, 1, s.rms_norm_eps as f32, h)?;
            self.gemm(
                lane,
                ptr(dev, h),
                1,
                &layer.w_gate_up,
                2 * s.intermediate_size,
                e,
                ptr_mut(dev, gate_up),
                false,
                false,
            )?;
            dev.swiglu_into(gate_up, 1, s.intermediate_size, act)?;
            self.gemm(lane, ptr(dev, act), 1, &layer.w_down, e, s.intermediate_size, xp, true, true)?;
        }
        dev.rms_norm_f32_into(x, &self.final_norm, 1, s.rms_norm_eps as f32, h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.gemm(lane, ptr(dev, h), 1, head, s.vocab_size, e, ptr_mut(dev, logits), true, false)
    }
}

/// Refuses a step for a cache with no room left.
fn check_room(cache: &KvCache) -> Result<()> {
    match cache.layers.iter().position(|l| l.len >= l.kv.capacity) {
        Some(full) => Err(Error::invalid(
            "max_new_tokens",
            format!(
                "layer {full}'s KV cache is full ({} entries): more tokens than were reserved",
                cache.layers[full].len
            ),
        )),
        None => Ok(()),
    }
}

impl KvCache {
    /// Prefilled layers as a cache that decodes on `lane`.
    pub(super) fn new(layers: Vec<LayerCache>, lane: Arc<Lane>) -> Self {
        KvCache { layers, lane, decode: None }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of K and V held (bf16), not counting the reserve.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| 2 * l.len * l.kv.n_kv_heads * l.kv.head_dim * 2).sum()
    }

    /// Original positions of every KV head's entries of `layer`, in cache order (a download).
    pub fn positions(&self, layer: usize) -> Result<Vec<Vec<u32>>> {
        let l = &self.layers[layer];
        let all = self.lane.dev.download(&l.kv.pos)?;
        Ok(all.chunks(l.kv.capacity).take(l.kv.n_kv_heads).map(|h| h[..l.len].to_vec()).collect())
    }
}
