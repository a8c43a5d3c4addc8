#include "linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/quant.h"
#include "dnnl_gemm.h"
#include "qaengine/error.h"

namespace qaengine {
namespace {

constexpr int64_t kZeroPoint = 128;  // uint8 activation = int8 q + 128 (engine/quant.py _ZERO_POINT)

std::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  auto op = c10::Dispatcher::singleton().findSchema({name, overload});
  if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
  return op;
}

const std::optional<c10::OperatorHandle>& linear_op() {
  static const auto op = find_op("mkldnn::_linear_pointwise", "");
  return op;
}

const std::optional<c10::OperatorHandle>& reorder_op() {
  static const auto op = find_op("mkldnn::_reorder_linear_weight", "");
  return op;
}

const std::optional<c10::OperatorHandle>& qlinear_op() {
  static const auto op = find_op("onednn::qlinear_pointwise", "");
  return op;
}

const std::optional<c10::OperatorHandle>& qprepack_op() {
  static const auto op = find_op("onednn::qlinear_prepack", "");
  return op;
}

at::Tensor reorder_weight(const at::Tensor& weight) {
  torch::jit::Stack stack{weight.contiguous(), c10::IValue()};
  reorder_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

// mkldnn::_linear_pointwise(X, W, B, attr, scalars, algorithm)
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, std::string attr,
                         std::optional<std::string> algorithm) {
  torch::jit::Stack stack{x,
                          packed,
                          bias.defined() ? c10::IValue(bias) : c10::IValue(),
                          std::move(attr),
                          c10::List<std::optional<at::Scalar>>(),
                          algorithm ? c10::IValue(*algorithm) : c10::IValue()};
  linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor int8_prepack(const at::Tensor& qweight) {
  torch::jit::Stack stack{qweight.contiguous(), c10::IValue()};
  qprepack_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

// onednn::qlinear_pointwise on uint8 q + 128 `[T, in]` -> fp32 `[T, out]` = (q Qᵀ) · s_w (+ bias).
at::Tensor int8_gemm(const at::Tensor& xu8, const at::Tensor& packed, const at::Tensor& w_scale,
                     const at::Tensor& w_zero_point, const at::Tensor& bias) {
  torch::jit::Stack stack{xu8,
                          1.0,
                          kZeroPoint,
                          packed,
                          w_scale,
                          w_zero_point,
                          bias.defined() ? c10::IValue(bias) : c10::IValue(),
                          1.0,
                          int64_t{0},
                          c10::IValue(at::kFloat),
                          std::string("none"),
                          c10::List<std::optional<at::Scalar>>(),
                          std::string("")};
  qlinear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

bool onednn_available() {
  return linear_op().has_value() && reorder_op().has_value();
}

bool onednn_bf16_available() {
  // oneDNN refuses bf16 on CPUs without the needed ISA (it throws), so a tiny GEMM tells.
  static const bool ok = [] {
    if (!onednn_available()) return false;
    try {
      const at::Tensor w = at::full({2, 4}, 1.0, at::TensorOptions().dtype(at::kBFloat16));
      const at::Tensor x = at::full({1, 4}, 0.5, at::TensorOptions().dtype(at::kBFloat16));
      const at::Tensor y = onednn_linear(x, reorder_weight(w), at::Tensor(), "none", std::nullopt).contiguous();
      return y.scalar_type() == at::kBFloat16 && y.numel() == 2 &&
             static_cast<float>(y.data_ptr<at::BFloat16>()[1]) == 2.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

bool onednn_int8_available() {
  static const bool ok = [] {
    if (!qlinear_op() || !qprepack_op()) return false;
    try {
      const at::Tensor q = at::full({2, 4}, 3, at::TensorOptions().dtype(at::kChar));
      const at::Tensor xu8 = at::full({1, 4}, kZeroPoint - 2, at::TensorOptions().dtype(at::kByte));  // q = -2
      const at::Tensor y =
          int8_gemm(xu8, int8_prepack(q), at::full({2}, 0.5, at::kFloat), at::zeros({2}, at::kLong), at::Tensor())
              .contiguous();
      return y.scalar_type() == at::kFloat && y.numel() == 2 && y.data_ptr<float>()[1] == -12.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

std::vector<std::string> supported_kernels(c10::Device device) {
  if (device.is_cpu() && onednn_int8_available()) return {"int8_gemm_per_token", "int8_gemm_static"};
  return {};
}

namespace {

// fp32 through libdnnl (GemmBackend::OneDnnDirect); the weights live prepacked inside the DnnlGemm.
class Float32Dnnl final : public LinearImpl {
 public:
  Float32Dnnl(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act)
      : LinearImpl(weight.size(0), weight.size(1), act) {
    const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
    gemm_ = std::make_unique<const DnnlGemm>(w.data_ptr<float>(), b.data_ptr<float>(), out_, in_, act);
  }
  at::Tensor operator()(const at::Tensor& x) const override {
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({xc.size(0), out_}, at::kFloat);
    gemm_->run(xc.data_ptr<float>(), xc.size(0), y.data_ptr<float>(), false);
    return y;
  }
  void run_into(const float* x, int64_t rows, float* y, bool accumulate) const override {
    gemm_->run(x, rows, y, accumulate);
  }
  bool writes_in_place() const override { return true; }
  LinearPrecision precision() const override { return LinearPrecision::Float32; }
  GemmBackend backend() const override { return GemmBackend::OneDnnDirect; }

 private:
  std::unique_ptr<const DnnlGemm> gemm_;
};

// fp32 through torch's oneDNN op (GemmBackend::TorchOneDnn), bias and activation fused.
class Float32TorchOneDnn final : public LinearImpl {
 public:
  Float32TorchOneDnn(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act)
      : LinearImpl(weight.size(0), weight.size(1), act), weight_(reorder_weight(weight)), bias_(bias.contiguous()) {}
  at::Tensor operator()(const at::Tensor& x) const override {
    std::string attr = "none";
    std::optional<std::string> algorithm;
    if (act_) {
      switch (*act_) {
        case Activation::Gelu:
          attr = "gelu";
          algorithm = "none";
          break;
        case Activation::GeluTanh:
          attr = "gelu";
          algorithm = "tanh";
          break;
        case Activation::Relu: attr = "relu"; break;
      }
    }
    return onednn_linear(x, weight_, bias_, attr, algorithm);
  }
  LinearPrecision precision() const override { return LinearPrecision::Float32; }
  GemmBackend backend() const override { return GemmBackend::TorchOneDnn; }

 private:
  at::Tensor weight_;  // prepacked
  at::Tensor bias_;    // [out]
};

// fp32 through at::addmm (GemmBackend::Aten; CUDA, and weights with nothing to multiply), then the activation.
class Float32Aten final : public LinearImpl {
 public:
  Float32Aten(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act, c10::Device device)
      : LinearImpl(weight.size(0), weight.size(1), act),
        bias_(bias.contiguous().to(device)),
        weight_t_(weight.t().contiguous().to(device)) {}
  at::Tensor operator()(const at::Tensor& x) const override {
    at::Tensor y = at::addmm(bias_, x, weight_t_);
    if (act_) {
      if (y.device().is_cpu()) {
        cpu::bias_act(y.data_ptr<float>(), out_, nullptr, y.size(0), out_, *act_, cpu::best_kernels());
      } else if (*act_ == Activation::Relu) {
        y = at::relu(y);
      } else {
        y = at::gelu(y, *act_ == Activation::Gelu ? "none" : "tanh");
      }
    }
    return y;
  }
  LinearPrecision precision() const override { return LinearPrecision::Float32; }
  GemmBackend backend() const override { return GemmBackend::Aten; }

 private:
  at::Tensor bias_;      // [out]
  at::Tensor weight_t_;  // Wᵀ [in, out]
};

// bf16 GEMM (torch's oneDNN op, or at::addmm for GemmBackend::Aten), widened to fp32 with the activation.
class BFloat16Linear final : public LinearImpl {
 public:
  BFloat16Linear(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act, GemmBackend backend)
      : LinearImpl(weight.size(0), weight.size(1), act), backend_(backend), bias_(bias.to(at::kBFloat16).contiguous()) {
    const at::Tensor w = weight.to(at::kBFloat16).contiguous();
    weight_ = backend == GemmBackend::TorchOneDnn ? reorder_weight(w) : w.t().contiguous();
  }
  at::Tensor operator()(const at::Tensor& x) const override {
    const int64_t n = x.size(0);
    if (n == 0) return at::empty({0, out_}, at::kFloat);
    const at::Tensor xb = x.to(at::kBFloat16);  // round to nearest even, as torch's .to(bfloat16)
    at::Tensor yb = backend_ == GemmBackend::TorchOneDnn ? onednn_linear(xb, weight_, bias_, "none", std::nullopt)
                                                         : at::addmm(bias_, xb, weight_);
    yb = yb.contiguous();
    at::Tensor y = at::empty({n, out_}, at::kFloat);
    cpu::best_quant_kernels().widen_bf16(reinterpret_cast<const uint16_t*>(yb.data_ptr<at::BFloat16>()), out_,
                                         y.data_ptr<float>(), out_, n, out_, act_);
    return y;
  }
  LinearPrecision precision() const override { return LinearPrecision::BFloat16; }
  GemmBackend backend() const override { return backend_; }

 private:
  GemmBackend backend_;  // TorchOneDnn or Aten
  at::Tensor bias_;      // bf16 [out]
  at::Tensor weight_;    // bf16: prepacked (TorchOneDnn), Wᵀ [in, out] (Aten)
};

// What the two int8 schemes share: the prepacked weight, its scales and the fp32 bias; subclasses quantize the input
// and finish the GEMM's output.
class Int8Linear : public LinearImpl {
 public:
  Int8Linear(const at::Tensor& qweight, const at::Tensor& weight_scale, const at::Tensor& bias,
             std::optional<Activation> act)
      : LinearImpl(qweight.size(0), qweight.size(1), act),
        bias_(bias.to(at::kFloat).contiguous()),
        weight_scale_(weight_scale.to(at::kFloat).contiguous()),
        weight_zero_point_(at::zeros({out_}, at::kLong)) {
    if (out_ > 0 && in_ > 0) {
      if (!onednn_int8_available()) {
        throw Error(
            "this torch build has no working oneDNN int8 linear (onednn::qlinear_pointwise), so libqaengine cannot "
            "run the int8 kernels (int8_gemm_per_token, int8_gemm_static); use a torch with mkldnn enabled");
      }
      weight_ = int8_prepack(qweight.to(at::kChar));
    }
  }
  at::Tensor operator()(const at::Tensor& x) const final {
    const int64_t n = x.size(0);
    if (n == 0 || out_ == 0) return at::empty({n, out_}, at::kFloat);
    if (in_ == 0) return bias_only(n);  // an empty sum: y = act(b)
    at::Tensor xu8 = at::empty({n, in_}, at::kByte);
    return quantized(x.contiguous(), xu8, cpu::best_quant_kernels());
  }
  GemmBackend backend() const override { return GemmBackend::TorchOneDnn; }

 protected:
  // act(x Wᵀ + b) for a contiguous `x` `[n, in]` (n, in and out > 0), quantizing it into `xu8` `[n, in]`.
  virtual at::Tensor quantized(const at::Tensor& x, at::Tensor& xu8, const cpu::QuantKernels& k) const = 0;
  // onednn::qlinear_pointwise on uint8 q + 128 `[n, in]` -> contiguous fp32 `[n, out]`, with the bias when `with_bias`.
  at::Tensor gemm(const at::Tensor& xu8, bool with_bias) const {
    return int8_gemm(xu8, weight_, weight_scale_, weight_zero_point_, with_bias ? bias_ : at::Tensor()).contiguous();
  }

  at::Tensor bias_;  // fp32 [out]

 private:
  at::Tensor bias_only(int64_t rows) const {  // a zero-width input: act(b) per row
    at::Tensor y = at::empty({rows, out_}, at::kFloat);
    float* p = y.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) std::memcpy(p + r * out_, bias_.data_ptr<float>(), sizeof(float) * out_);
    if (act_ && rows > 0 && out_ > 0) cpu::best_quant_kernels().epilogue(p, out_, nullptr, nullptr, rows, out_, act_);
    return y;
  }

  at::Tensor weight_;                            // prepacked int8; undefined when out or in is 0
  at::Tensor weight_scale_, weight_zero_point_;  // s_w [out], zeros [out] (int64)
};

// int8 with dynamic per-token input scales (int8_gemm_per_token).
class Int8Dynamic final : public Int8Linear {
 public:
  using Int8Linear::Int8Linear;
  LinearPrecision precision() const override { return LinearPrecision::Int8Dynamic; }

 protected:
  at::Tensor quantized(const at::Tensor& x, at::Tensor& xu8, const cpu::QuantKernels& k) const override {
    const int64_t n = x.size(0);
    thread_local std::vector<float> scale;  // s_x per row
    if (scale.size() < static_cast<size_t>(n)) scale.resize(static_cast<size_t>(n));
    k.quantize_per_token(x.data_ptr<float>(), in_, n, in_, xu8.data_ptr<uint8_t>(), in_, scale.data());
    at::Tensor y = gemm(xu8, false);
    k.epilogue(y.data_ptr<float>(), out_, scale.data(), bias_.data_ptr<float>(), n, out_, act_);
    return y;
  }
};

// int8 with calibrated static input scales per channel (int8_gemm_static).
class Int8Static final : public Int8Linear {
 public:
  Int8Static(const at::Tensor& qweight, const at::Tensor& weight_scale, const at::Tensor& bias,
             const at::Tensor& input_scale, std::optional<Activation> act)
      : Int8Linear(qweight, weight_scale, bias, act), inv_input_scale_(at::empty({in_}, at::kFloat)) {
    // 1 / c, as engine.quant.Int8LinearStatic (the kernel multiplies by it).
    const at::Tensor c = input_scale.to(at::kFloat).contiguous();
    for (int64_t k = 0; k < in_; ++k) inv_input_scale_.data_ptr<float>()[k] = 1.f / c.data_ptr<float>()[k];
  }
  LinearPrecision precision() const override { return LinearPrecision::Int8Static; }

 protected:
  at::Tensor quantized(const at::Tensor& x, at::Tensor& xu8, const cpu::QuantKernels& k) const override {
    const int64_t n = x.size(0);
    k.quantize_static(x.data_ptr<float>(), in_, n, in_, inv_input_scale_.data_ptr<float>(), xu8.data_ptr<uint8_t>(),
                      in_);
    at::Tensor y = gemm(xu8, true);  // oneDNN adds the bias
    if (act_) k.epilogue(y.data_ptr<float>(), out_, nullptr, nullptr, n, out_, act_);
    return y;
  }

 private:
  at::Tensor inv_input_scale_;  // 1 / c [in]
};

}  // namespace

void LinearImpl::run_into(const float* x, int64_t rows, float* y, bool accumulate) const {
  if (rows <= 0 || out_ == 0) return;
  const at::Tensor t = (*this)(at::from_blob(const_cast<float*>(x), {rows, in_}, at::kFloat)).contiguous();
  const float* tp = t.data_ptr<float>();
  const int64_t n = rows * out_;
  if (accumulate) {
    for (int64_t i = 0; i < n; ++i) y[i] += tp[i];
  } else {
    std::memcpy(y, tp, sizeof(float) * static_cast<size_t>(n));
  }
}

const LinearImpl& Linear::impl() const {
  if (!impl_) throw Error("this Linear is unset (it belongs to a layer with no heads or no FFN units)");
  return *impl_;
}

Linear::Linear(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act, GemmBackend backend,
               c10::Device device) {
  if (backend == GemmBackend::Auto) {
    backend = !device.is_cpu() || weight.numel() == 0 ? GemmBackend::Aten
              : dnnl_available()                     ? GemmBackend::OneDnnDirect
              : onednn_available()                   ? GemmBackend::TorchOneDnn
                                                     : GemmBackend::Aten;
  }
  if (backend == GemmBackend::TorchOneDnn && (!device.is_cpu() || !onednn_available())) {
    throw Error("the oneDNN GEMM backend needs a CPU device and a torch build with oneDNN (mkldnn)");
  }
  if (backend == GemmBackend::OneDnnDirect && (!device.is_cpu() || !dnnl_available())) {
    throw Error(
        "the dnnl GEMM backend needs a CPU device and libqaengine built with oneDNN's library (requirements.txt "
        "installs it; see docs/CPP.md); use gemm='onednn' or 'aten'");
  }
  if (backend == GemmBackend::OneDnnDirect && weight.numel() == 0) backend = GemmBackend::Aten;  // nothing to multiply
  switch (backend) {
    case GemmBackend::OneDnnDirect: impl_ = std::make_shared<const Float32Dnnl>(weight, bias, act); break;
    case GemmBackend::TorchOneDnn: impl_ = std::make_shared<const Float32TorchOneDnn>(weight, bias, act); break;
    case GemmBackend::Aten:
    case GemmBackend::Auto: impl_ = std::make_shared<const Float32Aten>(weight, bias, act, device); break;
  }
}

Linear Linear::bf16(const at::Tensor& weight, const at::Tensor& bias, std::optional<Activation> act,
                    GemmBackend backend) {
  if (weight.numel() == 0) {  // nothing to multiply: act(b), in fp32 (as engine.quant.bf16_model leaves it)
    return Linear(weight.to(at::kFloat), bias.to(at::kFloat), act, GemmBackend::Aten, c10::Device(c10::kCPU));
  }
  if (backend != GemmBackend::Aten) {  // Auto, TorchOneDnn, OneDnnDirect: bf16 runs torch's oneDNN op
    if (!onednn_bf16_available()) {
      throw Error(
          "this bf16 artifact needs bf16 GEMMs, which oneDNN cannot run with this torch build on this CPU (it "
          "needs torch with mkldnn and a CPU with AVX-512 BF16 or AVX512BW/VL/DQ); load it with gemm='aten' "
          "(ATen's bf16 addmm, slower) or build a float32 artifact");
    }
    backend = GemmBackend::TorchOneDnn;
  }
  return Linear(std::make_shared<const BFloat16Linear>(weight, bias, act, backend));
}

Linear Linear::int8(const at::Tensor& qweight, const at::Tensor& weight_scale, const at::Tensor& bias,
                    const at::Tensor& input_scale, std::optional<Activation> act) {
  if (input_scale.defined()) {
    return Linear(std::make_shared<const Int8Static>(qweight, weight_scale, bias, input_scale, act));
  }
  return Linear(std::make_shared<const Int8Dynamic>(qweight, weight_scale, bias, act));
}

}  // namespace qaengine
