// TensorRT's runtime from Rust (src/trt/runner.rs drives it): opens libnvinfer by path, loads fastkv's plugin library,
// deserialises plans and runs them. Device memory and streams are the caller's (cudarc's, on the same primary
// context): a context is told each tensor's address and enqueued on a stream, so the caller can capture the enqueue
// in a CUDA graph. Every failure is a C++ exception that cxx turns into a Rust Err.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <memory>

#include "fastkv/tensorrt/loader.h"
#include "rust/cxx.h"

namespace fastkv::trt {

struct IoTensor;
class Plan;
class Context;

// One IRuntime with the plugin library loaded into its registry; outlives the plans it deserialises.
class Runtime {
 public:
  Runtime(std::string nvinfer, std::string const& plugins);
  int32_t version() const { return version_; }
  std::unique_ptr<Plan> deserialize(rust::Slice<uint8_t const> plan) const;

 private:
  std::string path_;
  int32_t version_;
  std::unique_ptr<Logger> logger_;  // before runtime_: destroyed after it
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
};

std::unique_ptr<Runtime> open_runtime(rust::Str nvinfer, rust::Str plugins);

// One deserialised plan (ICudaEngine); outlives its contexts.
class Plan {
 public:
  Plan(nvinfer1::ICudaEngine* engine, Logger* logger) : engine_(engine), logger_(logger) {}
  rust::Vec<IoTensor> tensors() const;
  std::unique_ptr<Context> context() const;

 private:
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  Logger* logger_;
};

// One execution context: its own activation memory; used by one thread at a time.
class Context {
 public:
  Context(nvinfer1::IExecutionContext* context, Logger* logger) : context_(context), logger_(logger) {}
  void set_input_shape(rust::Str name, rust::Slice<int64_t const> dims);
  rust::Vec<int64_t> shape(rust::Str name) const;
  void set_address(rust::Str name, uint64_t address);
  void enqueue(uint64_t stream);

 private:
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  Logger* logger_;
};

}  // namespace fastkv::trt
