//! One request's KV cache on the GPU — per layer K and V `[Hk, capacity, D]` with their original
//! positions — and decode over it: the step is launched eagerly once, then captured as a CUDA graph
//! and replayed per token (token, position and cache lengths are read on the device).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice};
use half::bf16;

use super::gpu::driver;
use super::kernels::{decode_workspace_len, LayerKv};
use super::model::{ptr, ptr_mut, Lane, Model};
use crate::error::{Error, Result};

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

impl Model {
    /// One decode step of several requests, each on its own lane: their logits, in order.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Vec<f32>>> {
        tokens.iter().zip(positions).zip(caches.iter_mut()).map(|((&t, &p), c)| self.decode(t, p, c)).collect()
    }

    /// One decode step: token and position to the device, the step (eager the first time, then
    /// captured once and replayed), and its logits back.
    pub fn decode(&self, token: u32, position: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let s = &self.spec;
        if let Some(full) = cache.layers.iter().position(|l| l.len >= l.kv.capacity) {
            return Err(Error::invalid(
                "max_new_tokens",
                format!(
                    "layer {full}'s KV cache is full ({} entries): more tokens than were reserved",
                    cache.layers[full].len
                ),
            ));
        }
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
        if replay && st.graph.is_none() {
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
