// Element kernels around the reduced-precision GEMMs (int8, bf16) of the CPU path, compiled once per ISA like
// kernels.h and picked at run time. docs/PRECISION.md has the schemes; the GEMMs themselves are oneDNN's (linear.cpp).
//
// int8 activations go to oneDNN's u8 x s8 GEMM as q + 128 (zero point 128), q in [-127, 127] (engine/quant.py).
// Rounding is to nearest, ties to even, as torch.round; every function works on dense row-major rows with the given
// leading dimension, single-threaded, no alignment required.
#pragma once

#include <cstdint>
#include <optional>

#include "kernels.h"

namespace qaengine::cpu {

/// One ISA's single-threaded quantization and epilogue kernels.
struct QuantKernels {
  Isa isa;
  const char* name;
  /// Dynamic per-token int8: for each row r, a = max(max_k |x[r, k]|, 1e-30), out[r, k] = round(x[r, k] · (127 / a))
  /// + 128 as uint8 and scale[r] = a / 127 (the row's step s_x).
  void (*quantize_per_token)(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* out, int64_t ldo,
                             float* scale);
  /// Static int8: out[r, k] = clamp(round(x[r, k] · inv_scale[k]), -127, 127) + 128 as uint8.
  void (*quantize_static)(const float* x, int64_t ldx, int64_t rows, int64_t cols, const float* inv_scale, uint8_t* out,
                          int64_t ldo);
  /// In place y[r, c] = act(y[r, c] · row_scale[r] + bias[c]); `row_scale` and `bias` may be null (1 and 0), `act`
  /// empty (the identity).
  void (*epilogue)(float* y, int64_t ld, const float* row_scale, const float* bias, int64_t rows, int64_t cols,
                   std::optional<Activation> act);
  /// out[r, c] = act(float(in[r, c])) for bf16 `in` (raw bits); the widening is exact.
  void (*widen_bf16)(const uint16_t* in, int64_t ldi, float* out, int64_t ldo, int64_t rows, int64_t cols,
                     std::optional<Activation> act);
};

const QuantKernels& quant_kernels_base();
const QuantKernels& quant_kernels_avx2();
const QuantKernels& quant_kernels_avx512();

/// The fastest table this CPU runs.
const QuantKernels& best_quant_kernels();
/// Tables this CPU runs, best last (tests).
std::vector<const QuantKernels*> available_quant_kernels();

}  // namespace qaengine::cpu
