// Linear layers y = x Wᵀ + b (+ activation) in one of four precisions (docs/PRECISION.md). A Linear is a value
// handle on an immutable LinearImpl; linear.cpp has one implementation per precision (for fp32, per GEMM back end),
// each holding only what it computes with, and Linear's factories (the fp32 constructor, Linear::bf16, Linear::int8)
// pick one.
//
// Float32. CPU: oneDNN's matmul with weights prepacked at load, bias and activation fused as post-ops: called
// directly through libdnnl (GemmBackend::OneDnnDirect, dnnl_gemm.h: no dispatcher, output written in place), or
// through torch's mkldnn::_linear_pointwise (GemmBackend::TorchOneDnn, the op torch.compile's CPU backend emits). On
// this project's AMD CPUs it runs about 2x faster than at::addmm, whose MKL takes AVX2 paths on non-Intel CPUs.
// Where torch was built without oneDNN, or when asked (GemmBackend::Aten), at::addmm plus the fused activation
// kernel. CUDA: at::addmm (cuBLAS) plus ATen activations.
//
// BFloat16 (CPU). bf16 weight and bias; the fp32 input is rounded to bf16, oneDNN multiplies with fp32 accumulation
// and rounds the output to bf16, which one fused pass widens to fp32 (applying the activation in fp32), exactly as
// engine.quant.BF16Linear. With GemmBackend::Aten the GEMM is at::addmm in bf16. An empty weight gives an fp32 one.
//
// Int8Dynamic / Int8Static (CPU): the int8 kernels of docs/ARTIFACT.md. The input is quantized to uint8 q + 128 by
// a vectorised kernel (cpu/quant.h), multiplied with the prepacked int8 weight by oneDNN's u8 x s8 GEMM
// (onednn::qlinear_pointwise, int32 accumulation, fp32 output · s_w), then one fused pass applies the per-token scale,
// the bias and the activation (dynamic), or the activation alone (static: oneDNN adds the bias). The numerics are
// engine.quant.Int8LinearDynamic / Int8LinearStatic.
//
// Every call runs single-threaded when the caller is inside a cpu::run_items item (encoder_cpu.cpp). The encoder calls
// run_into(), which writes fp32 `[T, out]` rows (bias and activation applied, optionally accumulated) into the
// caller's buffers: in place through libdnnl, else through operator() (a new tensor) and a copy or add.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qaengine/config.h"

namespace qaengine {

/// Whether this torch build registers the oneDNN ops the TorchOneDnn backend needs.
bool onednn_available();
/// Whether oneDNN can run bf16 GEMMs here (the torch build and this CPU); probed once with a tiny GEMM.
bool onednn_bf16_available();
/// Whether this torch build registers oneDNN's int8 linear (onednn::qlinear_prepack / qlinear_pointwise) and it
/// runs; probed once with a tiny GEMM.
bool onednn_int8_available();
/// Artifact kernels (docs/ARTIFACT.md "Kernels") libqaengine runs on `device`: int8_gemm_per_token and
/// int8_gemm_static on the CPU when onednn_int8_available(); none on CUDA.
std::vector<std::string> supported_kernels(c10::Device device);

enum class LinearPrecision { Float32, BFloat16, Int8Dynamic, Int8Static };

/// One Linear's weights and kernels, in one precision (and, for fp32, one GEMM back end); immutable once built. The
/// implementations live in linear.cpp; Linear's factories pick one.
class LinearImpl {
 public:
  LinearImpl(int64_t out, int64_t in, std::optional<Activation> act) : out_(out), in_(in), act_(act) {}
  virtual ~LinearImpl() = default;
  LinearImpl(const LinearImpl&) = delete;
  LinearImpl& operator=(const LinearImpl&) = delete;

  /// `x` `[T, in]` contiguous fp32 -> fp32 `[T, out]`.
  virtual at::Tensor operator()(const at::Tensor& x) const = 0;
  /// Linear::run_into; by default operator() and a copy or add of its result.
  virtual void run_into(const float* x, int64_t rows, float* y, bool accumulate) const;
  /// Whether run_into() writes caller memory directly.
  virtual bool writes_in_place() const { return false; }
  virtual LinearPrecision precision() const = 0;
  virtual GemmBackend backend() const = 0;
  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }

 protected:
  const int64_t out_, in_;
  const std::optional<Activation> act_;  // applied after the bias; empty: none
};

/// A Linear of any precision: a cheap, copyable handle on an immutable LinearImpl. Default-constructed it is unset
/// (the Linears of a layer with 0 heads or 0 FFN units): its sizes are 0 and calling it throws.
class Linear {
 public:
  Linear() = default;
  /// fp32: `weight` `[out, in]`, `bias` `[out]`, fp32 on the CPU; moved to `device` (prepacked for oneDNN).
  Linear(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act, GemmBackend backend,
         c10::Device device);

  /// bf16 compute on the CPU: `weight` and `bias` (fp32 holding bf16 values, or any float: rounded to bf16).
  /// Throws when this torch build or CPU cannot run oneDNN bf16 GEMMs (unless `backend` is Aten).
  static Linear bf16(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act,
                     GemmBackend backend);
  /// int8 on the CPU: `qweight` int8 `[out, in]` in [-127, 127], `weight_scale` fp32 `[out]`, `bias` fp32 `[out]`;
  /// `input_scale` fp32 `[in]` selects static activation scales, undefined means dynamic per-token scales.
  static Linear int8(const at::Tensor& qweight, const at::Tensor& weight_scale, const at::Tensor& bias,
                     const at::Tensor& input_scale, std::optional<Activation> act);

  /// `x` `[T, in]` contiguous fp32 -> fp32 `[T, out]`.
  at::Tensor operator()(const at::Tensor& x) const { return impl()(x); }

  /// Whether run_into() writes caller memory directly (fp32 through libdnnl, GemmBackend::OneDnnDirect); otherwise it
  /// runs operator() and copies or adds the result.
  bool writes_in_place() const { return impl_ && impl_->writes_in_place(); }
  /// y = act(x Wᵀ + b) (+ y when `accumulate`) for `rows` contiguous rows of fp32 CPU memory (`x` `[rows, in]`,
  /// `y` `[rows, out]`), any precision and backend.
  void run_into(const float* x, int64_t rows, float* y, bool accumulate) const {
    impl().run_into(x, rows, y, accumulate);
  }

  int64_t out_features() const { return impl_ ? impl_->out_features() : 0; }
  int64_t in_features() const { return impl_ ? impl_->in_features() : 0; }
  GemmBackend backend() const { return impl_ ? impl_->backend() : GemmBackend::Aten; }
  LinearPrecision precision() const { return impl_ ? impl_->precision() : LinearPrecision::Float32; }

 private:
  explicit Linear(std::shared_ptr<const LinearImpl> impl) : impl_(std::move(impl)) {}
  const LinearImpl& impl() const;  // throws when unset

  std::shared_ptr<const LinearImpl> impl_;
};

}  // namespace qaengine
