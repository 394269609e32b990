//! The TensorRT runner in a build without the `tensorrt` feature: a model and a cache that cannot be made, so the
//! backend seam ([`crate::backend`]) names every backend in every build without a `#[cfg]`, and asking for a
//! TensorRT device says how to get a build that has one.

use std::path::Path;

use crate::engine::Manifest;
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::prefill::Prefill;

/// No TensorRT model exists in this build.
pub enum Model {}

/// No TensorRT cache exists in this build.
pub enum KvCache {}

impl Model {
    pub fn load(_: &Path, _: &Manifest, ordinal: usize) -> Result<Self> {
        Err(Error::NotBuilt { device: format!("tensorrt:{ordinal}"), feature: "tensorrt" })
    }

    pub fn ordinal(&self) -> usize {
        match *self {}
    }

    pub fn free_memory(&self) -> usize {
        match *self {}
    }

    pub fn check(&self, _: &Policy, _: usize) -> Result<()> {
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
