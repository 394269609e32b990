//! Memory-mapped safetensors files: reading (single or sharded, f32/f16/bf16, validated headers) and
//! a streaming writer, so a multi-GB checkpoint converts with one tensor in memory at a time.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Element types fastkv stores weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::Bf16 => "BF16",
        }
    }

    fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::Bf16),
            _ => None,
        }
    }
}

/// One tensor's raw little-endian bytes inside a mapped file.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl Tensor<'_> {
    fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Widens (or copies) every element into `out`, which must hold `self.len()` values.
    pub fn to_f32(&self, out: &mut [f32]) {
        let chunks = self.bytes.chunks_exact(self.dtype.size()).zip(out.iter_mut());
        match self.dtype {
            DType::F32 => chunks.for_each(|(b, o)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            DType::F16 => chunks.for_each(|(b, o)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            DType::Bf16 => chunks.for_each(|(b, o)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        }
    }

    /// Appends the tensor converted to `dtype` (round-to-nearest-even when narrowing).
    pub fn write_as(&self, dtype: DType, out: &mut Vec<u8>) {
        if dtype == self.dtype {
            out.extend_from_slice(self.bytes);
            return;
        }
        let mut wide = vec![0f32; self.len()];
        self.to_f32(&mut wide);
        out.reserve(wide.len() * dtype.size());
        for x in wide {
            match dtype {
                DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                DType::Bf16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            }
        }
    }
}

/// A memory-mapped safetensors file with its parsed, validated header.
pub struct TensorFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    data_start: usize,
    meta: Metadata,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; fastkv never maps a file it is writing.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::bad_file(path, format!("corrupt or truncated safetensors file: {e}")))?;
        Ok(TensorFile { path: path.into(), mmap: Arc::new(mmap), data_start: 8 + header_len, meta })
    }

    /// A safetensors image already in memory (e.g. generated weights); `name` stands for its path
    /// in messages.
    pub fn from_image(name: PathBuf, image: Mmap) -> Result<Self> {
        let (header_len, meta) = SafeTensors::read_metadata(&image)
            .map_err(|e| Error::bad_file(&name, format!("invalid safetensors image: {e}")))?;
        Ok(TensorFile { path: name, mmap: Arc::new(image), data_start: 8 + header_len, meta })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor called `name`, or a clear error if it is missing or of an unsupported dtype.
    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        let info =
            self.meta.info(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: name.into() })?;
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| Error::TensorMismatch {
            path: self.path.clone(),
            name: name.into(),
            what: "dtype",
            expected: "F32, F16 or BF16".into(),
            actual: format!("{:?}", info.dtype),
        })?;
        let (begin, end) = info.data_offsets;
        Ok(Tensor { dtype, shape: &info.shape, bytes: &self.mmap[self.data_start + begin..self.data_start + end] })
    }

    /// The tensor called `name`, which must have `shape` (else an error naming both shapes).
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor<'_>> {
        let t = self.get(name)?;
        self.check_shape(name, t.shape, shape)?;
        Ok(t)
    }

    /// [`TensorFile::mapped`] of a tensor that must have `shape`.
    pub fn mapped_shaped(&self, name: &str, shape: &[usize]) -> Result<MappedTensor> {
        let t = self.mapped(name)?;
        self.check_shape(name, &t.shape, shape)?;
        Ok(t)
    }

    fn check_shape(&self, name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
        if actual == expected {
            return Ok(());
        }
        Err(Error::TensorMismatch {
            path: self.path.clone(),
            name: name.into(),
            what: "shape",
            expected: format!("{expected:?}"),
            actual: format!("{actual:?}"),
        })
    }

    /// A tensor as a shared mapping plus byte range, for views that outlive this borrow.
    pub fn mapped(&self, name: &str) -> Result<MappedTensor> {
        let t = self.get(name)?;
        let start = t.bytes.as_ptr() as usize - self.mmap.as_ptr() as usize;
        Ok(MappedTensor {
            mmap: self.mmap.clone(),
            range: start..start + t.bytes.len(),
            dtype: t.dtype,
            shape: t.shape.to_vec(),
        })
    }
}

