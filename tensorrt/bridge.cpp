// See trt_bridge.h. The TensorRT library is opened with dlopen, so nothing here links against libnvinfer.
#include "fastkv/tensorrt/bridge.h"

#include <dlfcn.h>

#include <deque>
#include <stdexcept>
#include <string>

#include "fastkv/src/trt/bridge.rs.h"

namespace fastkv::trt {

using namespace nvinfer1;

namespace {

using ErrorFn = char const* (*)();

std::string dl_error() {
  char const* e = dlerror();
  return e ? e : "unknown dlopen error";
}

size_t element_size(PluginFieldType t) {
  switch (t) {
    case PluginFieldType::kINT8:
    case PluginFieldType::kCHAR: return 1;
    case PluginFieldType::kFLOAT16:
    case PluginFieldType::kBF16:
    case PluginFieldType::kINT16: return 2;
    case PluginFieldType::kFLOAT32:
    case PluginFieldType::kINT32: return 4;
    case PluginFieldType::kFLOAT64:
    case PluginFieldType::kINT64: return 8;
    default: return 0;  // dims, unknown, sub-byte types: not data this bridge copies
  }
}

rust::Vec<RawField> to_raw(PluginFieldCollection const* fc) {
  rust::Vec<RawField> out;
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    RawField r;
    r.name = rust::String(f.name ? f.name : "");
    r.ty = static_cast<int32_t>(f.type);
    r.length = f.length;
    size_t const bytes = f.data ? element_size(f.type) * std::max(f.length, 0) : 0;
    for (size_t b = 0; b < bytes; ++b) r.data.push_back(static_cast<uint8_t const*>(f.data)[b]);
    out.push_back(std::move(r));
  }
  return out;
}

Dims to_dims(Tensor const& t) {
  if (t.dims.size() > static_cast<size_t>(Dims::MAX_DIMS)) throw std::invalid_argument("a tensor has more than 8 dims");
  Dims d{};
  d.nbDims = static_cast<int32_t>(t.dims.size());
  for (size_t i = 0; i < t.dims.size(); ++i) d.d[i] = t.dims[i];
  return d;
}

PluginTensorDesc to_desc(Tensor const& t) {
  PluginTensorDesc d{};
  d.dims = to_dims(t);
  d.type = static_cast<DataType>(t.ty);
  d.format = TensorFormat::kLINEAR;
  d.scale = -1.0F;
  return d;
}

// The same extents as minimum, optimum and maximum: one concrete shape profile.
std::vector<DynamicPluginTensorDesc> to_dynamic(rust::Slice<Tensor const> ts) {
  std::vector<DynamicPluginTensorDesc> out;
  for (Tensor const& t : ts) {
    DynamicPluginTensorDesc d{};
    d.desc = to_desc(t);
    d.min = d.opt = d.max = d.desc.dims;
    out.push_back(d);
  }
  return out;
}

std::vector<PluginTensorDesc> to_descs(rust::Slice<Tensor const> ts) {
  std::vector<PluginTensorDesc> out;
  for (Tensor const& t : ts) out.push_back(to_desc(t));
  return out;
}

// An IExprBuilder that folds every expression to a constant, so getOutputShapes can be evaluated at concrete input
// shapes without TensorRT's builder (which is not obtainable here and would build the same expressions
// symbolically). It implements the headers' apiv interfaces, which IExprBuilder's inline methods call.
class FoldedExpr final : public IDimensionExpr {
 public:
  explicit FoldedExpr(int64_t v) : impl_(v) { mImpl = &impl_; }

 private:
  class Impl final : public apiv::VDimensionExpr {
   public:
    explicit Impl(int64_t v) : v_(v) {}
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return v_; }
    bool isSizeTensor() const override { return false; }

   private:
    int64_t v_;
  };
  Impl impl_;
};

class FoldingBuilder final : public IExprBuilder {
 public:
  FoldingBuilder() { mImpl = &impl_; }

