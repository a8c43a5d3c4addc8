// Helpers shared by the engine._C bindings (bindings.cpp) and its test-only submodule engine._C.testing (testing.cpp).
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <string>

#include "qaengine/config.h"

namespace qaengine::python {

/// "auto", "dnnl", "onednn" or "aten" -> GemmBackend; throws qaengine::Error naming the choices otherwise.
GemmBackend parse_gemm(const std::string& gemm);

/// Registers engine._C.testing: single kernels and layers of the engine, for tests and benchmarks only.
void bind_testing(pybind11::module_& m);

}  // namespace qaengine::python
