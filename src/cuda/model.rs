//! The CUDA backend's model: an engine's weights on one GPU in bf16 (uploaded once, shared by every
//! request), the prefill driver's [`Ops`] over device buffers — GEMMs through cuBLAS (bf16 in, f32
//! accumulate; the o and down projections accumulate straight into the f32 residual stream), every
//! other step through the plugin/ kernels — and decode over a device KV cache, captured once as a
//! CUDA graph and replayed per token.
//!
//! Each request gets its own stream and cuBLAS handle (a [`Lane`]), so requests run concurrently;
//! within a request nothing waits for the host inside a layer (budgets depend only on L), and the
//! host reads the device only for the logits and, once at ℓ*, the positions TSP kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::cublas::sys as blas;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaGraph, CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use half::slice::HalfFloatSliceExt;

use super::{driver, library, Device, Gather, Keys, LayerKv, Prefill as Attend, SlidingWindow};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::prefill::Ops;
use crate::rope::Rope;
use crate::select::Shape;
use crate::spec::ModelSpec;
use crate::tensors::{DType, TensorFile};

/// Rows of the MLP computed at once: bounds its 2·I-wide activations for long prompts.
const MLP_CHUNK: usize = 8192;
/// cuBLAS workspace per lane: set explicitly so a captured graph never allocates.
const BLAS_WORKSPACE: usize = 32 << 20;

struct Layer {
    attn_norm: CudaSlice<bf16>,
    wqkv: CudaSlice<bf16>,
    bqkv: Option<CudaSlice<bf16>>,
    q_norm: Option<CudaSlice<bf16>>,
    k_norm: Option<CudaSlice<bf16>>,
    wo: CudaSlice<bf16>,
    mlp_norm: CudaSlice<bf16>,
    w_gate_up: CudaSlice<bf16>,
    w_down: CudaSlice<bf16>,
}

/// An engine's model on one GPU.
pub struct Model {
    spec: ModelSpec,
    ordinal: usize,
    ctx: Arc<CudaContext>,
    layers: Vec<Layer>,
    embed: CudaSlice<bf16>,
    final_norm: CudaSlice<bf16>,
    lm_head: Option<CudaSlice<bf16>>,
    inv_freq: CudaSlice<f32>,
    /// Decode through a captured CUDA graph (`FASTKV_CUDA_GRAPHS=0`: eager launches).
    graphs: AtomicBool,
    /// Fence every profiled step (`FASTKV_CUDA_PROFILE=1`), so prefill profiles measure the GPU.
    profile: AtomicBool,
}

/// One request's stream and cuBLAS handle, shared by its prefill and every cache it made.
pub struct Lane {
    dev: Device,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
}

/// The prefill driver's view of the model for one request: the model's weights on the request's lane.
pub struct Request<'m> {
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

/// One layer's cache on the device and its length as the host knows it.
pub struct LayerCache {
    kv: LayerKv<bf16>,
    len: usize,
}