 private:
  class Impl final : public apiv::VExprBuilder {
   public:
    IDimensionExpr const* constant(int64_t v) override { return &exprs_.emplace_back(v); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& x,
                                    IDimensionExpr const& y) override {
      int64_t const a = x.getConstantValue(), b = y.getConstantValue();
      auto floor_div = [](int64_t p, int64_t q) { return p / q - ((p % q != 0) && ((p < 0) != (q < 0))); };
      switch (op) {
        case DimensionOperation::kSUM: return constant(a + b);
        case DimensionOperation::kPROD: return constant(a * b);
        case DimensionOperation::kMAX: return constant(std::max(a, b));
        case DimensionOperation::kMIN: return constant(std::min(a, b));
        case DimensionOperation::kSUB: return constant(a - b);
        case DimensionOperation::kEQUAL: return constant(a == b);
        case DimensionOperation::kLESS: return constant(a < b);
        case DimensionOperation::kFLOOR_DIV: return b ? constant(floor_div(a, b)) : nullptr;
        case DimensionOperation::kCEIL_DIV: return b ? constant(-floor_div(-a, b)) : nullptr;
      }
      return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
      return nullptr;  // data-dependent shapes: never used by fastkv's plugins
    }

   private:
    std::deque<FoldedExpr> exprs_;
  };
  Impl impl_;
};

}  // namespace

std::unique_ptr<Registry> open_registry(rust::Str runtime_library) {
  std::string const path = str(runtime_library);
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) throw std::runtime_error("cannot open the TensorRT runtime library " + path + ": " + dl_error());
  auto get = reinterpret_cast<IPluginRegistry* (*)()>(dlsym(lib, "getPluginRegistry"));
  if (!get) throw std::runtime_error(path + " has no getPluginRegistry: is it libnvinfer(_lean).so of TensorRT 10/11?");
  IPluginRegistry* registry = get();
  if (!registry) throw std::runtime_error(path + ": getPluginRegistry returned null");
  return std::make_unique<Registry>(lib, registry);
}

// The runtime library stays loaded: TensorRT keeps process-wide state that must not be unmapped.
Registry::~Registry() {
  for (auto h : loaded_) registry_->deregisterLibrary(h);
  for (void* h : handles_) dlclose(h);
}

void Registry::load_plugins(rust::Str library) {
  std::string const path = str(library);
  void* own = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!own) throw std::runtime_error("cannot open plugin library " + path + ": " + dl_error());
  IPluginRegistry::PluginLibraryHandle h = registry_->loadLibrary(path.c_str());
  if (!h) {
    dlclose(own);
    throw std::runtime_error("TensorRT did not load plugin library " + path +
                             " (it needs getCreators and setLoggerFinder, and none of its creators may be registered "
                             "already)");
  }
  loaded_.push_back(h);
  handles_.push_back(own);
}

