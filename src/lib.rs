//! # fastkv
//!
//! Inference engines with **FastKV** (arXiv 2502.01068) built in: *Token-Selective Propagation*
//! (TSP) passes only the most attended prompt tokens past layer ℓ*, and *GQA-aware KV compression*
//! keeps only a budget of KV entries per KV head in every layer.
//!
//! ## Architecture in one page
//! - [`spec`]: one normalised model description read from any supported HF `config.json`.
//! - [`checkpoint`] + [`tensors`] (+ [`gguf`], [`tokenizer_info`]): HF checkpoints and GGUF files,
//!   validated and mapped onto the engine's fused tensor names.
//! - [`builder`] (`fastkv-build`): checkpoint → engine directory, atomically; [`engine`]: the
//!   versioned engine format and [`Engine::open_on`]; [`random_weights`]: engines of a real model's
//!   shape whose weights are generated from a seed when opened.
//! - [`policy`]: full, FastKV or a baseline (docs/method.md §12), budgets and gates per layer, and the
//!   one override rule every front end uses ([`Overrides`]), budgets as exact [`fraction`]s, and the
//!   [`Floor`] below which nothing is compressed; [`select`]: the host reference of the
//!   selection math (window scores, pooling, group sums, top-k, TSP indices) that the CPU backend
//!   uses and every accelerator kernel is tested against.
//! - **Where TSP is decided**: [`prefill`], the backend-neutral driver — per layer and policy, what is
//!   cached and which rows propagate — over the operations each backend provides ([`prefill::Ops`]).
//! - **Where a backend plugs in**: [`backend`] — a [`Device`] (`cpu`, `cuda:N`, `tensorrt:N`), its
//!   [`backend::Backend`] (the model on it) and [`backend::KvCache`]; the only module naming backends.
//! - **Where the KV cache lives**: in each backend — [`cpu::kv_cache`] (host, per cache head) and
//!   `cuda::KvCache` (device, `[Hk, capacity, D]` per layer, decode replayed as a CUDA graph).
//! - [`cpu`]: the reference backend (tiled online-softmax attention, `gemm` matmuls); `cuda` (feature
//!   `cuda`): the plugin/ kernels + cuBLAS; [`hostmath`]: the host GEMM both `select` and `cpu` use.
//! - [`onnx`]: the network as ONNX (FastKV steps as TensorRT plugin nodes, or lowered to standard ops).
//! - [`trt`]: TensorRT — the plans' profiles and engine.json record; with the feature `tensorrt`, a cxx
//!   bridge (libraries opened by path) to the plugin registry and the builder of plans.
//! - [`session`]: requests, streaming, sampling ([`sampling`]) and metrics; [`text`]: tokenizer,
//!   chat template and streaming detokenization.
//! - [`calibrate`], [`eval`], [`bench`]: choosing ℓ* and t, accuracy and speed measurements; long
//!   work reports to a [`progress::Progress`] the caller draws. The command-line tools live in the
//!   `fastkv-cli` crate (cli/); the library parses no command line (its clap derives sit behind
//!   the `clap` feature for that crate) and draws nothing.
//!
//! ```no_run
//! use fastkv::{Engine, Prompt, Request};
//! let engine = Engine::open("engines/tiny")?;
//! let mut req = Request::new(Prompt::Text("The capital of France is".into()));
//! req.max_new_tokens = 16;
//! let out = engine.generate(&req, |t| { print!("{}", t.text); std::ops::ControlFlow::Continue(()) })?;
//! println!("\nTTFT {:.3}s, KV {} bytes", out.metrics.ttft_s, out.metrics.kv_cache_bytes);
//! # Ok::<(), fastkv::Error>(())
//! ```

pub mod backend;
pub mod bench;
pub mod builder;
pub mod calibrate;
pub mod checkpoint;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
/// The CUDA backend's stand-in in builds without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fraction;
pub mod gguf;
pub mod hostmath;
pub mod onnx;
pub mod policy;
pub mod prefill;
pub mod progress;
pub mod random_weights;
pub mod rope;
pub mod sampling;
pub mod scheduler;
pub mod select;
pub mod session;
pub mod spec;
pub mod stop;
pub mod tensors;
pub mod text;
pub mod tokenizer_info;
pub mod trt;

pub use backend::Device;
pub use engine::Engine;
pub use error::{Error, Result};
pub use policy::{Budget, Floor, Method, Overrides, Policy};
pub use sampling::Sampling;
pub use session::{FinishReason, Logprob, Metrics, Output, Prompt, Request, Token};
pub use text::Message;
