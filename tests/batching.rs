//! The batching engine (`fastkv::scheduler`): a request's tokens are the same whether it runs alone
//! or beside others — of other lengths and methods, joining and leaving at every step — and a
//! cancelled, refused or failing request does not disturb the rest; admission keeps the caches
//! within the memory set aside for them.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fastkv::scheduler::{Config, Event, Scheduler, Unobserved};
use fastkv::tensors::DType;
use fastkv::{Engine, Error, FinishReason, Method, Output, Policy, Prompt, Request};

fn engine(name: &str, dtype: DType) -> (tempfile::TempDir, Arc<Engine>) {
    let (tmp, dir) = build_engine(&fixture(name), dtype);
    (tmp, Arc::new(Engine::open(dir).unwrap()))
}

fn config(kv_cache_memory: usize) -> Config {
    Config { kv_cache_memory, max_waiting: 64, max_running: 64, prefill_slice: None }
}

/// Sixteen requests of other prompts, lengths, methods and sampling: the fixture's prompts, cut
/// to several lengths, under full KV, FastKV, SnapKV-GQA, StreamingLLM and GemFilter, greedy and
/// seeded, with logprobs, each with its own number of new tokens.
fn mixed_requests(engine: &Engine, name: &str) -> Vec<Request> {
    let prompts: Vec<Vec<u32>> = expected(name).prompts.into_iter().map(|p| p.ids).collect();
    let longest = prompts.iter().max_by_key(|p| p.len()).unwrap().clone();
    let methods = [Method::Full, Method::Fastkv, Method::SnapkvGqa, Method::Streamingllm, Method::Gemfilter];
    (0..16)
        .map(|i| {
            let ids = match i % 4 {
                3 => longest[..longest.len() / (1 + i % 3)].to_vec(),
                k => prompts[k % prompts.len()].clone(),
            };
            let mut req = Request::new(Prompt::Tokens(ids));
            req.max_new_tokens = 3 + (i * 5) % 14;
            req.policy = Some(Policy { method: methods[i % methods.len()], ..engine.default_policy() });
            if i % 3 == 1 {
                req.sampling.temperature = 0.8;
                req.sampling.seed = i as u64;
            }
            req.logprobs = (i % 2 == 0).then_some(3);
            req
        })
        .collect()
}

fn alone(engine: &Engine, req: &Request) -> Output {
    engine.generate(req, |_| ControlFlow::Continue(())).unwrap()
}

/// The tokens and logprobs of a stream, and its output.
fn collect(stream: fastkv::scheduler::Stream) -> (Vec<u32>, Vec<f32>, Output) {
    let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
    for event in stream {
        match event {
            Event::Token(t) => {
                ids.push(t.id);
                logprobs.extend(t.logprob.map(|l| l.logprob));
            }
            Event::Done(out) => return (ids, logprobs, *out),
            Event::Failed(e) => panic!("a request failed: {e}"),
        }
    }
    panic!("the stream ended without Done")
}

#[test]
fn sixteen_requests_together_get_the_tokens_they_get_alone() {
    for (name, dtype) in [("llama", DType::F32), ("qwen2", DType::F32), ("qwen3", DType::Bf16)] {
        let (_tmp, engine) = engine(name, dtype);
        let requests = mixed_requests(&engine, name);
        let singles: Vec<Output> = requests.iter().map(|r| alone(&engine, r)).collect();
        let scheduler = Scheduler::start(engine.clone(), config(1 << 30), Arc::new(Unobserved));
        let streams: Vec<_> = requests.iter().map(|r| scheduler.submit_stream(r.clone()).unwrap()).collect();
        for (i, (stream, single)) in streams.into_iter().zip(&singles).enumerate() {
            let (ids, logprobs, out) = collect(stream);
            assert_eq!(out.token_ids, single.token_ids, "{name} request {i}: tokens");
            assert_eq!(out.text, single.text, "{name} request {i}: text");
            assert_eq!(out.finish_reason, single.finish_reason, "{name} request {i}");
            assert!(out.token_ids.starts_with(&ids), "{name} request {i}: streamed ids (all but an EOS)");
            if let Some(lp) = single.token_ids.first().and(requests[i].logprobs) {
                assert!(lp > 0 && !logprobs.is_empty(), "{name} request {i}: logprobs reported");
            }
        }
        let stats = scheduler.stats();
        assert_eq!((stats.running, stats.waiting, stats.cache_bytes_reserved), (0, 0, 0), "{name}: all freed");
        assert!(stats.decoded_tokens > stats.decode_steps, "{name}: decode steps were shared");
    }
}

