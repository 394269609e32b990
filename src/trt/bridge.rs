//! TensorRT from Rust (feature `tensorrt`): a cxx bridge (C++ in `tensorrt/bridge.cpp` and `tensorrt/builder.cpp`)
//! that opens a TensorRT runtime library by path at run time, loads plugin libraries such as fastkv's own
//! `libfastkv_trt_plugins.so` (tensorrt/) into its plugin registry, creates and inspects IPluginV3 plugins, and
//! builds plans with TensorRT's builder and ONNX parser, and runs them (`tensorrt/runtime.cpp`).
//!
//! Nothing links against TensorRT: the library is `dlopen`ed, so a build needs only the headers, and a machine
//! without TensorRT gets an error instead of a loader failure. The lean runtime (`libnvinfer_lean.so.11`, which
//! `scripts/install-trt-lean.sh` installs) is enough for the plugin registry, with or without a GPU; building
//! plans needs the full `libnvinfer` and `libnvonnxparser` (found by [`super::library`]) and a GPU.

use std::path::Path;

use crate::{Error, Result};

#[cxx::bridge(namespace = "fastkv::trt")]
pub(super) mod ffi {
    /// A `PluginField`: its `PluginFieldType` code, element count and raw bytes.
    struct RawField {
        name: String,
        ty: i32,
        length: i32,
        data: Vec<u8>,
    }

    struct CreatorInfo {
        name: String,
        version: String,
        plugin_namespace: String,
        interface_kind: String,
    }

    struct PluginInfo {
        name: String,
        version: String,
        plugin_namespace: String,
        has_build: bool,
        has_runtime: bool,
        nb_outputs: i32,
    }

    /// A tensor's extents and `DataType` code (-1 where not known).
    struct Tensor {
        dims: Vec<i64>,
        ty: i32,
    }

    /// One network input's extents at the optimisation profile's min, opt and max.
    struct ProfileInput {
        name: String,
        min: Vec<i64>,
        opt: Vec<i64>,
        max: Vec<i64>,
    }

    /// What `build_plan` builds: library paths, the ONNX graph, its one profile and where the plan goes.
    struct PlanRequest {
        nvinfer: String,
        onnx_parser: String,
        plugins: String,
        onnx: String,
        profile: Vec<ProfileInput>,
        output: String,
    }

    /// One input or output of a plan: its name, direction, `DataType` code and extents (-1 where dynamic).
    struct IoTensor {
        name: String,
        input: bool,
        ty: i32,
        dims: Vec<i64>,
    }

    unsafe extern "C++" {
        include!("fastkv/tensorrt/runtime.h");

        type Runtime;
        type Plan;
        type Context;

        fn open_runtime(nvinfer: &str, plugins: &str) -> Result<UniquePtr<Runtime>>;
        fn version(self: &Runtime) -> i32;
        fn deserialize(self: &Runtime, plan: &[u8]) -> Result<UniquePtr<Plan>>;
        fn tensors(self: &Plan) -> Vec<IoTensor>;
        fn context(self: &Plan) -> Result<UniquePtr<Context>>;
        fn set_input_shape(self: Pin<&mut Context>, name: &str, dims: &[i64]) -> Result<()>;
        fn shape(self: &Context, name: &str) -> Result<Vec<i64>>;
        fn set_address(self: Pin<&mut Context>, name: &str, address: u64) -> Result<()>;
        fn enqueue(self: Pin<&mut Context>, stream: u64) -> Result<()>;
    }

    unsafe extern "C++" {
        include!("fastkv/tensorrt/builder.h");

        fn library_version(nvinfer: &str) -> Result<i32>;
        fn build_plan(request: &PlanRequest) -> Result<()>;
    }

