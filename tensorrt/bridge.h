// The C++ half of the cxx bridge to TensorRT (src/trt/mod.rs is the Rust half): opens a TensorRT runtime library
// by path (full libnvinfer.so.11 or lean libnvinfer_lean.so.11), loads plugin libraries into its plugin registry,
// and creates and inspects IPluginV3 plugins. Every failure is a C++ exception, which cxx turns into a Rust Err.
#pragma once

#include <NvInferRuntime.h>

#include <memory>
#include <vector>

#include "rust/cxx.h"

namespace fastkv::trt {

struct RawField;
struct CreatorInfo;
struct PluginInfo;
struct Tensor;

class Plugin;

// One TensorRT runtime library and its (process-wide) plugin registry.
class Registry {
 public:
  Registry(void* runtime, nvinfer1::IPluginRegistry* registry) : runtime_(runtime), registry_(registry) {}
  ~Registry();
  void load_plugins(rust::Str library);
  rust::Vec<CreatorInfo> creators() const;
  rust::Vec<RawField> field_names(rust::Str name, rust::Str version, rust::Str ns) const;
  std::unique_ptr<Plugin> create_plugin(rust::Str name, rust::Str version, rust::Str ns, rust::Slice<RawField const> fields,
                                        bool runtime_phase) const;

 private:
  nvinfer1::IPluginCreatorV3One* creator(rust::Str name, rust::Str version, rust::Str ns) const;
  std::string plugin_error() const;

  void* runtime_;
  nvinfer1::IPluginRegistry* registry_;
  std::vector<nvinfer1::IPluginRegistry::PluginLibraryHandle> loaded_;
  std::vector<void*> handles_;  // our own dlopen references of the loaded libraries, for fastkv_trt_take_error
};

std::unique_ptr<Registry> open_registry(rust::Str runtime_library);

// One IPluginV3 object, owned.
class Plugin {
 public:
  Plugin(nvinfer1::IPluginV3* plugin, std::string error_source, void* library);
  ~Plugin();
  PluginInfo info() const;
  rust::Vec<int32_t> output_types(rust::Slice<int32_t const> inputs) const;
  rust::Vec<Tensor> output_shapes(rust::Slice<Tensor const> inputs) const;
  bool supports_format(int32_t pos, rust::Slice<Tensor const> io, int32_t nb_inputs) const;
  void configure(rust::Slice<Tensor const> inputs, rust::Slice<Tensor const> outputs) const;
  void shape_change(rust::Slice<Tensor const> inputs, rust::Slice<Tensor const> outputs) const;
  size_t workspace_size(rust::Slice<Tensor const> inputs, rust::Slice<Tensor const> outputs) const;
  rust::Vec<RawField> serialized_fields() const;
  std::unique_ptr<Plugin> clone_plugin() const;
  std::unique_ptr<Plugin> attach_to_context() const;

 private:
  nvinfer1::IPluginV3OneBuild* build() const;
  nvinfer1::IPluginV3OneRuntime* runtime() const;
  [[noreturn]] void fail(std::string const& what) const;

  nvinfer1::IPluginV3* plugin_;
  std::string name_;
  void* library_;  // the plugin library's dlopen handle (for fastkv_trt_take_error), or null
};

}  // namespace fastkv::trt
