#include "linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>

#include "qaengine/error.h"

namespace qaengine {
namespace {

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

}  // namespace

bool onednn_available() {
  return linear_op().has_value() && reorder_op().has_value();
}

Linear::Linear(const at::Tensor& weight, const at::Tensor& bias, std::optional<cpu::Act> act, GemmBackend backend,
               c10::Device device)
    : act_(act), out_(weight.size(0)) {
  if (backend == GemmBackend::Auto) {
    backend = device.is_cpu() && onednn_available() && weight.numel() > 0 ? GemmBackend::OneDnn : GemmBackend::Aten;
  }
  if (backend == GemmBackend::OneDnn && (!device.is_cpu() || !onednn_available())) {
    throw Error("the oneDNN GEMM backend needs a CPU device and a torch build with oneDNN (mkldnn)");
  }
  backend_ = backend;
  bias_ = bias.contiguous().to(device);
  if (backend_ == GemmBackend::OneDnn) {
    torch::jit::Stack stack{weight.contiguous(), c10::IValue()};
    reorder_op()->callBoxed(&stack);
    weight_ = stack[0].toTensor();
  } else {
    weight_ = weight.t().contiguous().to(device);
  }
}

at::Tensor Linear::operator()(const at::Tensor& x) const {
  if (backend_ == GemmBackend::OneDnn) {
    std::string attr = "none";
    std::optional<std::string> algorithm;
    if (act_) {
      switch (*act_) {
        case cpu::Act::Gelu:
          attr = "gelu";
          algorithm = "none";
          break;
        case cpu::Act::GeluTanh:
          attr = "gelu";
          algorithm = "tanh";
          break;
        case cpu::Act::Relu: attr = "relu"; break;
      }
    }
    torch::jit::Stack stack{x,
                            weight_,
                            bias_,
                            attr,
                            c10::List<std::optional<at::Scalar>>(),
                            algorithm ? c10::IValue(*algorithm) : c10::IValue()};
    linear_op()->callBoxed(&stack);
    return stack[0].toTensor();
  }
  at::Tensor y = at::addmm(bias_, x, weight_);
  if (act_) {
    if (y.device().is_cpu()) {
      cpu::bias_act(y.data_ptr<float>(), out_, nullptr, y.size(0), out_, *act_, cpu::best_kernels());
    } else if (*act_ == cpu::Act::Relu) {
      y = at::relu(y);
    } else {
      y = at::gelu(y, *act_ == cpu::Act::Gelu ? "none" : "tanh");
    }
  }
  return y;
}

}  // namespace qaengine
