//! `fastkv-build`: checkpoint → engine directory. Everything is validated before anything is
//! written; the engine is written into a temporary sibling folder and renamed into place at the end,
//! so a failed or interrupted build never leaves half an engine.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::calibrate::{self, Grid, Probes};
use crate::checkpoint::Checkpoint;
use crate::engine::{Engine, FileEntry, Manifest, FORMAT_NAME, FORMAT_VERSION, TOKENIZER, WEIGHTS};
use crate::error::{Error, Result};
use crate::policy::{Overrides, Policy};
use crate::progress::Progress;
use crate::random_weights::RandomWeights;
use crate::spec::{Arch, ModelSpec};
use crate::tensors::{self, DType, TensorPlan};
use crate::tokenizer_info::TokenizerInfo;

pub struct BuildOptions {
    pub checkpoint: PathBuf,
    pub output: PathBuf,
    pub dtype: DType,
    /// Replace an existing output directory.
    pub force: bool,
    /// The engine's default policy as far as the build fixes it (`--tsp-layer`, `--retain-rate`,
    /// `--min-prompt-len`, …), applied to the preset's or FastKV's defaults; calibration chooses
    /// only what is not fixed, and a fixed ℓ* skips it.
    pub policy: Overrides,
    pub calibrate: Calibrate,
}

/// Whether a build chooses its budget and ℓ* by [`crate::calibrate`].
#[derive(Clone, Debug)]
pub enum Calibrate {
    /// Keep the preset's policy, else FastKV's defaults (ℓ* = N/2 − 1).
    Never,
    /// Calibrate unless a preset matches or ℓ* is fixed, and the probes' essays exist.
    Auto(Probes),
    /// Calibrate even over a preset (not over a fixed ℓ*).
    Always(Probes),
}

/// Presets for known models (`engines/*.json`), compiled in.
const PRESETS: [&str; 6] = [
    include_str!("../engines/llama-3.1-8b.json"),
    include_str!("../engines/ministral-8b.json"),
    include_str!("../engines/mistral-nemo-12b.json"),
    include_str!("../engines/qwen2.5-7b.json"),
    include_str!("../engines/qwen3-8b.json"),
    include_str!("../engines/smollm2-135m.json"),
];

#[derive(Deserialize)]
struct Preset {
    /// What `--preset` calls it (the file's name).
    id: String,
    name: String,
    /// The model's HF config.json values, for engines of its shape with random weights.
    config: serde_json::Value,
    /// The checkpoints it gives its policy to; `None`: a shape for random weights only.
    #[serde(rename = "match")]
    matches: Option<PresetMatch>,
    policy: Policy,
}

#[derive(Deserialize)]
struct PresetMatch {
    arch: Arch,
    num_layers: usize,
    hidden_size: usize,
}

/// The bundled presets, parsed.
fn presets() -> impl Iterator<Item = Preset> {
    PRESETS.iter().map(|p| serde_json::from_str(p).expect("bundled presets are valid"))
}

/// The default FastKV policy of a model: its preset if one matches, else the ℓ* = N/2 − 1 rule.
pub fn default_policy(spec: &ModelSpec) -> (Policy, Option<String>) {
    presets()
        .find(|p| {
            p.matches.as_ref().is_some_and(|m| {
                m.arch == spec.arch && m.num_layers == spec.num_layers && m.hidden_size == spec.hidden_size
            })
        })
        .map_or_else(|| (Policy::fastkv_default(spec), None), |p| (p.policy, Some(p.name)))
}

pub fn build(opts: &BuildOptions, progress: &dyn Progress) -> Result<Manifest> {
    let ckpt = Checkpoint::open(&opts.checkpoint)?;
    if opts.policy.head_scores.is_some() {
        return Err(Error::invalid(
            "head_scores",
            "an engine does not store HeadKV's scores: pass --head-scores when running it",
        ));
    }
    let (base, preset) = default_policy(&ckpt.spec);
    let fastkv = opts.policy.apply(base, &ckpt.spec)?;
    // A preset stays the source while its ℓ* and budget stand (floors or a window change nothing).
    let preset = preset.filter(|_| (fastkv.tsp_layer, fastkv.budget) == (base.tsp_layer, base.budget));
    let fixed_layer = opts.policy.tsp_layer.is_some();
    let probes = match &opts.calibrate {
        Calibrate::Always(p) if !fixed_layer => Some(p),
        Calibrate::Auto(p) if !fixed_layer && preset.is_none() && p.haystack.exists() => Some(p),
        _ => None,
    };
    let grid = Grid::unless_fixed(&opts.policy, &fastkv);
    atomically(&opts.output, opts.force, |tmp| {
        let mut manifest = write_engine(&ckpt, opts, (fastkv, preset), tmp, progress)?;
        if let Some(probes) = probes {
            let calibration = calibrate::calibrate(&Engine::open(tmp)?, probes, &grid, progress)?;
            manifest.set_calibration(calibration);
            manifest.write(tmp)?;
        }
        Ok(manifest)
    })
}

