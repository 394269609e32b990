//! Shared by the integration tests: fixture paths and engines built from them into temp dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fastkv::builder::{build, BuildOptions, Calibrate};
use fastkv::tensors::DType;
use fastkv::Overrides;
use serde::Deserialize;

pub const FIXTURES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// The repository: `FASTKV_ROOT` when set (test executables staged for another machine, e.g. by
/// scripts/gpu-check.sh), else the folder holding the crate the tests were built from (the root or cli/).
pub fn root() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repository = built.ancestors().find(|d| d.join("tests/fixtures").is_dir()).unwrap_or(built);
    std::env::var_os("FASTKV_ROOT").map_or_else(|| repository.to_path_buf(), PathBuf::from)
}

/// `path`, which a test needs and `how` installs. In a plain `cargo test` (the fast path) a missing
/// one skips the test — `None`, and a line on the terminal naming it. In the full run
/// (`FASTKV_FULL_TESTS=1`, set by scripts/test.sh, which installs everything) it fails the test.
pub fn resource(path: PathBuf, how: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("FASTKV_FULL_TESTS").is_some_and(|v| v == "1") {
        panic!("{} is missing: run {how} first", path.display());
    }
    skipped(&format!("{} is missing (run {how})", path.display()));
    None
}

/// Says on the terminal that the running test skips its checks: libtest captures the print macros,
/// not writes to stderr itself.
pub fn skipped(why: &str) {
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
}

/// The essays `scripts/models.sh` installs, if they are there ([`resource`]).
pub fn essays() -> Option<PathBuf> {
    resource(root().join(fastkv::eval::haystack::ESSAYS), "scripts/models.sh")
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The paper's budgets exactly, without fastkv's [`fastkv::Floor`]: what the reference
/// implementations compute, and what the test engines default to.
pub fn paper() -> Overrides {
    Overrides { min_prompt_len: Some(0), min_kv_budget: Some(0), ..Overrides::default() }
}

/// Builds `checkpoint` into `<tmp>/engine` with the [`paper`]'s budgets and returns the temp dir
/// (kept alive by the caller).
pub fn build_engine(checkpoint: &Path, dtype: DType) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("engine");
    build(
        &BuildOptions {
            checkpoint: checkpoint.into(),
            output: output.clone(),
            dtype,
            force: false,
            policy: paper(),
            calibrate: Calibrate::Never,
        },
        &fastkv::progress::Silent,
    )
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
