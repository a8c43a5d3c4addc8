// engine._C.testing: single kernels and layers of libqaengine, for tests and benchmarks only (not the engine's API).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <pybind11/stl.h>

#include "../src/cpu/kernels.h"
#include "../src/dnnl_gemm.h"
#include "../src/encoder.h"
#include "../src/linear.h"
#include "../src/safetensors.h"
#include "common.h"
#include "qaengine/error.h"

#if defined(QAENGINE_WITH_CUDA)
#include "../cuda/ops.h"
#endif

namespace py = pybind11;

namespace qaengine::python {
namespace {

// dtype, rank and contiguity of a tensor argument (ValueError naming the argument).
void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), name, " is None");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor cpu_attention(const at::Tensor& qkv, const at::Tensor& bias, const at::Tensor& cu, int64_t heads,
                         int64_t max_seqlen, const std::string& isa) {
  check_tensor(qkv, "qkv", at::kFloat, 2);
  check_tensor(bias, "bias", at::kFloat, 1);
  check_tensor(cu, "cu_seqlens", at::kInt, 1);
  TORCH_CHECK_VALUE(qkv.device().is_cpu() && bias.device().is_cpu() && cu.device().is_cpu(), "tensors must be on CPU");
  TORCH_CHECK_VALUE(heads >= 1 && qkv.size(1) % (3 * heads) == 0, "qkv width ", qkv.size(1),
                    " is not 3 * heads * head_dim for heads=", heads);
  TORCH_CHECK_VALUE(bias.size(0) == qkv.size(1), "bias must have ", qkv.size(1), " entries");
  TORCH_CHECK_VALUE(cu.size(0) >= 1, "cu_seqlens must have batch + 1 >= 1 entries");
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0, "cu_seqlens[0] must be 0");
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], "cu_seqlens must be non-decreasing");
    TORCH_CHECK_VALUE(c[b + 1] - c[b] <= max_seqlen, "max_seqlen ", max_seqlen, " is shorter than sequence ", b);
  }
  TORCH_CHECK_VALUE(c[cu.size(0) - 1] == qkv.size(0), "cu_seqlens must end at the token count ", qkv.size(0));
  const qaengine::cpu::KernelTable* table = nullptr;
  for (const auto* k : qaengine::cpu::available_kernels())
    if (isa.empty() ? true : isa == k->name) table = k;  // the last available is the best
  TORCH_CHECK_VALUE(table != nullptr, "ISA '", isa, "' is not available on this CPU");
  const int64_t head_dim = qkv.size(1) / (3 * heads);
  TORCH_CHECK_VALUE(table->attention_supports(head_dim), "the ", table->name, " kernel does not support head_dim ",
                    head_dim);
  at::Tensor out = at::empty({qkv.size(0), heads * head_dim}, qkv.options());
  qaengine::cpu::AttentionParams p;
  p.qkv = qkv.data_ptr<float>();
  p.bias = bias.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.cu_seqlens = c;
  p.batch = cu.size(0) - 1;
  p.heads = heads;
  p.head_dim = head_dim;
  p.ld_qkv = qkv.size(1);
  p.ld_out = heads * head_dim;
  p.max_seqlen = max_seqlen;
  {
    py::gil_scoped_release release;
    qaengine::cpu::varlen_attention(p, *table, at::get_num_threads());
  }
  return out;
}

std::optional<qaengine::Activation> parse_act(const std::optional<std::string>& act) {
  if (!act) return std::nullopt;
  if (const auto parsed = qaengine::parse_activation(*act)) return parsed;
  throw qaengine::Error("activation must be None, 'gelu', 'gelu_new' or 'relu', got '" + *act + "'");
}

void check_linear_input(const at::Tensor& x, int64_t in) {
  check_tensor(x, "x", at::kFloat, 2);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be on the CPU");
  TORCH_CHECK_VALUE(x.size(1) == in, "x has ", x.size(1), " columns, the weight ", in);
}

// One int8 Linear of the engine on `x` (tests): builds it (prepacking the weight) and runs it once.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& weight_scale,
                       const at::Tensor& bias, const std::optional<at::Tensor>& input_scale,
                       const std::optional<std::string>& activation) {
  check_tensor(qweight, "qweight", at::kChar, 2);
  check_tensor(weight_scale, "weight_scale", at::kFloat, 1);
  check_tensor(bias, "bias", at::kFloat, 1);
  TORCH_CHECK_VALUE(weight_scale.size(0) == qweight.size(0) && bias.size(0) == qweight.size(0),
                    "weight_scale and bias need one entry per weight row");
  if (input_scale) {
    check_tensor(*input_scale, "input_scale", at::kFloat, 1);
    TORCH_CHECK_VALUE(input_scale->size(0) == qweight.size(1), "input_scale needs one entry per weight column");
  }
  check_linear_input(x, qweight.size(1));
  const auto lin =
      qaengine::Linear::int8(qweight, weight_scale, bias, input_scale.value_or(at::Tensor()), parse_act(activation));
  py::gil_scoped_release release;
  return lin(x);
}

