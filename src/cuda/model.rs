//! The CUDA backend's model: an engine's weights on one GPU in bf16, uploaded once and shared by
//! every request, and the pieces of a decoder layer over them — GEMMs through cuBLAS (bf16 in, f32
//! accumulate; the o and down projections accumulate straight into the f32 residual stream), every
//! other step through the plugin/ kernels ([`super::kernels`]).
//!
//! Each request gets its own stream and cuBLAS handle (a [`Lane`]), so requests run concurrently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as blas;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use half::slice::HalfFloatSliceExt;

use super::gpu::{driver, Gpu};
use super::kv_cache::Batches;
use super::library;
use super::ops::LaneModel;
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::spec::ModelSpec;
use crate::tensors::{DType, TensorFile};

/// Rows of the MLP computed at once: bounds its 2·I-wide activations for long prompts.
const MLP_CHUNK: usize = 8192;
/// cuBLAS workspace per lane: set explicitly so a captured graph never allocates.
const BLAS_WORKSPACE: usize = 32 << 20;

pub(super) struct Layer {
    pub(super) attn_norm: CudaSlice<bf16>,
    pub(super) wqkv: CudaSlice<bf16>,
    pub(super) bqkv: Option<CudaSlice<bf16>>,
    pub(super) q_norm: Option<CudaSlice<bf16>>,
    pub(super) k_norm: Option<CudaSlice<bf16>>,
    pub(super) wo: CudaSlice<bf16>,
    pub(super) mlp_norm: CudaSlice<bf16>,
    pub(super) w_gate_up: CudaSlice<bf16>,
    pub(super) w_down: CudaSlice<bf16>,
}

/// An engine's model on one GPU.
pub struct Model {
    pub(super) spec: ModelSpec,
    pub(super) ordinal: usize,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) layers: Vec<Layer>,
    pub(super) embed: CudaSlice<bf16>,
    pub(super) final_norm: CudaSlice<bf16>,
    pub(super) lm_head: Option<CudaSlice<bf16>>,
    pub(super) inv_freq: CudaSlice<f32>,
    /// Decode through a captured CUDA graph (`FASTKV_CUDA_GRAPHS=0`: eager launches).
    pub(super) graphs: AtomicBool,
    /// Fence every profiled step (`FASTKV_CUDA_PROFILE=1`), so prefill profiles measure the GPU.
    pub(super) profile: AtomicBool,
    /// The batched decode's lane and steps, made on first use.
    pub(super) batches: Mutex<Option<Batches>>,
}

/// One request's stream and cuBLAS handle, shared by its prefill and every cache it made.
pub struct Lane {
    pub(super) dev: Gpu,
    pub(super) blas: CudaBlas,
    pub(super) _workspace: CudaSlice<u8>,
}

pub(super) fn cublas(operation: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error + '_ {
    move |e| Error::Device {
        backend: "cuda",
        operation: operation.into(),
        code: Some(e.0 as i64),
        message: e.to_string(),
    }
}

/// A tensor of the engine as bf16 (f32 and f16 weights are converted on the host, chunk by chunk).
fn upload(dev: &Gpu, file: &TensorFile, name: &str, shape: &[usize]) -> Result<CudaSlice<bf16>> {
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
        let dev = Gpu::new(ordinal)?;
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
            batches: Mutex::new(None),
        };
        dev.synchronize()?;
        Ok(model)
    }

    /// Checks that GPU `ordinal` can run engines: driver, device, this build's kernel code, cuBLAS.
    pub fn probe(ordinal: usize) -> Result<()> {
        Gpu::new(ordinal)?;
        library::ensure_cublas()
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Bytes of device memory free now.
    pub fn free_memory(&self) -> usize {
        self.ctx.mem_get_info().map_or(0, |(free, _)| free)
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
    pub fn request(&self) -> Result<LaneModel<'_>> {
        Ok(LaneModel::new(self, self.lane()?))
    }

    /// A new stream and cuBLAS handle (with a fixed workspace, for graph capture).
    pub(super) fn lane(&self) -> Result<Arc<Lane>> {
        let stream = self.ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let dev = Gpu { ctx: self.ctx.clone(), stream: stream.clone() };
        let blas = CudaBlas::new(stream).map_err(cublas("cublasCreate"))?;
        let mut workspace = dev.zeros::<u8>(BLAS_WORKSPACE)?;
        let (ptr, _guard) = workspace.device_ptr_mut(&dev.stream);
        // SAFETY: the workspace lives in the lane as long as the handle.
        unsafe { blas::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BLAS_WORKSPACE) }
            .result()
            .map_err(cublas("cublasSetWorkspace"))?;
        drop(_guard);
        Ok(Arc::new(Lane { dev, blas, _workspace: workspace }))
    }

    /// Checks that a prefill of `prompt_len` tokens whose caches hold `cache_entries` entries per KV
    /// head fits in free device memory: the caches, and the largest layer's activations.
    pub(super) fn check_fits(&self, prompt_len: usize, cache_entries: usize) -> Result<()> {
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
    pub(super) fn gemm(
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
    pub(super) fn output_and_mlp_rows(
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
    pub(super) fn qkv_rows(
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

pub(super) fn ptr<T>(dev: &Gpu, s: &impl DevicePtr<T>) -> u64 {
    s.device_ptr(&dev.stream).0
}

pub(super) fn ptr_mut<T>(dev: &Gpu, s: &mut impl DevicePtrMut<T>) -> u64 {
    s.device_ptr_mut(&dev.stream).0
}
