// engine._C: thin pybind11 bindings over libqaengine. Every tensor argument is checked here (dtype, rank,
// contiguity, device); the library re-checks value ranges. qaengine::Error surfaces as engine._C.Error (a
// ValueError).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "../src/cpu/kernels.h"
#include "../src/linear.h"
#include "qaengine/aten.h"
#include "qaengine/engine.h"

#if defined(QAENGINE_WITH_CUDA)
#include "../cuda/ops.h"
#endif

namespace py = pybind11;
using qaengine::Engine;

namespace {

qaengine::LoadOptions load_options(const std::string& gemm) {
  qaengine::LoadOptions o;
  if (gemm == "auto") {
    o.gemm = qaengine::GemmBackend::Auto;
  } else if (gemm == "onednn") {
    o.gemm = qaengine::GemmBackend::OneDnn;
  } else if (gemm == "aten") {
    o.gemm = qaengine::GemmBackend::Aten;
  } else if (gemm == "dnnl") {
    o.gemm = qaengine::GemmBackend::Dnnl;
  } else {
    throw qaengine::Error("gemm must be 'auto', 'dnnl', 'onednn' or 'aten', got '" + gemm + "'");
  }
  return o;
}

const char* gemm_name(qaengine::GemmBackend g) {
  switch (g) {
    case qaengine::GemmBackend::Dnnl: return "dnnl";
    case qaengine::GemmBackend::OneDnn: return "onednn";
    case qaengine::GemmBackend::Aten: return "aten";
    case qaengine::GemmBackend::Auto: break;
  }
  return "auto";
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), name, " is None");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

py::tuple forward_packed(const Engine& e, const at::Tensor& ids, const std::optional<at::Tensor>& types,
                         const at::Tensor& cu, int64_t max_seqlen) {
  check_tensor(ids, "input_ids", at::kLong, 1);
  check_tensor(cu, "cu_seqlens", at::kInt, 1);
  at::Tensor tt = types.has_value() ? *types : at::zeros_like(ids);
  check_tensor(tt, "token_type_ids", at::kLong, 1);
  TORCH_CHECK_VALUE(tt.size(0) == ids.size(0), "token_type_ids has ", tt.size(0), " tokens but input_ids has ",
                    ids.size(0));
  TORCH_CHECK_VALUE(cu.device().is_cpu() || cu.device() == ids.device(), "cu_seqlens must be on the CPU or on ",
                    ids.device());
  TORCH_CHECK_VALUE(max_seqlen >= 0, "max_seqlen must be >= 0, got ", max_seqlen);
  std::pair<at::Tensor, at::Tensor> out;
  {
    py::gil_scoped_release release;
    out = qaengine::forward_packed(e, ids, tt, cu, max_seqlen);
  }
  return py::make_tuple(out.first, out.second);
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
    qaengine::cpu::varlen_attention(p, *table);
  }
  return out;
}

std::optional<qaengine::cpu::Act> parse_act(const std::optional<std::string>& act) {
  if (!act) return std::nullopt;
  if (*act == "gelu") return qaengine::cpu::Act::Gelu;
  if (*act == "gelu_new") return qaengine::cpu::Act::GeluTanh;
  if (*act == "relu") return qaengine::cpu::Act::Relu;
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
  const auto lin = qaengine::Linear(weight, bias, parse_act(activation), load_options(gemm).gemm, c10::Device("cpu"));
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
  const auto lin = qaengine::Linear::bf16(weight, bias, parse_act(activation), load_options(gemm).gemm);
  py::gil_scoped_release release;
  return lin(x);
}

