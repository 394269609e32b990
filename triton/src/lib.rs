//! `libtriton_fastkv.so`: a Triton Inference Server backend (TRITONBACKEND API 1.19) serving fastkv
//! engines. One engine is opened per model and shared by all its instances; `Execute` only copies
//! each request's inputs and queues it, and a bounded pool of workers generates and streams the
//! responses (decoupled mode), stopping when the client cancels or goes away.
//!
//! Layout: [`ffi`] declares the C API, [`server`] wraps it safely, [`params`] turns request tensors
//! into a [`fastkv::Request`], [`stop`] handles stop strings; the entry points are below.

mod ffi;
mod params;
mod server;
mod stop;

use std::ffi::c_void;
use std::ops::ControlFlow;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use fastkv::{Device, Engine, Policy};

use params::Job;
use server::{log, Factory, ModelInfo, Value};

/// What every worker of a model shares.
struct Shared {
    name: String,
    engine: Engine,
    /// The engine's default policy with the model's parameters applied.
    policy: Policy,
}

/// A model's state: its engine and the queue of its workers. Dropping it drains the queue and
/// waits for the workers.
struct ModelState {
    shared: Arc<Shared>,
    queue: Option<mpsc::Sender<(Factory, Job)>>,
    workers: Vec<JoinHandle<()>>,
}

/// Requests generated at once when the model has no `max_concurrency` parameter.
const DEFAULT_CONCURRENCY: usize = 8;

impl ModelState {
    fn new(info: ModelInfo) -> Result<Self, String> {
        let param = |name: &str| info.config["parameters"][name]["string_value"].as_str().filter(|s| !s.is_empty());
        let device = device(&info.config)?;
        let engine_path = param("engine_path").ok_or("parameter engine_path is missing from config.pbtxt")?;
        let engine_dir = info.dir.join(engine_path);
        let engine = Engine::open_on(&engine_dir, device)
            .map_err(|e| format!("engine {} on {device}: {e}", engine_dir.display()))?;
        let policy = params::apply(&params::overrides_from_config(&info.config)?, engine.default_policy(), &engine)
            .map_err(|e| format!("default compression policy: {e}"))?;
        let workers = match param("max_concurrency") {
            None => DEFAULT_CONCURRENCY,
            Some(s) => s
                .trim()
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("parameter max_concurrency: {s:?} is not a positive integer"))?,
        };
        log(ffi::LOG_INFO, &format!("fastkv model {}: engine {} ({workers} workers)", info.name, engine_dir.display()));
        let shared = Arc::new(Shared { name: info.name, engine, policy });
        let (tx, rx) = mpsc::channel::<(Factory, Job)>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..workers)
            .map(|_| {
                let (shared, rx) = (shared.clone(), rx.clone());
                std::thread::spawn(move || loop {
                    let next = rx.lock().map_err(|_| ()).and_then(|q| q.recv().map_err(|_| ()));
                    match next {
                        Ok((factory, job)) => serve(&shared, &factory, job),
                        Err(()) => break,
                    }
                })
            })
            .collect();
        Ok(ModelState { shared, queue: Some(tx), workers })
    }
}

/// The device the model configuration asks for: the `device` parameter (`cpu`, `cuda:N`), else the
/// first instance group's kind (`KIND_GPU` → `cuda:` its first GPU), else the CPU.
fn device(config: &serde_json::Value) -> Result<Device, String> {
    if let Some(d) = config["parameters"]["device"]["string_value"].as_str().filter(|s| !s.is_empty()) {
        return d.parse().map_err(|e| format!("parameter device: {e}"));
    }
    let group = &config["instance_group"][0];
    Ok(match group["kind"].as_str() {
        Some("KIND_GPU") => Device::Cuda(group["gpus"][0].as_u64().unwrap_or(0) as usize),
        _ => Device::Cpu,
    })
}

