//! The GGUF container (v2/v3): header, metadata and tensor table read over a memory map, every
//! offset bounds-checked so a truncated or corrupt file is an error naming what was found.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::GgmlType;
use crate::error::{Error, Result};

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Int(n) => u64::try_from(n).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(x) => Some(x),
            Value::Int(n) => Some(n as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor table entry; `dims` are in ggml order (`dims[0]` is the row length).
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
}

impl TensorInfo {
    /// The shape in row-major (PyTorch/HF) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
}

const MAGIC: &[u8; 4] = b"GGUF";

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; fastkv never maps a file it is writing.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::bad_file(path, msg);
        let mut c = Cursor { buf: &mmap, pos: 0 };
        let magic = c.take(4, "magic").map_err(bad)?;
        if magic != MAGIC {
            return Err(bad(format!("not a GGUF file: magic {magic:?}, expected {:?} (\"GGUF\")", MAGIC)));
        }
        let version = c.u32("version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} is not supported (2 or 3)")));
        }
        let n_tensors = c.u64("tensor count").map_err(bad)?;
        let n_kv = c.u64("metadata count").map_err(bad)?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key").map_err(bad)?;
            let ty = c.u32("metadata type").map_err(bad)?;
            let value = c.value(ty, &key, 0).map_err(bad)?;
            metadata.insert(key, value);
        }
        let mut table = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string("tensor name").map_err(bad)?;
            let n_dims = c.u32("tensor dims").map_err(bad)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)")));
            }
            let dims = (0..n_dims).map(|_| c.usize("tensor dim")).collect::<Result<Vec<_>, _>>();
            let ty = c.u32("tensor type").map_err(bad)?;
            let offset = c.usize("tensor offset").map_err(bad)?;
            table.push((name, dims.map_err(bad)?, ty, offset));
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .and_then(|a| usize::try_from(a).ok())
                .filter(|a| *a > 0)
                .ok_or_else(|| bad(format!("general.alignment is {v:?}")))?,
        };
        let data_start = c
            .pos
            .checked_next_multiple_of(align)
            .ok_or_else(|| bad(format!("general.alignment {align} is too large")))?;
        let mut tensors = HashMap::new();
        for (name, dims, ty, offset) in table {
            let ggml_type = GgmlType::from_id(ty).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has ggml type {ty}{}, which fastkv cannot dequantize (supported: {})",
                    GgmlType::name_of_unsupported(ty).map(|n| format!(" ({n})")).unwrap_or_default(),
                    GgmlType::SUPPORTED
                ))
            })?;
            let (block, block_bytes) = ggml_type.block();
            if dims[0] % block != 0 {
                return Err(bad(format!(
                    "tensor `{name}`: row length {} is not a multiple of the {ggml_type:?} block ({block})",
                    dims[0]
                )));
            }
            let bytes = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| (n / block).checked_mul(block_bytes))
                .ok_or_else(|| bad(format!("tensor `{name}`: dims {dims:?} are too large (their size overflows)")))?;
            let start = data_start.checked_add(offset).filter(|s| s.checked_add(bytes).is_some());
            let range = match start {
                Some(s) if s + bytes <= mmap.len() => s..s + bytes,
                _ => {
                    return Err(bad(format!(
                        "truncated: tensor `{name}` needs bytes up to {}, the file has {}",
                        data_start as u128 + offset as u128 + bytes as u128,
                        mmap.len()
                    )))
                }
            };
            tensors.insert(name, TensorInfo { dims, ggml_type, range });
        }
        Ok(GgufFile { path: path.into(), mmap, version, metadata, tensors })
    }

    /// Raw bytes of a tensor (in range by construction).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.range.clone()]
    }
}

/// Reads little-endian values; errors say what was being read and where.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        match self.pos.checked_add(n).filter(|&end| end <= self.buf.len()) {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "truncated: reading {what} at byte {} needs {n} bytes, the file has {}",
                self.pos,
                self.buf.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 that must fit a `usize` (a size or an offset).
    fn usize(&mut self, what: &str) -> Result<usize, String> {
        let n = self.u64(what)?;
        usize::try_from(n).map_err(|_| format!("{what} {n} at byte {} is too large", self.pos - 8))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let bytes = self.take(usize::try_from(len).unwrap_or(usize::MAX), what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} at byte {} is not UTF-8", self.pos))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::Int(self.array::<1>(key)?[0] as i64),
            1 => Value::Int(self.array::<1>(key)?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(self.array(key)?) as i64),
            3 => Value::Int(i16::from_le_bytes(self.array(key)?) as i64),
            4 => Value::Int(self.u32(key)? as i64),
            5 => Value::Int(i32::from_le_bytes(self.array(key)?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.array(key)?) as f64),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 if depth == 0 => {
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // A count the rest of the file cannot hold is corruption, refused before anything is allocated.
                let min_bytes = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                if n.checked_mul(min_bytes).is_none_or(|b| b > (self.buf.len() - self.pos) as u64) {
                    return Err(format!("truncated: `{key}` claims {n} elements at byte {}", self.pos));
                }
                Value::Array((0..n).map(|_| self.value(elem, key, depth + 1)).collect::<Result<_, _>>()?)
            }
            9 => return Err(format!("metadata `{key}`: nested arrays are not supported")),
            10 => Value::Int(self.u64(key)? as i64),
            11 => Value::Int(i64::from_le_bytes(self.array(key)?)),
            12 => Value::Float(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("metadata `{key}` has unknown value type {other}")),
        })
    }
}
