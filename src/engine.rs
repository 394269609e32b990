//! The engine directory: `engine.json` (versioned manifest), `weights.safetensors` (normalised names,
//! one dtype) and `tokenizer.json`. [`Engine::open`] maps it once; the engine is then shared by any
//! number of concurrent requests.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Device};
use crate::error::{Error, Result};
use crate::policy::{Budget, Policy};
use crate::random_weights::RandomWeights;
use crate::spec::ModelSpec;
use crate::tensors::{DType, TensorFile};
use crate::text::TextCodec;
use crate::tokenizer_info::TokenizerInfo;

pub const FORMAT_NAME: &str = "fastkv-engine";
/// Major versions are incompatible; minor versions only add optional fields.
pub const FORMAT_VERSION: (u32, u32) = (1, 3);
pub const MANIFEST: &str = "engine.json";
pub const WEIGHTS: &str = "weights.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// Contents of `engine.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: String,
    pub model: ModelSpec,
    pub dtype: DType,
    pub tokenizer: TokenizerInfo,
    /// Default FastKV policy (a preset from `engines/` or the ℓ* = N/2 − 1 rule).
    pub fastkv: Policy,
    /// Name of the preset the defaults came from, if any.
    pub preset: Option<String>,
    pub files: BTreeMap<String, FileEntry>,
    /// Directory name of the checkpoint it was built from.
    pub source: String,
    /// Set when the weights are generated from a seed at open instead of read from a file (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_weights: Option<RandomWeights>,
    /// How `fastkv calibrate` chose the default ℓ* and TSP budget, with its evidence (1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// The TensorRT plans `fastkv-build --target tensorrt` built, and for which TensorRT and GPU (1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorrt: Option<crate::trt::plan::TensorRtRecord>,
}

impl Manifest {
    /// Makes `calibration`'s choice the engine's default FastKV policy and records its evidence.
    pub fn set_calibration(&mut self, calibration: Calibration) {
        self.fastkv.tsp_layer = calibration.tsp_layer;
        self.fastkv.budget = calibration.budget;
        self.preset = None;
        self.calibration = Some(calibration);
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, format!("not valid JSON: {e}")))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(Error::bad_file(
                &path,
                format!("not a fastkv engine manifest (no \"format\": \"{FORMAT_NAME}\")"),
            ));
        }
        let version = v.get("format_version").and_then(|f| f.as_str()).unwrap_or("");
        let major = version.split('.').next().and_then(|m| m.parse::<u32>().ok());
        match major {
            Some(m) if m == FORMAT_VERSION.0 => {}
            Some(m) if m > FORMAT_VERSION.0 => {
                return Err(Error::EngineVersion {
                    path,
                    found: version.into(),
                    supported: format!("{}.x", FORMAT_VERSION.0),
                })
            }
            _ => return Err(Error::bad_file(&path, format!("unknown format_version `{version}`"))),
        }
        let manifest: Manifest =
            serde_json::from_value(v).map_err(|e| Error::bad_file(&path, format!("invalid manifest: {e}")))?;
        manifest.model.validate().map_err(|m| Error::bad_file(&path, m))?;
        // Every listed file is read and hashed: only plain names inside the engine directory.
        let plain = |name: &str| {
            let mut parts = Path::new(name).components();
            matches!((parts.next(), parts.next()), (Some(Component::Normal(_)), None))
        };
        if let Some(bad) = manifest.files.keys().find(|n| !plain(n)) {
            return Err(Error::bad_file(
                &path,
                format!("file `{bad}` must be a plain file name inside the engine directory"),
            ));
        }
        Ok(manifest)
    }

    /// Writes `engine.json` into `dir` through a temporary file, so a failure leaves the old one whole.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!("{MANIFEST}.partial"));
        let json = serde_json::to_string_pretty(self).expect("manifest serializes");
        std::fs::write(&tmp, json + "\n").and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&path, e)
        })
    }

    /// Checks that every listed file exists with its recorded size; with `hashes`, also its sha256.
    pub fn check_files(&self, dir: &Path, hashes: bool) -> Result<()> {
        let real_dir = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        for (name, entry) in &self.files {
            let path = dir.join(name);
            let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
            if !real.starts_with(&real_dir) {
                return Err(Error::bad_file(
                    &dir.join(MANIFEST),
                    format!("file `{name}` resolves outside the engine directory (to {})", real.display()),
                ));
            }
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            if meta.len() != entry.bytes {
                return Err(Error::bad_file(
                    &path,
                    format!(
                        "size is {} bytes, engine.json records {}: the engine is corrupt, rebuild it",
                        meta.len(),
                        entry.bytes
                    ),
                ));
            }
            if hashes && crate::tensors::sha256_file(&path)? != entry.sha256 {
                return Err(Error::bad_file(
                    &path,
                    "sha256 does not match engine.json: the engine is corrupt, rebuild it",
                ));
            }
        }
        Ok(())
    }
}

