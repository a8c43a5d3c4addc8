// engine._C: thin pybind11 bindings over libqaengine's public API. Inputs are checked by the library itself (the C++
// API boundary); qaengine::Error surfaces as engine._C.Error (a ValueError). Test-only entry points (single kernels
// and layers) live in the submodule engine._C.testing (testing.cpp).
#include <ATen/ops/zeros_like.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "../src/cpu/pool.h"
#include "common.h"
#include "qaengine/aten.h"
#include "qaengine/engine.h"

namespace py = pybind11;
using qaengine::Engine;

namespace qaengine::python {

GemmBackend parse_gemm(const std::string& gemm) {
  if (gemm == "auto") return GemmBackend::Auto;
  if (gemm == "dnnl") return GemmBackend::OneDnnDirect;
  if (gemm == "onednn") return GemmBackend::TorchOneDnn;
  if (gemm == "aten") return GemmBackend::Aten;
  throw Error("gemm must be 'auto', 'dnnl', 'onednn' or 'aten', got '" + gemm + "'");
}

}  // namespace qaengine::python

namespace {

const char* gemm_name(qaengine::GemmBackend g) {
  switch (g) {
    case qaengine::GemmBackend::OneDnnDirect: return "dnnl";
    case qaengine::GemmBackend::TorchOneDnn: return "onednn";
    case qaengine::GemmBackend::Aten: return "aten";
    case qaengine::GemmBackend::Auto: break;
  }
  return "auto";
}

// (ids, code-point offsets, UTF-8 byte offsets) of the encoding `encode()` returns, computed without the GIL.
template <class Encode>
py::tuple encoding_tuple(Encode encode) {
  qaengine::Encoding enc;
  {
    py::gil_scoped_release release;
    enc = encode();
  }
  std::vector<std::pair<int64_t, int64_t>> chars(enc.size()), bytes(enc.size());
  for (size_t i = 0; i < enc.size(); ++i) {
    chars[i] = {enc.starts[i], enc.ends[i]};
    bytes[i] = {enc.byte_starts[i], enc.byte_ends[i]};
  }
  return py::make_tuple(enc.ids, chars, bytes);
}

py::tuple forward_packed(const Engine& e, const at::Tensor& ids, const std::optional<at::Tensor>& types,
                         const at::Tensor& cu, int64_t max_seqlen) {
  const at::Tensor tt = types.has_value() ? *types : at::zeros_like(ids);
  std::pair<at::Tensor, at::Tensor> out;
  {
    py::gil_scoped_release release;
    out = qaengine::forward_packed(e, ids, tt, cu, max_seqlen);  // checks every input
  }
  return py::make_tuple(out.first, out.second);
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
      .def_static(
          "load",
          [](const std::string& dir, const std::string& device, const std::string& gemm) {
            qaengine::LoadOptions options;
            options.gemm = qaengine::python::parse_gemm(gemm);
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
          [](const Engine& e, const std::string& text) { return encoding_tuple([&] { return e.tokenize(text); }); },
          py::arg("text"), "(ids, code-point offsets, UTF-8 byte offsets), without special tokens.")
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
            return encoding_tuple([&] { return t.encode(text); });
          },
          py::arg("text"), "(ids, code-point offsets, UTF-8 byte offsets), without special tokens.")
      .def("token_to_id", &qaengine::WordPieceTokenizer::token_to_id, py::arg("token"));

  py::class_<qaengine::ByteLevelBPETokenizer>(m, "ByteLevelBPETokenizer")
      .def(py::init([](const std::string& path) {
             return std::make_unique<qaengine::ByteLevelBPETokenizer>(
                 qaengine::ByteLevelBPETokenizer::from_json_file(path));
           }),
           py::arg("tokenizer_json"), "Byte-level BPE tokenizer (RoBERTa, GPT-2) from an HF tokenizer.json.")
      .def(
          "encode",
          [](const qaengine::ByteLevelBPETokenizer& t, const std::string& text) {
            return encoding_tuple([&] { return t.encode(text); });
          },
          py::arg("text"),
           "(ids, code-point offsets, UTF-8 byte offsets), without special tokens.")
      .def("token_to_id", &qaengine::ByteLevelBPETokenizer::token_to_id, py::arg("token"))
      .def_property_readonly("add_prefix_space",
                             [](const qaengine::ByteLevelBPETokenizer& t) { return t.options().add_prefix_space; })
      .def_property_readonly("trim_offsets",
                             [](const qaengine::ByteLevelBPETokenizer& t) { return t.options().trim_offsets; });

  m.def(
      "supported_kernels", [](const std::string& device) { return qaengine::supported_kernels(device); },
      py::arg("device") = "cpu",
      "Artifact kernels (docs/ARTIFACT.md) this build runs on `device`: int8_gemm_per_token and int8_gemm_static on "
      "the CPU when torch's oneDNN int8 linear works; none on CUDA.");
  m.def("set_release_caller_team", &qaengine::cpu::set_release_caller_team, py::arg("on"),
        "Whether a multi-threaded CPU forward first ends the spinning of the calling thread's OpenMP team (torch's "
        "intra-op threads); engine.openmp sets it.");
  m.def("release_caller_team", &qaengine::cpu::release_caller_team);
  m.attr("cuda_built") = py::bool_(
#if defined(QAENGINE_WITH_CUDA)
      true
#else
      false
#endif
  );
  auto testing = m.def_submodule("testing", "Single kernels and layers of the engine, for tests and benchmarks only.");
  qaengine::python::bind_testing(testing);
}
