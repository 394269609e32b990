//! `fastkv-build --target tensorrt`: an engine directory's network built into TensorRT plans. TensorRT's libraries
//! are found first (no library, one error, nothing done); then the engine is exported as ONNX into a temporary
//! folder, its prefill graph and in-place decode graph are built with the profiles [`super::plan::profile`]
//! plans, and the plans land in `ENGINE/tensorrt/` with their record in engine.json. A failure leaves the engine
//! as it was.

use std::path::{Path, PathBuf};

use super::bridge::{device_error, ffi, utf8};
use super::library::{self, Libraries};
use super::plan::{self, InputProfile, PlanOptions, PlanRecord, TensorRtRecord, PLAN_DIR};
use crate::builder::PartialDir;
use crate::cuda::gpu::{driver, Gpu};
use crate::engine::{FileEntry, Manifest};
use crate::error::{Error, Result};
use crate::onnx::export::{self, Budgets, CACHED_DECODE};
use crate::onnx::Flavour;
use crate::progress::Progress;

/// The plugin library the plans' FastKV nodes resolve to: beside the running program (where `cargo build` and an
/// install put it), else where this build wrote it.
pub fn plugin_library() -> PathBuf {
    const NAME: &str = "libfastkv_trt_plugins.so";
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(NAME)));
    beside.filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from(env!("FASTKV_TRT_PLUGIN_LIB")))
}

/// Whether plans can be built here: TensorRT's libraries are found (checked before any long work).
pub fn available() -> Result<()> {
    library::locate().map(drop)
}

/// Builds the plans of the engine in `engine_dir` and records them in its engine.json.
pub fn build_plans(engine_dir: &Path, opts: &PlanOptions, progress: &dyn Progress) -> Result<TensorRtRecord> {
    let libs = library::locate()?;
    let mut manifest = Manifest::read(engine_dir)?;
    // What the export cannot express, TensorRT cannot build: said of --target, the flag the user gave.
    let budgets = Budgets::new(&manifest.fastkv, &manifest.model).map_err(|e| match e {
        Error::InvalidArgument { msg, .. } => Error::invalid("target", msg),
        other => other,
    })?;
    let gpu = Gpu::new(opts.device)?; // its primary context is current: TensorRT builds on it
    let (major, minor) = gpu.ctx.compute_capability().map_err(driver("cuDeviceGetAttribute"))?;
    let version = plan::version_string(ffi::library_version(utf8(&libs.nvinfer)?).map_err(build_error)?);

    let tmp = PartialDir(engine_dir.join(format!(".{PLAN_DIR}.partial-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    let (onnx_dir, plan_dir) = (tmp.0.join("onnx"), tmp.0.join(PLAN_DIR));
    std::fs::create_dir_all(&plan_dir).map_err(|e| Error::io(&plan_dir, e))?;
    export::export(engine_dir, &onnx_dir)?;
    let graphs = ["prefill", CACHED_DECODE];
    progress.begin("building TensorRT plans", graphs.len() as u64, false);
    let mut plans = Vec::new();
    for graph in graphs {
        progress.advance(0, graph);
        let onnx = onnx_dir.join(Flavour::Plugin.file_name(graph));
        let profile = plan::profile(&onnx, &budgets, &manifest.fastkv, opts.limits)?;
        let file = format!("{PLAN_DIR}/{graph}.plan");
        build_one(&libs, &onnx, &profile, &tmp.0.join(&file))?;
        plans.push(PlanRecord { graph: graph.into(), file, profile });
        progress.advance(1, graph);
    }
    progress.end();

    let dest = engine_dir.join(PLAN_DIR);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(&plan_dir, &dest).map_err(|e| Error::io(&dest, e))?;
    manifest.files.retain(|name, _| !name.starts_with(&format!("{PLAN_DIR}/")));
    for p in &plans {
        let path = engine_dir.join(&p.file);
        let bytes = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        manifest.files.insert(p.file.clone(), FileEntry { bytes, sha256: crate::tensors::sha256_file(&path)? });
    }
    let record = TensorRtRecord { version, compute_capability: format!("{major}.{minor}"), limits: opts.limits, plans };
    manifest.tensorrt = Some(record.clone());
    manifest.write(engine_dir)?;
    Ok(record)
}

fn build_one(libs: &Libraries, onnx: &Path, profile: &[InputProfile], out: &Path) -> Result<()> {
    let request = ffi::PlanRequest {
        nvinfer: utf8(&libs.nvinfer)?.into(),
        onnx_parser: utf8(&libs.onnx_parser)?.into(),
        plugins: utf8(&plugin_library())?.into(),
        onnx: utf8(onnx)?.into(),
        profile: profile
            .iter()
            .map(|p| ffi::ProfileInput {
                name: p.name.clone(),
                min: p.min.clone(),
                opt: p.opt.clone(),
                max: p.max.clone(),
            })
            .collect(),
        output: utf8(out)?.into(),
    };
    ffi::build_plan(&request).map_err(build_error)
}

fn build_error(e: impl std::fmt::Display) -> Error {
    device_error("plan build", e)
}
