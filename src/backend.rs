//! The backend seam: where a backend plugs in. A [`Device`] names where an engine runs; a
//! [`Backend`] is that device's model (weights loaded once, shared by every request) and a
//! [`KvCache`] one request's cache on it. Prefill goes through the one backend-neutral driver
//! ([`crate::prefill`]) over each backend's [`crate::prefill::Ops`]; decode is the backend's own.
//! This is the only module that names the backends. A backend left out of the build is a stub whose
//! model cannot be made (as candle does), so nothing here depends on the build's features.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::cpu;
use crate::cuda;
use crate::engine::Manifest;
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::prefill::{self, Prefill};
use crate::tensors::TensorFile;
use crate::trt::runner as trt;

/// Where an engine runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The host CPU, with the fastest kernels it has (chosen at run time).
    #[default]
    Cpu,
    /// NVIDIA GPU `N` through the CUDA kernels of plugin/ and cuBLAS (feature `cuda`).
    Cuda(usize),
    /// NVIDIA GPU `N` running the engine's TensorRT plans (`fastkv-build --target tensorrt`; feature `tensorrt`).
    TensorRt(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::TensorRt(n) => write!(f, "tensorrt:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// `cpu`, `cuda[:N]` or `tensorrt[:N]` (`trt` for short; N defaults to 0).
    fn from_str(s: &str) -> Result<Self> {
        let (kind, index) = match s.trim().split_once(':') {
            Some((kind, n)) => (kind, Some(n)),
            None => (s.trim(), None),
        };
        let ordinal = || -> Result<usize> {
            index.map_or(Ok(0), |n| {
                n.parse().map_err(|_| Error::invalid("device", format!("`{s}` is not a device: `{n}` is no number")))
            })
        };
        match kind.to_ascii_lowercase().as_str() {
            "cpu" if index.is_none() => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(ordinal()?)),
            "tensorrt" | "trt" => Ok(Device::TensorRt(ordinal()?)),
            _ => Err(Error::invalid("device", format!("`{s}` is not a device: use cpu, cuda:N or tensorrt:N"))),
        }
    }
}

/// A model loaded on its device (one per engine: the size of the CPU variant costs nothing).
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Cpu(cpu::Model),
    Cuda(cuda::Model),
    TensorRt(trt::Model),
}

/// One request's KV cache on the backend that prefilled it.
pub enum KvCache {
    Cpu(cpu::KvCache),
    Cuda(cuda::KvCache),
    /// Boxed: a TensorRT cache carries its decode context, stream and buffers.
    TensorRt(Box<trt::KvCache>),
}

impl Backend {
    /// Loads the engine in `dir` on `device`: its weights (`file`, checked against the manifest's spec), or for
    /// TensorRT the plans its manifest records.
    pub fn load(dir: &Path, manifest: &Manifest, file: &TensorFile, device: Device) -> Result<Self> {
        let spec = &manifest.model;
        match device {
            Device::Cpu => Ok(Backend::Cpu(cpu::Model::load(spec, file)?)),
            Device::Cuda(n) => Ok(Backend::Cuda(cuda::Model::load(spec, file, n)?)),
            Device::TensorRt(n) => Ok(Backend::TensorRt(trt::Model::load(dir, manifest, n)?)),
        }
    }

    /// Checks that `device` can run engines (driver, device, kernel code), without loading anything.
    pub fn probe(device: Device) -> Result<()> {
        match device {
            Device::Cpu => Ok(()),
            Device::Cuda(n) | Device::TensorRt(n) => cuda::Model::probe(n),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Backend::Cpu(_) => Device::Cpu,
            Backend::Cuda(m) => Device::Cuda(m.ordinal()),
            Backend::TensorRt(m) => Device::TensorRt(m.ordinal()),
        }
    }

    /// Whether `policy` can prefill a `prompt_len`-token prompt here ([`prefill::check_policy`]).
    pub fn check(&self, policy: &Policy, prompt_len: usize) -> Result<()> {
        match self {
            Backend::Cpu(m) => prefill::check_policy(m.spec(), policy, prompt_len, "cpu", true),
            Backend::Cuda(m) => prefill::check_policy(m.spec(), policy, prompt_len, "cuda", false),
            Backend::TensorRt(m) => m.check(policy, prompt_len),
        }
    }

    /// Bytes of memory free on the device now, for KV caches: the host's available memory for the
    /// CPU (MemAvailable on Linux, else 4 GiB), the GPU's free memory.
    pub fn free_memory(&self) -> usize {
        match self {
            Backend::Cpu(_) => cpu::available_memory(),
            Backend::Cuda(m) => m.free_memory(),
            Backend::TensorRt(m) => m.free_memory(),
        }
    }

    /// Bytes of one cached K or V element.
    pub fn kv_element_bytes(&self) -> usize {
        match self {
            Backend::Cpu(m) => m.kv_element_bytes(),
            Backend::Cuda(_) | Backend::TensorRt(_) => 2,
        }
    }

    /// Runs the prompt through every layer under `policy`, reserving `max_new_tokens` of cache.
    pub fn prefill(&self, tokens: &[u32], policy: &Policy, max_new_tokens: usize) -> Result<Prefill<KvCache>> {
        let mut one = self.prefill_many(tokens, std::slice::from_ref(policy), max_new_tokens)?;
        Ok(one.pop().expect("one prefill per policy"))
    }

