//! Request tensors (Triton's LLM generate conventions) and model parameters → a fastkv request.

use fastkv::{Engine, Method, Overrides, Policy, Prompt, Request};

use crate::ffi;
use crate::server::Tensor;

/// What one request asks for.
pub struct Job {
    pub request: Request,
    /// One response per token (`stream: true`) or one with the whole text.
    pub stream: bool,
}

/// The model parameters that set the compression policy (strings in config.pbtxt): `method`,
/// `tsp_rate`, `retain_rate`, `kv_budget`, `tsp_len`, `tsp_layer`, `min_prompt_len`, `min_kv_budget`.
pub fn overrides_from_config(config: &serde_json::Value) -> Result<Overrides, String> {
    let param = |name: &str| config["parameters"][name]["string_value"].as_str().filter(|s| !s.is_empty());
    let num = |name: &str| -> Result<Option<f64>, String> {
        param(name)
            .map(|s| s.trim().parse().map_err(|_| format!("parameter {name}: {s:?} is not a number")))
            .transpose()
    };
    let int = |name: &'static str| num(name)?.map(|x| count(name, x)).transpose();
    Ok(Overrides {
        method: param("method").map(parse_method).transpose()?,
        tsp_rate: num("tsp_rate")?,
        retain_rate: num("retain_rate")?,
        kv_budget: int("kv_budget")?,
        tsp_len: int("tsp_len")?,
        tsp_layer: int("tsp_layer")?,
        min_prompt_len: int("min_prompt_len")?,
        min_kv_budget: int("min_kv_budget")?,
        ..Overrides::default()
    })
}

/// `base` with `overrides` applied by the library's one rule, the error in words for a client.
pub fn apply(overrides: &Overrides, base: Policy, engine: &Engine) -> Result<Policy, String> {
    overrides.apply(base, engine.spec()).map_err(|e| e.to_string())
}

fn parse_method(s: &str) -> Result<Method, String> {
    s.parse().map_err(|e: fastkv::Error| e.to_string())
}

fn count(name: &str, x: f64) -> Result<usize, String> {
    if x >= 0.0 && x.fract() == 0.0 {
        Ok(x as usize)
    } else {
        Err(format!("{name}: {x} is not a non-negative integer"))
    }
}

/// Builds the request from its tensors; `get(name)` returns an input, `None` when absent.
pub fn parse(
    get: impl Fn(&str) -> Result<Option<Tensor>, String>,
    engine: &Engine,
    policy: &Policy,
) -> Result<Job, String> {
    let text = match get("text_input")? {
        None => return Err("the input text_input is missing".into()),
        Some(t) => strings("text_input", &t)?.into_iter().next().ok_or("text_input has no element")?,
    };
    if text.is_empty() {
        return Err("text_input: the prompt is empty".into());
    }
    let mut request = Request::new(Prompt::Text(text));
    if let Some(n) = scalar(&get, "max_tokens", ffi::TYPE_INT32)? {
        request.max_new_tokens = count("max_tokens", n)?;
    }
    let s = &mut request.sampling;
    s.temperature = scalar(&get, "temperature", ffi::TYPE_FP32)?.map_or(s.temperature, |x| x as f32);
    s.top_p = scalar(&get, "top_p", ffi::TYPE_FP32)?.map_or(s.top_p, |x| x as f32);
    s.top_k = scalar(&get, "top_k", ffi::TYPE_INT32)?.map(|x| count("top_k", x)).transpose()?.unwrap_or(s.top_k);
    if let Some(t) = get("seed")? {
        let seed = (t.dtype == ffi::TYPE_INT64).then(|| t.data.get(..8)).flatten().ok_or("seed must be INT64")?;
        s.seed = u64::try_from(i64::from_le_bytes(seed.try_into().unwrap()))
            .map_err(|_| "seed: must not be negative".to_string())?;
    }
    s.validate().map_err(|e| e.to_string())?;
    let method = get("method")?.map(|t| strings("method", &t)).transpose()?;
    let int = |name: &'static str| -> Result<Option<usize>, String> {
        scalar(&get, name, ffi::TYPE_INT32)?.map(|x| count(name, x)).transpose()
    };
    let overrides = Overrides {
        method: method.as_ref().and_then(|m| m.first()).map(|m| parse_method(m)).transpose()?,
        tsp_rate: scalar(&get, "tsp_rate", ffi::TYPE_FP32)?,
        retain_rate: scalar(&get, "retain_rate", ffi::TYPE_FP32)?,
        kv_budget: int("kv_budget")?,
        tsp_len: int("tsp_len")?,
        tsp_layer: int("tsp_layer")?,
        min_prompt_len: int("min_prompt_len")?,
        min_kv_budget: int("min_kv_budget")?,
        ..Overrides::default()
    };
    request.policy = Some(apply(&overrides, *policy, engine)?);
    request.stop = get("stop")?.map(|t| strings("stop", &t)).transpose()?.unwrap_or_default();
    let stream = scalar(&get, "stream", ffi::TYPE_BOOL)?.is_some_and(|x| x != 0.0);
    Ok(Job { request, stream })
}