/// A tensor that keeps its file mapped.
pub struct MappedTensor {
    pub mmap: Arc<Mmap>,
    pub range: std::ops::Range<usize>,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// The weights of an HF checkpoint: `model.safetensors`, or shards listed by
/// `model.safetensors.index.json`.
pub struct TensorSet {
    files: Vec<TensorFile>,
    owner: HashMap<String, usize>,
}

impl TensorSet {
    pub fn open_checkpoint(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shards: Vec<(String, Vec<String>)> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::bad_file(&index, "missing object `weight_map`"))?;
            let mut by_file: Vec<(String, Vec<String>)> = Vec::new();
            for (name, file) in map {
                let file =
                    file.as_str().ok_or_else(|| Error::bad_file(&index, format!("`{name}` maps to a non-string")))?;
                if file.contains('/') || file.contains("..") {
                    return Err(Error::bad_file(&index, format!("shard name `{file}` must be a plain file name")));
                }
                match by_file.iter_mut().find(|(f, _)| f == file) {
                    Some((_, names)) => names.push(name.clone()),
                    None => by_file.push((file.into(), vec![name.clone()])),
                }
            }
            if by_file.is_empty() {
                return Err(Error::bad_file(&index, "`weight_map` lists no tensors"));
            }
            by_file.sort();
            by_file
        } else if single.exists() {
            vec![("model.safetensors".into(), Vec::new())]
        } else {
            return Err(Error::bad_file(dir, "no weights: expected model.safetensors or model.safetensors.index.json"));
        };
        let mut files = Vec::new();
        let mut owner = HashMap::new();
        for (i, (file, names)) in shards.into_iter().enumerate() {
            let tf = TensorFile::open(&dir.join(&file))?;
            let names: Vec<String> = if names.is_empty() { tf.meta.tensors().into_keys().collect() } else { names };
            for n in names {
                if tf.meta.info(&n).is_none() {
                    return Err(Error::MissingTensor { path: tf.path.clone(), name: n });
                }
                owner.insert(n, i);
            }
            files.push(tf);
        }
        Ok(TensorSet { files, owner })
    }

    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        match self.owner.get(name) {
            Some(&i) => self.files[i].get(name),
            None => Err(Error::MissingTensor { path: self.files[0].path.clone(), name: name.into() }),
        }
    }
}

/// Header entry of a tensor about to be streamed into a new safetensors file.
pub struct TensorPlan {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorPlan {
    pub(crate) fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// The JSON header of a safetensors file holding `plan`'s tensors back to back, padded so the data
/// starts 8-byte aligned.
pub(crate) fn safetensors_header(plan: &[TensorPlan], metadata: &HashMap<String, String>) -> String {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    let mut offset = 0usize;
    for t in plan {
        let end = offset + t.bytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header = serde_json::to_string(&header).expect("json");
    // Pad so tensor data starts 8-byte aligned: mapped f32/bf16 slices then need no copy.
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(' ');
    }
    header
}

/// Writes a safetensors file tensor by tensor: `fill(i, buf)` appends tensor `i`'s bytes. Returns
/// the file size and its sha256, computed on the way out.
pub fn write_safetensors(
    path: &Path,
    plan: &[TensorPlan],
    metadata: &HashMap<String, String>,
    mut fill: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<(u64, String)> {
    let header = safetensors_header(plan, metadata);
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut out = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hash: Sha256::new(), bytes: 0 };
    let io = |e| Error::io(path, e);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(header.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    for (i, t) in plan.iter().enumerate() {
        buf.clear();
        fill(i, &mut buf)?;
        if buf.len() != t.bytes() {
            return Err(Error::bad_file(
                path,
                format!("tensor `{}`: wrote {} bytes, expected {}", t.name, buf.len(), t.bytes()),
            ));
        }
        out.write_all(&buf).map_err(io)?;
    }
    out.inner.flush().map_err(io)?;
    out.inner.get_ref().sync_all().map_err(io)?;
    Ok((out.bytes, format!("{:x}", out.hash.finalize())))
}

/// sha256 of a whole file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hash = Sha256::new();
    std::io::copy(&mut f, &mut hash).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", hash.finalize()))
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
