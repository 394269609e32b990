//! TensorRT plans in an engine directory, without TensorRT: the optimisation profile each exported graph is built
//! with (its inputs read from the graph, their ranges from the policy and the limits), and engine.json's record
//! of what was built, for which TensorRT and which GPU — checked before a plan is used, since a plan runs only on
//! the TensorRT version and GPU architecture that built it.

use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::onnx::export::Budgets;
use crate::onnx::proto::{DimValue, ModelProto};
use crate::policy::Policy;

/// Folder of the plans inside an engine directory.
pub const PLAN_DIR: &str = "tensorrt";

/// The longest prompt and the most new tokens the plans accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_input_len: usize,
    pub max_output_len: usize,
}

/// What `fastkv-build --target tensorrt` builds the plans for.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub limits: Limits,
    /// The GPU that builds (TensorRT tunes its kernels on it; the plans run on GPUs of its compute capability).
    pub device: usize,
}

/// One network input's extents at the profile's min, opt and max.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputProfile {
    pub name: String,
    pub min: Vec<i64>,
    pub opt: Vec<i64>,
    pub max: Vec<i64>,
}

/// One plan file and the profile it was built with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// `prefill` or `decode_cached`.
    pub graph: String,
    /// Relative to the engine directory (also listed, with its checksum, in engine.json's `files`).
    pub file: String,
    pub profile: Vec<InputProfile>,
}

/// engine.json's `tensorrt`: what `fastkv-build --target tensorrt` built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRtRecord {
    /// `major.minor.patch` of the libnvinfer that built the plans.
    pub version: String,
    /// The GPU's compute capability, `major.minor`.
    pub compute_capability: String,
    pub limits: Limits,
    pub plans: Vec<PlanRecord>,
}

impl TensorRtRecord {
    /// Refuses plans built by another TensorRT version or for another GPU architecture (TensorRT would reject them
    /// at deserialisation with a less helpful message, or not at all until a kernel fails).
    pub fn check(&self, version: &str, compute_capability: &str) -> Result<()> {
        let rebuild = "rebuild them here with `fastkv-build --engine ENGINE --target tensorrt`";
        if self.version != version {
            return Err(Error::invalid(
                "tensorrt",
                format!(
                    "the engine's plans were built with TensorRT {}, this machine has {version}: {rebuild}",
                    self.version
                ),
            ));
        }
        if self.compute_capability != compute_capability {
            return Err(Error::invalid(
                "tensorrt",
                format!(
                    "the engine's plans were built for compute capability {}, this GPU is {compute_capability}: {rebuild}",
                    self.compute_capability
                ),
            ));
        }
        Ok(())
    }
}

/// The element type of a plan's input or output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Element {
    F32,
    F16,
    I32,
    I64,
}

impl Element {
    /// ONNX's `TensorProto.DataType` code.
    pub fn onnx(self) -> i32 {
        match self {
            Element::F32 => 1,
            Element::F16 => 10,
            Element::I32 => 6,
            Element::I64 => 7,
        }
    }

    /// TensorRT's `nvinfer1::DataType` code.
    pub fn tensorrt(self) -> i32 {
        match self {
            Element::F32 => 0,
            Element::F16 => 1,
            Element::I32 => 3,
            Element::I64 => 8,
        }
    }
}

/// One input or output of a plan as the runner binds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Binding {
    pub name: String,
    pub input: bool,
    pub element: Element,
}

/// Every input and output the runner binds in the plan of `graph` (`prefill` or `decode_cached`) of a
/// `num_layers`-layer model: the exported graph's own, which tests/onnx.rs checks.
pub fn bindings(graph: &str, num_layers: usize) -> Vec<Binding> {
    let b = |name: String, input, element| Binding { name, input, element };
    let mut out = Vec::new();
    if graph == "prefill" {
        out.push(b("input_ids".into(), true, Element::I64));
        for l in 0..num_layers {
            out.push(b(format!("k_{l}"), false, Element::F32));
            out.push(b(format!("v_{l}"), false, Element::F32));
            out.push(b(format!("pos_{l}"), false, Element::I64));
        }
        out.push(b("tsp_positions".into(), false, Element::I64));
    } else {
        out.push(b("input_id".into(), true, Element::I64));
        out.push(b("position".into(), true, Element::I64));
        for l in 0..num_layers {
            out.push(b(format!("k_cache_{l}"), true, Element::F16));
            out.push(b(format!("v_cache_{l}"), true, Element::F16));
            out.push(b(format!("cache_pos_{l}"), true, Element::I32));
            out.push(b(format!("cache_len_{l}"), true, Element::I32));
        }
    }
    out.push(b("logits".into(), false, Element::F32));
    out
}

/// `getInferLibVersion`'s code (major·10000 + minor·100 + patch) as `major.minor.patch`.
pub fn version_string(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
}