impl Drop for ModelState {
    fn drop(&mut self) {
        self.queue.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Generates one request, streaming per token when asked; always ends with a final flag.
fn serve(shared: &Shared, factory: &Factory, job: Job) {
    let Job { request, stops, stream } = job;
    let mut text = stop::StopText::new(stops);
    let mut send_failed = None;
    let mut tokens = 0usize;
    let result = shared.engine.generate(&request, |token| {
        if factory.is_cancelled() {
            return ControlFlow::Break(());
        }
        tokens += 1;
        let (piece, stopped) = text.push(&token.text);
        if stream && !piece.is_empty() {
            if let Err(e) = factory.send(&[("text_output", Value::Text(&piece))], false) {
                send_failed = Some(e);
                return ControlFlow::Break(());
            }
        }
        if stopped {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    if factory.is_cancelled() || send_failed.is_some() {
        let why = send_failed.map_or("the client cancelled".to_string(), |e| format!("a response failed: {e}"));
        log(ffi::LOG_INFO, &format!("fastkv model {}: request cancelled after {tokens} tokens ({why})", shared.name));
        factory.finish();
        return;
    }
    match result {
        Err(e) => factory.send_error(ffi::ERROR_INVALID_ARG, &e.to_string()),
        Ok(out) => {
            let rest = text.rest();
            let m = &out.metrics;
            let finish = if text.text().len() < out.text.len() { "stop" } else { finish_reason(&out) };
            let outputs = [
                ("text_output", Value::Text(if stream { &rest } else { text.text() })),
                ("finish_reason", Value::Text(finish)),
                ("prompt_tokens", Value::I64(m.prompt_tokens as i64)),
                ("generated_tokens", Value::I64(m.generated_tokens as i64)),
                ("ttft_s", Value::F64(m.ttft_s)),
                ("prefill_tokens_per_s", Value::F64(m.prefill_tokens_per_s)),
                ("decode_tokens_per_s", Value::F64(m.decode_tokens_per_s)),
                ("kv_cache_bytes", Value::I64(m.kv_cache_bytes as i64)),
            ];
            if let Err(e) = factory.send(&outputs, true) {
                log(ffi::LOG_ERROR, &format!("fastkv model {}: cannot send the final response: {e}", shared.name));
                factory.finish();
            }
        }
    }
}

fn finish_reason(out: &fastkv::Output) -> &'static str {
    match out.finish_reason {
        fastkv::FinishReason::Eos => "eos",
        fastkv::FinishReason::Length => "length",
        fastkv::FinishReason::Cancelled => "stop",
    }
}

// ---- Entry points the server calls. Each receives live handles from the server. ----

/// Refuses servers whose backend API is older than the one this backend was written against.
#[no_mangle]
pub extern "C" fn TRITONBACKEND_Initialize(_backend: *mut c_void) -> *mut ffi::Error {
    let (mut major, mut minor) = (0u32, 0u32);
    // SAFETY: plain out-parameters.
    let err = unsafe { ffi::TRITONBACKEND_ApiVersion(&mut major, &mut minor) };
    if !err.is_null() {
        return err;
    }
    if major != ffi::API_MAJOR || minor < ffi::API_MINOR {
        return server::error(
            ffi::ERROR_UNSUPPORTED,
            &format!("fastkv needs backend API {}.{}+, the server has {major}.{minor}", ffi::API_MAJOR, ffi::API_MINOR),
        );
    }
    std::ptr::null_mut()
}

/// Opens the model's engine and starts its workers; a bad configuration fails the load, naming why.
///
/// # Safety
/// `model` must be a live model handle.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInitialize(model: *mut ffi::Model) -> *mut ffi::Error {
    let state = ModelInfo::read(model).and_then(|info| {
        let name = info.name.clone();
        ModelState::new(info).map_err(|e| format!("fastkv model {name}: {e}"))
    });
    match state {
        Ok(s) => ffi::TRITONBACKEND_ModelSetState(model, Box::into_raw(Box::new(s)) as *mut c_void),
        Err(e) => server::error(ffi::ERROR_INVALID_ARG, &e),
    }
}

/// # Safety
/// `model` must be a live model handle whose state was set by `TRITONBACKEND_ModelInitialize`.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelFinalize(model: *mut ffi::Model) -> *mut ffi::Error {
    let mut state = std::ptr::null_mut();
    let err = ffi::TRITONBACKEND_ModelState(model, &mut state);
    if err.is_null() && !state.is_null() {
        // SAFETY: the pointer came from `Box::into_raw` in ModelInitialize and is freed once, here.
        drop(Box::from_raw(state as *mut ModelState));
    }
    err
}

/// Instances share the model's engine and workers: nothing to set up per instance.
#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceInitialize(_instance: *mut ffi::ModelInstance) -> *mut ffi::Error {
    std::ptr::null_mut()
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceFinalize(_instance: *mut ffi::ModelInstance) -> *mut ffi::Error {
    std::ptr::null_mut()
}

/// Copies each request's inputs, releases it and queues it for a worker; never waits on generation.
///
/// # Safety
/// `requests` must point to `count` live requests of a model initialised by this backend.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut ffi::ModelInstance,
    requests: *mut *mut ffi::Request,
    count: u32,
) -> *mut ffi::Error {
    let mut model = std::ptr::null_mut();
    let mut state = std::ptr::null_mut();
    let err = ffi::TRITONBACKEND_ModelInstanceModel(instance, &mut model);
    let err = if err.is_null() { ffi::TRITONBACKEND_ModelState(model, &mut state) } else { err };
    if !err.is_null() {
        return err; // the server then fails and releases the requests itself
    }
    // SAFETY: set in ModelInitialize; the server finalizes the model only after its instances.
    let state = &*(state as *const ModelState);
    for &req in std::slice::from_raw_parts(requests, count as usize) {
        let factory = match Factory::new(req) {
            Ok(f) => f,
            Err(e) => {
                log(ffi::LOG_ERROR, &format!("fastkv: cannot respond to a request: {e}"));
                server::release(req);
                continue;
            }
        };
        let job = params::parse(|name| server::input(req, name), &state.shared.engine, &state.shared.policy);
        server::release(req);
        match (job, &state.queue) {
            (Err(e), _) => factory.send_error(ffi::ERROR_INVALID_ARG, &e),
            (Ok(job), Some(queue)) => {
                if let Err(mpsc::SendError((factory, _))) = queue.send((factory, job)) {
                    factory.send_error(ffi::ERROR_INTERNAL, "the model is shutting down");
                }
            }
            (Ok(_), None) => factory.send_error(ffi::ERROR_INTERNAL, "the model is shutting down"),
        }
    }
    std::ptr::null_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_comes_from_the_parameter_else_the_instance_group() {
        let config = |device: &str, kind: &str| {
            serde_json::json!({
                "parameters": { "device": { "string_value": device } },
                "instance_group": [{ "kind": kind, "count": 1, "gpus": [2] }],
            })
        };
        assert_eq!(device(&config("cuda:1", "KIND_CPU")), Ok(Device::Cuda(1)));
        assert_eq!(device(&config("", "KIND_GPU")), Ok(Device::Cuda(2)));
        assert_eq!(device(&config("", "KIND_CPU")), Ok(Device::Cpu));
        assert_eq!(device(&serde_json::json!({})), Ok(Device::Cpu));
        let err = device(&config("gpu", "KIND_CPU")).unwrap_err();
        assert!(err.contains("parameter device") && err.contains("cuda:N"), "{err}");
    }
}