/// One request's KV cache: every layer's, the lane it lives on, and its decode state.
pub struct KvCache {
    layers: Vec<LayerCache>,
    lane: Arc<Lane>,
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

fn cublas(operation: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error + '_ {
    move |e| Error::Device {
        backend: "cuda",
        operation: operation.into(),
        code: Some(e.0 as i64),
        message: e.to_string(),
    }
}

/// A tensor of the engine as bf16 (f32 and f16 weights are converted on the host, chunk by chunk).
fn upload(dev: &Device, file: &TensorFile, name: &str, shape: &[usize]) -> Result<CudaSlice<bf16>> {
    let t = file.get_shaped(name, shape)?;
    let host: Vec<bf16> = match t.dtype {
        // Engine data is 8-byte aligned: bf16 goes up straight from the mapping.
        DType::Bf16 => return dev.upload(bytemuck::cast_slice::<u8, bf16>(t.bytes)),
        DType::F16 => {
            let h: Vec<half::f16> = bytemuck::pod_collect_to_vec(t.bytes);
            h.iter().map(|x| bf16::from_f32(x.to_f32())).collect()
        }
        DType::F32 => {
            let f: Vec<f32> = bytemuck::pod_collect_to_vec(t.bytes);
            let mut out = vec![bf16::ZERO; f.len()];
            out.convert_from_f32_slice(&f);
            out
        }
    };
    dev.upload(&host)
}

impl Model {
    /// Uploads the engine's weights (checked against `spec`) to GPU `ordinal`, after checking they
    /// fit in its free memory.
    pub fn load(spec: &ModelSpec, file: &TensorFile, ordinal: usize) -> Result<Self> {
        let dev = Device::new(ordinal)?;
        library::ensure_cublas()?;
        // Every request synchronises its own stream; weights are written once, below, and fenced.
        // SAFETY: no buffer is shared between streams while it is written.
        unsafe { dev.ctx.disable_event_tracking() };
        let (e, d, inter, v) = (spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.vocab_size);
        let per_layer = 2 * e + spec.qkv_rows() * e + e * spec.num_heads * d + 3 * inter * e;
        let bytes = 2 * (spec.num_layers * per_layer + v * e * if spec.tie_word_embeddings { 1 } else { 2 });
        ensure_free(&dev.ctx, ordinal, bytes, || format!("the weights need {:.1} GB in bf16", bytes as f64 / 1e9), "")?;
        if let Ok(t) = file.get("embed") {
            if t.dtype != DType::Bf16 {
                eprintln!("fastkv: {:?} weights are converted to bf16 for the GPU", t.dtype);
            }
        }
        let w = |name: String, shape: &[usize]| upload(&dev, file, &name, shape);
        let layers = (0..spec.num_layers)
            .map(|l| {
                let n = |s: &str| format!("layers.{l}.{s}");
                Ok(Layer {
                    attn_norm: w(n("attn_norm"), &[e])?,
                    wqkv: w(n("wqkv"), &[spec.qkv_rows(), e])?,
                    bqkv: spec.qkv_bias.then(|| w(n("bqkv"), &[spec.qkv_rows()])).transpose()?,
                    q_norm: spec.qk_norm.then(|| w(n("q_norm"), &[d])).transpose()?,
                    k_norm: spec.qk_norm.then(|| w(n("k_norm"), &[d])).transpose()?,
                    wo: w(n("wo"), &[e, spec.num_heads * d])?,
                    mlp_norm: w(n("mlp_norm"), &[e])?,
                    w_gate_up: w(n("w_gate_up"), &[2 * inter, e])?,
                    w_down: w(n("w_down"), &[e, inter])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Model {
            spec: spec.clone(),
            ordinal,
            layers,
            embed: w("embed".into(), &[v, e])?,
            final_norm: w("final_norm".into(), &[e])?,
            lm_head: (!spec.tie_word_embeddings).then(|| w("lm_head".into(), &[v, e])).transpose()?,
            inv_freq: dev.upload(Rope::new(spec).inv_freq())?,
            graphs: AtomicBool::new(std::env::var("FASTKV_CUDA_GRAPHS").map_or(true, |v| v != "0")),
            profile: AtomicBool::new(std::env::var("FASTKV_CUDA_PROFILE").is_ok_and(|v| v == "1")),
            ctx: dev.ctx.clone(),
        };
        dev.synchronize()?;
        Ok(model)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Decode caches made from now on replay a captured graph (`true`, the default) or launch eagerly.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }

    /// Prefill profiles measure GPU time (a stream sync at every step) or only enqueue time.
    pub fn set_profile(&self, on: bool) {
        self.profile.store(on, Ordering::Relaxed);
    }

    /// A new request: its own stream and cuBLAS handle (with a fixed workspace, for graph capture).
    pub fn request(&self) -> Result<Request<'_>> {
        let stream = self.ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let dev = Device { ctx: self.ctx.clone(), stream: stream.clone() };
        let blas = CudaBlas::new(stream).map_err(cublas("cublasCreate"))?;
        let mut workspace = dev.zeros::<u8>(BLAS_WORKSPACE)?;
        let (ptr, _guard) = workspace.device_ptr_mut(&dev.stream);
        // SAFETY: the workspace lives in the lane as long as the handle.
        unsafe { blas::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BLAS_WORKSPACE) }
            .result()
            .map_err(cublas("cublasSetWorkspace"))?;
        drop(_guard);
        let lane = Arc::new(Lane { dev, blas, _workspace: workspace });
        Ok(Request { model: self, lane, iota: OnceLock::new() })
    }

    /// Checks that a prefill of `prompt_len` tokens whose caches hold `cache_entries` entries per KV
    /// head fits in free device memory: the caches, and the largest layer's activations.
    fn check_fits(&self, prompt_len: usize, cache_entries: usize) -> Result<()> {
        let s = &self.spec;
        let (e, hd, i) = (s.hidden_size, s.num_heads * s.head_dim, s.intermediate_size);
        let cache = cache_entries * s.num_kv_heads * (2 * 2 * s.head_dim + 4);
        let per_row = 2 * s.qkv_rows() + 2 * 4 * e + 2 * e + 2 * hd + 4 * s.num_heads;
        let activations = prompt_len * per_row + prompt_len.min(MLP_CHUNK) * (2 * e + 6 * i);
        let needed = cache + activations;
        let what =
            || format!("this request needs {:.2} GB ({:.2} GB of KV cache)", needed as f64 / 1e9, cache as f64 / 1e9);
        let fix = ": shorten the prompt or max_new_tokens, or lower the retain rate";
        ensure_free(&self.ctx, self.ordinal, needed, what, fix)
    }

    /// `out[m, n] (+)= x[m, k] · wᵀ` for a row-major weight `w` `[n, k]`: cuBLAS sees the column-major
    /// transposes, `outᵀ = w · xᵀ`. `out` is bf16, or f32 when `accumulate` adds into it (the residual).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        lane: &Lane,
        x: u64,
        m: usize,
        w: &CudaSlice<bf16>,
        n: usize,
        k: usize,
        out: u64,
        out_f32: bool,
        accumulate: bool,
    ) -> Result<()> {
        let (wp, _g) = w.device_ptr(&lane.dev.stream);
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        let int = |v: usize| i32::try_from(v).map_err(|_| Error::invalid("shape", format!("{v} exceeds cuBLAS's int")));
        let out_type = if out_f32 { blas::cudaDataType_t::CUDA_R_32F } else { blas::cudaDataType_t::CUDA_R_16BF };
        // SAFETY: the callers size x [m, k], w [n, k] and out [m, n] from the spec; cuBLAS reads and
        // writes exactly those on the lane's stream.
        unsafe {
            blas::cublasGemmEx(
                *lane.blas.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                int(n)?,
                int(m)?,
                int(k)?,
                &alpha as *const f32 as *const _,
                wp as *const _,
                blas::cudaDataType_t::CUDA_R_16BF,
                int(k)?,
                x as *const _,
                blas::cudaDataType_t::CUDA_R_16BF,
                int(k)?,
                &beta as *const f32 as *const _,
                out as *mut _,
                out_type,
                int(n)?,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .map_err(cublas("cublasGemmEx"))
    }

    /// The decoder layer after attention: `x += o·Woᵀ; x += down(swiglu(gate_up(RMSNorm(x))))` on
    /// `rows` rows, the MLP in chunks of [`MLP_CHUNK`] rows whose buffers are `h`, `gu`, `act`.
    fn output_and_mlp_rows(
        &self,
        lane: &Lane,
        layer: &Layer,
        x: &mut CudaSlice<f32>,
        o: &CudaSlice<bf16>,
        rows: usize,
    ) -> Result<()> {
        let s = &self.spec;
        let (e, inter, hd) = (s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim);
        let dev = &lane.dev;
        let xp = ptr_mut(dev, x);
        self.gemm(lane, ptr(dev, o), rows, &layer.wo, e, hd, xp, true, true)?;
        let chunk = rows.min(MLP_CHUNK);
        let mut h = dev.zeros::<bf16>(chunk * e)?;
        let mut gu = dev.zeros::<bf16>(chunk * 2 * inter)?;
        let mut act = dev.zeros::<bf16>(chunk * inter)?;
        for r0 in (0..rows).step_by(MLP_CHUNK) {
            let m = chunk.min(rows - r0);
            let xs = x.slice(r0 * e..(r0 + m) * e);
            dev.rms_norm_f32_into(&xs, &layer.mlp_norm, m, s.rms_norm_eps as f32, &mut h.slice_mut(..m * e))?;
            self.gemm(lane, ptr(dev, &h), m, &layer.w_gate_up, 2 * inter, e, ptr_mut(dev, &mut gu), false, false)?;
            dev.swiglu_into(&gu.slice(..m * 2 * inter), m, inter, &mut act.slice_mut(..m * inter))?;
            self.gemm(lane, ptr(dev, &act), m, &layer.w_down, e, inter, xp + (r0 * e * 4) as u64, true, true)?;
        }
        Ok(())
    }

    /// RMSNorm, the fused q|k|v projection, bias, q/k norm and RoPE of `rows` rows of `x` at `pos`,
    /// into `qkv` `[rows, width]` through `h` `[rows, E]`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rows(
        &self,
        lane: &Lane,
        layer: &Layer,
        x: &CudaSlice<f32>,
        rows: usize,
        pos: &impl DevicePtr<u32>,
        h: &mut CudaSlice<bf16>,
        qkv: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let s = &self.spec;
        let (e, hq, hk, d, width) = (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.qkv_rows());
        let dev = &lane.dev;
        dev.rms_norm_f32_into(x, &layer.attn_norm, rows, s.rms_norm_eps as f32, h)?;
        self.gemm(lane, ptr(dev, h), rows, &layer.wqkv, width, e, ptr_mut(dev, qkv), false, false)?;
        if let Some(b) = &layer.bqkv {
            dev.add_bias_into(qkv, b, rows)?;
        }
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let eps = s.rms_norm_eps as f32;
            dev.rms_norm_heads_in_place(qkv, width, qn, (rows, hq), eps)?;
            dev.rms_norm_heads_in_place(&mut qkv.slice_mut(hq * d..), width, kn, (rows, hk), eps)?;
        }
        dev.rope(qkv, width, hq, d, pos, &self.inv_freq)?;
        dev.rope(&mut qkv.slice_mut(hq * d..), width, hk, d, pos, &self.inv_freq)?;
        Ok(())
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
                workspace: dev.zeros(super::decode_workspace_len(s.num_heads, capacity, s.head_dim)?)?,
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
            st.graph = self.capture(&lane, layers, st);
        }
        match &st.graph {
            Some(graph) if replay => graph.launch().map_err(driver("cuGraphLaunch"))?,
            _ => self.decode_step(&lane, layers, st)?,
        }
        layers.iter_mut().for_each(|l| l.len += 1);
        st.steps += 1;
        dev.download(&st.logits)
    }

