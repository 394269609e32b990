//! `libtriton_fastkv.so`: a Triton Inference Server backend (TRITONBACKEND API 1.19) serving fastkv
//! engines. One engine is opened per model and shared by all its instances, with one batching engine
//! ([`fastkv::scheduler`]) over it: `Execute` only copies each request's inputs and submits it, and
//! the scheduler decodes every running request in one batched step, streaming the responses
//! (decoupled mode) and stopping a request when its client cancels or goes away.
//!
//! Layout: [`ffi`] declares the C API, [`server`] wraps it safely, [`params`] turns request tensors
//! into a [`fastkv::Request`]; the entry points are below.

mod ffi;
mod params;
mod server;

use std::ffi::c_void;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use fastkv::scheduler::{Event, Limits, Scheduler, Unobserved};
use fastkv::{Device, Engine, Output, Policy};

use params::Job;
use server::{log, Factory, ModelInfo, Value};

/// A model's state: its name, its batching engine and the policy of its parameters.
struct ModelState {
    name: String,
    scheduler: Scheduler,
    /// The engine's default policy with the model's parameters applied.
    policy: Policy,
}

/// Requests decoding at once when the model has no `max_concurrency` parameter.
const DEFAULT_CONCURRENCY: usize = 16;
/// How long a model being unloaded lets its requests finish before cancelling them.
const DRAIN: Duration = Duration::from_secs(30);

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
        let max_running = match param("max_concurrency") {
            None => DEFAULT_CONCURRENCY,
            Some(s) => s
                .trim()
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("parameter max_concurrency: {s:?} is not a positive integer"))?,
        };
        let kv_cache_memory = param("kv_cache_memory")
            .map(|s| s.trim().parse().map_err(|_| format!("parameter kv_cache_memory: {s:?} is not a number of bytes")))
            .transpose()?;
        let config = Limits { kv_cache_memory, max_running, ..Limits::default() }.config(&engine);
        log(
            ffi::LOG_INFO,
            &format!(
                "fastkv model {}: engine {} ({max_running} requests at once, {:.0} MB of KV cache)",
                info.name,
                engine_dir.display(),
                config.kv_cache_memory as f64 / 1e6
            ),
        );
        let scheduler = Scheduler::start(Arc::new(engine), config, Arc::new(Unobserved));
        Ok(ModelState { name: info.name, scheduler, policy })
    }
}

/// The device the model configuration asks for: the `device` parameter (`cpu`, `cuda:N`, `tensorrt:N`), else the
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
        if !self.scheduler.drain(DRAIN) {
            log(
                ffi::LOG_WARN,
                &format!("fastkv model {}: requests still running after {DRAIN:?} were cancelled", self.name),
            );
        }
    }
}

/// Submits one request: its responses — one per token when streaming, then a final one with the
/// rest of the text, the finish reason and the metrics — go out from the scheduler's thread.
fn submit(state: &ModelState, factory: Factory, job: Job) {
    let Job { request, stream } = job;
    let name = state.name.clone();
    let factory = Arc::new(factory);
    let mine = factory.clone();
    let (mut sent, mut tokens) = (0usize, 0usize);
    let sink = move |event: Event| -> ControlFlow<()> {
        match event {
            Event::Token(token) => {
                tokens += 1;
                let cancelled = |why: &str| {
                    log(
                        ffi::LOG_INFO,
                        &format!("fastkv model {name}: request cancelled after {tokens} tokens ({why})"),
                    );
                    ControlFlow::Break(())
                };
                if factory.is_cancelled() {
                    return cancelled("the client cancelled");
                }
                if stream && !token.text.is_empty() {
                    if let Err(e) = factory.send(&[("text_output", Value::Text(&token.text))], false) {
                        return cancelled(&format!("a response failed: {e}"));
                    }
                    sent += token.text.len();
                }
                ControlFlow::Continue(())
            }
            Event::Done(out) if out.finish_reason == fastkv::FinishReason::Cancelled => {
                factory.finish();
                ControlFlow::Break(())
            }
            Event::Done(out) => {
                let text = if stream { &out.text[sent.min(out.text.len())..] } else { &out.text[..] };
                if let Err(e) = factory.send(&final_outputs(text, &out), true) {
                    log(ffi::LOG_ERROR, &format!("fastkv model {name}: cannot send the final response: {e}"));
                    factory.finish();
                }
                ControlFlow::Break(())
            }
            Event::Failed(fastkv::Error::Cancelled) => {
                factory.finish();
                ControlFlow::Break(())
            }
            Event::Failed(e) => {
                factory.send_error(ffi::ERROR_INVALID_ARG, &e.to_string());
                ControlFlow::Break(())
            }
        }
    };
    if let Err(e) = state.scheduler.submit(request, sink) {
        // A refused request never reaches the sink: it is answered here.
        let code = match e {
            fastkv::Error::QueueFull { .. } | fastkv::Error::ShuttingDown => ffi::ERROR_UNAVAILABLE,
            _ => ffi::ERROR_INVALID_ARG,
        };
        mine.send_error(code, &e.to_string());
    }
}

fn final_outputs<'a>(text: &'a str, out: &Output) -> [(&'static str, Value<'a>); 8] {
    let m = &out.metrics;
    [
        ("text_output", Value::Text(text)),
        ("finish_reason", Value::Text(finish_reason(out))),
        ("prompt_tokens", Value::I64(m.prompt_tokens as i64)),
        ("generated_tokens", Value::I64(m.generated_tokens as i64)),
        ("ttft_s", Value::F64(m.ttft_s)),
        ("prefill_tokens_per_s", Value::F64(m.prefill_tokens_per_s)),
        ("decode_tokens_per_s", Value::F64(m.decode_tokens_per_s)),
        ("kv_cache_bytes", Value::I64(m.kv_cache_bytes as i64)),
    ]
}

fn finish_reason(out: &Output) -> &'static str {
    match out.finish_reason {
        fastkv::FinishReason::Eos => "eos",
        fastkv::FinishReason::Length => "length",
        fastkv::FinishReason::Stop => "stop",
        fastkv::FinishReason::Cancelled => "cancelled",
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
        let job = params::parse(|name| server::input(req, name), state.scheduler.engine(), &state.policy);
        server::release(req);
        match job {
            Err(e) => factory.send_error(ffi::ERROR_INVALID_ARG, &e),
            Ok(job) => submit(state, factory, job),
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
