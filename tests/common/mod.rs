//! Shared by the integration tests: fixture paths and engines built from them into temp dirs.
#![allow(dead_code)]

#[cfg(feature = "cuda")]
pub mod cuda;

use std::path::{Path, PathBuf};

use fastkv::builder::{build, BuildOptions, Calibrate};
use fastkv::tensors::DType;
use serde::Deserialize;

pub const FIXTURES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// The repository: `FASTKV_ROOT` when set (test executables staged for another machine, e.g. by
/// scripts/gpu-check.sh), else where the tests were built.
pub fn root() -> PathBuf {
    std::env::var_os("FASTKV_ROOT").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The essays `scripts/models.sh` installs (CI runs it before the tests).
pub fn essays() -> PathBuf {
    let dir = root().join(fastkv::eval::haystack::ESSAYS);
    assert!(dir.is_dir(), "{} is missing: run scripts/models.sh first", dir.display());
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Builds `checkpoint` into `<tmp>/engine` and returns the temp dir (kept alive by the caller).
pub fn build_engine(checkpoint: &Path, dtype: DType) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("engine");
    build(&BuildOptions {
        checkpoint: checkpoint.into(),
        output: output.clone(),
        dtype,
        force: false,
        progress: false,
        tsp_layer: None,
        calibrate: Calibrate::Never,
    })
    .unwrap_or_else(|e| panic!("building {}: {e}", checkpoint.display()));
    (tmp, output)
}

#[derive(Deserialize)]
pub struct Expected {
    pub prompts: Vec<ExpectedPrompt>,
    pub chat_example: ChatExample,
}

#[derive(Deserialize)]
pub struct ExpectedPrompt {
    pub text: String,
    pub ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

#[derive(Deserialize)]
pub struct ChatExample {
    pub text: String,
    pub ids: Vec<u32>,
}

pub fn expected(name: &str) -> Expected {
    let path = fixture(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// max |a − b| / max |b|: the relative error of a whole logit vector.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Copies a fixture checkpoint into a temp dir so a test can break it.
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    (tmp, dst)
}