/// The optimisation profile of the exported graph at `graph`: every input's extents, fixed ones as declared, the
/// prompt length `L` over `[the export's minimum, max_input_len]`, each layer's cache length `N_l` over what
/// the policy keeps of the shortest prompt to what it keeps of the longest plus `max_output_len − 1` appended
/// entries, and each layer's cache capacity `C_l` (decode_cached.onnx) one more than that. The optimum is the
/// maximum: long prompts are where the time goes.
pub fn profile(graph: &Path, budgets: &Budgets, policy: &Policy, limits: Limits) -> Result<Vec<InputProfile>> {
    let (min_len, max_len) = (budgets.min_prompt_len, limits.max_input_len);
    if !(min_len..=budgets.max_prompt_len).contains(&max_len) {
        return Err(Error::invalid(
            "max_input_len",
            format!(
                "{max_len} is outside the prompt lengths the exported graphs support ({min_len}..={})",
                budgets.max_prompt_len
            ),
        ));
    }
    if limits.max_output_len == 0 {
        return Err(Error::invalid("max_output_len", "must be at least 1"));
    }
    let bytes = std::fs::read(graph).map_err(|e| Error::io(graph, e))?;
    let model =
        ModelProto::decode(bytes.as_slice()).map_err(|e| Error::bad_file(graph, format!("not an ONNX model: {e}")))?;
    let inputs = model.graph.map(|g| g.input).unwrap_or_default();
    let range = |name: &str, dim: &str| -> Result<(usize, usize)> {
        if dim == "L" {
            return Ok((min_len, max_len));
        }
        // N_l: entries before a decode step; C_l: room for the step's own entry too.
        let (layer, room) = match (dim.strip_prefix("N_"), dim.strip_prefix("C_")) {
            (Some(l), _) => (l.parse::<usize>().ok(), 0),
            (_, Some(l)) => (l.parse::<usize>().ok(), 1),
            _ => (None, 0),
        };
        match layer {
            Some(l) => Ok((
                budgets.cache_len(policy, l, min_len) + room,
                budgets.cache_len(policy, l, max_len) + limits.max_output_len - 1 + room,
            )),
            None => Err(Error::bad_file(graph, format!("input `{name}` has a dimension `{dim}` no profile covers"))),
        }
    };
    inputs
        .iter()
        .map(|input| {
            let dims = input
                .r#type
                .as_ref()
                .and_then(|t| t.tensor_type.as_ref())
                .and_then(|t| t.shape.as_ref())
                .ok_or_else(|| Error::bad_file(graph, format!("input `{}` declares no shape", input.name)))?;
            let mut p = InputProfile { name: input.name.clone(), min: vec![], opt: vec![], max: vec![] };
            for d in &dims.dim {
                let (lo, hi) = match &d.value {
                    Some(DimValue::Value(v)) => (*v, *v),
                    Some(DimValue::Param(dim)) => {
                        let (lo, hi) = range(&input.name, dim)?;
                        (lo as i64, hi as i64)
                    }
                    None => {
                        return Err(Error::bad_file(
                            graph,
                            format!("input `{}` has a dimension of no size", input.name),
                        ))
                    }
                };
                p.min.push(lo);
                p.opt.push(hi);
                p.max.push(hi);
            }
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TensorRtRecord {
        TensorRtRecord {
            version: "10.9.0".into(),
            compute_capability: "9.0".into(),
            limits: Limits { max_input_len: 8192, max_output_len: 512 },
            plans: vec![],
        }
    }

    #[test]
    fn versions_read_as_tensorrt_writes_them() {
        assert_eq!(version_string(100900), "10.9.0");
        assert_eq!(version_string(110400), "11.4.0");
        assert_eq!(version_string(101302), "10.13.2");
    }

    #[test]
    fn plans_for_another_tensorrt_or_gpu_are_refused_with_the_way_out() {
        assert!(record().check("10.9.0", "9.0").is_ok());
        let other_version = record().check("11.4.0", "9.0").unwrap_err().to_string();
        assert!(other_version.contains("TensorRT 10.9.0") && other_version.contains("11.4.0"), "{other_version}");
        let other_gpu = record().check("10.9.0", "8.9").unwrap_err().to_string();
        assert!(other_gpu.contains("compute capability 9.0") && other_gpu.contains("8.9"), "{other_gpu}");
        assert!(other_gpu.contains("--target tensorrt"), "{other_gpu}");
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let mut r = record();
        r.plans.push(PlanRecord {
            graph: "prefill".into(),
            file: "tensorrt/prefill.plan".into(),
            profile: vec![InputProfile { name: "input_ids".into(), min: vec![64], opt: vec![8192], max: vec![8192] }],
        });
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<TensorRtRecord>(&json).unwrap(), r);
    }
}
