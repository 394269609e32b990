//! `fastkv-build`: compile an HF checkpoint into a fastkv engine directory.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fastkv::builder::{build, BuildOptions};
use fastkv::tensors::DType;

/// Compile a HuggingFace checkpoint (Llama 3.x, Mistral family, Qwen2/2.5, Qwen3) into a fastkv
/// engine directory: engine.json (versioned manifest with checksums and FastKV defaults),
/// weights.safetensors (normalised, fused, in the chosen dtype) and tokenizer.json.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Checkpoint directory: config.json, model.safetensors (or model.safetensors.index.json with its
    /// shards), tokenizer.json, and optionally tokenizer_config.json / generation_config.json.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Engine directory to create. It is written to a temporary folder beside it and renamed at the
    /// end, so a failed build leaves nothing behind.
    #[arg(long)]
    output: PathBuf,
    /// Element type of the engine's weights (computation is always accumulated in f32).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DType,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// Print nothing but errors (no progress bar, no summary).
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = BuildOptions {
        checkpoint: args.checkpoint,
        output: args.output,
        dtype: args.dtype,
        force: args.force,
        progress: !args.quiet && std::io::stderr().is_terminal(),
    };
    match build(&opts) {
        Ok(m) => {
            if !args.quiet {
                let weights = &m.files["weights.safetensors"];
                println!(
                    "built {} ({:?}, {} layers, {} MB {:?} weights, FastKV defaults: {}) from {}",
                    opts.output.display(),
                    m.model.arch,
                    m.model.num_layers,
                    weights.bytes / 1_000_000,
                    m.dtype,
                    m.preset.as_deref().unwrap_or("ℓ* = N/2 − 1 rule"),
                    m.source
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
