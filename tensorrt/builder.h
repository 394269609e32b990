// TensorRT's builder from Rust (src/trt/build.rs drives it): opens libnvinfer and libnvonnxparser by path, parses an
// exported ONNX graph whose FastKV nodes resolve to the plugins of a plugin library, sets one optimisation profile
// and writes the serialised plan. Every failure is a C++ exception that cxx turns into a Rust Err.
#pragma once

#include <cstdint>

#include "rust/cxx.h"

namespace fastkv::trt {

struct PlanRequest;

// The library's TensorRT version (getInferLibVersion: major·10000 + minor·100 + patch).
int32_t library_version(rust::Str nvinfer);

// Builds `request.onnx` into a plan written to `request.output`.
void build_plan(PlanRequest const& request);

}  // namespace fastkv::trt