/// An engine of preset `name`'s exact shape (`engines/*.json`) whose weights are generated from
/// `seed` when it is opened ([`RandomWeights`]): no weight file, a byte-level tokenizer; its default policy is
/// the preset's with `policy`'s changes.
pub fn build_random(
    name: &str,
    seed: u64,
    dtype: DType,
    policy: &Overrides,
    output: &Path,
    force: bool,
) -> Result<Manifest> {
    let presets: Vec<Preset> = presets().collect();
    let names = || presets.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(", ");
    let preset = presets
        .iter()
        .find(|p| p.id == name)
        .ok_or_else(|| Error::invalid("preset", format!("`{name}` is not a preset (presets: {})", names())))?;
    let origin = PathBuf::from(format!("engines/{name}.json"));
    let spec = ModelSpec::from_hf_value(&preset.config, &origin)?;
    let fastkv = policy.apply(preset.policy, &spec)?;
    atomically(output, force, |dir| {
        let tokenizer = byte_level_tokenizer()?;
        let tok_dst = dir.join(TOKENIZER);
        std::fs::write(&tok_dst, &tokenizer).map_err(|e| Error::io(&tok_dst, e))?;
        let entry = FileEntry { bytes: tokenizer.len() as u64, sha256: tensors::sha256_file(&tok_dst)? };
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            format_version: format!("{}.{}", FORMAT_VERSION.0, FORMAT_VERSION.1),
            model: spec.clone(),
            dtype,
            tokenizer: TokenizerInfo::default(),
            fastkv,
            preset: Some(preset.name.clone()),
            files: BTreeMap::from([(TOKENIZER.to_string(), entry)]),
            source: format!("random weights of {} (seed {seed})", preset.name),
            random_weights: Some(RandomWeights { seed }),
            calibration: None,
            tensorrt: None,
        };
        manifest.write(dir)?;
        Ok(manifest)
    })
}

/// A byte-level BPE tokenizer of the 256 byte tokens (ids 0..256): any text encodes, and random
/// weights need no real vocabulary.
fn byte_level_tokenizer() -> Result<String> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    let bpe =
        BPE::builder().vocab_and_merges(vocab, Vec::new()).build().map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default()));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Runs `write` into a temporary folder beside `output` and renames it to `output` when it
/// succeeds; on failure — an error or a panic — nothing is left behind.
fn atomically(output: &Path, force: bool, write: impl FnOnce(&Path) -> Result<Manifest>) -> Result<Manifest> {
    if output.exists() && !force {
        return Err(Error::bad_file(output, "already exists; pass --force to replace it"));
    }
    let name = output.file_name().ok_or_else(|| Error::bad_file(output, "not a directory name"))?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = PartialDir(parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir(&tmp.0).map_err(|e| Error::io(&tmp.0, e))?;
    let manifest = write(&tmp.0)?;
    if output.exists() {
        std::fs::remove_dir_all(output).map_err(|e| Error::io(output, e))?;
    }
    std::fs::rename(&tmp.0, output).map_err(|e| Error::io(output, e))?;
    Ok(manifest)
}

/// A build's temporary output folder, removed when dropped: on every error return and while a
/// panic unwinds. After the rename into place there is nothing left to remove.
pub(crate) struct PartialDir(pub(crate) PathBuf);

impl Drop for PartialDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the engine's files into `dir`, with `defaults` (FastKV policy, preset name) in its manifest.
fn write_engine(
    ckpt: &Checkpoint,
    opts: &BuildOptions,
    (fastkv, preset): (Policy, Option<String>),
    dir: &Path,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let plan: Vec<TensorPlan> = ckpt
        .layout
        .iter()
        .map(|t| TensorPlan { name: t.name.clone(), dtype: opts.dtype, shape: t.shape.clone() })
        .collect();
    let total: u64 = plan.iter().map(|t| (t.shape.iter().product::<usize>() * t.dtype.size()) as u64).sum();
    progress.begin("converting weights", total, true);
    let meta = HashMap::from([("format".to_string(), "fastkv".to_string())]);
    let (bytes, sha256) = tensors::write_safetensors(&dir.join(WEIGHTS), &plan, &meta, |i, buf| {
        let t = &ckpt.layout[i];
        for src in &t.sources {
            ckpt.weights.write_as(&src.name, opts.dtype, buf)?;
        }
        progress.advance(buf.len() as u64, &t.name);
        Ok(())
    })?;
    progress.end();
    let mut files = BTreeMap::from([(WEIGHTS.to_string(), FileEntry { bytes, sha256 })]);
    let tok_dst = dir.join(TOKENIZER);
    std::fs::write(&tok_dst, &ckpt.tokenizer_json).map_err(|e| Error::io(&tok_dst, e))?;
    let tok_bytes = ckpt.tokenizer_json.len() as u64;
    files.insert(TOKENIZER.into(), FileEntry { bytes: tok_bytes, sha256: tensors::sha256_file(&tok_dst)? });
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: format!("{}.{}", FORMAT_VERSION.0, FORMAT_VERSION.1),
        model: ckpt.spec.clone(),
        dtype: opts.dtype,
        tokenizer: ckpt.tokenizer.clone(),
        fastkv,
        preset,
        files,
        source: ckpt.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        random_weights: None,
        calibration: None,
        tensorrt: None,
    };
    manifest.write(dir)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_that_panics_leaves_no_partial_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let output = tmp.path().join("engine");
        let build = std::panic::catch_unwind(|| atomically(&output, false, |_| panic!("a bug in a writer")));
        assert!(build.is_err());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "the partial folder was left behind");
    }
}