    unsafe extern "C++" {
        include!("fastkv/tensorrt/bridge.h");

        type Registry;
        type Plugin;

        fn open_registry(runtime_library: &str) -> Result<UniquePtr<Registry>>;
        fn load_plugins(self: Pin<&mut Registry>, library: &str) -> Result<()>;
        fn creators(self: &Registry) -> Vec<CreatorInfo>;
        fn field_names(self: &Registry, name: &str, version: &str, ns: &str) -> Result<Vec<RawField>>;
        fn create_plugin(
            self: &Registry,
            name: &str,
            version: &str,
            ns: &str,
            fields: &[RawField],
            runtime_phase: bool,
        ) -> Result<UniquePtr<Plugin>>;

        fn info(self: &Plugin) -> Result<PluginInfo>;
        fn output_types(self: &Plugin, inputs: &[i32]) -> Result<Vec<i32>>;
        fn output_shapes(self: &Plugin, inputs: &[Tensor]) -> Result<Vec<Tensor>>;
        fn supports_format(self: &Plugin, pos: i32, io: &[Tensor], nb_inputs: i32) -> Result<bool>;
        fn configure(self: &Plugin, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()>;
        fn shape_change(self: &Plugin, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()>;
        fn workspace_size(self: &Plugin, inputs: &[Tensor], outputs: &[Tensor]) -> Result<usize>;
        fn serialized_fields(self: &Plugin) -> Result<Vec<RawField>>;
        fn clone_plugin(self: &Plugin) -> Result<UniquePtr<Plugin>>;
        fn attach_to_context(self: &Plugin) -> Result<UniquePtr<Plugin>>;
    }
}

pub use ffi::{CreatorInfo, PluginInfo};

/// The one place TensorRT failures become `fastkv::Error`: `operation` says which part of TensorRT failed.
pub(super) fn device_error(operation: &str, e: impl std::fmt::Display) -> Error {
    Error::Device { backend: "tensorrt", operation: operation.into(), code: None, message: e.to_string() }
}

fn trt_error(e: impl std::fmt::Display) -> Error {
    device_error("plugin registry", e)
}

/// TensorRT's element types as the plugins use them (`nvinfer1::DataType` codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Float = 0,
    Half = 1,
    Int32 = 3,
    BFloat16 = 7,
    Int64 = 8,
}

impl DataType {
    fn from_code(code: i32) -> Result<Self> {
        Ok(match code {
            0 => DataType::Float,
            1 => DataType::Half,
            3 => DataType::Int32,
            7 => DataType::BFloat16,
            8 => DataType::Int64,
            _ => return Err(trt_error(format!("unexpected TensorRT DataType code {code}"))),
        })
    }
}

/// A plugin field value (`PluginField`); fastkv's plugins take int32 scalars, the other kinds exist so callers
/// can pass what an ONNX node would and see it rejected.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Float32(Vec<f32>),
    Chars(String),
    /// A `PluginFieldType` this module does not decode: its code and raw bytes.
    Other {
        ty: i32,
        length: i32,
        data: Vec<u8>,
    },
}

/// A named plugin field.
#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub name: String,
    pub value: FieldValue,
}

impl Field {
    /// An int32 scalar, the type of every fastkv plugin field.
    pub fn int(name: &str, v: i32) -> Self {
        Field { name: name.into(), value: FieldValue::Int32(vec![v]) }
    }

    fn to_raw(&self) -> ffi::RawField {
        let (ty, length, data) = match &self.value {
            FieldValue::Int32(v) => (5, v.len(), v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
            FieldValue::Int64(v) => (10, v.len(), v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
            FieldValue::Float32(v) => (1, v.len(), v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
            FieldValue::Chars(s) => (6, s.len(), s.as_bytes().to_vec()),
            FieldValue::Other { ty, length, data } => (*ty, *length as usize, data.clone()),
        };
        ffi::RawField { name: self.name.clone(), ty, length: length as i32, data }
    }

    fn from_raw(r: ffi::RawField) -> Self {
        let value = match r.ty {
            5 => FieldValue::Int32(decode(&r.data, i32::from_ne_bytes)),
            10 => FieldValue::Int64(decode(&r.data, i64::from_ne_bytes)),
            1 => FieldValue::Float32(decode(&r.data, f32::from_ne_bytes)),
            6 => FieldValue::Chars(String::from_utf8_lossy(&r.data).into_owned()),
            ty => FieldValue::Other { ty, length: r.length, data: r.data },
        };
        Field { name: r.name, value }
    }
}

/// Native-endian values of N bytes each.
fn decode<const N: usize, T>(data: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| {
            let mut a = [0; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

/// The field a creator declares (`getFieldNames`): name, `PluginFieldType` code and element count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    pub name: String,
    pub ty: i32,
    pub length: i32,
}

/// The phase a plugin is created for (`TensorRTPhase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Build,
    Runtime,
}

/// A tensor description for the plugin's shape and format queries: extents and element type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub dims: Vec<i64>,
    pub ty: DataType,
}

impl TensorDesc {
    pub fn new(dims: &[i64], ty: DataType) -> Self {
        TensorDesc { dims: dims.to_vec(), ty }
    }
}

fn to_ffi(ts: &[TensorDesc]) -> Vec<ffi::Tensor> {
    ts.iter().map(|t| ffi::Tensor { dims: t.dims.clone(), ty: t.ty as i32 }).collect()
}

pub(super) fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| trt_error(format!("{}: the path is not UTF-8", path.display())))
}

/// A TensorRT runtime library and its process-wide plugin registry. Not `Sync`: TensorRT's registry queries are
/// not thread-safe, so share it behind a `Mutex`.
pub struct TensorRt {
    inner: cxx::UniquePtr<ffi::Registry>,
}

// SAFETY: the C++ object only holds library handles and TensorRT's registry pointer, usable from any thread as
// long as calls do not overlap, which `&mut`/`Mutex` (the type is not `Sync`) guarantee.
unsafe impl Send for TensorRt {}

impl TensorRt {
    /// Opens a TensorRT 10/11 runtime library by path (`libnvinfer.so.11` or `libnvinfer_lean.so.11`).
    pub fn open(runtime_library: &Path) -> Result<Self> {
        let inner = ffi::open_registry(utf8(runtime_library)?).map_err(trt_error)?;
        Ok(TensorRt { inner })
    }

