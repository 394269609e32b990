//! `--device tensorrt:N`: an engine's TensorRT plans run on GPU N. [`Model`] deserialises both plans once and runs
//! the prefill plan on one shared execution context (the batching engine prefills one request at a time). A
//! request's KV cache ([`KvCache`]) is allocated once at capacity in f16, filled with what the prefill kept, and
//! appended in place by the decode plan's FastKVCacheAttention nodes; each request has its own decode context and
//! stream, and its step is enqueued eagerly once, then captured as a CUDA graph and replayed (plain `enqueueV3`
//! where capture fails, or with `FASTKV_CUDA_GRAPHS=0`). A plan implements the policy it was built with, the
//! engine's default, for the prompt lengths and new tokens of its record's limits; anything else is refused.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use cxx::UniquePtr;
use half::f16;

use super::bridge::{device_error, ffi, utf8};
use super::builder::plugin_library;
use super::library;
use super::plan::{bindings, version_string, Limits, PLAN_DIR};
use crate::cuda::gpu::{driver, Gpu};
use crate::engine::Manifest;
use crate::error::{Error, Result};
use crate::onnx::export::{Budgets, CACHED_DECODE};
use crate::policy::Policy;
use crate::prefill::{Prefill, PrefillProfile};
use crate::spec::ModelSpec;

/// The runtime and its two plans; TensorRT's runtime and engines may be used from any thread.
struct Plans {
    // Declared (so dropped) before the runtime that made them.
    prefill: UniquePtr<ffi::Plan>,
    decode: UniquePtr<ffi::Plan>,
    _runtime: UniquePtr<ffi::Runtime>,
}

// SAFETY: IRuntime and ICudaEngine are thread-safe for deserialising, inspecting and creating contexts.
unsafe impl Send for Plans {}
unsafe impl Sync for Plans {}

/// An execution context, used by one thread at a time (behind a `Mutex` or owned by one cache).
struct Context(UniquePtr<ffi::Context>);

// SAFETY: an IExecutionContext may move between threads; it is never used by two at once.
unsafe impl Send for Context {}

impl Context {
    fn bind<T>(&mut self, gpu: &Gpu, name: &str, buffer: &CudaSlice<T>) -> Result<()> {
        let address = buffer.device_ptr(&gpu.stream).0;
        self.0.pin_mut().set_address(name, address).map_err(run_error)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let dims = self.0.shape(name).map_err(run_error)?;
        dims.iter().map(|&d| usize::try_from(d).map_err(|_| run_error(format!("{name} has extent {d}")))).collect()
    }
}

/// An engine's plans on one GPU.
pub struct Model {
    spec: ModelSpec,
    policy: Policy,
    budgets: Budgets,
    limits: Limits,
    ordinal: usize,
    gpu: Gpu,
    prefill: Mutex<Context>,
    plans: Arc<Plans>,
    /// Decode through a captured CUDA graph (`FASTKV_CUDA_GRAPHS=0`: plain `enqueueV3`).
    graphs: AtomicBool,
}

/// One request's KV cache on the GPU and the decode context bound to it.
pub struct KvCache {
    // Declared (so dropped) before the plans it was created from.
    context: Context,
    graph: Option<CudaGraph>,
    /// Per request, on its own stream.
    gpu: Gpu,
    layers: Vec<LayerCache>,
    input_id: CudaSlice<i64>,
    position: CudaSlice<i64>,
    logits: CudaSlice<f32>,
    graphs: bool,
    steps: usize,
    _plans: Arc<Plans>,
}

/// One layer's cache: K and V `[Hk, capacity, D]` f16, positions `[Hk, capacity]` and the length (device-side,
/// advanced by the plugin; `len` is the host's count).
struct LayerCache {
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    pos: CudaSlice<i32>,
    len_dev: CudaSlice<i32>,
    len: usize,
    capacity: usize,
}

fn run_error(e: impl std::fmt::Display) -> Error {
    device_error("plan run", e)
}

