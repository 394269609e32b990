//! TensorRT. [`plan`] (every build): the optimisation profiles of an engine's exported graphs and engine.json's
//! record of its plans. With the feature `tensorrt`: the cxx bridge to TensorRT's libraries (opened by path at run
//! time, so a build needs only headers) — the plugin registry with fastkv's plugins of tensorrt/, and the builder
//! that turns an engine into plans ([`builder`]), once [`library`] has found libnvinfer and libnvonnxparser, and the
//! runner that runs them (`--device tensorrt:N`, [`runner`]; a stub that cannot be made without the feature).

pub mod plan;

#[cfg(feature = "tensorrt")]
mod bridge;
#[cfg(feature = "tensorrt")]
pub mod builder;
/// Without the feature, building plans says how to get it.
#[cfg(not(feature = "tensorrt"))]
pub mod builder {
    use super::plan::{PlanOptions, TensorRtRecord};
    use crate::{progress::Progress, Error, Result};

    pub fn available() -> Result<()> {
        Err(Error::NotBuilt { device: "tensorrt".into(), feature: "tensorrt" })
    }

    pub fn build_plans(_: &std::path::Path, _: &PlanOptions, _: &dyn Progress) -> Result<TensorRtRecord> {
        available().map(|_| unreachable!("available() fails in this build"))
    }
}
#[cfg(feature = "tensorrt")]
pub mod library;
#[cfg(feature = "tensorrt")]
pub mod runner;
#[cfg(not(feature = "tensorrt"))]
#[path = "runner_stub.rs"]
pub mod runner;

#[cfg(feature = "tensorrt")]
pub use bridge::{
    CreatorInfo, DataType, Field, FieldSpec, FieldValue, Phase, Plugin, PluginInfo, TensorDesc, TensorRt,
};
