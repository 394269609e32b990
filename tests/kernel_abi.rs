//! The kernel ABI is declared once, in plugin/fastkv.h: nvcc checks every definition in plugin/*.cu
//! against it (they include it) and so does the TensorRT plugin build; this test checks the Rust
//! declarations (src/cuda/ffi.rs) against it, launcher by launcher and argument by argument. It reads
//! both files as text, so it runs on every build, with or without the `cuda` feature.

use std::collections::BTreeMap;

/// Launcher name → (argument types, return type), in Rust's spelling.
type Signatures = BTreeMap<String, (Vec<String>, String)>;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A C type of the header as Rust's FFI spells it.
fn rust_type(c: &str) -> String {
    let c = c.split_whitespace().collect::<Vec<_>>().join(" ");
    let (base, pointer) = match c.strip_suffix('*') {
        Some(b) => (b.trim().to_string(), true),
        None => (c.clone(), false),
    };
    let (constant, base) = match base.strip_prefix("const ") {
        Some(b) => (true, b.to_string()),
        None => (false, base),
    };
    let scalar = match base.as_str() {
        "int" => "c_int",
        "int64_t" => "i64",
        "uint32_t" => "u32",
        "float" => "f32",
        "void" => "c_void",
        "cudaStream_t" => "Stream",
        "FastkvCacheRef" => "CacheRef",
        other => panic!("plugin/fastkv.h: type `{other}` has no Rust mapping in this test"),
    };
    match (pointer, constant) {
        (false, _) => scalar.into(),
        (true, true) => format!("*const {scalar}"),
        (true, false) => format!("*mut {scalar}"),
    }
}

/// Drops an argument's name: the type is everything before the last word.
fn c_argument_type(arg: &str) -> &str {
    let arg = arg.trim();
    let split = arg.rfind([' ', '*']).expect("a named argument");
    arg[..=split].trim()
}

fn header() -> Signatures {
    let text = std::fs::read_to_string(root().join("plugin/fastkv.h")).unwrap();
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//") && !l.starts_with('#')).collect();
    let mut out = Signatures::new();
    for decl in code.split(';') {
        let Some(open) = decl.find("fastkv_") else { continue };
        let (ret, rest) = decl.split_at(open);
        let ret = ret.trim().rsplit(['{', '}']).next().unwrap().trim();
        let name = rest[..rest.find('(').unwrap()].trim().to_string();
        let args = &rest[rest.find('(').unwrap() + 1..rest.rfind(')').unwrap()];
        let args = match args.trim() {
            "void" | "" => vec![],
            a => a.split(',').map(|a| rust_type(c_argument_type(a))).collect(),
        };
        out.insert(name, (args, rust_type(ret)));
    }
    out
}

fn rust() -> Signatures {
    let text = std::fs::read_to_string(root().join("src/cuda/ffi.rs")).unwrap();
    let block = &text[text.find("extern \"C\" {").unwrap()..];
    let mut out = Signatures::new();
    for decl in block.split(';') {
        let Some(at) = decl.find("pub fn fastkv_") else { continue };
        let decl = decl[at + "pub fn ".len()..].split_whitespace().collect::<Vec<_>>().join(" ");
        let name = decl[..decl.find('(').unwrap()].to_string();
        let close = decl.rfind(')').unwrap();
        let args = decl[decl.find('(').unwrap() + 1..close]
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .map(|a| a.split_once(':').expect("name: type").1.trim().to_string())
            .collect();
        let ret = decl[close + 1..].trim().trim_start_matches("->").trim().to_string();
        out.insert(name, (args, ret));
    }
    out
}

#[test]
fn rust_declarations_match_the_kernel_abi_header() {
    let (c, r) = (header(), rust());
    assert!(c.len() >= 20, "parsed only {} launchers from plugin/fastkv.h", c.len());
    let only_c: Vec<_> = c.keys().filter(|k| !r.contains_key(*k)).collect();
    let only_r: Vec<_> = r.keys().filter(|k| !c.contains_key(*k)).collect();
    assert!(only_c.is_empty() && only_r.is_empty(), "only in the header: {only_c:?}; only in ffi.rs: {only_r:?}");
    for (name, decl) in &c {
        assert_eq!(&r[name], decl, "{name}: ffi.rs (left) differs from plugin/fastkv.h (right)");
    }
}

#[test]
fn every_kernel_file_includes_the_abi_header() {
    for entry in std::fs::read_dir(root().join("plugin")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") && path.file_name().unwrap() != "fastkv.cu" {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains("#include \"common.cuh\""), "{} must include common.cuh (fastkv.h)", path.display());
        }
    }
    let common = std::fs::read_to_string(root().join("plugin/common.cuh")).unwrap();
    assert!(common.contains("#include \"fastkv.h\""));
}