impl Model {
    /// The plans of the engine in `dir` (recorded in `manifest`) on GPU `ordinal`: refused without plans, without
    /// TensorRT, or for plans another TensorRT version or GPU architecture built.
    pub fn load(dir: &Path, manifest: &Manifest, ordinal: usize) -> Result<Self> {
        let record = manifest.tensorrt.as_ref().ok_or_else(|| {
            let dir = dir.display();
            let build = format!("build them with `fastkv-build --engine {dir} --target tensorrt`");
            Error::invalid("device", format!("tensorrt:{ordinal}: {dir} has no TensorRT plans; {build}"))
        })?;
        let budgets = Budgets::new(&manifest.fastkv, &manifest.model)?;
        let libs = library::locate()?;
        let gpu = Gpu::new(ordinal)?;
        let (major, minor) = gpu.ctx.compute_capability().map_err(driver("cuDeviceGetAttribute"))?;
        let runtime = ffi::open_runtime(utf8(&libs.nvinfer)?, utf8(&plugin_library())?).map_err(run_error)?;
        record.check(&version_string(runtime.version()), &format!("{major}.{minor}"))?;
        let n_layers = manifest.model.num_layers;
        let plan = |graph: &str| -> Result<UniquePtr<ffi::Plan>> {
            let file = record.plans.iter().find(|p| p.graph == graph).map_or_else(
                || Path::new(PLAN_DIR).join(format!("{graph}.plan")),
                |p| Path::new(&p.file).to_path_buf(),
            );
            let path = dir.join(file);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let plan = runtime.deserialize(&bytes).map_err(|e| Error::bad_file(&path, e.to_string()))?;
            let io = plan.tensors();
            for b in bindings(graph, n_layers) {
                let found = io.iter().find(|t| t.name == b.name);
                if !found.is_some_and(|t| t.input == b.input && t.ty == b.element.tensorrt()) {
                    let what = format!("{} `{}` of {:?}", if b.input { "input" } else { "output" }, b.name, b.element);
                    let rebuild = format!("fastkv-build --engine {} --target tensorrt", dir.display());
                    return Err(Error::bad_file(&path, format!("the plan has no {what}: rebuild it with `{rebuild}`")));
                }
            }
            Ok(plan)
        };
        let plans = Plans { prefill: plan("prefill")?, decode: plan(CACHED_DECODE)?, _runtime: runtime };
        let prefill = Context(plans.prefill.context().map_err(run_error)?);
        Ok(Model {
            spec: manifest.model.clone(),
            policy: manifest.fastkv,
            budgets,
            limits: record.limits,
            ordinal,
            gpu,
            prefill: Mutex::new(prefill),
            plans: Arc::new(plans),
            graphs: AtomicBool::new(std::env::var("FASTKV_CUDA_GRAPHS").map_or(true, |v| v != "0")),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn free_memory(&self) -> usize {
        self.gpu.ctx.mem_get_info().map_or(0, |(free, _)| free)
    }

    /// Caches prefilled from now on replay a captured graph (`true`, the default) or enqueue every step.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }

    /// Whether the plans can prefill a `prompt_len`-token prompt under `policy`: only the policy they were built
    /// with, over the prompt lengths of their profile.
    pub fn check(&self, policy: &Policy, prompt_len: usize) -> Result<()> {
        policy.validate(&self.spec)?;
        if *policy != self.policy {
            let p = &self.policy;
            return Err(Error::Unsupported {
                backend: "tensorrt",
                what: format!("a policy other than the plans' (method `{}`)", policy.method.name()),
                supported: format!(
                    "the engine's default, {} with TSP at layer {}, {:?}, built into the plans; run other methods \
                     on cuda:N",
                    p.method.name(),
                    p.tsp_layer,
                    p.budget
                ),
            });
        }
        let (min, max) = (self.budgets.min_prompt_len, self.limits.max_input_len);
        if !(min..=max).contains(&prompt_len) {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{prompt_len} tokens: the TensorRT plans take {min}..={max} (rebuild with a larger \
                     --max-input-len for longer prompts)"
                ),
            ));
        }
        Ok(())
    }