    /// Loads a plugin library through `IPluginRegistry::loadLibrary` (as `trtexec --staticPlugins` does), which
    /// registers the creators its `getCreators` returns. Fails if any of them is already registered.
    pub fn load_plugins(&mut self, library: &Path) -> Result<()> {
        self.inner.pin_mut().load_plugins(utf8(library)?).map_err(trt_error)
    }

    /// Every creator in the registry; name, version and namespace are filled for IPluginCreatorV3One creators.
    pub fn creators(&self) -> Vec<CreatorInfo> {
        self.inner.creators()
    }

    /// The fields the creator of (name, version, namespace) declares.
    pub fn field_names(&self, name: &str, version: &str, ns: &str) -> Result<Vec<FieldSpec>> {
        let raw = self.inner.field_names(name, version, ns).map_err(trt_error)?;
        Ok(raw.into_iter().map(|r| FieldSpec { name: r.name, ty: r.ty, length: r.length }).collect())
    }

    /// Creates a plugin from fields; bad fields give the plugin's own message (e.g. which field is out of range).
    pub fn create_plugin(
        &self,
        name: &str,
        version: &str,
        ns: &str,
        fields: &[Field],
        phase: Phase,
    ) -> Result<Plugin<'_>> {
        let raw: Vec<_> = fields.iter().map(Field::to_raw).collect();
        let inner = self.inner.create_plugin(name, version, ns, &raw, phase == Phase::Runtime).map_err(trt_error)?;
        Ok(Plugin { inner, _registry: std::marker::PhantomData })
    }
}

/// An IPluginV3 object; it borrows the registry so it cannot outlive its plugin library.
pub struct Plugin<'r> {
    inner: cxx::UniquePtr<ffi::Plugin>,
    _registry: std::marker::PhantomData<&'r TensorRt>,
}

impl Plugin<'_> {
    /// Name, version and namespace (core capability), whether build/runtime capabilities answer, nbOutputs.
    pub fn info(&self) -> Result<PluginInfo> {
        self.inner.info().map_err(trt_error)
    }

    /// `getOutputDataTypes` for these input types.
    pub fn output_types(&self, inputs: &[DataType]) -> Result<Vec<DataType>> {
        let codes: Vec<i32> = inputs.iter().map(|t| *t as i32).collect();
        self.inner.output_types(&codes).map_err(trt_error)?.into_iter().map(DataType::from_code).collect()
    }

    /// `getOutputShapes` evaluated at concrete input extents (every expression folded to a constant).
    pub fn output_shapes(&self, inputs: &[Vec<i64>]) -> Result<Vec<Vec<i64>>> {
        let ts: Vec<_> = inputs.iter().map(|d| ffi::Tensor { dims: d.clone(), ty: -1 }).collect();
        Ok(self.inner.output_shapes(&ts).map_err(trt_error)?.into_iter().map(|t| t.dims).collect())
    }

    /// `supportsFormatCombination` at `pos` of inputs followed by outputs (all linear format).
    pub fn supports(&self, pos: usize, inputs: &[TensorDesc], outputs: &[TensorDesc]) -> Result<bool> {
        let io: Vec<_> = to_ffi(inputs).into_iter().chain(to_ffi(outputs)).collect();
        self.inner.supports_format(pos as i32, &io, inputs.len() as i32).map_err(trt_error)
    }

    /// `configurePlugin` with one shape profile (min = opt = max; -1 extents: unknown at build time).
    pub fn configure(&self, inputs: &[TensorDesc], outputs: &[TensorDesc]) -> Result<()> {
        self.inner.configure(&to_ffi(inputs), &to_ffi(outputs)).map_err(trt_error)
    }

    /// `onShapeChange` with concrete shapes.
    pub fn shape_change(&self, inputs: &[TensorDesc], outputs: &[TensorDesc]) -> Result<()> {
        self.inner.shape_change(&to_ffi(inputs), &to_ffi(outputs)).map_err(trt_error)
    }

    /// `getWorkspaceSize` in bytes for one shape profile.
    pub fn workspace_size(&self, inputs: &[TensorDesc], outputs: &[TensorDesc]) -> Result<usize> {
        self.inner.workspace_size(&to_ffi(inputs), &to_ffi(outputs)).map_err(trt_error)
    }

    /// `getFieldsToSerialize`: what an engine stores to re-create the plugin.
    pub fn serialized_fields(&self) -> Result<Vec<Field>> {
        Ok(self.inner.serialized_fields().map_err(trt_error)?.into_iter().map(Field::from_raw).collect())
    }

    /// `IPluginV3::clone`.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Plugin { inner: self.inner.clone_plugin().map_err(trt_error)?, _registry: self._registry })
    }

    /// `attachToContext` without a resource context (fastkv's plugins use none).
    pub fn attach_to_context(&self) -> Result<Self> {
        Ok(Plugin { inner: self.inner.attach_to_context().map_err(trt_error)?, _registry: self._registry })
    }
}
