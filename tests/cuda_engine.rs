//! What only the CUDA engine has: decode replayed as a CUDA graph equals eager launches, concurrent
//! requests on their own streams, and clear errors for what the GPU cannot run. (Its results against
//! the CPU reference are tests/backends.rs's, with every other backend.) Each test prints `skipped:
//! no CUDA device` without a GPU (fails with `FASTKV_REQUIRE_GPU=1`).
#![cfg(feature = "cuda")]

mod common;
#[path = "common/cuda.rs"]
mod cuda_common;

use common::{build_engine, expected, fixture};
use fastkv::backend::Backend;
use fastkv::tensors::DType;
use fastkv::{Device, Engine, Error, Method, Policy};

/// The engine on GPU 0, or `None` (and a printed skip) without a CUDA device.
fn on_gpu(dir: &std::path::Path) -> Option<Engine> {
    match Engine::open_on(dir, Device::Cuda(0)) {
        Ok(e) => Some(e),
        Err(Error::NoDevice { reason, .. }) => {
            cuda_common::no_cuda_device(&reason);
            None
        }
        Err(e) => panic!("opening {} on cuda:0: {e}", dir.display()),
    }
}

#[test]
fn graph_replay_equals_eager_launches() {
    let (_tmp, dir) = build_engine(&fixture("qwen3"), DType::Bf16);
    let Some(gpu) = on_gpu(&dir) else { return };
    let Backend::Cuda(model) = gpu.backend() else { unreachable!("opened on cuda") };
    let ids = expected("qwen3").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let policy = gpu.default_policy();
    let run = |graphs: bool| {
        model.set_graphs(graphs);
        let mut pre = gpu.backend().prefill(&ids, &policy, 12).unwrap();
        let mut token = fastkv::sampling::argmax(&pre.logits);
        let mut all = Vec::new();
        for step in 0..12 {
            let logits = gpu.backend().decode(token, pre.next_position + step, &mut pre.cache).unwrap();
            token = fastkv::sampling::argmax(&logits);
            all.push(logits);
        }
        all
    };
    let (eager, graphs) = (run(false), run(true));
    model.set_graphs(true);
    assert_eq!(eager, graphs, "a replayed graph must compute exactly what eager launches do");
}

#[test]
fn concurrent_requests_get_their_own_streams() {
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::Bf16);
    let Some(gpu) = on_gpu(&dir) else { return };
    let prompts: Vec<Vec<u32>> = expected("llama").prompts.into_iter().map(|p| p.ids).collect();
    let generate = |ids: &Vec<u32>| {
        let mut req = fastkv::Request::new(fastkv::Prompt::Tokens(ids.clone()));
        req.max_new_tokens = 8;
        gpu.generate(&req, |_| std::ops::ControlFlow::Continue(())).unwrap().token_ids
    };
    let alone: Vec<Vec<u32>> = prompts.iter().map(generate).collect();
    let together: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|ids| s.spawn(move || generate(ids))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
}

#[test]
fn what_the_gpu_cannot_run_is_a_clear_error() {
    let (_tmp, dir) = build_engine(&fixture("mistral"), DType::Bf16);
    let Some(gpu) = on_gpu(&dir) else { return };
    let err = Engine::open_on(&dir, Device::Cuda(99)).err().unwrap().to_string();
    assert!(err.contains("99"), "{err}");
    let ids = expected("mistral").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let snapkv = Policy { method: Method::Snapkv, ..gpu.default_policy() };
    let err = gpu.backend().prefill(&ids, &snapkv, 1).err().unwrap().to_string();
    assert!(err.contains("snapkv") && err.contains("fastkv") && err.contains("streamingllm"), "{err}");
    // The CPU backend keeps working in the same process.
    let cpu = Engine::open(&dir).unwrap();
    assert!(cpu.backend().prefill(&ids, &snapkv, 1).is_ok());
}