    /// Prefills `tokens` once per policy (each must be the plans'; see [`Model::check`]).
    pub fn prefill_pausing(
        &self,
        tokens: &[u32],
        policies: &[Policy],
        max_new_tokens: usize,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Prefill<KvCache>>> {
        policies
            .iter()
            .map(|p| {
                // The plan runs in one enqueue: the only place to yield is before it.
                pause()?;
                self.check(p, tokens.len())?;
                self.prefill(tokens, max_new_tokens)
            })
            .collect()
    }

    /// The positions TSP keeps, from the prefill plan's `tsp_positions`.
    pub fn tsp_selections(&self, tokens: &[u32], policies: &[Policy]) -> Result<Vec<Option<Vec<u32>>>> {
        self.prefill_pausing(tokens, policies, 1, &mut || Ok(()))
            .map(|v| v.into_iter().map(|p| p.tsp_positions).collect())
    }

    /// One decode step of several requests, each on its own stream, in turn: their logits, in order.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Vec<f32>>> {
        tokens.iter().zip(positions).zip(caches.iter_mut()).map(|((&t, &p), c)| c.decode(t, p)).collect()
    }

    /// The prefill plan on `tokens`; its kept K/V, positions and lengths into a new cache with room for
    /// `max_new_tokens`.
    fn prefill(&self, tokens: &[u32], max_new_tokens: usize) -> Result<Prefill<KvCache>> {
        if max_new_tokens > self.limits.max_output_len {
            return Err(Error::invalid(
                "max_new_tokens",
                format!(
                    "{max_new_tokens}: the TensorRT plans hold {} new tokens (rebuild with a larger --max-output-len)",
                    self.limits.max_output_len
                ),
            ));
        }
        let s = &self.spec;
        let (n_layers, hk, d) = (s.num_layers, s.num_kv_heads, s.head_dim);
        let gpu = &self.gpu;
        // TensorRT runs on the thread's current context: this GPU's primary one.
        gpu.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        let mut context = self.prefill.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let ids = gpu.upload(&ids)?;
        context.0.pin_mut().set_input_shape("input_ids", &[tokens.len() as i64]).map_err(run_error)?;
        context.bind(gpu, "input_ids", &ids)?;
        // Outputs at the extents the plan derives from L, bound; with those extents.
        fn output<T>(gpu: &Gpu, c: &mut Context, name: &str) -> Result<(CudaSlice<T>, Vec<usize>)>
        where
            T: DeviceRepr + ValidAsZeroBits,
        {
            let dims = c.shape(name)?;
            let buffer = gpu.zeros::<T>(dims.iter().product())?;
            c.bind(gpu, name, &buffer)?;
            Ok((buffer, dims))
        }
        let (logits, _) = output::<f32>(gpu, &mut context, "logits")?;
        let (tsp, _) = output::<i64>(gpu, &mut context, "tsp_positions")?;
        let mut kept = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let (k, dims) = output::<f32>(gpu, &mut context, &format!("k_{l}"))?;
            let (v, _) = output::<f32>(gpu, &mut context, &format!("v_{l}"))?;
            let (pos, _) = output::<i64>(gpu, &mut context, &format!("pos_{l}"))?;
            let n =
                *dims.get(1).ok_or_else(|| run_error(format!("output k_{l} has extents {dims:?}, not [Hk, N, D]")))?;
            kept.push((n, k, v, pos));
        }
        let t0 = std::time::Instant::now();
        context.0.pin_mut().enqueue(gpu.stream.cu_stream() as u64).map_err(run_error)?;
        gpu.synchronize()?;
        let prefill_s = t0.elapsed().as_secs_f64();
        drop(context);
        let tsp_positions: Vec<u32> = gpu.download(&tsp)?.into_iter().map(|p| p as u32).collect();

