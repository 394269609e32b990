//! With the `cuda` feature, compiles the kernels of plugin/ with nvcc (one translation unit,
//! plugin/fastkv.cu) into a static library of their `extern "C"` launchers (linked with the static
//! CUDA runtime). The device code — SASS for sm_80 and sm_90 plus compute_90 PTX — is embedded once,
//! compressed (4.6 → 0.8 MB), in the object the runtime registers. Without the feature it does nothing.
//! nvcc comes from `$CUDA_HOME/bin` or `PATH` (scripts/install-cuda-toolchain.sh installs one).
//!
//! With the `tensorrt` feature it also builds the TensorRT plugin library `libfastkv_trt_plugins.so` (tensorrt/*.cpp
//! linked with the same kernel object and the static CUDA runtime, not with TensorRT) into `$OUT_DIR` and next to the
//! build's binaries, and the C++ half of `fastkv::trt`'s cxx bridge (tensorrt/bridge.cpp). TensorRT headers: `$TENSORRT_ROOT/include`, else the
//! TensorRT 11.4 headers in the source of the crates.io crate trtx-sys, which `cargo metadata` on
//! tensorrt/headers/Cargo.toml fetches (without building it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=plugin");
    println!("cargo:rerun-if-changed=tensorrt");
    println!("cargo:rerun-if-changed=src/trt/bridge.rs");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=TENSORRT_ROOT");
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
    // Before the slow nvcc step, so a missing TensorRT header set fails at once.
    #[cfg(feature = "tensorrt")]
    let trt_headers = tensorrt_headers();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("fastkv_kernels.o");
    run(Command::new(&nvcc)
        .args(["-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xfatbin=-compress-all"])
        .args(["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"])
        .arg("plugin/fastkv.cu")
        .arg("-o")
        .arg(&object));
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
    #[cfg(feature = "tensorrt")]
    build_tensorrt(&home, &trt_headers, &out, &object);
}

/// The plugin library and the cxx bridge (feature `tensorrt`; its build-dependencies exist only then).
#[cfg(feature = "tensorrt")]
fn build_tensorrt(cuda_home: &Path, trt_headers: &Path, out: &Path, kernels: &Path) {
    // The real CUDA headers first: trtx-sys also ships a 4-line cuda_runtime_api.h stand-in.
    let includes = [cuda_home.join("include"), trt_headers.to_path_buf()];
    let system_includes = includes.iter().flat_map(|dir| ["-isystem".into(), dir.clone().into_os_string()]);
    let cxx = std::env::var_os("CXX").unwrap_or_else(|| "c++".into());
    let dir = out.join("trt");
    std::fs::create_dir_all(&dir).expect("create $OUT_DIR/trt");
    let mut objects = Vec::new();
    for name in ["plugin", "plugins"] {
        let object = dir.join(format!("{name}.o"));
        run(Command::new(&cxx)
            .args(["-std=c++17", "-fPIC", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror", "-c"])
            .args(system_includes.clone())
            .arg(format!("tensorrt/{name}.cpp"))
            .arg("-o")
            .arg(&object));
        objects.push(object);
    }
    let lib = out.join("libfastkv_trt_plugins.so");
    // Only the plugin-library entry points are exported, so the kernels' symbols never clash with a host's.
    let exports = dir.join("exports.map");
    std::fs::write(&exports, "{ global: getCreators; setLoggerFinder; fastkv_trt_take_error; local: *; };\n")
        .expect("write exports.map");
    // -z defs: every symbol resolves here, so the library needs no TensorRT library at link or load time.
    run(Command::new(&cxx)
        .args(["-shared", "-Wl,-z,defs", "-Wl,--exclude-libs,ALL"])
        .arg(format!("-Wl,--version-script={}", exports.display()))
        .arg("-o")
        .arg(&lib)
        .args(&objects)
        .arg(kernels)
        .arg(cudart_static(cuda_home))
        .args(["-ldl", "-lrt", "-lpthread"]));
    // target/<profile>/, where users find the binaries: OUT_DIR is target/<profile>/build/<pkg>/out.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        std::fs::copy(&lib, profile_dir.join("libfastkv_trt_plugins.so")).expect("copy libfastkv_trt_plugins.so");
    }
    println!("cargo:rustc-env=FASTKV_TRT_PLUGIN_LIB={}", lib.display());

    let mut bridge = cxx_build::bridge("src/trt/bridge.rs");
    bridge
        .file("tensorrt/bridge.cpp")
        .file("tensorrt/builder.cpp")
        .file("tensorrt/runtime.cpp")
        .flag("-std=c++17")
        .flag("-Wno-deprecated-declarations");
    for dir in &includes {
        bridge.flag("-isystem").flag(dir.to_str().expect("UTF-8 include path"));
    }
    bridge.compile("fastkv_trt_bridge");
}

/// `<CUDA_HOME>/lib(64)/libcudart_static.a`.
#[cfg(feature = "tensorrt")]
fn cudart_static(home: &Path) -> PathBuf {
    ["lib", "lib64"]
        .iter()
        .map(|dir| home.join(dir).join("libcudart_static.a"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no libcudart_static.a under {}/lib or lib64", home.display()))
}

/// The folder holding NvInferRuntime.h: `$TENSORRT_ROOT/include`, else trtx-sys's TensorRT 11.4 headers.
#[cfg(feature = "tensorrt")]
fn tensorrt_headers() -> PathBuf {
    if let Some(root) = std::env::var_os("TENSORRT_ROOT") {
        let dir = PathBuf::from(root).join("include");
        assert!(
            dir.join("NvInferRuntime.h").is_file(),
            "TENSORRT_ROOT is set but {} has no NvInferRuntime.h: point it at a TensorRT 11 SDK, or unset it to use \
             the headers of the crate trtx-sys",
            dir.display()
        );
        return dir;
    }
    let manifest = "tensorrt/headers/Cargo.toml";
    println!("cargo:rerun-if-changed={manifest}");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let fail = |why: String| -> ! {
        panic!(
            "the `tensorrt` feature needs TensorRT headers: set TENSORRT_ROOT to a TensorRT 11 SDK, or let cargo \
             fetch the crate trtx-sys (`cargo metadata --manifest-path {manifest}`, needs crates.io or a filled \
             cargo cache): {why}"
        )
    };
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--manifest-path", manifest])
        .output()
        .unwrap_or_else(|e| fail(format!("cannot run cargo: {e}")));
    if !output.status.success() {
        fail(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| fail(format!("bad cargo metadata output: {e}")));
    let package = meta["packages"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "trtx-sys"));
    let manifest_path = package.and_then(|p| p["manifest_path"].as_str()).unwrap_or_else(|| fail("no trtx-sys".into()));
    let dir = Path::new(manifest_path)
        .parent()
        .expect("a manifest path has a folder")
        .join("TensorRT-Headers/TRT-Enterprise-11.4");
    if !dir.join("NvInferRuntime.h").is_file() {
        fail(format!("{} has no NvInferRuntime.h", dir.display()));
    }
    dir
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
