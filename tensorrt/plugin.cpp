// Field parsing, the shared IPluginV3 plumbing and the error channel of the fastkv plugin library.
#include "plugin.h"

#include <limits>

namespace fastkv_trt {

namespace {
thread_local std::string last_error, taken_error;
ILoggerFinder* logger_finder = nullptr;
}  // namespace

void set_logger_finder(ILoggerFinder* finder) { logger_finder = finder; }

char const* take_error_message() {
  taken_error = std::move(last_error);
  last_error.clear();
  return taken_error.c_str();
}

void report(std::string const& msg) {
  last_error = msg;
  if (ILogger* logger = logger_finder ? logger_finder->findLogger() : nullptr)
    logger->log(ILogger::Severity::kERROR, msg.c_str());
}

bool parse_fields(Schema const& schema, PluginFieldCollection const* fc, std::vector<int32_t>& values) {
  auto const& specs = schema.fields;
  std::vector<bool> seen(specs.size(), false);
  values.assign(specs.size(), 0);
  auto fail = [&](std::string const& msg) {
    report(std::string(schema.plugin) + ": " + msg);
    return false;
  };
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    std::string const name = f.name ? f.name : "";
    size_t s = 0;
    while (s < specs.size() && name != specs[s].name) ++s;
    if (s == specs.size()) return fail("unknown field `" + name + "`");
    if (seen[s]) return fail("field `" + name + "` given twice");
    if (f.length != 1 || !f.data) return fail("field `" + name + "` must be one scalar, got length " +
                                              std::to_string(f.length));
    int64_t v;
    if (f.type == PluginFieldType::kINT32) v = *static_cast<int32_t const*>(f.data);
    else if (f.type == PluginFieldType::kINT64) v = *static_cast<int64_t const*>(f.data);
    else return fail("field `" + name + "` must be an int32 (or int64) scalar");
    if (v < specs[s].min || v > specs[s].max)
      return fail("field `" + name + "` = " + std::to_string(v) + " is out of range [" + std::to_string(specs[s].min) +
                  ", " + std::to_string(specs[s].max) + "]");
    values[s] = static_cast<int32_t>(v);
    seen[s] = true;
  }
  for (size_t s = 0; s < specs.size(); ++s)
    if (!seen[s]) return fail("field `" + std::string(specs[s].name) + "` is missing");
  return true;
}

IPluginCapability* Plugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

PluginFieldCollection const* Plugin::getFieldsToSerialize() noexcept {
  serialized_.clear();
  for (size_t i = 0; i < values_.size(); ++i)
    serialized_.emplace_back(schema_.fields[i].name, &values_[i], PluginFieldType::kINT32, 1);
  collection_ = {static_cast<int32_t>(serialized_.size()), serialized_.data()};
  return &collection_;
}

int32_t Plugin::fail(std::string const& msg) const {
  report(std::string(schema_.plugin) + ": " + msg);
  return -1;
}

}  // namespace fastkv_trt
