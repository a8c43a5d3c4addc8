// libqaengine: load a SparseQA engine artifact and answer questions (docs/ARTIFACT.md, docs/CPP.md).
//
//   auto engine = qaengine::Engine::load("artifacts/minilm", "cpu");
//   qaengine::Answer a = engine.answer("Who wrote it?", context);
//
// The encoder Linears compute in the artifact's precision on the CPU (fp32; bf16 for bf16 artifacts; int8 for int8
// artifacts; fp16 artifacts are upcast to fp32), everything else in fp32 (docs/PRECISION.md, docs/CPP.md). This
// header is torch-free; the ATen-tensor entry point lives in qaengine/aten.h.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qaengine/bpe.h"
#include "qaengine/config.h"
#include "qaengine/error.h"
#include "qaengine/tokenizer.h"

namespace qaengine {

struct EngineAccess;

/// One answer. Offsets index the context: `start`/`end` in code points (Python str indices), `start_byte`/
/// `end_byte` in UTF-8 bytes, both half-open. When `no_answer` is set, `text` is empty, the offsets are 0 and
/// `score` is the null score (as engine.qa.Answer).
struct Answer {
  std::string text;
  int64_t start = 0, end = 0, start_byte = 0, end_byte = 0;
  double score = 0.0;            // the span's start + end logit (the null score for a no-answer result)
  double null_score = 0.0;       // min over windows of start[0] + end[0]
  double null_score_diff = 0.0;  // null_score - best span score (SQuAD 2.0's na_prob)
  bool no_answer = false;        // null_score_diff > null_threshold
};

/// Start and end logits of packed tokens, `[T]` each.
struct Logits {
  std::vector<float> start, end;
};

/// Options of Engine::load.
struct LoadOptions {
  GemmBackend gemm = GemmBackend::Auto;
};

/// Sets the intra-op thread count of the CPU path (ATen's pool, shared with torch in the same process).
void set_num_threads(int threads);

/// Artifact kernels (docs/ARTIFACT.md "Kernels": int8_gemm_per_token, int8_gemm_static) this build runs on
/// `device` ("cpu" or "cuda[:N]"): both on the CPU when torch's oneDNN int8 linear works, none on CUDA.
std::vector<std::string> supported_kernels(const std::string& device = "cpu");

class Engine {
 public:
  /// Loads and validates ARTIFACT_DIR (engine.json, weights.safetensors, tokenizer.json). `device` is "cpu" or
  /// "cuda[:N]" (the latter only in a -DQAENGINE_CUDA=ON build). Throws qaengine::Error naming what is wrong.
  static Engine load(const std::string& artifact_dir, const std::string& device = "cpu",
                     const LoadOptions& options = LoadOptions());
  ~Engine();
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  const Manifest& manifest() const;
  const std::string& device() const;
  /// The GEMM backend in use (never Auto); for int8 artifacts it applies to the QA head only.
  GemmBackend gemm_backend() const;
  /// What the encoder Linears compute in: "float32", "bfloat16", "int8_dynamic_per_token" or
  /// "int8_static_per_input_channel".
  const char* precision() const;

  /// Packed forward: `input_ids`/`token_type_ids` `[total]`, `cu_seqlens` `[batch + 1]` (0, ..., total).
  Logits forward_packed(const int64_t* input_ids, const int64_t* token_type_ids, int64_t total,
                        const int32_t* cu_seqlens, int64_t batch, int64_t max_seqlen) const;

  /// Tokenizes with the artifact's tokenizer (no special tokens): WordPiece for BERT, byte-level BPE for RoBERTa.
  Encoding tokenize(std::string_view text) const;

  /// Extractive QA with SQuAD 2.0 semantics. `null_threshold` defaults to the manifest's. Windows as
  /// engine/features.py: [CLS] q [SEP] c [SEP] (BERT) or <s> q </s></s> c </s> (RoBERTa, token types all 0).
  Answer answer(std::string_view question, std::string_view context, int64_t max_answer_length = 30,
                std::optional<double> null_threshold = std::nullopt) const;

 private:
  friend struct EngineAccess;  // engine.cpp: lets the ATen entry point (qaengine/aten.h) reach the encoder
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qaengine
