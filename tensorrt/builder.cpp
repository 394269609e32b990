// See builder.h. Both libraries are opened by path (loader.h); their factory functions are looked up by name.
#include "fastkv/tensorrt/builder.h"

#include <NvInfer.h>
#include <NvOnnxParser.h>

#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fastkv/src/trt/bridge.rs.h"
#include "fastkv/tensorrt/loader.h"

namespace fastkv::trt {

using namespace nvinfer1;

int32_t library_version(rust::Str nvinfer) {
  std::string const path = str(nvinfer);
  return symbol<int32_t (*)()>(open_library(path), "getInferLibVersion", path)();
}

void build_plan(PlanRequest const& request) {
  std::string const nvinfer = str(request.nvinfer), parser_lib = str(request.onnx_parser);
  void* infer = open_library(nvinfer);
  checked_version(infer, nvinfer);
  auto create_builder = symbol<void* (*)(void*, int32_t)>(infer, "createInferBuilder_INTERNAL", nvinfer);
  auto create_parser =
      symbol<void* (*)(void*, void*, int)>(open_library(parser_lib), "createNvOnnxParser_INTERNAL", parser_lib);

  Logger logger;
  auto fail = [&](std::string const& what) { logger.fail(what); };
  std::unique_ptr<IBuilder> builder(static_cast<IBuilder*>(create_builder(&logger, NV_TENSORRT_VERSION)));
  if (!builder) fail("createInferBuilder failed");
  std::string const plugins = str(request.plugins);
  if (!builder->getPluginRegistry().loadLibrary(plugins.c_str())) fail("TensorRT did not load " + plugins);
  // Strongly typed: the graph's own Casts fix every precision (TensorRT 11 types every network so and ignores
  // the flag; 10 needs it).
  auto const flags = 1U << static_cast<uint32_t>(NetworkDefinitionCreationFlag::kSTRONGLY_TYPED);
  std::unique_ptr<INetworkDefinition> network(builder->createNetworkV2(flags));
  if (!network) fail("createNetworkV2 failed");
  std::unique_ptr<nvonnxparser::IParser> parser(
      static_cast<nvonnxparser::IParser*>(create_parser(network.get(), &logger, NV_ONNX_PARSER_VERSION)));
  if (!parser) fail("createNvOnnxParser failed");
  std::string const onnx = str(request.onnx);
  if (!parser->parseFromFile(onnx.c_str(), static_cast<int>(ILogger::Severity::kERROR))) {
    std::string errors;
    for (int i = 0; i < parser->getNbErrors(); ++i) {
      auto const* e = parser->getError(i);
      errors += std::string(errors.empty() ? "" : "; ") + "node " + std::to_string(e->node()) + " (" +
                e->nodeName() + "): " + e->desc();
    }
    fail("TensorRT's ONNX parser rejected " + onnx + ": " + errors);
  }
  std::unique_ptr<IBuilderConfig> config(builder->createBuilderConfig());
  if (!config) fail("createBuilderConfig failed");
  IOptimizationProfile* profile = builder->createOptimizationProfile();  // owned by the builder
  for (ProfileInput const& in : request.profile) {
    std::string const name = str(in.name);
    bool const ok = profile->setDimensions(name.c_str(), OptProfileSelector::kMIN, to_dims(in.min, name)) &&
                    profile->setDimensions(name.c_str(), OptProfileSelector::kOPT, to_dims(in.opt, name)) &&
                    profile->setDimensions(name.c_str(), OptProfileSelector::kMAX, to_dims(in.max, name));
    if (!ok) fail("the optimisation profile of input " + name + " was refused");
  }
  if (config->addOptimizationProfile(profile) < 0) fail("addOptimizationProfile failed");
  std::unique_ptr<IHostMemory> plan(builder->buildSerializedNetwork(*network, *config));
  if (!plan || plan->size() == 0) fail("TensorRT could not build " + onnx);
  std::string const output = str(request.output);
  std::ofstream out(output, std::ios::binary);
  out.write(static_cast<char const*>(plan->data()), static_cast<std::streamsize>(plan->size()));
  if (!out.flush()) throw std::runtime_error("cannot write " + output);
}

}  // namespace fastkv::trt
