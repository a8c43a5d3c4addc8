// Linear layers y = x Wᵀ + b (+ activation) through ATen.
//
// CPU: oneDNN's inner product with weights prepacked at load, bias and activation fused as post-ops
// (mkldnn::_linear_pointwise, the op torch.compile's CPU backend emits). On this project's AMD CPUs it runs about
// 2x faster than at::addmm, whose MKL takes AVX2 paths on non-Intel CPUs. Where torch was built without oneDNN, or
// when asked, at::addmm plus the fused activation kernel. CUDA: at::addmm (cuBLAS) plus ATen activations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <optional>

#include "cpu/kernels.h"
#include "qaengine/config.h"

namespace qaengine {

/// Whether this torch build registers the oneDNN ops the OneDnn backend needs.
bool onednn_available();

class Linear {
 public:
  Linear() = default;
  /// `weight` `[out, in]`, `bias` `[out]`, fp32 on the CPU; moved to `device` (prepacked for oneDNN).
  Linear(const at::Tensor& weight, const at::Tensor& bias, std::optional<cpu::Act> act, GemmBackend backend,
         c10::Device device);

  /// `x` `[T, in]` contiguous fp32 -> `[T, out]`.
  at::Tensor operator()(const at::Tensor& x) const;

  int64_t out_features() const { return out_; }
  GemmBackend backend() const { return backend_; }

 private:
  GemmBackend backend_ = GemmBackend::Aten;
  std::optional<cpu::Act> act_;
  at::Tensor weight_;  // oneDNN: prepacked (mkldnn layout); ATen: Wᵀ `[in, out]` contiguous
  at::Tensor bias_;
  int64_t out_ = 0;
};

}  // namespace qaengine