/// The elements of a BYTES tensor (each a 4-byte little-endian length and UTF-8 bytes).
fn strings(name: &str, t: &Tensor) -> Result<Vec<String>, String> {
    if t.dtype != ffi::TYPE_BYTES {
        return Err(format!("{name} must be BYTES (a string)"));
    }
    let (mut rest, mut out) = (&t.data[..], Vec::new());
    while !rest.is_empty() {
        let bad = || format!("{name}: malformed BYTES tensor");
        let len = u32::from_le_bytes(rest.get(..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
        let s = rest.get(4..4 + len).ok_or_else(bad)?;
        out.push(String::from_utf8(s.to_vec()).map_err(|_| format!("{name} is not UTF-8"))?);
        rest = &rest[4 + len..];
    }
    Ok(out)
}

/// The first element of a BOOL, INT32 or FP32 input, as f64 (which holds each exactly).
fn scalar(
    get: &impl Fn(&str) -> Result<Option<Tensor>, String>,
    name: &str,
    dtype: u32,
) -> Result<Option<f64>, String> {
    let Some(t) = get(name)? else { return Ok(None) };
    let type_name = match dtype {
        ffi::TYPE_BOOL => "BOOL",
        ffi::TYPE_INT32 => "INT32",
        _ => "FP32",
    };
    if t.dtype != dtype {
        return Err(format!("{name} must be {type_name}"));
    }
    let b = &t.data;
    let x = match dtype {
        ffi::TYPE_BOOL => b.first().map(|&v| v as f64),
        ffi::TYPE_INT32 => b.get(..4).map(|v| i32::from_le_bytes(v.try_into().unwrap()) as f64),
        _ => b.get(..4).map(|v| f32::from_le_bytes(v.try_into().unwrap()) as f64),
    };
    x.map(Some).ok_or_else(|| format!("{name} has no element"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;
    use fastkv::builder::{build, BuildOptions};
    use fastkv::eval::contenders;
    use fastkv::policy::{DEFAULT_TSP_LEN, DEFAULT_TSP_RATE};
    use fastkv::tensors::DType;
    use fastkv::Budget;

    use super::*;

    /// The CLI's flags are `Overrides` itself, flattened.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        policy: Overrides,
    }

    fn cli(engine: &Engine, args: &[&str]) -> Policy {
        let cli = Cli::try_parse_from(std::iter::once("fastkv").chain(args.iter().copied())).unwrap();
        cli.policy.apply(engine.default_policy(), engine.spec()).unwrap()
    }

    fn model_parameters(engine: &Engine, params: &[(&str, &str)]) -> Policy {
        let mut config = serde_json::json!({ "parameters": {} });
        for (k, v) in params {
            config["parameters"][*k] = serde_json::json!({ "string_value": v });
        }
        apply(&overrides_from_config(&config).unwrap(), engine.default_policy(), engine).unwrap()
    }

    fn request_tensors(engine: &Engine, method: &str, retain_rate: Option<f32>, kv_budget: Option<i32>) -> Policy {
        let get = |name: &str| -> Result<Option<Tensor>, String> {
            let tensor = |dtype, data: Vec<u8>| Some(Tensor { dtype, data });
            Ok(match name {
                "text_input" => tensor(ffi::TYPE_BYTES, [&2u32.to_le_bytes()[..], b"hi"].concat()),
                "method" => {
                    tensor(ffi::TYPE_BYTES, [&(method.len() as u32).to_le_bytes()[..], method.as_bytes()].concat())
                }
                "retain_rate" => retain_rate.and_then(|r| tensor(ffi::TYPE_FP32, r.to_le_bytes().to_vec())),
                "kv_budget" => kv_budget.and_then(|c| tensor(ffi::TYPE_INT32, c.to_le_bytes().to_vec())),
                _ => None,
            })
        };
        parse(get, engine, &engine.default_policy()).unwrap().request.policy.unwrap()
    }

    #[test]
    fn cli_triton_and_eval_give_the_same_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("engine");
        let checkpoint = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama");
        let options = BuildOptions {
            checkpoint,
            output: dir.clone(),
            dtype: DType::F32,
            force: false,
            policy: Default::default(),
            calibrate: fastkv::builder::Calibrate::Never,
        };
        build(&options, &fastkv::progress::Silent).unwrap();
        for absolute in [false, true] {
            let mut engine = Engine::open(&dir).unwrap();
            if absolute {
                engine.manifest.fastkv.budget = Budget::Absolute { kv_budget: 64, tsp_len: 96 };
            }
            // A retain rate: rate mode on both engines (the absolute one takes FastKV's TSP rate).
            let by_cli = cli(&engine, &["--method", "snapkv-gqa", "--retain-rate", "0.25"]);
            let by_params = model_parameters(&engine, &[("method", "snapkv-gqa"), ("retain_rate", "0.25")]);
            let by_request = request_tensors(&engine, "snapkv-gqa", Some(0.25), None);
            let by_eval = contenders(&engine, &[Method::SnapkvGqa], &[0.25], &[]).unwrap().remove(0).policy;
            assert_eq!(by_cli, by_params, "absolute engine: {absolute}");
            assert_eq!(by_cli, by_request, "absolute engine: {absolute}");
            assert_eq!(by_cli, by_eval, "absolute engine: {absolute}");
            let t = match engine.default_policy().budget {
                Budget::Rate { tsp_rate, .. } => tsp_rate,
                Budget::Absolute { .. } => DEFAULT_TSP_RATE,
            };
            assert_eq!(by_cli.budget, Budget::Rate { tsp_rate: t, retain_rate: 0.25 });
            // A KV budget: absolute mode; the absolute engine keeps its TSP length.
            let by_cli = cli(&engine, &["--method", "fastkv", "--kv-budget", "32"]);
            let by_params = model_parameters(&engine, &[("method", "fastkv"), ("kv_budget", "32")]);
            let by_request = request_tensors(&engine, "fastkv", None, Some(32));
            assert_eq!(by_cli, by_params, "absolute engine: {absolute}");
            assert_eq!(by_cli, by_request, "absolute engine: {absolute}");
            let tsp_len = if absolute { 96 } else { DEFAULT_TSP_LEN };
            assert_eq!(by_cli.budget, Budget::Absolute { kv_budget: 32, tsp_len });
            // No budget fields: the engine's own budget, whatever its mode.
            assert_eq!(cli(&engine, &[]).budget, engine.default_policy().budget);
            assert_eq!(model_parameters(&engine, &[]).budget, engine.default_policy().budget);
        }
    }
}
