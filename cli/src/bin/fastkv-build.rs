//! `fastkv-build`: compile an HF checkpoint or a GGUF file into a fastkv engine directory, and/or
//! export an engine as ONNX.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use fastkv::builder::{build, BuildOptions, Calibrate};
use fastkv::calibrate::Probes;
use fastkv::progress::{Progress, Silent};
use fastkv::tensors::DType;
use fastkv::trt::plan::{Limits, PlanOptions};
use fastkv::Overrides;
use fastkv_cli::{calibration_summary, describe, Bars};

/// Compile a HuggingFace checkpoint (Llama 3.x, Mistral family, Qwen2/2.5, Qwen3) or a GGUF file
/// (llama and qwen2 archs) into a fastkv engine directory: engine.json (versioned manifest with
/// checksums and FastKV defaults), weights.safetensors (normalised, fused, in the chosen dtype) and
/// tokenizer.json.
///
/// With --export-onnx DIR it also writes the engine as ONNX (after building it, or from an existing
/// engine with --engine ENGINE --export-onnx DIR): prefill.onnx and decode.onnx with the FastKV steps
/// as TensorRT plugin nodes (domain `fastkv`), prefill.reference.onnx and decode.reference.onnx with
/// those steps lowered to standard ONNX ops (runs on onnxruntime), all four reading DIR/weights.bin
/// (f32). Only the engine's default FastKV policy in rate mode is exported.
///
/// With --target tensorrt it then builds TensorRT plans of the engine (docs/onnx-tensorrt.md).
#[derive(Parser)]
#[command(name = "fastkv-build", version)]
struct Args {
    /// Checkpoint directory: config.json, model.safetensors (or model.safetensors.index.json with its
    /// shards), tokenizer.json, and optionally tokenizer_config.json / generation_config.json.
    /// Or a GGUF v2/v3 file: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K tensors
    /// are dequantized to --dtype; the tokenizer (byte-level BPE, pre-tokenizer smollm, qwen2 or
    /// llama-bpe) and chat template come from its metadata.
    #[arg(long, required_unless_present_any = ["engine", "random_weights"], conflicts_with_all = ["engine", "random_weights"])]
    checkpoint: Option<PathBuf>,
    /// Instead of a checkpoint: an engine of --preset's exact shape whose weights are drawn from
    /// --seed each time it is opened (no weight file; a byte-level tokenizer), for measuring speed on
    /// the shapes users run. Its default policy is the preset's with the policy flags applied.
    #[arg(long, requires_all = ["preset", "output"])]
    random_weights: bool,
    /// The shape for --random-weights: llama-3.1-8b, ministral-8b, mistral-nemo-12b, qwen2.5-7b,
    /// qwen3-8b or smollm2-135m (engines/*.json).
    #[arg(long, requires = "random_weights")]
    preset: Option<String>,
    /// Seed of --random-weights (same seed, same weights, on every machine).
    #[arg(long, default_value_t = 0, requires = "random_weights")]
    seed: u64,
    /// Engine directory to create. It is written to a temporary folder beside it and renamed at the
    /// end, so a failed build leaves nothing behind.
    #[arg(long, required_unless_present = "engine", conflicts_with = "engine")]
    output: Option<PathBuf>,
    /// An engine directory built before, to export with --export-onnx or build plans of with --target
    /// tensorrt (instead of building one).
    #[arg(long)]
    engine: Option<PathBuf>,
    /// Write the engine as ONNX into this directory (created if missing; its files are replaced).
    /// Prompts of the exported prefill graph must be at least the printed minimum length.
    #[arg(long)]
    export_onnx: Option<PathBuf>,
    /// What to build: `engine`, the engine directory; `tensorrt`, the engine directory and then its
    /// TensorRT plans in ENGINE/tensorrt/ (prefill.plan and decode_cached.plan, recorded in engine.json): the
    /// network is exported as ONNX and built by TensorRT 10/11's builder on --gpu. Needs libnvinfer and
    /// libnvonnxparser, looked for in $TENSORRT_ROOT/lib, $LD_LIBRARY_PATH, a Python environment's
    /// tensorrt_libs and the system's library folders, before anything is built.
    #[arg(long, value_enum, default_value = "engine")]
    target: Target,
    /// TensorRT plans: the longest prompt they accept, in tokens.
    #[arg(long, default_value_t = 8192)]
    max_input_len: usize,
    /// TensorRT plans: the most new tokens of one request.
    #[arg(long, default_value_t = 1024)]
    max_output_len: usize,
    /// TensorRT plans: the GPU that builds them (they run on GPUs of its compute capability).
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Element type of the engine's weights (computation is always accumulated in f32).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DType,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// The engine's default policy: the model's preset (engines/*.json), else FastKV's defaults, with
    /// these flags applied; calibration chooses what they leave open (--retain-rate / --kv-budget fix
    /// the KV budget, --tsp-rate the TSP rate; --tsp-layer fixes ℓ* and skips calibration).
    #[command(flatten, next_help_heading = "Default policy")]
    policy: Overrides,
    /// Choose the KV budget, ℓ* and the TSP rate by calibration (as `fastkv calibrate` does: probes
    /// of --haystack essays with synthetic facts; about two minutes per 100M parameters on 2 cores)
    /// even when a preset matches. Without this flag, engines with no preset are calibrated when the
    /// essays exist.
    #[arg(long, conflicts_with_all = ["tsp_layer", "no_calibrate", "random_weights"])]
    calibrate: bool,
    /// Never calibrate: the preset's policy, else FastKV's defaults (r = 0.1, t = 0.2, ℓ* = N/2 − 1).
    #[arg(long)]
    no_calibrate: bool,
    /// Essays for the calibration probes (a folder of .txt files; scripts/models.sh installs these).
    #[arg(long, default_value = fastkv::eval::haystack::ESSAYS)]
    haystack: PathBuf,
    /// Print nothing but errors (no progress bar, no summary).
    #[arg(long)]
    quiet: bool,
}

