// What the four fastkv TensorRT plugins share: their int32 fields (parsed, range-checked, serialised), the
// IPluginV3 capability plumbing, and one generic IPluginCreatorV3One. Each plugin (plugins.cpp) only adds its
// shape/type rules and its enqueue.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastkv_trt {

using namespace nvinfer1;

constexpr char const* kNamespace = "fastkv";
constexpr char const* kVersion = "1";

// Keeps `msg` for fastkv_trt_take_error() and passes it to TensorRT's logger when one was found.
void report(std::string const& msg);

// One int32 scalar field and its allowed range (inclusive).
struct FieldSpec {
  char const* name;
  int32_t min, max;
};

// A plugin's name and fields, in the order its `values` vector holds them.
struct Schema {
  char const* plugin;
  std::vector<FieldSpec> fields;
};

// Reads every field of `schema` from `fc` (int32 or int64 scalars; ONNX attributes may arrive as either). Unknown,
// duplicate, missing, mistyped or out-of-range fields are reported and give false.
bool parse_fields(Schema const& schema, PluginFieldCollection const* fc, std::vector<int32_t>& values);

// Base of every fastkv plugin: one object is all three capabilities.
class Plugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  Plugin(Schema const& schema, std::vector<int32_t> values) : schema_(schema), values_(std::move(values)) {}

  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override;
  char const* getPluginName() const noexcept override { return schema_.plugin; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override;
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

 protected:
  int32_t field(size_t i) const { return values_[i]; }
  std::vector<int32_t> const& values() const { return values_; }
  // Reports "<plugin>: <msg>" and returns the error code TensorRT expects (-1).
  int32_t fail(std::string const& msg) const;

 private:
  Schema const& schema_;
  std::vector<int32_t> values_;
  std::vector<PluginField> serialized_;
  PluginFieldCollection collection_{};
};

// The creator of plugin class P, which provides `static Schema const& schema()`, `static std::string
// check(std::vector<int32_t> const&)` (cross-field rules; empty when fine) and a constructor from the values.
template <typename P>
class Creator : public IPluginCreatorV3One {
 public:
  Creator() {
    for (FieldSpec const& f : P::schema().fields) names_.emplace_back(f.name, nullptr, PluginFieldType::kINT32, 1);
    collection_ = {static_cast<int32_t>(names_.size()), names_.data()};
  }

  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    try {
      std::vector<int32_t> values;
      if (!parse_fields(P::schema(), fc, values)) return nullptr;
      std::string const bad = P::check(values);
      if (!bad.empty()) {
        report(std::string(P::schema().plugin) + ": " + bad);
        return nullptr;
      }
      return new P(std::move(values));
    } catch (std::exception const& e) {
      report(std::string(P::schema().plugin) + ": " + e.what());
      return nullptr;
    }
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }
  char const* getPluginName() const noexcept override { return P::schema().plugin; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  std::vector<PluginField> names_;
  PluginFieldCollection collection_{};
};

}  // namespace fastkv_trt
