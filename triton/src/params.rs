//! Request tensors (Triton's LLM generate conventions) and model parameters → a fastkv request.

use fastkv::{Budget, Engine, Method, Policy, Prompt, Request};

use crate::ffi;
use crate::server::Tensor;

/// What one request asks for.
pub struct Job {
    pub request: Request,
    pub stops: Vec<String>,
    /// One response per token (`stream: true`) or one with the whole text.
    pub stream: bool,
}

/// Compression fields given per request or as model parameters; unset ones keep the defaults.
#[derive(Clone, Copy, Default)]
pub struct PolicyFields {
    pub method: Option<Method>,
    pub tsp_rate: Option<f64>,
    pub retain_rate: Option<f64>,
    pub kv_budget: Option<usize>,
}

/// `tsp_len` when `kv_budget` switches a rate policy to absolute mode: the CLI's default.
const DEFAULT_TSP_LEN: usize = 2048;

impl PolicyFields {
    /// The model parameters `method`, `tsp_rate`, `retain_rate`, `kv_budget` (strings).
    pub fn from_config(config: &serde_json::Value) -> Result<Self, String> {
        let param = |name: &str| config["parameters"][name]["string_value"].as_str().filter(|s| !s.is_empty());
        let num = |name: &str| -> Result<Option<f64>, String> {
            param(name)
                .map(|s| s.trim().parse().map_err(|_| format!("parameter {name}: {s:?} is not a number")))
                .transpose()
        };
        Ok(PolicyFields {
            method: param("method").map(parse_method).transpose()?,
            tsp_rate: num("tsp_rate")?,
            retain_rate: num("retain_rate")?,
            kv_budget: num("kv_budget")?.map(|x| count("kv_budget", x)).transpose()?,
        })
    }

    /// `base` with these fields applied and checked against the engine's model.
    pub fn apply(&self, base: Policy, engine: &Engine) -> Result<Policy, String> {
        let mut p = base;
        p.method = self.method.unwrap_or(p.method);
        let rates = self.tsp_rate.is_some() || self.retain_rate.is_some();
        p.budget = match (self.kv_budget, p.budget) {
            (Some(_), _) if rates => return Err("kv_budget cannot be combined with tsp_rate / retain_rate".into()),
            (Some(kv_budget), Budget::Absolute { tsp_len, .. }) => Budget::Absolute { kv_budget, tsp_len },
            (Some(kv_budget), Budget::Rate { .. }) => Budget::Absolute { kv_budget, tsp_len: DEFAULT_TSP_LEN },
            (None, Budget::Rate { tsp_rate, retain_rate }) => Budget::Rate {
                tsp_rate: self.tsp_rate.unwrap_or(tsp_rate),
                retain_rate: self.retain_rate.unwrap_or(retain_rate),
            },
            (None, b @ Budget::Absolute { .. }) if !rates => b,
            (None, Budget::Absolute { .. }) => {
                let d = engine.default_policy();
                let (t, r) = match d.budget {
                    Budget::Rate { tsp_rate, retain_rate } => (tsp_rate, retain_rate),
                    Budget::Absolute { .. } => (0.2, 0.1),
                };
                Budget::Rate { tsp_rate: self.tsp_rate.unwrap_or(t), retain_rate: self.retain_rate.unwrap_or(r) }
            }
        };
        p.validate(engine.spec()).map_err(|e| e.to_string())?;
        Ok(p)
    }
}

fn parse_method(s: &str) -> Result<Method, String> {
    <Method as clap::ValueEnum>::from_str(s.trim(), true).map_err(|_| {
        let known: Vec<String> = <Method as clap::ValueEnum>::value_variants()
            .iter()
            .filter_map(|m| clap::ValueEnum::to_possible_value(m).map(|v| v.get_name().to_string()))
            .collect();
        format!("method: unknown compression method {s:?} (known: {})", known.join(", "))
    })
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
    let fields = PolicyFields {
        method: method.as_ref().and_then(|m| m.first()).map(|m| parse_method(m)).transpose()?,
        tsp_rate: scalar(&get, "tsp_rate", ffi::TYPE_FP32)?,
        retain_rate: scalar(&get, "retain_rate", ffi::TYPE_FP32)?,
        kv_budget: scalar(&get, "kv_budget", ffi::TYPE_INT32)?.map(|x| count("kv_budget", x)).transpose()?,
    };
    request.policy = Some(fields.apply(*policy, engine)?);
    let stops = get("stop")?.map(|t| strings("stop", &t)).transpose()?.unwrap_or_default();
    let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
    let stream = scalar(&get, "stream", ffi::TYPE_BOOL)?.is_some_and(|x| x != 0.0);
    Ok(Job { request, stops, stream })
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