/// What `fastkv-build` produces.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    /// A fastkv engine directory (runs on the CPU and CUDA backends).
    Engine,
    /// An engine directory with TensorRT plans.
    Tensorrt,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.engine.is_some() && args.export_onnx.is_none() && args.target == Target::Engine {
        Args::command()
            .error(ErrorKind::MissingRequiredArgument, "--engine needs --export-onnx DIR or --target tensorrt")
            .exit();
    }
    if args.target == Target::Tensorrt {
        if let Err(e) = fastkv::trt::builder::available() {
            return fail(e);
        }
    }
    let engine = match (&args.engine, args.checkpoint.clone(), args.output.clone()) {
        (Some(engine), _, _) => engine.clone(),
        (None, None, Some(output)) if args.random_weights => {
            let preset = args.preset.as_deref().expect("clap requires --preset");
            match fastkv::builder::build_random(preset, args.seed, args.dtype, &args.policy, &output, args.force) {
                Ok(m) => {
                    if !args.quiet {
                        println!(
                            "built {} ({}, {} layers, random {:?} weights from seed {})\ndefault policy: {}",
                            output.display(),
                            preset,
                            m.model.num_layers,
                            m.dtype,
                            args.seed,
                            describe(&m.fastkv)
                        );
                    }
                    output
                }
                Err(e) => return fail(e),
            }
        }
        (None, Some(checkpoint), Some(output)) => match build_engine(&args, checkpoint, output) {
            Ok(dir) => dir,
            Err(e) => return fail(e),
        },
        _ => unreachable!("clap requires --checkpoint and --output without --engine"),
    };
    if let Some(dir) = &args.export_onnx {
        match fastkv::onnx::export::export(&engine, dir) {
            Ok(x) if !args.quiet => println!(
                "exported {} as ONNX into {}: {} + {} (prompts of {}..={} tokens)",
                engine.display(),
                x.dir.display(),
                x.graphs.join(", "),
                fastkv::onnx::export::WEIGHTS_FILE,
                x.min_prompt_len,
                x.max_prompt_len
            ),
            Ok(_) => {}
            Err(e) => return fail(e),
        }
    }
    if args.target == Target::Tensorrt {
        let opts = PlanOptions {
            limits: Limits { max_input_len: args.max_input_len, max_output_len: args.max_output_len },
            device: args.gpu,
        };
        let progress: &dyn Progress = if args.quiet { &Silent } else { &Bars::new() };
        match fastkv::trt::builder::build_plans(&engine, &opts, progress) {
            Ok(r) if !args.quiet => println!(
                "built TensorRT {} plans for compute capability {} into {}/{}: prompts up to {} tokens, {} new",
                r.version,
                r.compute_capability,
                engine.display(),
                fastkv::trt::plan::PLAN_DIR,
                r.limits.max_input_len,
                r.limits.max_output_len
            ),
            Ok(_) => {}
            Err(e) => return fail(e),
        }
    }
    ExitCode::SUCCESS
}

fn fail(e: fastkv::Error) -> ExitCode {
    eprintln!("error: {}", e.cli_message());
    ExitCode::FAILURE
}

/// Builds `checkpoint` into the engine directory `output` and returns it.
fn build_engine(args: &Args, checkpoint: PathBuf, output: PathBuf) -> fastkv::Result<PathBuf> {
    let opts = BuildOptions {
        checkpoint,
        output,
        dtype: args.dtype,
        force: args.force,
        policy: args.policy.clone(),
        calibrate: match (args.calibrate, args.no_calibrate) {
            (true, _) => Calibrate::Always(Probes::new(args.haystack.clone())),
            (false, true) => Calibrate::Never,
            (false, false) => Calibrate::Auto(Probes::new(args.haystack.clone())),
        },
    };
    let progress: &dyn Progress = if args.quiet { &Silent } else { &Bars::new() };
    let m = build(&opts, progress)?;
    if !args.quiet {
        let weights = &m.files["weights.safetensors"];
        println!(
            "built {} ({:?}, {} layers, {} MB {:?} weights) from {}\ndefault policy: {}\n{}",
            opts.output.display(),
            m.model.arch,
            m.model.num_layers,
            weights.bytes / 1_000_000,
            m.dtype,
            m.source,
            describe(&m.fastkv),
            match (&m.calibration, &m.preset) {
                (Some(c), _) => calibration_summary(c),
                (None, Some(name)) => format!("from the {name} preset"),
                (None, None) if args.policy.tsp_layer.is_some() || args.no_calibrate => {
                    "not calibrated (--tsp-layer / --no-calibrate)".to_string()
                }
                (None, None) => format!(
                    "not calibrated: no essays at {} to calibrate with (run scripts/models.sh)",
                    args.haystack.display()
                ),
            },
        );
    }
    Ok(opts.output)
}