rust::Vec<CreatorInfo> Registry::creators() const {
  int32_t n = 0;
  IPluginCreatorInterface* const* all = registry_->getAllCreators(&n);
  rust::Vec<CreatorInfo> out;
  for (int32_t i = 0; all && i < n; ++i) {
    CreatorInfo c;
    c.interface_kind = rust::String(all[i]->getInterfaceInfo().kind);
    if (std::string(all[i]->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE") {
      auto* v3 = static_cast<IPluginCreatorV3One*>(all[i]);
      c.name = rust::String(v3->getPluginName());
      c.version = rust::String(v3->getPluginVersion());
      c.plugin_namespace = rust::String(v3->getPluginNamespace());
    }
    out.push_back(std::move(c));
  }
  return out;
}

IPluginCreatorV3One* Registry::creator(rust::Str name, rust::Str version, rust::Str ns) const {
  std::string const n = str(name), v = str(version), s = str(ns);
  IPluginCreatorInterface* c = registry_->getCreator(n.c_str(), v.c_str(), s.c_str());
  if (!c)
    throw std::runtime_error("no plugin creator " + n + " version " + v + " in namespace \"" + s +
                             "\" (is the plugin library loaded?)");
  if (std::string(c->getInterfaceInfo().kind) != "PLUGIN CREATOR_V3ONE")
    throw std::runtime_error(n + " is not an IPluginCreatorV3One creator");
  return static_cast<IPluginCreatorV3One*>(c);
}

rust::Vec<RawField> Registry::field_names(rust::Str name, rust::Str version, rust::Str ns) const {
  return to_raw(creator(name, version, ns)->getFieldNames());
}

std::string Registry::plugin_error() const {
  for (void* h : handles_)
    if (auto f = reinterpret_cast<ErrorFn>(dlsym(h, "fastkv_trt_take_error"))) return f();
  return "";
}

std::unique_ptr<Plugin> Registry::create_plugin(rust::Str name, rust::Str version, rust::Str ns,
                                                rust::Slice<RawField const> fields, bool runtime_phase) const {
  IPluginCreatorV3One* c = creator(name, version, ns);
  // Field data copied into 8-byte aligned storage: plugins read it as int32/int64/float.
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> data;
  for (RawField const& f : fields) {
    names.push_back(str(f.name));
    data.emplace_back((f.data.size() + 7) / 8);
    std::copy(f.data.begin(), f.data.end(), reinterpret_cast<uint8_t*>(data.back().data()));
  }
  std::vector<PluginField> pf;
  for (size_t i = 0; i < fields.size(); ++i)
    pf.emplace_back(names[i].c_str(), data[i].data(), static_cast<PluginFieldType>(fields[i].ty), fields[i].length);
  PluginFieldCollection fc{static_cast<int32_t>(pf.size()), pf.data()};
  std::string const n = str(name);
  IPluginV3* p = c->createPlugin(n.c_str(), &fc, runtime_phase ? TensorRTPhase::kRUNTIME : TensorRTPhase::kBUILD);
  if (!p) {
    std::string const why = plugin_error();
    throw std::runtime_error(why.empty() ? n + ": createPlugin failed" : why);
  }
  void* own = nullptr;
  for (void* h : handles_)
    if (dlsym(h, "fastkv_trt_take_error")) own = h;
  return std::make_unique<Plugin>(p, n, own);
}

Plugin::Plugin(IPluginV3* plugin, std::string name, void* library)
    : plugin_(plugin), name_(std::move(name)), library_(library) {}

Plugin::~Plugin() { delete plugin_; }

void Plugin::fail(std::string const& what) const {
  auto f = library_ ? reinterpret_cast<ErrorFn>(dlsym(library_, "fastkv_trt_take_error")) : nullptr;
  std::string const why = f ? f() : "";
  throw std::runtime_error(why.empty() ? name_ + ": " + what + " failed" : why + " (" + what + ")");
}

PluginInfo Plugin::info() const {
  PluginInfo i{};
  auto* core = static_cast<IPluginV3OneCore*>(plugin_->getCapabilityInterface(PluginCapabilityType::kCORE));
  if (!core || std::string(core->getInterfaceInfo().kind) != "PLUGIN_V3ONE_CORE") fail("the core capability");
  i.name = rust::String(core->getPluginName());
  i.version = rust::String(core->getPluginVersion());
  i.plugin_namespace = rust::String(core->getPluginNamespace());
  IPluginCapability* b = plugin_->getCapabilityInterface(PluginCapabilityType::kBUILD);
  IPluginCapability* r = plugin_->getCapabilityInterface(PluginCapabilityType::kRUNTIME);
  i.has_build = b && std::string(b->getInterfaceInfo().kind) == "PLUGIN_V3ONE_BUILD";
  i.has_runtime = r && std::string(r->getInterfaceInfo().kind) == "PLUGIN_V3ONE_RUNTIME";
  i.nb_outputs = i.has_build ? static_cast<IPluginV3OneBuild*>(b)->getNbOutputs() : -1;
  return i;
}

IPluginV3OneBuild* Plugin::build() const {
  IPluginCapability* b = plugin_->getCapabilityInterface(PluginCapabilityType::kBUILD);
  if (!b || std::string(b->getInterfaceInfo().kind) != "PLUGIN_V3ONE_BUILD") fail("the build capability");
  return static_cast<IPluginV3OneBuild*>(b);
}

IPluginV3OneRuntime* Plugin::runtime() const {
  IPluginCapability* r = plugin_->getCapabilityInterface(PluginCapabilityType::kRUNTIME);
  if (!r || std::string(r->getInterfaceInfo().kind) != "PLUGIN_V3ONE_RUNTIME") fail("the runtime capability");
  return static_cast<IPluginV3OneRuntime*>(r);
}

rust::Vec<int32_t> Plugin::output_types(rust::Slice<int32_t const> inputs) const {
  IPluginV3OneBuild* b = build();
  std::vector<DataType> in;
  for (int32_t t : inputs) in.push_back(static_cast<DataType>(t));
  std::vector<DataType> out(std::max(b->getNbOutputs(), 0));
  if (b->getOutputDataTypes(out.data(), static_cast<int32_t>(out.size()), in.data(), static_cast<int32_t>(in.size())))
    fail("getOutputDataTypes");
  rust::Vec<int32_t> r;
  for (DataType t : out) r.push_back(static_cast<int32_t>(t));
  return r;
}

rust::Vec<Tensor> Plugin::output_shapes(rust::Slice<Tensor const> inputs) const {
  IPluginV3OneBuild* b = build();
  FoldingBuilder fb;
  std::vector<DimsExprs> in(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    Dims const d = to_dims(inputs[i]);
    in[i].nbDims = d.nbDims;
    for (int32_t j = 0; j < d.nbDims; ++j) in[i].d[j] = fb.constant(d.d[j]);
  }
  std::vector<DimsExprs> out(std::max(b->getNbOutputs(), 0));
  if (b->getOutputShapes(in.data(), static_cast<int32_t>(in.size()), nullptr, 0, out.data(),
                         static_cast<int32_t>(out.size()), fb))
    fail("getOutputShapes");
  rust::Vec<Tensor> r;
  for (DimsExprs const& e : out) {
    Tensor t{};
    t.ty = -1;
    for (int32_t j = 0; j < e.nbDims; ++j) {
      if (!e.d[j]) fail("getOutputShapes (an extent is not an expression)");
      t.dims.push_back(e.d[j]->getConstantValue());
    }
    r.push_back(std::move(t));
  }
  return r;
}

bool Plugin::supports_format(int32_t pos, rust::Slice<Tensor const> io, int32_t nb_inputs) const {
  std::vector<DynamicPluginTensorDesc> d = to_dynamic(io);
  if (pos < 0 || static_cast<size_t>(pos) >= d.size() || nb_inputs < 0 || static_cast<size_t>(nb_inputs) > d.size())
    throw std::invalid_argument("supports_format: pos or nb_inputs out of range");
  return build()->supportsFormatCombination(pos, d.data(), nb_inputs, static_cast<int32_t>(d.size()) - nb_inputs);
}

void Plugin::configure(rust::Slice<Tensor const> inputs, rust::Slice<Tensor const> outputs) const {
  std::vector<DynamicPluginTensorDesc> in = to_dynamic(inputs), out = to_dynamic(outputs);
  if (build()->configurePlugin(in.data(), static_cast<int32_t>(in.size()), out.data(), static_cast<int32_t>(out.size())))
    fail("configurePlugin");
}

void Plugin::shape_change(rust::Slice<Tensor const> inputs, rust::Slice<Tensor const> outputs) const {
  std::vector<PluginTensorDesc> in = to_descs(inputs), out = to_descs(outputs);
  if (runtime()->onShapeChange(in.data(), static_cast<int32_t>(in.size()), out.data(), static_cast<int32_t>(out.size())))
    fail("onShapeChange");
}

size_t Plugin::workspace_size(rust::Slice<Tensor const> inputs, rust::Slice<Tensor const> outputs) const {
  std::vector<DynamicPluginTensorDesc> in = to_dynamic(inputs), out = to_dynamic(outputs);
  return build()->getWorkspaceSize(in.data(), static_cast<int32_t>(in.size()), out.data(),
                                   static_cast<int32_t>(out.size()));
}

rust::Vec<RawField> Plugin::serialized_fields() const {
  PluginFieldCollection const* fc = runtime()->getFieldsToSerialize();
  if (!fc) fail("getFieldsToSerialize");
  return to_raw(fc);
}

std::unique_ptr<Plugin> Plugin::clone_plugin() const {
  IPluginV3* p = plugin_->clone();
  if (!p) fail("clone");
  return std::make_unique<Plugin>(p, name_, library_);
}

// fastkv's plugins need no per-context resources, so no IPluginResourceContext is passed.
std::unique_ptr<Plugin> Plugin::attach_to_context() const {
  IPluginV3* p = runtime()->attachToContext(nullptr);
  if (!p) fail("attachToContext");
  return std::make_unique<Plugin>(p, name_, library_);
}

}  // namespace fastkv::trt
