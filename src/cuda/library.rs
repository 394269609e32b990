//! Finding cuBLAS. cudarc loads `libcublas` / `libcublasLt` by bare name, which finds them only on
//! the loader's path; a CUDA install usually keeps them in `$CUDA_HOME/lib64`, and a PyTorch machine
//! inside the `nvidia-cublas` wheel's folder of its Python environment. So before cudarc looks,
//! fastkv searches those places itself and loads the libraries it finds by full path: the loader
//! then resolves cudarc's bare-name lookups to them. Not found anywhere is one clear error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Names the cuBLAS 13 libraries go by, in load order (cuBLAS needs cuBLASLt).
pub const LIBRARIES: [&str; 2] = ["libcublasLt.so.13", "libcublas.so.13"];

/// Env var naming the folder that holds the libraries; searched first.
pub const DIR_VAR: &str = "FASTKV_CUBLAS_DIR";

/// Folders to search, in order: `$FASTKV_CUBLAS_DIR`, `$CUDA_HOME` / `$CUDA_PATH` (`lib64`, `lib`),
/// then the `nvidia/cu13/lib` and `nvidia/cublas/lib` folders of the given Python package folders.
pub fn search_dirs(env: impl Fn(&str) -> Option<String>, python_paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = env(DIR_VAR).into_iter().map(PathBuf::from).collect();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env(var) {
            dirs.extend(["lib64", "lib"].map(|d| Path::new(&home).join(d)));
        }
    }
    for site in python_paths {
        dirs.extend(["nvidia/cu13/lib", "nvidia/cublas/lib"].map(|d| site.join(d)));
    }
    dirs
}

/// The first folder of `dirs` that holds every library of [`LIBRARIES`].
pub fn find(dirs: &[PathBuf]) -> Option<&Path> {
    dirs.iter().map(PathBuf::as_path).find(|d| LIBRARIES.iter().all(|lib| d.join(lib).is_file()))
}

/// The package folders of `python3` (site-packages and its `sys.path`), or none without Python.
pub(crate) fn python_paths() -> Vec<PathBuf> {
    let script =
        "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))";
    Command::new("python3")
        .args(["-c", script])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// Makes cuBLAS loadable for cudarc, once per process: nothing to do when the loader already finds
/// it; otherwise the libraries of the first folder [`search_dirs`] lists that has them are loaded
/// (and kept loaded). The error names every folder searched and how to point fastkv at one.
pub fn ensure_cublas() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: only probes whether the library can be opened by name.
            if unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Ok(());
            }
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let mut dirs = search_dirs(env, &[]);
            let dir = match find(&dirs) {
                Some(d) => d.to_path_buf(),
                None => {
                    dirs = search_dirs(env, &python_paths());
                    find(&dirs).map(Path::to_path_buf).ok_or_else(|| not_found(&dirs))?
                }
            };
            for lib in LIBRARIES {
                let path = dir.join(lib);
                // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's cuBLAS.
                let handle = unsafe { libloading::Library::new(&path) }
                    .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
                std::mem::forget(handle); // stays loaded for the process, as cudarc's own handle does
            }
            Ok(())
        })
        .clone()
        .map_err(|reason| Error::NoDevice { backend: "cuda", reason })
}

fn not_found(dirs: &[PathBuf]) -> String {
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    format!(
        "cuBLAS ({}) was not found on the loader path nor in: {}; set {DIR_VAR} to the folder that holds it \
         (e.g. `pip install nvidia-cublas` puts it in <site-packages>/nvidia/cu13/lib)",
        LIBRARIES.join(", "),
        if searched.is_empty() { "(no folders)".to_string() } else { searched.join(", ") }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_is_env_then_cuda_home_then_python_wheels() {
        let env = |k: &str| match k {
            DIR_VAR => Some("/opt/cublas".to_string()),
            "CUDA_HOME" => Some("/usr/local/cuda".to_string()),
            _ => None,
        };
        let dirs = search_dirs(env, &[PathBuf::from("/site")]);
        let expect = [
            "/opt/cublas",
            "/usr/local/cuda/lib64",
            "/usr/local/cuda/lib",
            "/site/nvidia/cu13/lib",
            "/site/nvidia/cublas/lib",
        ];
        assert_eq!(dirs, expect.map(PathBuf::from));
        assert!(search_dirs(|_| None, &[]).is_empty());
    }

    #[test]
    fn the_first_folder_with_every_library_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let (partial, complete, later) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        for dir in [&partial, &complete, &later] {
            std::fs::create_dir(dir).unwrap();
        }
        std::fs::write(partial.join(LIBRARIES[1]), b"").unwrap();
        for lib in LIBRARIES {
            std::fs::write(complete.join(lib), b"").unwrap();
            std::fs::write(later.join(lib), b"").unwrap();
        }
        let dirs = [tmp.path().join("missing"), partial, complete.clone(), later];
        assert_eq!(find(&dirs), Some(complete.as_path()));
        assert_eq!(find(&dirs[..2]), None);
    }

    #[test]
    fn not_found_names_every_folder_and_the_way_out() {
        let msg = not_found(&[PathBuf::from("/a/lib64"), PathBuf::from("/b")]);
        assert!(msg.contains("/a/lib64, /b") && msg.contains(DIR_VAR) && msg.contains("libcublas.so.13"), "{msg}");
    }
}
