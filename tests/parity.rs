//! The CPU backend against transformers: tiny random-weight checkpoints of every supported
//! architecture, with logits and greedy continuations computed by `scripts/make_fixtures.py`.

mod common;

use std::ops::ControlFlow;

use common::*;
use fastkv::tensors::DType;
use fastkv::{Engine, Prompt, Request};

fn greedy_full(engine: &Engine, ids: &[u32], n: usize) -> fastkv::Output {
    let mut req = Request::new(Prompt::Tokens(ids.to_vec()));
    req.max_new_tokens = n;
    req.policy = Some(engine.full_policy());
    engine.generate(&req, |_| ControlFlow::Continue(())).unwrap()
}

/// Tokens up to and including the first EOS (the engine stops there; transformers was told not to).
fn until_eos(tokens: &[u32], eos: &[u32]) -> Vec<u32> {
    match tokens.iter().position(|t| eos.contains(t)) {
        Some(i) => tokens[..=i].to_vec(),
        None => tokens.to_vec(),
    }
}

#[test]
fn f32_engines_match_transformers_logits_and_greedy_tokens() {
    for name in FIXTURES {
        let (_tmp, dir) = build_engine(&fixture(name), DType::F32);
        let engine = Engine::open(&dir).unwrap();
        let eos = engine.manifest.tokenizer.eos_token_ids.clone();
        for p in expected(name).prompts {
            assert_eq!(engine.encode(&p.text).unwrap(), p.ids, "{name}: tokenizer ids of {:?}", p.text);
            let out = greedy_full(&engine, &p.ids, p.greedy.len());
            assert_eq!(out.metrics.kv_cache_bytes, out.metrics.kv_cache_bytes_full, "{name}: a full f32 cache");
            let err = rel_err(&out.prompt_logits, &p.last_logits);
            assert!(err < 1e-4, "{name}, {} tokens: logits relative error {err:e}", p.ids.len());
            assert_eq!(
                out.token_ids,
                until_eos(&p.greedy, &eos),
                "{name}, {} tokens: greedy continuation",
                p.ids.len()
            );
        }
    }
}

/// bf16 weights round every parameter to 8 mantissa bits (exact for the bf16-stored fixtures, lossy
/// for the f32 llama and f16 qwen2 ones); logits stay within 5% of their largest magnitude.
#[test]
fn bf16_engines_stay_within_documented_tolerance() {
    for name in FIXTURES {
        let (_tmp, dir) = build_engine(&fixture(name), DType::Bf16);
        let engine = Engine::open(&dir).unwrap();
        for p in expected(name).prompts {
            let out = greedy_full(&engine, &p.ids, 1);
            assert_eq!(out.metrics.kv_cache_bytes, out.metrics.kv_cache_bytes_full, "{name}: a full bf16 cache");
            let err = rel_err(&out.prompt_logits, &p.last_logits);
            eprintln!("{name}, {} tokens: bf16 logits relative error {err:.2e}", p.ids.len());
            assert!(err < 5e-2, "{name}, {} tokens: bf16 logits relative error {err:e}", p.ids.len());
        }
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    for name in FIXTURES {
        let (_tmp, dir) = build_engine(&fixture(name), DType::F32);
        let engine = Engine::open(&dir).unwrap();
        let chat = expected(name).chat_example;
        assert_eq!(engine.chat_prompt("Hello").unwrap(), chat.text, "{name}");
        let mut req = Request::new(Prompt::Chat("Hello".into()));
        req.max_new_tokens = 1;
        let out = engine.generate(&req, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(out.prompt_ids, chat.ids, "{name}");
    }
}
