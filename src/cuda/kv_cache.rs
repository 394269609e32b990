//! One request's KV cache on the GPU — per layer K and V `[Hk, capacity, D]` with their original
//! positions — and decode over it, one request alone or several as one batched step.
//!
//! Every decode step is the same [`DecodeStep`]: every GEMM with M = its rows (one pass over the weights for the
//! whole batch), K/V appends and attention over a device table of the requests' caches ([`CacheRef`]), with
//! token ids, positions and cache lengths read on the device. So a step is launched eagerly once, then captured
//! as a CUDA graph and replayed. A request alone has its own step on its own lane (one row, its capacity); a batch
//! runs on a lane of the model's, padded to a power of two and the caches' largest capacity rounded up to one, so
//! the step captured for that bucket is replayed for any batch that falls in it (ids, positions and the table are
//! written before each launch).

use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice};
use half::bf16;

use super::ffi::CacheRef;
use super::gpu::{driver, Gpu};
use super::kernels::{decode_batch_workspace_len, LayerKv};
use super::model::{ptr, ptr_mut, Lane, Model};
use crate::error::{Error, Result};
use crate::spec::ModelSpec;

/// One layer's cache on the device and its length as the host knows it.
pub struct LayerCache {
    pub(super) kv: LayerKv<bf16>,
    pub(super) len: usize,
}

/// One request's KV cache: every layer's, the lane it lives on, and its step for decoding alone.
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) lane: Arc<Lane>,
    decode: Option<Box<DecodeStep>>,
}

/// The batched decode: its lane and a step per bucket (rows, capacity).
pub struct Batches {
    lane: Arc<Lane>,
    steps: HashMap<(usize, usize), DecodeStep>,
}

// SAFETY: cudarc leaves CudaGraph !Send for its raw handles, but CUDA graphs may be launched from any thread; the
// steps are used only under the model's mutex, on the lane's stream.
unsafe impl Send for Batches {}

/// Buffers of a decode step for `rows` requests whose caches hold at most `capacity` entries, allocated once so a
/// captured graph can replay them, and that graph.
struct DecodeStep {
    rows: usize,
    capacity: usize,
    /// `[ids (rows) | positions (rows)]` of the step, written before each launch.
    step: CudaSlice<u32>,
    /// `[layers, rows]`: each layer's table of the requests' caches, and what it holds (written when it changes).
    caches: CudaSlice<CacheRef>,
    table: Vec<CacheRef>,
    x: CudaSlice<f32>,
    h: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
    graph: Option<CudaGraph>,
    /// Replay a captured graph from the second step on: a request's step keeps the model's setting when it first
    /// decoded; a bucket's follows it every step.
    graphs: bool,
    steps: usize,
}

impl DecodeStep {
    fn new(s: &ModelSpec, dev: &Gpu, rows: usize, capacity: usize, graphs: bool) -> Result<Self> {
        let (e, inter, hd) = (s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim);
        Ok(DecodeStep {
            rows,
            capacity,
            step: dev.zeros(2 * rows)?,
            caches: dev.zeros(s.num_layers * rows)?,
            table: Vec::new(),
            x: dev.zeros(rows * e)?,
            h: dev.zeros(rows * e)?,
            qkv: dev.zeros(rows * s.qkv_rows())?,
            o: dev.zeros(rows * hd)?,
            gate_up: dev.zeros(rows * 2 * inter)?,
            act: dev.zeros(rows * inter)?,
            logits: dev.zeros(rows * s.vocab_size)?,
            workspace: dev.zeros(decode_batch_workspace_len(rows, s.num_heads, capacity, s.head_dim)?)?,
            graph: None,
            graphs,
            steps: 0,
        })
    }
}

/// Rows and capacities of the batched steps: powers of two, capacities from the attention's split size.
fn bucket(n: usize, least: usize) -> usize {
    n.max(least).next_power_of_two()
}

