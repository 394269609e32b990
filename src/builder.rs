//! `fastkv-build`: checkpoint → engine directory. Everything is validated before anything is
//! written; the engine is written into a temporary sibling folder and renamed into place at the end,
//! so a failed or interrupted build never leaves half an engine.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::engine::{FileEntry, Manifest, FORMAT_NAME, FORMAT_VERSION, MANIFEST, TOKENIZER, WEIGHTS};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::spec::{Arch, ModelSpec};
use crate::tensors::{self, DType, TensorPlan};

pub struct BuildOptions {
    pub checkpoint: PathBuf,
    pub output: PathBuf,
    pub dtype: DType,
    /// Replace an existing output directory.
    pub force: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// FastKV's default TSP layer ℓ* for this engine; `None`: the preset's, else N/2 − 1.
    pub tsp_layer: Option<usize>,
}

/// Presets for known models (`engines/*.json`), compiled in.
const PRESETS: [&str; 5] = [
    include_str!("../engines/llama-3.1-8b.json"),
    include_str!("../engines/ministral-8b.json"),
    include_str!("../engines/mistral-nemo-12b.json"),
    include_str!("../engines/qwen2.5-7b.json"),
    include_str!("../engines/qwen3-8b.json"),
];

#[derive(Deserialize)]
struct Preset {
    name: String,
    #[serde(rename = "match")]
    matches: PresetMatch,
    policy: Policy,
}

#[derive(Deserialize)]
struct PresetMatch {
    arch: Arch,
    num_layers: usize,
    hidden_size: usize,
}

/// The default FastKV policy of a model: its preset if one matches, else the ℓ* = N/2 − 1 rule.
pub fn default_policy(spec: &ModelSpec) -> (Policy, Option<String>) {
    PRESETS
        .iter()
        .map(|p| serde_json::from_str::<Preset>(p).expect("bundled presets are valid"))
        .find(|p| {
            p.matches.arch == spec.arch
                && p.matches.num_layers == spec.num_layers
                && p.matches.hidden_size == spec.hidden_size
        })
        .map_or_else(|| (Policy::fastkv_default(spec), None), |p| (p.policy, Some(p.name)))
}

pub fn build(opts: &BuildOptions) -> Result<Manifest> {
    let ckpt = Checkpoint::open(&opts.checkpoint)?;
    let (mut fastkv, mut preset) = default_policy(&ckpt.spec);
    if let Some(layer) = opts.tsp_layer {
        fastkv.tsp_layer = layer;
        preset = None;
        fastkv.validate(&ckpt.spec)?;
    }
    if opts.output.exists() && !opts.force {
        return Err(Error::bad_file(&opts.output, "already exists; pass --force to replace it"));
    }
    let name = opts.output.file_name().ok_or_else(|| Error::bad_file(&opts.output, "not a directory name"))?;
    let parent = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write_engine(&ckpt, opts, (fastkv, preset), &tmp).and_then(|manifest| {
        if opts.output.exists() {
            std::fs::remove_dir_all(&opts.output).map_err(|e| Error::io(&opts.output, e))?;
        }
        std::fs::rename(&tmp, &opts.output).map_err(|e| Error::io(&opts.output, e))?;
        Ok(manifest)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes the engine's files into `dir`, with `defaults` (FastKV policy, preset name) in its manifest.
fn write_engine(
    ckpt: &Checkpoint,
    opts: &BuildOptions,
    (fastkv, preset): (Policy, Option<String>),
    dir: &Path,
) -> Result<Manifest> {
    let plan: Vec<TensorPlan> = ckpt
        .layout
        .iter()
        .map(|t| TensorPlan { name: t.name.clone(), dtype: opts.dtype, shape: t.shape.clone() })
        .collect();
    let total: u64 = plan.iter().map(|t| (t.shape.iter().product::<usize>() * t.dtype.size()) as u64).sum();
    let bar = if opts.progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("converting weights {bar:40} {bytes}/{total_bytes} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let meta = HashMap::from([("format".to_string(), "fastkv".to_string())]);
    let (bytes, sha256) = tensors::write_safetensors(&dir.join(WEIGHTS), &plan, &meta, |i, buf| {
        let t = &ckpt.layout[i];
        bar.set_message(t.name.clone());
        for src in &t.sources {
            ckpt.weights.write_as(src, opts.dtype, buf)?;
        }
        bar.inc(buf.len() as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
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
    };
    let path = dir.join(MANIFEST);
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&path, json + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(manifest)
}
