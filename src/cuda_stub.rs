//! The CUDA backend in a build without the `cuda` feature: a model and a cache that cannot be made,
//! so the backend seam ([`crate::backend`]) names every backend in every build without a `#[cfg]`,
//! and asking for a CUDA device says how to get a build that has one.

use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::prefill::Prefill;
use crate::spec::ModelSpec;
use crate::tensors::TensorFile;

/// No CUDA model exists in this build.
pub enum Model {}

/// No CUDA cache exists in this build.
pub enum KvCache {}

fn not_built(ordinal: usize) -> Error {
    Error::NotBuilt { device: format!("cuda:{ordinal}"), feature: "cuda" }
}

impl Model {
    pub fn load(_: &ModelSpec, _: &TensorFile, ordinal: usize) -> Result<Self> {
        Err(not_built(ordinal))
    }

    pub fn probe(ordinal: usize) -> Result<()> {
        Err(not_built(ordinal))
    }

    pub fn ordinal(&self) -> usize {
        match *self {}
    }

    pub fn spec(&self) -> &ModelSpec {
        match *self {}
    }

    pub fn free_memory(&self) -> usize {
        match *self {}
    }

    pub fn prefill_pausing(
        &self,
        _: &[u32],
        _: &[Policy],
        _: usize,
        _: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Prefill<KvCache>>> {
        match *self {}
    }

    pub fn tsp_selections(&self, _: &[u32], _: &[Policy]) -> Result<Vec<Option<Vec<u32>>>> {
        match *self {}
    }

    pub fn decode_batch(&self, _: &[u32], _: &[u32], _: &mut [&mut KvCache]) -> Result<Vec<Vec<f32>>> {
        match *self {}
    }
}

impl KvCache {
    pub fn bytes(&self) -> usize {
        match *self {}
    }

    pub fn num_layers(&self) -> usize {
        match *self {}
    }

    pub fn positions(&self, _: usize) -> Result<Vec<Vec<u32>>> {
        match *self {}
    }
}