    /// Captures one decode step as a graph; `None` (eager launches from then on) if capture fails.
    fn capture(&self, lane: &Lane, layers: &mut [LayerCache], st: &mut DecodeState) -> Option<CudaGraph> {
        let stream = &lane.dev.stream;
        stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).ok()?;
        let enqueued = self.decode_step(lane, layers, st);
        let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        match (enqueued, graph) {
            (Ok(()), Ok(Some(g))) => Some(g),
            (e, g) => {
                eprintln!(
                    "fastkv: CUDA graph capture failed ({:?}, {:?}); decoding with eager launches",
                    e.err(),
                    g.err()
                );
                None
            }
        }
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

/// Fails with "`what()` and GPU N has X GB free`fix`" unless `bytes` fit in the device's free memory.
fn ensure_free(ctx: &CudaContext, ordinal: usize, bytes: usize, what: impl Fn() -> String, fix: &str) -> Result<()> {
    let (free, _) = ctx.mem_get_info().map_err(driver("cuMemGetInfo"))?;
    if bytes <= free {
        return Ok(());
    }
    let reason = format!("{} and GPU {ordinal} has {:.2} GB free{fix}", what(), free as f64 / 1e9);
    Err(Error::NoDevice { backend: "cuda", reason })
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

fn ptr<T>(dev: &Device, s: &impl DevicePtr<T>) -> u64 {
    s.device_ptr(&dev.stream).0
}

fn ptr_mut<T>(dev: &Device, s: &mut impl DevicePtrMut<T>) -> u64 {
    s.device_ptr_mut(&dev.stream).0
}

impl Request<'_> {
    /// Wraps prefilled layers into a cache that decodes on this request's lane.
    pub fn cache(&self, layers: Vec<LayerCache>) -> KvCache {
        KvCache { layers, lane: self.lane.clone(), decode: None }
    }

    fn dev(&self) -> &Device {
        &self.lane.dev
    }
}

impl Ops for Request<'_> {
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

    fn qkv(&self, layer: usize, x: &Hidden, pos: &Positions) -> Result<Qkv> {
        let s = &self.model.spec;
        let dev = self.dev();
        let mut h = dev.zeros::<bf16>(x.rows * s.hidden_size)?;
        let mut rows = dev.zeros::<bf16>(x.rows * s.qkv_rows())?;
        self.model.qkv_rows(&self.lane, &self.model.layers[layer], &x.x, x.rows, &pos.pos, &mut h, &mut rows)?;
        Ok(Qkv { rows, seq: x.rows })
    }

    fn attention(&self, qkv: &Qkv, pos: &Positions, last_row_only: bool) -> Result<Attention> {
        let s = &self.model.spec;
        let (hq, d, seq) = (s.num_heads, s.head_dim, qkv.seq);
        let dev = self.dev();
        let mut a = Attend::fused(&qkv.rows, seq, hq, s.num_kv_heads, d);
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

    fn output_and_mlp(&self, layer: usize, x: &mut Hidden, o: Attention, last_row_only: bool) -> Result<()> {
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
                let mut workspace = dev.zeros::<f32>(super::window_scores_workspace_len(&shape)?)?;
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

impl KvCache {
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