#[test]
fn batched_logprobs_equal_those_of_the_request_alone() {
    let (_tmp, engine) = engine("mistral", DType::F32);
    let requests: Vec<Request> = mixed_requests(&engine, "mistral")
        .into_iter()
        .map(|mut r| {
            r.logprobs = Some(2);
            r
        })
        .collect();
    let logprobs = |req: &Request| {
        let mut all = Vec::new();
        engine
            .generate(req, |t| {
                all.push(t.logprob.clone().unwrap());
                ControlFlow::Continue(())
            })
            .unwrap();
        all
    };
    let singles: Vec<_> = requests.iter().map(logprobs).collect();
    let scheduler = Scheduler::start(engine.clone(), config(1 << 30), Arc::new(Unobserved));
    let streams: Vec<_> = requests.iter().map(|r| scheduler.submit_stream(r.clone()).unwrap()).collect();
    for (i, (stream, single)) in streams.into_iter().zip(singles).enumerate() {
        let batched: Vec<_> = stream.filter_map(|e| if let Event::Token(t) = e { t.logprob } else { None }).collect();
        // The decode products compute each request's row the same in any batch: the same bits.
        assert_eq!(batched, single, "request {i}");
    }
}

#[test]
fn requests_joining_and_leaving_at_every_step_keep_their_tokens() {
    let (_tmp, engine) = engine("llama", DType::F32);
    let ids = expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let scheduler = Scheduler::start(engine.clone(), config(1 << 30), Arc::new(Unobserved));
    // Request i asks for i + 1 tokens and starts on a prompt of its own length: while the earlier
    // ones decode, one leaves and one joins at almost every step.
    let requests: Vec<Request> = (0..12)
        .map(|i| {
            let mut req = Request::new(Prompt::Tokens(ids[..ids.len() - 40 * i].to_vec()));
            req.max_new_tokens = i + 1;
            req.ignore_eos = true;
            req
        })
        .collect();
    let mut streams = Vec::new();
    for req in &requests {
        streams.push(scheduler.submit_stream(req.clone()).unwrap());
        std::thread::sleep(Duration::from_millis(15));
    }
    for (i, (stream, req)) in streams.into_iter().zip(&requests).enumerate() {
        let out = stream.finish().unwrap();
        assert_eq!(out.token_ids, alone(&engine, req).token_ids, "request {i}");
        assert_eq!(out.token_ids.len(), i + 1);
    }
}