/// The largest capacity of `layers`' caches.
fn capacity(layers: &[LayerCache]) -> usize {
    layers.iter().map(|l| l.kv.capacity).max().unwrap_or(1)
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

    /// One decode step of one request, on its own lane and step.
    pub fn decode(&self, token: u32, position: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        check_room(cache)?;
        let lane = cache.lane.clone();
        if cache.decode.is_none() {
            let graphs = self.graphs.load(Ordering::Relaxed);
            cache.decode = Some(Box::new(DecodeStep::new(&self.spec, &lane.dev, 1, capacity(&cache.layers), graphs)?));
        }
        let KvCache { layers, decode, .. } = cache;
        let st = decode.as_mut().expect("set above");
        Ok(self.run(&lane, st, &[token], &[position], &mut [layers])?.pop().expect("one row"))
    }

    fn decode_batched(&self, tokens: &[u32], positions: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Vec<f32>>> {
        for c in caches.iter() {
            check_room(c)?;
        }
        let largest = caches.iter().map(|c| capacity(&c.layers)).max().unwrap_or(1);
        let (rows, capacity) = (bucket(caches.len(), 1), bucket(largest, 256));
        let mut guard = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Batches { lane: self.lane()?, steps: HashMap::new() });
        }
        let Batches { lane, steps } = guard.as_mut().expect("set above");
        let graphs = self.graphs.load(Ordering::Relaxed);
        let st = match steps.entry((rows, capacity)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(DecodeStep::new(&self.spec, &lane.dev, rows, capacity, graphs)?),
        };
        st.graphs = graphs;
        let mut layers: Vec<&mut Vec<LayerCache>> = caches.iter_mut().map(|c| &mut c.layers).collect();
        self.run(lane, st, tokens, positions, &mut layers)
    }

    /// Runs `st` for the requests whose caches are `layers` (at most `st.rows` of them; padding rows decode id 0
    /// at position 0 against no cache): ids, positions and the cache table to the device, the step (eager the first
    /// time, then captured once and replayed), and each request's logits back.
    fn run(
        &self,
        lane: &Lane,
        st: &mut DecodeStep,
        tokens: &[u32],
        positions: &[u32],
        layers: &mut [&mut Vec<LayerCache>],
    ) -> Result<Vec<Vec<f32>>> {
        let (dev, rows, n_layers) = (&lane.dev, st.rows, self.spec.num_layers);
        let mut step = vec![0u32; 2 * rows];
        step[..tokens.len()].copy_from_slice(tokens);
        step[rows..][..positions.len()].copy_from_slice(positions);
        dev.write(&step, &mut st.step)?;
        let mut table = vec![CacheRef::default(); n_layers * rows];
        for (b, request) in layers.iter().enumerate() {
            for (l, layer) in request.iter().enumerate() {
                table[l * rows + b] = layer.kv.cache_ref(dev);
            }
        }
        if table != st.table {
            dev.write(&table, &mut st.caches)?;
            st.table = table;
        }
        // Captured once, at the second step; a failed capture leaves the step eager.
        let replay = st.graphs && st.steps >= 1;
        if replay && st.steps == 1 {
            let graph = dev.capture(|| self.enqueue_step(lane, st));
            st.graph = graph;
        }
        match &st.graph {
            Some(graph) if replay => graph.launch().map_err(driver("cuGraphLaunch"))?,
            _ => self.enqueue_step(lane, st)?,
        }
        st.steps += 1;
        let logits = dev.download(&st.logits)?;
        for request in layers.iter_mut() {
            request.iter_mut().for_each(|l| l.len += 1);
        }
        Ok(logits.chunks(self.spec.vocab_size).take(layers.len()).map(<[f32]>::to_vec).collect())
    }

    /// Enqueues one step on the lane: every projection with M = the step's rows, the appends and the attention
    /// through each layer's cache table, reading ids, positions and cache lengths on the device.
    fn enqueue_step(&self, lane: &Lane, st: &mut DecodeStep) -> Result<()> {
        let s = &self.spec;
        let (e, hq, hk, d, width) = (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.qkv_rows());
        let (inter, rows, dev) = (s.intermediate_size, st.rows, &lane.dev);
        let DecodeStep { step, caches, x, h, qkv, o, gate_up, act, logits, workspace, .. } = st;
        let (tokens, positions) = (step.slice(..rows), step.slice(rows..));
        dev.embed_into(&tokens, &self.embed, e, x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let table = caches.slice(l * rows..(l + 1) * rows);
            self.qkv_rows(lane, layer, x, rows, &positions, h, qkv)?;
            let window = s.sliding_window.map(|w| (w, step.slice(rows..)));
            // SAFETY: the table holds this step's caches of this layer (cache_ref, capacities ≤ st.capacity),
            // alive for the step, and padding rows.
            unsafe {
                dev.kv_append_batch(qkv, width, &table, (hq, hk, d), &positions)?;
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
