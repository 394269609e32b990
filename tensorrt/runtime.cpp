// See runtime.h.
#include "fastkv/tensorrt/runtime.h"

#include <string>
#include <utility>

#include "fastkv/src/trt/bridge.rs.h"

namespace fastkv::trt {

using namespace nvinfer1;

Runtime::Runtime(std::string nvinfer, std::string const& plugins)
    : path_(std::move(nvinfer)), logger_(std::make_unique<Logger>()) {
  void* lib = open_library(path_);
  version_ = checked_version(lib, path_);
  auto create = symbol<void* (*)(void*, int32_t)>(lib, "createInferRuntime_INTERNAL", path_);
  void* runtime = create(logger_.get(), NV_TENSORRT_VERSION);
  // A failure is logged, and its pointer is not always null (the lean runtime's without a CUDA driver is not).
  std::string const errors = logger_->take();
  if (!runtime || !errors.empty())
    throw std::runtime_error("createInferRuntime failed (" + path_ + ")" + (errors.empty() ? "" : ": " + errors));
  runtime_.reset(static_cast<IRuntime*>(runtime));
  // The library's process-wide registry (the one deserialisation looks plugins up in; the lean runtime has no other).
  IPluginRegistry* registry = symbol<IPluginRegistry* (*)()>(lib, "getPluginRegistry", path_)();
  if (!registry || !registry->loadLibrary(plugins.c_str()))
    logger_->fail("TensorRT did not load the plugin library " + plugins);
}

std::unique_ptr<Runtime> open_runtime(rust::Str nvinfer, rust::Str plugins) {
  return std::make_unique<Runtime>(str(nvinfer), str(plugins));
}

std::unique_ptr<Plan> Runtime::deserialize(rust::Slice<uint8_t const> plan) const {
  ICudaEngine* engine = runtime_->deserializeCudaEngine(plan.data(), plan.size());
  if (!engine) logger_->fail("TensorRT could not deserialise the plan");
  return std::make_unique<Plan>(engine, logger_.get());
}

rust::Vec<IoTensor> Plan::tensors() const {
  rust::Vec<IoTensor> out;
  for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
    char const* name = engine_->getIOTensorName(i);
    IoTensor t;
    t.name = rust::String(name);
    t.input = engine_->getTensorIOMode(name) == TensorIOMode::kINPUT;
    t.ty = static_cast<int32_t>(engine_->getTensorDataType(name));
    Dims const d = engine_->getTensorShape(name);
    for (int32_t k = 0; k < d.nbDims; ++k) t.dims.push_back(d.d[k]);
    out.push_back(std::move(t));
  }
  return out;
}

std::unique_ptr<Context> Plan::context() const {
  IExecutionContext* context = engine_->createExecutionContext();
  if (!context) logger_->fail("createExecutionContext failed (out of device memory?)");
  return std::make_unique<Context>(context, logger_);
}

void Context::set_input_shape(rust::Str name, rust::Slice<int64_t const> dims) {
  std::string const n = str(name);
  if (!context_->setInputShape(n.c_str(), to_dims(dims, n))) logger_->fail("input " + n + "'s shape was refused");
}

rust::Vec<int64_t> Context::shape(rust::Str name) const {
  std::string const n = str(name);
  Dims const d = context_->getTensorShape(n.c_str());
  if (d.nbDims < 0) logger_->fail("the plan has no tensor " + n);
  rust::Vec<int64_t> out;
  for (int32_t k = 0; k < d.nbDims; ++k) out.push_back(d.d[k]);
  return out;
}

void Context::set_address(rust::Str name, uint64_t address) {
  std::string const n = str(name);
  if (!context_->setTensorAddress(n.c_str(), reinterpret_cast<void*>(address)))
    logger_->fail("tensor " + n + "'s address was refused");
}

void Context::enqueue(uint64_t stream) {
  if (!context_->enqueueV3(reinterpret_cast<cudaStream_t>(stream))) logger_->fail("enqueueV3 failed");
}

}  // namespace fastkv::trt