// The record of `fastkv calibrate` (crate::calibrate), kept here beside the manifest that stores it.

/// The choice and its evidence, stored in engine.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub tsp_layer: usize,
    pub budget: Budget,
    /// The criterion's threshold ([`crate::calibrate::MIN_RECALL`] when it ran).
    pub min_recall: f64,
    pub probes: usize,
    pub probe_tokens: usize,
    pub seed: u64,
    /// Per candidate budget, the mean recall of TSP at each layer ℓ = 0 … N − 2.
    pub candidates: Vec<Candidate>,
    /// Full-KV over FastKV prefill FLOPs at the chosen ℓ* and budget, at the probes' length.
    pub ideal_speedup: f64,
    /// The share of full KV's cache the chosen policy keeps at the probes' length.
    #[serde(default)]
    pub kv_fraction: f64,
    /// Mean [`crate::calibrate::answer_score`] of full KV's greedy answers to the probes' questions.
    #[serde(default)]
    pub full_score: f64,
    /// The same for SnapKV-GQA at the chosen KV budget, the bar a candidate must reach.
    #[serde(default)]
    pub snapkv_gqa_score: f64,
    /// The KV budget's trade-off: SnapKV-GQA's answers at every retain rate tried.
    #[serde(default)]
    pub budgets: Vec<BudgetScore>,
    /// The candidates whose answers were checked, in the order they were preferred.
    #[serde(default)]
    pub verified: Vec<Verified>,
}

impl Calibration {
    /// The chosen candidate's answer score (0 for engine.json written before answers were checked).
    pub fn chosen_score(&self) -> f64 {
        self.verified.iter().find(|v| (v.tsp_layer, v.budget) == (self.tsp_layer, self.budget)).map_or(0.0, |v| v.score)
    }
}

/// SnapKV-GQA (FastKV without TSP) at one retain rate: its mean answer score on the probes and the
/// share of full KV's cache it keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetScore {
    pub retain_rate: f64,
    pub snapkv_gqa_score: f64,
    pub kv_fraction: f64,
}

/// One candidate's mean [`crate::calibrate::answer_score`] on the probes' questions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verified {
    pub tsp_layer: usize,
    pub budget: Budget,
    pub score: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub budget: Budget,
    pub recall: Vec<f64>,
}

/// An opened engine: the model on its backend and the text codec. `Send + Sync`; open once, share.
pub struct Engine {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub(crate) backend: Backend,
    pub(crate) text: TextCodec,
}

impl Engine {
    /// Opens an engine directory written by `fastkv-build`, on the CPU backend.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_on(dir, Device::Cpu)
    }

    /// Opens an engine directory on `device`.
    pub fn open_on(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.join(MANIFEST).exists() {
            return Err(Error::bad_file(dir, "not an engine directory (no engine.json); build one with fastkv-build"));
        }
        let manifest = Manifest::read(dir)?;
        manifest.check_files(dir, false)?;
        let weights = match manifest.random_weights {
            // Generating an 8B model's weights takes a while: first make sure the device is there.
            Some(random) => {
                Backend::probe(device)?;
                random.generate(&manifest.model, manifest.dtype)?
            }
            None => TensorFile::open(&dir.join(WEIGHTS))?,
        };
        let text = TextCodec::load(&dir.join(TOKENIZER), &manifest.tokenizer)?;
        let backend = Backend::load(dir, &manifest, &weights, device)?;
        Ok(Engine { dir: dir.into(), manifest, backend, text })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.manifest.model
    }

    /// The model on its backend, for callers that drive prefill and decode themselves.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The engine's default FastKV policy.
    pub fn default_policy(&self) -> Policy {
        self.manifest.fastkv
    }

    /// Token ids of `text` (with the tokenizer's own special tokens, e.g. BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.text.encode(text, true)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.text.decode(ids)
    }

    /// Renders the chat template for one user message, ready to generate the assistant's answer.
    pub fn chat_prompt(&self, user_message: &str) -> Result<String> {
        self.text.chat_prompt(user_message)
    }
}
