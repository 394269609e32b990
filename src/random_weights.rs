//! Engines of a real model's exact shape with weights drawn from a seed where the engine is opened:
//! speed depends on shapes, not on weight values, so an 8B-shaped engine measures what users run
//! without a 16 GB download or file. The weights are a safetensors image in anonymous memory, laid
//! out like a built engine's, so every backend loads them through its usual path. Each value is a
//! counter-based hash of (seed, tensor, index): the same seed gives the same model on every machine.

use std::collections::HashMap;
use std::path::PathBuf;

use half::{bf16, f16};
use memmap2::MmapMut;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::hf_layout;
use crate::error::{Error, Result};
use crate::spec::ModelSpec;
use crate::tensors::{safetensors_header, DType, TensorFile, TensorPlan};

/// What `engine.json` records for an engine whose weights are generated at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandomWeights {
    pub seed: u64,
}

/// splitmix64: a well-mixed 64-bit hash of a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Value `index` of tensor number `tensor`, uniform in [−1, 1).
fn uniform(seed: u64, tensor: usize, index: usize) -> f32 {
    let z = mix(seed ^ mix((tensor as u64) << 40 ^ index as u64));
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

impl RandomWeights {
    /// The engine weights of `spec` in `dtype`: matrices uniform with variance 1/cols (so activations
    /// keep their scale through the layers), norm weights 1 ± 0.1, biases ± 0.02.
    pub fn generate(&self, spec: &ModelSpec, dtype: DType) -> Result<TensorFile> {
        let plan: Vec<TensorPlan> =
            hf_layout(spec).into_iter().map(|t| TensorPlan { name: t.name, dtype, shape: t.shape }).collect();
        let header = safetensors_header(&plan, &HashMap::new());
        let data_start = 8 + header.len();
        let total = data_start + plan.iter().map(TensorPlan::bytes).sum::<usize>();
        let name = PathBuf::from(format!("<random weights, seed {}>", self.seed));
        let mut image = MmapMut::map_anon(total).map_err(|e| Error::io(&name, e))?;
        image[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
        image[8..data_start].copy_from_slice(header.as_bytes());
        let mut rest = &mut image[data_start..];
        for (i, t) in plan.iter().enumerate() {
            let (bytes, tail) = rest.split_at_mut(t.bytes());
            rest = tail;
            let value = value_of(&t.name, &t.shape);
            let seed = self.seed;
            let chunk = 1 << 16;
            bytes.par_chunks_mut(chunk * dtype.size()).enumerate().for_each(|(c, out)| {
                for (j, e) in out.chunks_exact_mut(dtype.size()).enumerate() {
                    let x = value(uniform(seed, i, c * chunk + j));
                    match dtype {
                        DType::F32 => e.copy_from_slice(&x.to_le_bytes()),
                        DType::F16 => e.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
                        DType::Bf16 => e.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
                    }
                }
            });
        }
        let image = image.make_read_only().map_err(|e| Error::io(&name, e))?;
        TensorFile::from_image(name, image)
    }
}

/// How a uniform draw becomes a weight of the tensor called `name` with `shape`.
fn value_of(name: &str, shape: &[usize]) -> impl Fn(f32) -> f32 + Sync {
    let (scale, offset) = match shape {
        [_] if name.ends_with("norm") => (0.1, 1.0),
        [_] => (0.02, 0.0),
        [_, cols] => (3f32.sqrt() / (*cols as f32).sqrt(), 0.0),
        _ => (1.0, 0.0),
    };
    move |u| offset + scale * u
}