        // The request's own stream, caches at capacity and decode context.
        let own = Gpu { ctx: gpu.ctx.clone(), stream: gpu.ctx.new_stream().map_err(driver("cuStreamCreate"))? };
        let mut layers = Vec::with_capacity(n_layers);
        for (n, k, v, pos) in kept {
            let capacity = n + max_new_tokens;
            layers.push(LayerCache {
                k: own.upload(&at_capacity(&gpu.download(&k)?, n * d, capacity * d, f16::from_f32))?,
                v: own.upload(&at_capacity(&gpu.download(&v)?, n * d, capacity * d, f16::from_f32))?,
                pos: own.upload(&at_capacity(&gpu.download(&pos)?, n, capacity, |p| p as i32))?,
                len_dev: own.upload(&[n as i32])?,
                len: n,
                capacity,
            });
        }
        let mut decode = Context(self.plans.decode.context().map_err(run_error)?);
        let (input_id, position, step_logits) =
            (own.zeros::<i64>(1)?, own.zeros::<i64>(1)?, own.zeros::<f32>(s.vocab_size)?);
        decode.bind(&own, "input_id", &input_id)?;
        decode.bind(&own, "position", &position)?;
        decode.bind(&own, "logits", &step_logits)?;
        for (l, c) in layers.iter().enumerate() {
            let (cap, hk, d) = (c.capacity as i64, hk as i64, d as i64);
            for (name, dims) in
                [("k_cache", vec![hk, cap, d]), ("v_cache", vec![hk, cap, d]), ("cache_pos", vec![hk, cap])]
            {
                decode.0.pin_mut().set_input_shape(&format!("{name}_{l}"), &dims).map_err(run_error)?;
            }
            decode.bind(&own, &format!("k_cache_{l}"), &c.k)?;
            decode.bind(&own, &format!("v_cache_{l}"), &c.v)?;
            decode.bind(&own, &format!("cache_pos_{l}"), &c.pos)?;
            decode.bind(&own, &format!("cache_len_{l}"), &c.len_dev)?;
        }
        own.synchronize()?;
        let seq_lens =
            (0..n_layers).map(|l| if l <= self.policy.tsp_layer { tokens.len() } else { tsp_positions.len() });
        Ok(Prefill {
            logits: gpu.download(&logits)?,
            seq_lens: seq_lens.collect(),
            tsp_positions: Some(tsp_positions),
            filtered_positions: None,
            next_position: tokens.len() as u32,
            // One enqueue: TensorRT's time is not split by part; it is all counted as projections.
            profile: PrefillProfile { projections_s: prefill_s, ..Default::default() },
            cache: KvCache {
                context: decode,
                graph: None,
                graphs: self.graphs.load(Ordering::Relaxed),
                gpu: own,
                layers,
                input_id,
                position,
                logits: step_logits,
                steps: 0,
                _plans: self.plans.clone(),
            },
        })
    }
}

/// Every head's `n` values (of `x`, heads `n` apart) converted by `f` into a head of `capacity` (the rest zero):
/// the prefill plan's kept K, V (`n = N·D`) and positions laid out as the decode plan's caches.
fn at_capacity<S: Copy, T: Copy + Default>(x: &[S], n: usize, capacity: usize, f: impl Fn(S) -> T) -> Vec<T> {
    let heads = x.len() / n.max(1);
    let mut out = vec![T::default(); heads * capacity];
    for (head, src) in x.chunks(n.max(1)).enumerate() {
        out[head * capacity..][..src.len()].iter_mut().zip(src).for_each(|(o, &v)| *o = f(v));
    }
    out
}