// One fp32 Linear of the engine on `x` (tests); with `residual`, the in-place form the encoder uses
// (residual + act(x Wᵀ + b), written into a copy of `residual`), which needs gemm='dnnl'.
at::Tensor fp32_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const std::optional<std::string>& activation, const std::string& gemm,
                       const std::optional<at::Tensor>& residual) {
  check_tensor(weight, "weight", at::kFloat, 2);
  check_tensor(bias, "bias", at::kFloat, 1);
  TORCH_CHECK_VALUE(bias.size(0) == weight.size(0), "bias needs one entry per weight row");
  check_linear_input(x, weight.size(1));
  const auto lin = qaengine::Linear(weight, bias, parse_act(activation), parse_gemm(gemm), c10::Device("cpu"));
  if (!residual) {
    py::gil_scoped_release release;
    return lin(x.contiguous());
  }
  check_tensor(*residual, "residual", at::kFloat, 2);
  TORCH_CHECK_VALUE(residual->size(0) == x.size(0) && residual->size(1) == weight.size(0),
                    "residual must be [T, out]");
  TORCH_CHECK_VALUE(lin.writes_in_place(), "residual needs gemm='dnnl' (and a build with libdnnl)");
  at::Tensor y = residual->contiguous().clone();
  const at::Tensor xc = x.contiguous();
  py::gil_scoped_release release;
  lin.run_into(xc.data_ptr<float>(), xc.size(0), y.data_ptr<float>(), true);
  return y;
}

// One bf16 Linear of the engine on `x` (tests).
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const std::optional<std::string>& activation, const std::string& gemm) {
  check_tensor(weight, "weight", at::kFloat, 2);
  check_tensor(bias, "bias", at::kFloat, 1);
  TORCH_CHECK_VALUE(bias.size(0) == weight.size(0), "bias needs one entry per weight row");
  check_linear_input(x, weight.size(1));
  const auto lin = qaengine::Linear::bf16(weight, bias, parse_act(activation), parse_gemm(gemm));
  py::gil_scoped_release release;
  return lin(x);
}

}  // namespace

void bind_testing(py::module_& m) {
  m.def(
      "cpu_kernels",
      [] {
        std::vector<std::string> names;
        for (const auto* k : qaengine::cpu::available_kernels()) names.emplace_back(k->name);
        return names;
      },
      "Fused CPU kernel ISAs this CPU runs, best last.");
  m.def("int8_linear", &int8_linear, py::arg("x"), py::arg("qweight"), py::arg("weight_scale"), py::arg("bias"),
        py::arg("input_scale") = py::none(), py::arg("activation") = py::none(),
        "One int8 Linear of the engine (tests): fp32 x [T, in], int8 qweight [out, in], fp32 weight_scale [out], "
        "bias [out], input_scale [in] (static; None = dynamic per-token) -> fp32 [T, out].");
  m.def(
      "artifact_tensors",
      [](const std::string& dir) {
        const Manifest man = read_manifest(dir);
        const auto file = SafetensorsFile::read(dir + "/weights.safetensors", "weights.safetensors");
        return read_weights(file, man.config, man.dtype, man.quantization, man.int8_word_embeddings);
      },
      py::arg("artifact_dir"),
      "Every tensor of an artifact as libqaengine's loader reads it (tests): int8 Linears as stored, the rest fp32, "
      "int8 word embeddings dequantized.");
  m.def("dnnl_available", &qaengine::dnnl_available,
        "Whether this build calls oneDNN's library (libdnnl) directly for fp32 GEMMs (gemm='dnnl', auto's choice).");
  m.def("fp32_linear", &fp32_linear, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("activation") = py::none(), py::arg("gemm") = "auto", py::arg("residual") = py::none(),
        "One fp32 Linear of the engine (tests): x [T, in], weight [out, in], bias [out] -> [T, out]; with residual "
        "[T, out] (gemm='dnnl'), residual + act(x W^T + b) through the in-place path.");
  m.def("bf16_linear", &bf16_linear, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("activation") = py::none(), py::arg("gemm") = "auto",
        "One bf16 Linear of the engine (tests): fp32 x [T, in], weight [out, in] and bias [out] rounded to bf16 "
        "-> fp32 [T, out] (the bf16 GEMM output widened, then the activation in fp32).");
  m.def("cpu_attention", &cpu_attention, py::arg("qkv"), py::arg("bias"), py::arg("cu_seqlens"), py::arg("heads"),
        py::arg("max_seqlen"), py::arg("isa") = "",
        "Fused varlen attention on packed qkv [T, 3*h*dh] (+ bias [3*h*dh]) -> [T, h*dh] (tests, benchmarks).");
#if defined(QAENGINE_WITH_CUDA)
  m.def("cuda_varlen_attention", &qaengine::cuda::varlen_attention, py::arg("qkv"), py::arg("bias"),
        py::arg("cu_seqlens"), py::arg("heads"), py::arg("max_seqlen"),
        "CUDA varlen attention on packed fp32 qkv [T, 3*h*dh] (+ bias) -> [T, h*dh] (tests, benchmarks).");
  m.def(
      "cuda_add_layernorm_",
      [](at::Tensor x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& bias,
         const at::Tensor& gamma, const at::Tensor& beta, double eps) {
        qaengine::cuda::add_layernorm_(x, residual, bias, gamma, beta, eps);
        return x;
      },
      py::arg("x"), py::arg("residual"), py::arg("bias"), py::arg("gamma"), py::arg("beta"), py::arg("eps"),
      "In place x = LayerNorm(x + residual + bias) on CUDA fp32 [rows, cols]; returns x.");
#endif
}

}  // namespace qaengine::python
