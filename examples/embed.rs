//! Embedding fastkv in a service: open an engine once, share it across threads, stream tokens.
//!
//! ```text
//! cargo run --release --bin fastkv-build -- --checkpoint tests/fixtures/llama --output target/engines/llama --force
//! cargo run --release --example embed -- target/engines/llama
//! ```

use std::ops::ControlFlow;
use std::sync::Arc;

use fastkv::{Engine, Prompt, Request, Sampling};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: embed ENGINE_DIR")?;
    let engine = Arc::new(Engine::open(&dir)?);

    // Several requests at once on one engine: greedy full-KV, greedy FastKV, and seeded sampling.
    let requests = [
        ("full", Some(engine.full_policy()), Sampling::default()),
        ("fastkv", None, Sampling::default()),
        ("sampled", None, Sampling { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7 }),
    ];
    let handles: Vec<_> = requests
        .into_iter()
        .map(|(name, policy, sampling)| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                let mut req = Request::new(Prompt::Text("The quick brown fox".repeat(20)));
                req.max_new_tokens = 16;
                req.policy = policy;
                req.sampling = sampling;
                let mut streamed = 0;
                let out = engine.generate(&req, |_token| {
                    streamed += 1;
                    ControlFlow::Continue(())
                })?;
                Ok::<_, fastkv::Error>((name, streamed, out))
            })
        })
        .collect();
    for h in handles {
        let (name, streamed, out) = h.join().expect("request thread")?;
        let m = &out.metrics;
        println!(
            "{name:>8}: {streamed} tokens streamed, TTFT {:.4} s, KV cache {} of {} bytes: {:?}",
            m.ttft_s, m.kv_cache_bytes, m.kv_cache_bytes_full, out.text
        );
    }
    Ok(())
}