/// A tokenizer's `encode` as (ids, code-point offsets, UTF-8 byte offsets), tokenizing without the GIL.
template <typename Tokenizer>
py::tuple encoding_tuple(const Tokenizer& t, const std::string& text) {
  qaengine::Encoding enc;
  {
    py::gil_scoped_release release;
    enc = t.encode(text);
  }
  std::vector<std::pair<int64_t, int64_t>> chars(enc.size()), bytes(enc.size());
  for (size_t i = 0; i < enc.size(); ++i) {
    chars[i] = {enc.starts[i], enc.ends[i]};
    bytes[i] = {enc.byte_starts[i], enc.byte_ends[i]};
  }
  return py::make_tuple(enc.ids, chars, bytes);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "SparseQA's C++ engine (libqaengine): packed encoder forward, WordPiece and byte-level BPE "
            "tokenizers, SQuAD 2.0 answers";
  py::register_exception<qaengine::Error>(m, "Error", PyExc_ValueError);

  py::class_<qaengine::Answer>(m, "Answer")
      .def_readonly("text", &qaengine::Answer::text)
      .def_readonly("start", &qaengine::Answer::start)
      .def_readonly("end", &qaengine::Answer::end)
      .def_readonly("start_byte", &qaengine::Answer::start_byte)
      .def_readonly("end_byte", &qaengine::Answer::end_byte)
      .def_readonly("score", &qaengine::Answer::score)
      .def_readonly("null_score", &qaengine::Answer::null_score)
      .def_readonly("null_score_diff", &qaengine::Answer::null_score_diff)
      .def_readonly("no_answer", &qaengine::Answer::no_answer)
      .def("__repr__", [](const qaengine::Answer& a) {
        return "Answer(text=" + py::repr(py::str(a.text)).cast<std::string>() + ", start=" + std::to_string(a.start) +
               ", end=" + std::to_string(a.end) + ", score=" + std::to_string(a.score) +
               ", no_answer=" + (a.no_answer ? "True" : "False") + ")";
      });

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const std::string& dir, const std::string& device, const std::string& gemm) {
             const auto options = load_options(gemm);
             py::gil_scoped_release release;
             return std::make_unique<Engine>(Engine::load(dir, device, options));
           }),
           py::arg("artifact_dir"), py::arg("device") = "cpu", py::arg("gemm") = "auto")
      .def_static(
          "load",
          [](const std::string& dir, const std::string& device, const std::string& gemm) {
            const auto options = load_options(gemm);
            py::gil_scoped_release release;
            return std::make_unique<Engine>(Engine::load(dir, device, options));
          },
          py::arg("artifact_dir"), py::arg("device") = "cpu", py::arg("gemm") = "auto",
          "Load and validate an engine artifact directory; gemm: 'auto', 'dnnl' or 'onednn' (CPU), or 'aten'.")
      .def("forward_packed", &forward_packed, py::arg("input_ids"), py::arg("token_type_ids"), py::arg("cu_seqlens"),
           py::arg("max_seqlen"),
           "Packed int64 ids/types [T], int32 cu_seqlens [B+1] -> fp32 (start, end) logits [T] each.")
      .def(
          "answer",
          [](const Engine& e, const std::string& question, const std::string& context, int64_t max_answer_length,
             std::optional<double> null_threshold) {
            py::gil_scoped_release release;
            return e.answer(question, context, max_answer_length, null_threshold);
          },
          py::arg("question"), py::arg("context"), py::arg("max_answer_length") = 30,
          py::arg("null_threshold") = py::none(), "SQuAD 2.0 answer; offsets in code points and UTF-8 bytes.")
      .def(
          "tokenize",
          [](const Engine& e, const std::string& text) {
            qaengine::Encoding enc;
            {
              py::gil_scoped_release release;
              enc = e.tokenize(text);
            }
            std::vector<std::pair<int64_t, int64_t>> offsets(enc.size());
            for (size_t i = 0; i < enc.size(); ++i) offsets[i] = {enc.starts[i], enc.ends[i]};
            return py::make_tuple(enc.ids, offsets);
          },
          py::arg("text"), "Token ids and (start, end) code-point offsets, without special tokens.")
      .def(
          "tokenize_bytes",
          [](const Engine& e, const std::string& text) {
            qaengine::Encoding enc;
            {
              py::gil_scoped_release release;
              enc = e.tokenize(text);
            }
            std::vector<std::pair<int64_t, int64_t>> offsets(enc.size());
            for (size_t i = 0; i < enc.size(); ++i) offsets[i] = {enc.byte_starts[i], enc.byte_ends[i]};
            return py::make_tuple(enc.ids, offsets);
          },
          py::arg("text"), "Token ids and (start, end) UTF-8 byte offsets, without special tokens.")
      .def_property_readonly("device", &Engine::device)
      .def_property_readonly("gemm", [](const Engine& e) { return gemm_name(e.gemm_backend()); })
      .def_property_readonly("precision", &Engine::precision,
                             "What the encoder Linears compute in: 'float32', 'bfloat16', "
                             "'int8_dynamic_per_token' or 'int8_static_per_input_channel'.")
      .def_property_readonly("null_threshold", [](const Engine& e) { return e.manifest().null_threshold; })
      .def_property_readonly("architecture", [](const Engine& e) {
        return e.manifest().config.architecture == qaengine::Architecture::Bert ? "bert" : "roberta";
      });

  py::class_<qaengine::WordPieceTokenizer>(m, "WordPieceTokenizer")
      .def(py::init([](const std::string& path, std::optional<bool> lowercase, std::optional<bool> strip_accents) {
             return std::make_unique<qaengine::WordPieceTokenizer>(
                 qaengine::WordPieceTokenizer::from_json_file(path, lowercase, strip_accents));
           }),
           py::arg("tokenizer_json"), py::arg("lowercase") = py::none(), py::arg("strip_accents") = py::none(),
           "WordPiece tokenizer from an HF tokenizer.json; lowercase/strip_accents override the file's normalizer.")
      .def(
          "encode",
          [](const qaengine::WordPieceTokenizer& t, const std::string& text) {
            qaengine::Encoding enc;
            {
              py::gil_scoped_release release;
              enc = t.encode(text);
            }
            std::vector<std::pair<int64_t, int64_t>> chars(enc.size()), bytes(enc.size());
            for (size_t i = 0; i < enc.size(); ++i) {
              chars[i] = {enc.starts[i], enc.ends[i]};
              bytes[i] = {enc.byte_starts[i], enc.byte_ends[i]};
            }
            return py::make_tuple(enc.ids, chars, bytes);
          },
          py::arg("text"), "(ids, code-point offsets, UTF-8 byte offsets), without special tokens.")
      .def("token_to_id", &qaengine::WordPieceTokenizer::token_to_id, py::arg("token"));

  py::class_<qaengine::ByteLevelBPETokenizer>(m, "ByteLevelBPETokenizer")
      .def(py::init([](const std::string& path) {
             return std::make_unique<qaengine::ByteLevelBPETokenizer>(
                 qaengine::ByteLevelBPETokenizer::from_json_file(path));
           }),
           py::arg("tokenizer_json"), "Byte-level BPE tokenizer (RoBERTa, GPT-2) from an HF tokenizer.json.")
      .def("encode", &encoding_tuple<qaengine::ByteLevelBPETokenizer>, py::arg("text"),
           "(ids, code-point offsets, UTF-8 byte offsets), without special tokens.")
      .def("token_to_id", &qaengine::ByteLevelBPETokenizer::token_to_id, py::arg("token"))
      .def_property_readonly("add_prefix_space",
                             [](const qaengine::ByteLevelBPETokenizer& t) { return t.options().add_prefix_space; })
      .def_property_readonly("trim_offsets",
                             [](const qaengine::ByteLevelBPETokenizer& t) { return t.options().trim_offsets; });

  m.def(
      "cpu_kernels",
      [] {
        std::vector<std::string> names;
        for (const auto* k : qaengine::cpu::available_kernels()) names.emplace_back(k->name);
        return names;
      },
      "Fused CPU kernel ISAs this CPU runs, best last.");
  m.def(
      "supported_kernels", [](const std::string& device) { return qaengine::supported_kernels(device); },
      py::arg("device") = "cpu",
      "Artifact kernels (docs/ARTIFACT.md) this build runs on `device`: int8_gemm_per_token and int8_gemm_static on "
      "the CPU when torch's oneDNN int8 linear works; none on CUDA.");
  m.def("int8_linear", &int8_linear, py::arg("x"), py::arg("qweight"), py::arg("weight_scale"), py::arg("bias"),
        py::arg("input_scale") = py::none(), py::arg("activation") = py::none(),
        "One int8 Linear of the engine (tests): fp32 x [T, in], int8 qweight [out, in], fp32 weight_scale [out], "
        "bias [out], input_scale [in] (static; None = dynamic per-token) -> fp32 [T, out].");
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
  m.attr("cuda_built") = py::bool_(
#if defined(QAENGINE_WITH_CUDA)
      true
#else
      false
#endif
  );
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