impl KvCache {
    /// One decode step: token and position to the device, the decode plan (enqueued the first time, then captured
    /// once and replayed; the plugins read the lengths on the device), and its logits back.
    fn decode(&mut self, token: u32, position: u32) -> Result<Vec<f32>> {
        if let Some(full) = self.layers.iter().position(|l| l.len >= l.capacity) {
            return Err(Error::invalid(
                "max_new_tokens",
                format!(
                    "layer {full}'s KV cache is full ({} entries): more tokens than were reserved",
                    self.layers[full].len
                ),
            ));
        }
        let gpu = &self.gpu;
        gpu.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        gpu.write(&[i64::from(token)], &mut self.input_id)?;
        gpu.write(&[i64::from(position)], &mut self.position)?;
        let stream = gpu.stream.cu_stream() as u64;
        // Captured once, at the second step; a failed capture leaves the cache enqueueing every step.
        let replay = self.graphs && self.steps >= 1;
        if replay && self.steps == 1 {
            let context = &mut self.context;
            self.graph = gpu.capture(|| context.0.pin_mut().enqueue(stream).map_err(run_error));
        }
        match &self.graph {
            Some(graph) if replay => graph.launch().map_err(driver("cuGraphLaunch"))?,
            _ => self.context.0.pin_mut().enqueue(stream).map_err(run_error)?,
        }
        self.layers.iter_mut().for_each(|l| l.len += 1);
        self.steps += 1;
        gpu.download(&self.logits)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of K and V held (f16), not counting the reserve.
    pub fn bytes(&self) -> usize {
        let per_entry = |l: &LayerCache| 2 * l.k.len() / l.capacity * 2;
        self.layers.iter().map(|l| l.len * per_entry(l)).sum()
    }

    /// Original positions of every KV head's entries of `layer`, in cache order (a download).
    pub fn positions(&self, layer: usize) -> Result<Vec<Vec<u32>>> {
        let l = &self.layers[layer];
        let all = self.gpu.download(&l.pos)?;
        Ok(all.chunks(l.capacity).map(|h| h[..l.len].iter().map(|&p| p as u32).collect()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two heads of three entries of two values each into heads of capacity five: each head's entries first, in
    /// order, then zeros (the room decode appends into).
    #[test]
    fn prefill_outputs_land_at_the_start_of_each_head_at_capacity() {
        let x: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let got = at_capacity(&x, 3 * 2, 5 * 2, |v| v as i32);
        let head = |first: i32| (first..first + 6).chain([0; 4]).collect::<Vec<_>>();
        assert_eq!(got, [head(1), head(7)].concat());
        assert_eq!(at_capacity(&[4i64, 9], 1, 3, |p| p as i32), [4, 0, 0, 9, 0, 0]);
    }

    /// The runtime half of the bridge in the real TensorRT lean runtime (`FASTKV_TRT_LEAN_LIB`, as
    /// tests/trt_plugins.rs finds it): without a CUDA driver (CI) it refuses to start with TensorRT's reason instead
    /// of crashing; with one it loads fastkv's plugin library, reports its version, and refuses bytes that are not a
    /// plan with TensorRT's reason.
    #[test]
    fn the_lean_runtime_starts_or_says_why_and_refuses_what_is_not_a_plan() {
        let lib = std::env::var_os("FASTKV_TRT_LEAN_LIB").map(std::path::PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/trt-lean/tensorrt_lean_libs/libnvinfer_lean.so.11")
        });
        if !lib.is_file() {
            eprintln!("skipped: no TensorRT lean runtime (scripts/install-trt-lean.sh installs it)");
            return;
        }
        // SAFETY: only probes whether libcuda can be loaded.
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        match ffi::open_runtime(utf8(&lib).unwrap(), utf8(&plugin_library()).unwrap()) {
            Err(e) => {
                let e = e.to_string();
                assert!(!driver, "the runtime failed with a CUDA driver present: {e}");
                assert!(e.contains("createInferRuntime failed") && e.contains("CUDA"), "{e}");
            }
            Ok(runtime) => {
                assert_eq!(runtime.version() / 10000, 11, "{}", version_string(runtime.version()));
                let err = runtime.deserialize(b"not a TensorRT plan").err().expect("garbage is no plan").to_string();
                assert!(err.contains("could not deserialise the plan"), "{err}");
            }
        }
    }
}
