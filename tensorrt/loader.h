// What the builder (builder.cpp) and the runner (runtime.cpp) share: opening a TensorRT library by path, looking up
// its factory functions, and a logger that keeps TensorRT's errors for the exception message. Nothing here links
// against TensorRT; the libraries stay loaded (TensorRT keeps process-wide state).
#pragma once

#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "rust/cxx.h"

namespace fastkv::trt {

inline std::string str(rust::Str s) { return std::string(s.data(), s.size()); }

inline void* open_library(std::string const& path) {
  // RTLD_GLOBAL: libnvonnxparser's dependency on libnvinfer.so.N resolves to the copy opened here by path.
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    char const* e = dlerror();
    throw std::runtime_error("cannot open " + path + ": " + (e ? e : "unknown dlopen error"));
  }
  return lib;
}

template <typename F>
F symbol(void* lib, char const* name, std::string const& path) {
  auto f = reinterpret_cast<F>(dlsym(lib, name));
  if (!f) throw std::runtime_error(path + " has no " + name + ": is it TensorRT 10 or 11?");
  return f;
}

// The library's TensorRT version code (major·10000 + minor·100 + patch); refuses a major other than the headers'.
inline int32_t checked_version(void* lib, std::string const& path) {
  int32_t const version = symbol<int32_t (*)()>(lib, "getInferLibVersion", path)();
  if (version / 10000 != NV_TENSORRT_MAJOR)
    throw std::runtime_error(path + " is TensorRT " + std::to_string(version / 10000) +
                             ", this fastkv was compiled against TensorRT " + std::to_string(NV_TENSORRT_MAJOR) +
                             " headers: rebuild fastkv with TENSORRT_ROOT set to that TensorRT's SDK");
  return version;
}

// `v` (a rust::Vec or rust::Slice of extents) as TensorRT's Dims; `name` is the tensor's, for the error.
template <typename V>
nvinfer1::Dims to_dims(V const& v, std::string const& name) {
  if (v.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
    throw std::invalid_argument(name + " has more than 8 dims");
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

// Keeps TensorRT's errors for the exception message; warnings and below are not shown. One runtime's contexts may
// log from several threads.
class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity > Severity::kERROR) return;
    std::lock_guard<std::mutex> lock(mutex_);
    errors_ += (errors_.empty() ? "" : "; ") + std::string(msg);
  }
  std::string take() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(errors_, {});
  }

  // Throws `what`, with the errors TensorRT logged since the last throw.
  [[noreturn]] void fail(std::string const& what) {
    std::string const why = take();
    throw std::runtime_error(what + (why.empty() ? "" : ": " + why));
  }

 private:
  std::mutex mutex_;
  std::string errors_;
};

}  // namespace fastkv::trt
