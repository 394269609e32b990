//! Finding TensorRT, to build plans and to run them: `libnvinfer.so.N` with `libnvonnxparser.so.N` beside it,
//! N = 11 or 10. Nothing links against them (the bridge opens them by path), so a machine without TensorRT gets one
//! error that names every folder searched and what to install, not a loader failure.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// TensorRT major versions the builder looks for, newest first.
pub const MAJORS: [u32; 2] = [11, 10];

/// Env var naming a TensorRT SDK folder (its `lib/` or `lib64/` is searched first).
pub const ROOT_VAR: &str = "TENSORRT_ROOT";

/// Folders the loader searches by default, searched last.
const SYSTEM_DIRS: [&str; 4] =
    ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/local/lib"];

/// The two libraries of one TensorRT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Libraries {
    pub major: u32,
    pub nvinfer: PathBuf,
    pub onnx_parser: PathBuf,
}

/// Folders to search, in order: `$TENSORRT_ROOT/lib` and `lib64`, each folder of `$LD_LIBRARY_PATH`, the
/// `tensorrt_libs` folder of each given Python package folder (where `pip install tensorrt` puts them), then the
/// system's library folders; each once.
pub fn search_dirs(env: impl Fn(&str) -> Option<String>, python_paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(root) = env(ROOT_VAR) {
        dirs.extend(["lib", "lib64"].map(|d| Path::new(&root).join(d)));
    }
    if let Some(paths) = env("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    dirs.extend(python_paths.iter().map(|site| site.join("tensorrt_libs")));
    dirs.extend(SYSTEM_DIRS.map(PathBuf::from));
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// The first folder of `dirs` holding both libraries of one major version (the newest of [`MAJORS`] there).
pub fn find(dirs: &[PathBuf]) -> Option<Libraries> {
    dirs.iter().find_map(|dir| {
        MAJORS.iter().find_map(|&major| {
            let (nvinfer, onnx_parser) =
                (dir.join(format!("libnvinfer.so.{major}")), dir.join(format!("libnvonnxparser.so.{major}")));
            (nvinfer.is_file() && onnx_parser.is_file()).then_some(Libraries { major, nvinfer, onnx_parser })
        })
    })
}

/// TensorRT's libraries on this machine, or the one-line error that says where fastkv looked.
pub fn locate() -> Result<Libraries> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    find(&search_dirs(env, &[])).map_or_else(
        || {
            let dirs = search_dirs(env, &crate::cuda::library::python_paths());
            find(&dirs).ok_or_else(|| not_found(&dirs))
        },
        Ok,
    )
}

fn not_found(dirs: &[PathBuf]) -> Error {
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Error::NoDevice {
        backend: "tensorrt",
        reason: format!(
            "TensorRT (libnvinfer.so.11 or .10 with libnvonnxparser.so of the same version beside it) was \
             not found in: {}; install TensorRT 10 or 11 (`pip install tensorrt`, or NVIDIA's tar file) and set \
             {ROOT_VAR} to its folder",
            searched.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_is_root_then_loader_path_then_python_then_system() {
        let env = |k: &str| match k {
            ROOT_VAR => Some("/opt/trt".to_string()),
            "LD_LIBRARY_PATH" => Some("/a::/b:/a".to_string()),
            _ => None,
        };
        let dirs = search_dirs(env, &[PathBuf::from("/site")]);
        let head = ["/opt/trt/lib", "/opt/trt/lib64", "/a", "/b", "/site/tensorrt_libs"].map(PathBuf::from);
        assert_eq!(dirs[..5], head);
        assert_eq!(dirs[5..], SYSTEM_DIRS.map(PathBuf::from));
        assert_eq!(search_dirs(|_| None, &[]), SYSTEM_DIRS.map(PathBuf::from));
    }

    #[test]
    fn both_libraries_of_one_version_in_one_folder_are_needed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |name: &str, files: &[&str]| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            files.iter().for_each(|f| std::fs::write(d.join(f), b"").unwrap());
            d
        };
        let parser_only = dir("a", &["libnvonnxparser.so.11"]);
        let mixed = dir("b", &["libnvinfer.so.11", "libnvonnxparser.so.10"]);
        let both =
            dir("c", &["libnvinfer.so.10", "libnvonnxparser.so.10", "libnvinfer.so.11", "libnvonnxparser.so.11"]);
        let ten = dir("d", &["libnvinfer.so.10", "libnvonnxparser.so.10"]);
        assert_eq!(find(&[parser_only.clone(), mixed.clone()]), None);
        let found = find(&[parser_only, mixed, both.clone(), ten.clone()]).unwrap();
        assert_eq!(found.major, 11, "the newest version of the first complete folder");
        assert_eq!(found.nvinfer, both.join("libnvinfer.so.11"));
        assert_eq!(find(std::slice::from_ref(&ten)).unwrap().onnx_parser, ten.join("libnvonnxparser.so.10"));
    }

    #[test]
    fn not_found_names_every_folder_and_what_to_install() {
        let msg = not_found(&[PathBuf::from("/x/lib"), PathBuf::from("/y")]).to_string();
        assert!(msg.contains("/x/lib, /y") && msg.contains("pip install tensorrt") && msg.contains(ROOT_VAR), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}