    /// Prefills one prompt under several policies at once, sharing every layer until their
    /// propagated tokens part ([`prefill::prefill_many`]); each result equals that policy's
    /// prefill alone, and each profile counts the shared work as its own.
    pub fn prefill_many(
        &self,
        tokens: &[u32],
        policies: &[Policy],
        max_new_tokens: usize,
    ) -> Result<Vec<Prefill<KvCache>>> {
        self.prefill_pausing_many(tokens, policies, max_new_tokens, &mut || Ok(()))
    }

    /// [`Backend::prefill`], calling `pause` between the pieces of every layer
    /// ([`prefill::prefill_pausing`]).
    pub fn prefill_pausing(
        &self,
        tokens: &[u32],
        policy: &Policy,
        max_new_tokens: usize,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Prefill<KvCache>> {
        let mut one = self.prefill_pausing_many(tokens, std::slice::from_ref(policy), max_new_tokens, pause)?;
        Ok(one.pop().expect("one prefill per policy"))
    }

    fn prefill_pausing_many(
        &self,
        tokens: &[u32],
        policies: &[Policy],
        max_new_tokens: usize,
        pause: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Prefill<KvCache>>> {
        Ok(match self {
            Backend::Cpu(m) => prefill::prefill_pausing(m, tokens, policies, max_new_tokens, pause)?
                .into_iter()
                .map(|p| p.map_cache(|layers| KvCache::Cpu(cpu::KvCache { layers })))
                .collect(),
            Backend::Cuda(m) => m
                .prefill_pausing(tokens, policies, max_new_tokens, pause)?
                .into_iter()
                .map(|p| p.map_cache(KvCache::Cuda))
                .collect(),
            Backend::TensorRt(m) => m
                .prefill_pausing(tokens, policies, max_new_tokens, pause)?
                .into_iter()
                .map(|p| p.map_cache(|c| KvCache::TensorRt(Box::new(c))))
                .collect(),
        })
    }

    /// The positions each FastKV policy's TSP keeps at its ℓ*, from one shared prefill
    /// ([`prefill::tsp_selections`]).
    pub fn tsp_selections(&self, tokens: &[u32], policies: &[Policy]) -> Result<Vec<Option<Vec<u32>>>> {
        match self {
            Backend::Cpu(m) => prefill::tsp_selections(m, tokens, policies),
            Backend::Cuda(m) => m.tsp_selections(tokens, policies),
            Backend::TensorRt(m) => m.tsp_selections(tokens, policies),
        }
    }

    /// One new token at `position` through every layer, appending to `cache`; its logits.
    pub fn decode(&self, token: u32, position: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        Ok(self.decode_batch(&mut [Step { token, position, cache }])?.pop().expect("one request"))
    }

    /// One decode step of several requests at once, each appending to its own cache: their logits,
    /// in order. A request's logits do not depend on what else is in the batch.
    pub fn decode_batch(&self, steps: &mut [Step]) -> Result<Vec<Vec<f32>>> {
        let tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let positions: Vec<u32> = steps.iter().map(|s| s.position).collect();
        let foreign = || Error::invalid("cache", "a KV cache was prefilled on another backend");
        match self {
            Backend::Cpu(m) => {
                let mut caches = Vec::with_capacity(steps.len());
                for s in steps.iter_mut() {
                    match &mut *s.cache {
                        KvCache::Cpu(c) => caches.push(c),
                        _ => return Err(foreign()),
                    }
                }
                Ok(m.decode_batch(&tokens, &positions, &mut caches))
            }
            Backend::Cuda(m) => {
                let mut caches = Vec::with_capacity(steps.len());
                for s in steps.iter_mut() {
                    match &mut *s.cache {
                        KvCache::Cuda(c) => caches.push(c),
                        _ => return Err(foreign()),
                    }
                }
                m.decode_batch(&tokens, &positions, &mut caches)
            }
            Backend::TensorRt(m) => {
                let mut caches = Vec::with_capacity(steps.len());
                for s in steps.iter_mut() {
                    match &mut *s.cache {
                        KvCache::TensorRt(c) => caches.push(&mut **c),
                        _ => return Err(foreign()),
                    }
                }
                m.decode_batch(&tokens, &positions, &mut caches)
            }
        }
    }
}

/// One request's share of a decode step: the token it appends at `position` to its `cache`.
pub struct Step<'a> {
    pub token: u32,
    pub position: u32,
    pub cache: &'a mut KvCache,
}

impl KvCache {
    /// Bytes of K and V held, not counting the reserve for tokens not generated yet.
    pub fn bytes(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.bytes(),
            KvCache::Cuda(c) => c.bytes(),
            KvCache::TensorRt(c) => c.bytes(),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.layers.len(),
            KvCache::Cuda(c) => c.num_layers(),
            KvCache::TensorRt(c) => c.num_layers(),
        }
    }

    /// Original positions of the entries of every cache head of `layer`, in cache order.
    pub fn positions(&self, layer: usize) -> Result<Vec<Vec<u32>>> {
        match self {
            KvCache::Cpu(c) => {
                let lc = &c.layers[layer];
                Ok((0..lc.n_heads()).map(|h| lc.positions(h).to_vec()).collect())
            }
            KvCache::Cuda(c) => c.positions(layer),
            KvCache::TensorRt(c) => c.positions(layer),
        }
    }
}
