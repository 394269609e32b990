//! The command-line tools end to end: every method through `fastkv run`, `fastkv calibrate` writing
//! engine.json only without --dry-run, `fastkv bench` / `fastkv eval` writing JSON and charts, and
//! `fastkv-build --random-weights`; bad flags are named. (What the tools compute is the library's and
//! is tested beside it, in tests/.)

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use fastkv::engine::Manifest;
use fastkv::policy::HeadScores;
use fastkv::tensors::DType;
use fastkv::{Engine, Method};

/// Uniform head scores for `engine`'s shape, written to `dir`.
fn head_scores(engine: &Engine, dir: &std::path::Path) -> &'static HeadScores {
    let s = engine.spec();
    let map: serde_json::Map<String, serde_json::Value> = (0..s.num_layers * s.num_heads)
        .map(|i| (format!("{}-{}", i / s.num_heads, i % s.num_heads), serde_json::json!([1.0 + (i % 3) as f64])))
        .collect();
    let path = dir.join("heads.json");
    std::fs::write(&path, serde_json::to_string(&map).unwrap()).unwrap();
    HeadScores::load(&path, s).unwrap()
}

#[test]
fn cli_runs_every_method_and_names_bad_flags() {
    let (tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(&dir).unwrap();
    head_scores(&engine, tmp.path());
    let heads = tmp.path().join("heads.json");
    let fastkv = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fastkv"))
            .current_dir(root())
            .args(["run", "--engine", dir.to_str().unwrap(), "--prompt", &"The quick brown fox. ".repeat(40)])
            .args(["--max-new-tokens", "2", "--json"])
            .args(args)
            .output()
            .unwrap()
    };
    for method in Method::ALL.into_iter().filter(|&m| m != Method::Full) {
        let name = method.name();
        let out = fastkv(&["--method", name, "--retain-rate", "0.3", "--head-scores", heads.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(json["metrics"]["kv_cache_bytes"].as_u64().unwrap() > 0, "{name}");
    }
    let fails = |args: &[&str], needle: &str| {
        let out = fastkv(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    };
    fails(&["--method", "headkv"], "--head-scores");
    fails(&["--method", "headkv", "--head-scores", "/nonexistent/heads.json"], "/nonexistent/heads.json");
    fails(&["--method", "h2o", "--h2o-max-len", "10"], "--h2o-max-len");
    fails(&["--method", "gemfilter", "--filter-layer", "9"], "--filter-layer");
}

#[test]
fn calibrate_command_writes_engine_json_only_without_dry_run() {
    let Some(essays) = essays() else { return };
    let (_tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let manifest = dir.join("engine.json");
    let before = std::fs::read(&manifest).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fastkv"))
            .current_dir(root())
            .args(["calibrate", "--engine", dir.to_str().unwrap(), "--haystack", essays.to_str().unwrap()])
            .args(["--probes", "2", "--probe-tokens", "384"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let none = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .current_dir(root())
        .args(["calibrate", "--engine", dir.to_str().unwrap(), "--probes", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert!(
        !none.status.success() && stderr.trim() == "error: invalid --probes: calibration needs at least one probe",
        "{stderr}"
    );
    let dry = run(&["--dry-run"]);
    assert!(dry.contains("calibrated r = ") && dry.contains("recall") && dry.contains("SnapKV-GQA"), "{dry}");
    assert_eq!(std::fs::read(&manifest).unwrap(), before, "--dry-run leaves engine.json alone");
    let wet = run(&[]);
    assert!(wet.contains("wrote "), "{wet}");
    let engine = Engine::open(&dir).unwrap();
    let c = engine.manifest.calibration.as_ref().expect("written");
    assert_eq!(engine.default_policy().tsp_layer, c.tsp_layer);
    let verify = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .current_dir(root())
        .args(["verify", "--engine", dir.to_str().unwrap()])
        .output();
    assert!(verify.unwrap().status.success(), "a calibrated engine still verifies");
}

#[test]
fn cli_writes_json_and_charts_and_names_bad_flags() {
    let Some(essays) = essays() else { return };
    let (tmp, dir) = build_engine(&fixture("llama"), DType::F32);
    let engine = Engine::open(dir).unwrap();
    let fastkv = env!("CARGO_BIN_EXE_fastkv");
    let (json, svg) = (tmp.path().join("bench.json"), tmp.path().join("bench.svg"));
    let run = |args: &[&str]| Command::new(fastkv).current_dir(root()).args(args).output().unwrap();
    let out = run(&[
        "bench",
        "--engine",
        engine.dir.to_str().unwrap(),
        "--lengths",
        "128",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("fastkv") && chart.contains("128 tokens"));

    let heatmap = tmp.path().join("niah.svg");
    let out = run(&[
        "eval",
        "niah",
        "--engine",
        engine.dir.to_str().unwrap(),
        "--haystack",
        essays.to_str().unwrap(),
        "--lengths",
        "512",
        "--depths",
        "0,1",
        "--plot",
        heatmap.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("depth") && table.contains("fastkv") && table.contains("0.00") && table.contains("1.00"));
    assert!(std::fs::read_to_string(&heatmap).unwrap().contains("full"));

    let out = run(&["bench", "--engine", engine.dir.to_str().unwrap(), "--lengths", "64", "--plot", "chart.gif"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--plot"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["eval", "niah", "--engine", engine.dir.to_str().unwrap(), "--haystack", "/nonexistent/essays"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/essays"));
}

#[test]
fn fastkv_build_writes_a_random_weight_engine_of_a_preset() {
    let tmp = tempfile::tempdir().unwrap();
    // The 8B shape is written at once (its 16 GB of weights exist only while it is open).
    let out = tmp.path().join("llama");
    let run = Command::new(env!("CARGO_BIN_EXE_fastkv-build"))
        .current_dir(root())
        .args(["--random-weights", "--preset", "llama-3.1-8b", "--seed", "3", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let m = Manifest::read(&out).unwrap();
    assert_eq!((m.model.num_layers, m.model.hidden_size, m.model.num_kv_heads), (32, 4096, 8));
    assert_eq!(m.random_weights.map(|r| r.seed), Some(3));
    assert_eq!(m.fastkv.tsp_layer, 15, "the preset's policy");
}

/// Whether the system's library folders (searched whatever the environment says) hold TensorRT.
fn tensorrt_in_system_folders() -> bool {
    let system = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/local/lib"];
    let installed = |d: &&str| ["libnvinfer.so.10", "libnvinfer.so.11"].iter().any(|f| Path::new(d).join(f).exists());
    system.iter().any(installed)
}

/// `fastkv-build --target tensorrt` where TensorRT is not installed fails in one line that names the library and
/// the folders searched (or, in a build without the feature, the feature), before it builds anything.
#[test]
fn target_tensorrt_without_tensorrt_fails_in_one_line_before_building() {
    if tensorrt_in_system_folders() {
        return skipped("TensorRT is installed in the system's library folders");
    }
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("engine");
    let out = Command::new(env!("CARGO_BIN_EXE_fastkv-build"))
        .current_dir(root())
        // No TensorRT where it looks first, and no python3 to name Python environments.
        .env("TENSORRT_ROOT", tmp.path())
        .env("LD_LIBRARY_PATH", "")
        .env("PATH", "")
        .args(["--checkpoint", "tests/fixtures/llama", "--output", output.to_str().unwrap()])
        .args(["--no-calibrate", "--target", "tensorrt"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.trim_end().lines().count() == 1, "{stderr}");
    let searched = format!("{}, ", tmp.path().join("lib").display());
    let not_found =
        stderr.contains("libnvinfer.so.11") && stderr.contains(&searched) && stderr.contains("TENSORRT_ROOT");
    assert!(not_found || stderr.contains("--features tensorrt"), "{stderr}");
    assert!(!output.exists(), "nothing is built when TensorRT is missing");
}

/// `fastkv run --device tensorrt:0` on an engine whose plans are recorded, where TensorRT is not installed, fails in
/// one line that names the library, the folders searched and what to install (or, without the feature, the feature).
#[test]
fn running_plans_without_tensorrt_fails_in_one_line() {
    if tensorrt_in_system_folders() {
        return skipped("TensorRT is installed in the system's library folders");
    }
    let (tmp, engine) = build_engine(&fixture("llama"), DType::F32);
    let manifest = engine.join("engine.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    json["tensorrt"] = serde_json::json!({
        "version": "11.4.0", "compute_capability": "9.0",
        "limits": { "max_input_len": 4096, "max_output_len": 64 }, "plans": []
    });
    std::fs::write(&manifest, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .env("TENSORRT_ROOT", tmp.path())
        .env("LD_LIBRARY_PATH", "")
        .env("PATH", "")
        .args(["run", "--engine", engine.to_str().unwrap(), "--prompt", "hi", "--device", "tensorrt:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.trim_end().lines().count() == 1, "{stderr}");
    let not_found = stderr.contains("libnvinfer.so.11") && stderr.contains("TENSORRT_ROOT");
    assert!(not_found || stderr.contains("--features tensorrt"), "{stderr}");
}
