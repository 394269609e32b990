//! The CUDA backend (feature `cuda`): the kernels of plugin/ and cuBLAS, laid out like [`crate::cpu`]:
//!
//! - [`ffi`]: the launchers, as the kernel ABI plugin/fastkv.h declares them;
//! - [`gpu`]: one GPU ([`Gpu`]): context, stream, buffers, errors;
//! - [`kernels`]: one typed, size-checked wrapper per launcher;
//! - [`library`]: finding cuBLAS;
//! - [`model`]: an engine's weights on the GPU and the pieces of a decoder layer ([`Model`]);
//! - [`ops`]: the prefill driver's operations for one request ([`LaneModel`]);
//! - [`kv_cache`]: a request's device KV cache and decode, replayed as a CUDA graph ([`KvCache`]), and the
//!   batched decode step of several requests.

pub mod ffi;
pub mod gpu;
pub mod kernels;
pub mod kv_cache;
pub mod library;
pub mod model;
pub mod ops;

pub use ffi::CacheRef;
pub use gpu::Gpu;
pub use kernels::{
    decode_batch_workspace_len, decode_workspace_len, window_scores_workspace_len, AttentionInputs, Element, Gather,
    Keys, LayerKv, SlidingWindow,
};
pub use kv_cache::{KvCache, LayerCache};
pub use model::Model;
pub use ops::LaneModel;
