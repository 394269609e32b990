//! The plugin flavour of the ONNX export against the plugin library it is built with: every `fastkv` node of
//! prefill.onnx and decode.onnx, for the four HF fixtures as f32 and bf16 engines, is a registered creator of the
//! real TensorRT lean runtime (`FASTKV_TRT_LEAN_LIB`), created in the build phase from exactly the node's
//! attributes, and accepts the inputs the graph declares for it (value_info: rank, static extents, element type)
//! while reporting the outputs the graph declares. This is the contract `trtexec --onnx=prefill.onnx
//! --staticPlugins=libfastkv_trt_plugins.so` relies on; no GPU is needed (enqueue is not run).
#![cfg(feature = "tensorrt")]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::*;
use fastkv::onnx::export::{export, CACHED_DECODE, GRAPHS};
use fastkv::onnx::proto::{DimValue, ModelProto, NodeProto, ValueInfoProto};
use fastkv::onnx::{Flavour, DOMAIN, DOMAIN_VERSION};
use fastkv::tensors::DType;
use fastkv::trt::{DataType, Field, Phase, TensorDesc, TensorRt};
use prost::Message;

/// The lean runtime with our plugin library loaded; `None` (test skipped) only when no runtime is installed.
fn trt() -> Option<TensorRt> {
    let lib = match std::env::var_os("FASTKV_TRT_LEAN_LIB") {
        Some(path) => PathBuf::from(path),
        None => {
            let default =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/trt-lean/tensorrt_lean_libs/libnvinfer_lean.so.11");
            if !default.is_file() {
                eprintln!("skipped: no TensorRT runtime");
                return None;
            }
            default
        }
    };
    let mut trt = TensorRt::open(&lib).expect("open the TensorRT lean runtime");
    trt.load_plugins(Path::new(env!("FASTKV_TRT_PLUGIN_LIB"))).expect("load libfastkv_trt_plugins.so");
    Some(trt)
}

/// A declared tensor as the plugin queries take it: extents (-1 where the graph leaves them open) and type.
fn desc(v: &ValueInfoProto) -> TensorDesc {
    let t = v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).expect("a tensor type");
    let ty = match t.elem_type {
        1 => DataType::Float,
        10 => DataType::Half,
        16 => DataType::BFloat16,
        6 => DataType::Int32,
        7 => DataType::Int64,
        other => panic!("{}: ONNX element type {other} has no TensorRT type here", v.name),
    };
    let dims = t.shape.as_ref().expect("a shape").dim.iter().map(|d| match d.value {
        Some(DimValue::Value(n)) => n,
        _ => -1,
    });
    TensorDesc { dims: dims.collect(), ty }
}

/// Checks one `fastkv` node against its plugin; `what` names it in failures.
fn check_node(trt: &TensorRt, node: &NodeProto, declared: &HashMap<&str, &ValueInfoProto>, what: &str) {
    let version = DOMAIN_VERSION.to_string();
    assert!(
        trt.creators().iter().any(|c| c.name == node.op_type && c.version == version && c.plugin_namespace == DOMAIN),
        "{what}: no creator {} (namespace {DOMAIN}, version {version})",
        node.op_type
    );
    let attrs: BTreeSet<&str> = node.attribute.iter().map(|a| a.name.as_str()).collect();
    let specs = trt.field_names(&node.op_type, &version, DOMAIN).unwrap();
    let fields: BTreeSet<&str> = specs.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(attrs, fields, "{what}: attributes (left) against the plugin's fields (right)");
    let values: Vec<Field> = node
        .attribute
        .iter()
        .map(|a| Field::int(&a.name, i32::try_from(a.i).unwrap_or_else(|_| panic!("{what}: {} overflows", a.name))))
        .collect();
    let plugin = trt
        .create_plugin(&node.op_type, &version, DOMAIN, &values, Phase::Build)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let tensors = |names: &[String]| -> Vec<TensorDesc> {
        names
            .iter()
            .map(|n| desc(declared.get(n.as_str()).unwrap_or_else(|| panic!("{what}: {n} undeclared"))))
            .collect()
    };
    let (inputs, outputs) = (tensors(&node.input), tensors(&node.output));
    assert_eq!(plugin.info().unwrap().nb_outputs as usize, outputs.len(), "{what}: number of outputs");
    let types: Vec<DataType> = inputs.iter().map(|t| t.ty).collect();
    let out_types: Vec<DataType> = outputs.iter().map(|t| t.ty).collect();
    assert_eq!(
        plugin.output_types(&types).unwrap_or_else(|e| panic!("{what}: {e}")),
        out_types,
        "{what}: output types"
    );
    for pos in 0..inputs.len() + outputs.len() {
        assert!(plugin.supports(pos, &inputs, &outputs).unwrap(), "{what}: format combination refused at {pos}");
    }
    plugin.configure(&inputs, &outputs).unwrap_or_else(|e| panic!("{what}: {e}"));
    // Output shapes at one size for every open extent: ranks and the declared static extents must agree.
    let sized: Vec<Vec<i64>> =
        inputs.iter().map(|t| t.dims.iter().map(|&d| if d < 0 { 4096 } else { d }).collect()).collect();
    let shapes = plugin.output_shapes(&sized).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (got, want) in shapes.iter().zip(&outputs) {
        assert_eq!(got.len(), want.dims.len(), "{what}: output rank");
        for (g, w) in got.iter().zip(&want.dims) {
            assert!(*w < 0 || g == w, "{what}: output extents {got:?} against the declared {:?}", want.dims);
        }
    }
}

#[test]
fn every_fastkv_node_of_the_plugin_graphs_is_accepted_by_its_plugin() {
    let Some(trt) = trt() else { return };
    for name in FIXTURES {
        for dtype in [DType::F32, DType::Bf16] {
            let (_tmp, engine) = build_engine(&fixture(name), dtype);
            let out = tempfile::tempdir().unwrap();
            export(&engine, out.path()).unwrap_or_else(|e| panic!("exporting {name}: {e}"));
            for graph in GRAPHS.into_iter().chain([CACHED_DECODE]) {
                let path = out.path().join(Flavour::Plugin.file_name(graph));
                let model = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
                let g = model.graph.unwrap();
                let declared: HashMap<&str, &ValueInfoProto> =
                    g.value_info.iter().chain(&g.input).chain(&g.output).map(|v| (v.name.as_str(), v)).collect();
                let nodes: Vec<&NodeProto> = g.node.iter().filter(|n| n.domain == DOMAIN).collect();
                assert!(!nodes.is_empty(), "{name} {graph}: no fastkv nodes");
                for node in nodes {
                    check_node(&trt, node, &declared, &format!("{name} {dtype:?} {graph} {}", node.name));
                }
            }
        }
    }
}
