//! With the `cuda` feature, compiles the kernels of plugin/ with nvcc (one translation unit,
//! plugin/fastkv.cu) into a static library of their `extern "C"` launchers (linked with the static
//! CUDA runtime) and keeps the device code as `$OUT_DIR/fastkv_kernels.fatbin` — SASS for sm_80 and
//! sm_90 plus compute_90 PTX — which `fastkv::cuda` embeds. Without the feature it does nothing.
//! nvcc comes from `$CUDA_HOME/bin` or `PATH` (scripts/install-cuda-toolchain.sh installs one).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=plugin");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "the `cuda` feature needs nvcc: set CUDA_HOME or put nvcc on PATH \
             (export CUDA_HOME=$(scripts/install-cuda-toolchain.sh)), or build without `--features cuda`"
        )
    });
    let home = nvcc.parent().and_then(Path::parent).expect("nvcc lives in <CUDA_HOME>/bin").to_path_buf();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let keep = out.join("nvcc");
    std::fs::create_dir_all(&keep).expect("create $OUT_DIR/nvcc");
    let object = out.join("fastkv_kernels.o");
    run(Command::new(&nvcc)
        .args(["-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--keep", "--keep-dir"])
        .arg(&keep)
        .args(["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"])
        .arg("plugin/fastkv.cu")
        .arg("-o")
        .arg(&object));
    // --keep leaves the fatbin nvcc embedded in the object: the same device code, for the driver API.
    std::fs::copy(keep.join("fastkv.fatbin"), out.join("fastkv_kernels.fatbin")).expect("nvcc kept fastkv.fatbin");
    let lib = out.join("libfastkv_kernels.a");
    let _ = std::fs::remove_file(&lib);
    run(Command::new("ar").arg("crs").arg(&lib).arg(&object));

    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=fastkv_kernels");
    for dir in ["lib", "lib64"] {
        if home.join(dir).join("libcudart_static.a").exists() {
            println!("cargo:rustc-link-search=native={}", home.join(dir).display());
        }
    }
    for lib in ["static=cudart_static", "stdc++", "dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib={lib}");
    }
}

/// `$CUDA_HOME/bin/nvcc`, else the first `nvcc` on PATH.
fn find_nvcc() -> Option<PathBuf> {
    let home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin"));
    let path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    home.into_iter().chain(path).map(|dir| dir.join("nvcc")).find(|p| p.is_file())
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}