#[test]
fn a_cancelled_request_frees_its_cache_and_the_others_go_on() {
    let (_tmp, engine) = engine("qwen2", DType::F32);
    let ids = expected("qwen2").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let scheduler = Scheduler::start(engine.clone(), config(1 << 30), Arc::new(Unobserved));
    let request = |n: usize| {
        let mut req = Request::new(Prompt::Tokens(ids.clone()));
        req.max_new_tokens = n;
        req.ignore_eos = true;
        req
    };
    let keep = scheduler.submit_stream(request(24)).unwrap();
    let mut cancel = scheduler.submit_stream(request(1000)).unwrap();
    for _ in 0..3 {
        assert!(matches!(cancel.next(), Some(Event::Token(_))));
    }
    cancel.ticket().cancel();
    let rest: Vec<Event> = cancel.by_ref().collect();
    match rest.last() {
        Some(Event::Done(out)) => {
            assert_eq!(out.finish_reason, FinishReason::Cancelled);
            assert!(out.token_ids.len() < 1000);
        }
        other => panic!("expected Done after a cancellation, got {other:?}"),
    }
    let kept = keep.finish().unwrap();
    assert_eq!(kept.token_ids, alone(&engine, &request(24)).token_ids);
    // Dropping a stream cancels its request too.
    drop(scheduler.submit_stream(request(1000)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while scheduler.stats().running + scheduler.stats().waiting > 0 {
        assert!(std::time::Instant::now() < deadline, "a dropped stream's request kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(scheduler.stats().cache_bytes_reserved, 0);
}

#[test]
fn a_bad_request_is_refused_at_once_and_disturbs_no_one() {
    let (_tmp, engine) = engine("llama", DType::F32);
    let ids = expected("llama").prompts[0].ids.clone();
    let scheduler = Scheduler::start(engine.clone(), config(1 << 30), Arc::new(Unobserved));
    let mut good = Request::new(Prompt::Tokens(ids.clone()));
    good.max_new_tokens = 12;
    let running = scheduler.submit_stream(good.clone()).unwrap();
    let bad_id = Request::new(Prompt::Tokens(vec![0, engine.spec().vocab_size as u32]));
    let err = scheduler.submit_stream(bad_id).err().unwrap().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let mut bad_policy = good.clone();
    bad_policy.policy = Some(Policy { tsp_layer: 99, ..engine.default_policy() });
    let err = scheduler.submit_stream(bad_policy).err().unwrap().to_string();
    assert!(err.contains("tsp_layer"), "{err}");
    let mut bad_sampling = good.clone();
    bad_sampling.sampling.top_p = 0.0;
    assert!(scheduler.submit_stream(bad_sampling).is_err());
    assert_eq!(running.finish().unwrap().token_ids, alone(&engine, &good).token_ids);
}

#[test]
fn admission_keeps_the_caches_within_their_memory() {
    let (_tmp, engine) = engine("llama", DType::F32);
    let ids = expected("llama").prompts.into_iter().max_by_key(|p| p.ids.len()).unwrap().ids;
    let request = |method: Method| {
        let mut req = Request::new(Prompt::Tokens(ids.clone()));
        req.max_new_tokens = 16;
        req.ignore_eos = true;
        req.policy = Some(Policy { method, ..engine.default_policy() });
        req
    };
    let element = 4; // an f32 engine caches f32
    let bytes = |m: Method| {
        let policy = request(m).policy.unwrap();
        fastkv::prefill::cache_bytes_bound(engine.spec(), &policy, ids.len(), 16, element)
    };
    let (full, fastkv) = (bytes(Method::Full), bytes(Method::Fastkv));
    assert!(fastkv * 5 < full, "FastKV reserves a fraction of full KV ({fastkv} vs {full} bytes)");
    // Room for two full-KV caches: eight full-KV requests run two at a time, FastKV ones all at once.
    let scheduler = Scheduler::start(engine.clone(), config(2 * full + full / 2), Arc::new(Unobserved));
    let streams: Vec<_> = (0..8).map(|_| scheduler.submit_stream(request(Method::Full)).unwrap()).collect();
    let mut most = 0;
    while scheduler.stats().running + scheduler.stats().waiting > 0 {
        let s = scheduler.stats();
        assert!(s.cache_bytes_reserved <= s.cache_bytes_limit, "{s:?}");
        most = most.max(s.running);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(most <= 2, "{most} full-KV requests ran at once in memory for 2");
    let want = alone(&engine, &request(Method::Full)).token_ids;
    for s in streams {
        assert_eq!(s.finish().unwrap().token_ids, want);
    }
    let fastkv_streams: Vec<_> = (0..8).map(|_| scheduler.submit_stream(request(Method::Fastkv)).unwrap()).collect();
    for s in fastkv_streams {
        s.finish().unwrap();
    }
    // A request that could never fit is refused, naming the memory; a full queue refuses, retryably.
    let small = Scheduler::start(engine.clone(), Config { max_waiting: 1, ..config(fastkv) }, Arc::new(Unobserved));
    let err = small.submit_stream(request(Method::Full)).err().unwrap().to_string();
    assert!(err.contains("KV cache needs") && err.contains("max_new_tokens"), "{err}");
    let mut held = Vec::new();
    let refused = (0..6).find_map(|_| match small.submit_stream(request(Method::Fastkv)) {
        Ok(s) => {
            held.push(s);
            None
        }
        Err(e) => Some(e),
    });
    assert!(matches!(refused, Some(Error::QueueFull { .. })), "{refused:?}");
}

#[test]
fn draining_finishes_running_requests_and_refuses_new_ones() {
    let (_tmp, engine) = engine("llama", DType::F32);
    let ids = expected("llama").prompts[1].ids.clone();
    let scheduler = Scheduler::start(engine.clone(), config(1 << 30), Arc::new(Unobserved));
    let mut req = Request::new(Prompt::Tokens(ids));
    req.max_new_tokens = 8;
    let stream = scheduler.submit_stream(req.clone()).unwrap();
    // Drained as soon as it left the queue: in its prefill, it is running too.
    while scheduler.stats().waiting > 0 {
        std::thread::yield_now();
    }
    assert!(scheduler.drain(Duration::from_secs(60)), "the running request finished in time");
    assert_eq!(stream.finish().unwrap().token_ids, alone(&engine, &req).token_ids);
    assert!(matches!(scheduler.submit_stream(req), Err(Error::ShuttingDown)));
}

/// The bundled model (bf16 engine, on this CPU's path): its test prompts give the same ids batched.
#[test]
fn the_bundled_model_decodes_the_same_batched() {
    let Some(model) = resource(root().join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf"), "scripts/models.sh")
    else {
        return;
    };
    let (_tmp, dir) = build_engine(&model, DType::Bf16);
    let engine = Arc::new(Engine::open(dir).unwrap());
    let prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"];
    let requests: Vec<Request> = (0..12)
        .map(|i| {
            let text = prompts[i % prompts.len()].repeat(1 + i / prompts.len() * 20);
            let mut req = Request::new(Prompt::Chat(text));
            req.max_new_tokens = 24;
            req.policy = Some(if i % 2 == 0 { engine.default_policy() } else { engine.full_policy() });
            req
        })
        .collect();
    let scheduler = Scheduler::start(engine.clone(), config(1 << 30), Arc::new(Unobserved));
    let streams: Vec<_> = requests.iter().map(|r| scheduler.submit_stream(r.clone()).unwrap()).collect();
    for (i, (stream, req)) in streams.into_iter().zip(&requests).enumerate() {
        assert_eq!(stream.finish().unwrap().token_ids, alone(&engine, req).token_ids, "request {i}");
    }
}
