// fp32 GEMMs through oneDNN's own C++ API (libdnnl), when the build found it (QAENGINE_HAVE_DNNL).
//
// Why not only the ATen route (linear.cpp, mkldnn::_linear_pointwise): every call through the dispatcher builds an
// IValue stack, looks the primitive up by hashing its descriptors and returns a freshly allocated tensor; at batch
// 1 that is about 10 us on GEMMs of 40-250 us, four per layer and row chunk, plus the copy of the result into the
// encoder's buffers. Here a Linear keeps its weights in the blocked layout oneDNN's brgemm matmul picks, one
// primitive per row count (created once, looked up in a short list), and writes into caller memory: the QKV
// projection straight into the encoder's QKV buffer, and the output projections added onto the residual stream by
// a `sum` post-op (x += h Wᵀ + b), so LayerNorm runs in place.
//
// Numerics are those of the ATen route: fp32 with fp32 accumulation, the bias added to the product, then the
// activation (exact or tanh GELU, ReLU) as an eltwise post-op, then (accumulate) the old destination added.
//
// Threads. Primitives are created and run with the OpenMP thread count of the caller, which cpu::run_items sets to
// 1 inside its items; scratchpads are per calling thread, so one DnnlGemm serves all pool threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "qaengine/config.h"

namespace qaengine {

/// Whether libqaengine was built with libdnnl (CMake found oneDNN's package; see docs/BUILD.md).
bool dnnl_available();

class DnnlGemm {
 public:
  /// `weight` `[out, in]` row-major and `bias` `[out]` (fp32, copied); `act` fused as a post-op.
  DnnlGemm(const float* weight, const float* bias, int64_t out, int64_t in, std::optional<Activation> act);
  ~DnnlGemm();
  DnnlGemm(const DnnlGemm&) = delete;
  DnnlGemm& operator=(const DnnlGemm&) = delete;

  /// y[r, :] = act(x[r, :] Wᵀ + b) (+ y[r, :] when `accumulate`) for rows [0, rows); `x` `[rows, in]` and `y`
  /// `[rows, out]` contiguous row-major, not overlapping.
  void run(const float* x, int64_t rows, float* y, bool accumulate) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qaengine
