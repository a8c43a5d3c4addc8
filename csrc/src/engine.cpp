// qaengine::Engine: artifact loading, text -> windows -> packed forward -> SQuAD 2.0 answer.
#include "qaengine/engine.h"

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>

#include <cmath>
#include <limits>

#include "encoder.h"
#include "json_file.h"
#include "qaengine/aten.h"
#include "safetensors.h"
#include "unicode.h"
#include "windows.h"

namespace qaengine {

void set_num_threads(int threads) {
  if (threads < 1) throw Error("threads must be >= 1, got " + std::to_string(threads));
  at::set_num_threads(threads);
}

struct Engine::Impl {
  Manifest manifest;
  std::string device;
  std::unique_ptr<Encoder> encoder;
  std::unique_ptr<WordPieceTokenizer> tokenizer;  // tokenizer.json's model is WordPiece (BERT), or
  std::unique_ptr<ByteLevelBPETokenizer> bpe;     // BPE (RoBERTa)
  int64_t cls_id = 0, sep_id = 0;                 // [CLS]/[SEP] or <s>/</s>
  std::string tokenizer_error;  // RoBERTa artifacts whose tokenizer C++ cannot run still serve forward_packed

  Encoding encode(std::string_view text) const {
    if (tokenizer) return tokenizer->encode(text);
    if (bpe) return bpe->encode(text);
    throw Error(tokenizer_error + "; text input is not available for this artifact (forward_packed with ids is)");
  }

  /// The tokenizer tokenizer.json names and the window's [CLS]/[SEP] (BERT) or <s>/</s> (RoBERTa) ids.
  void load_tokenizer(const std::string& dir) {
    Impl& impl = *this;
    const Manifest& m = impl.manifest;
    const std::string tok_file = dir + "/tokenizer.json";
    const std::string type = read_json_file(tok_file).value("model", nlohmann::json::object()).value("type", "");
    if (type == "BPE") {
      impl.bpe = std::make_unique<ByteLevelBPETokenizer>(ByteLevelBPETokenizer::from_json_file(tok_file));
    } else if (type == "WordPiece") {
      impl.tokenizer = std::make_unique<WordPieceTokenizer>(
          WordPieceTokenizer::from_json_file(tok_file, m.do_lower_case, m.strip_accents));
    } else {
      throw Error(tok_file + ": model type '" + type + "' is not supported by libqaengine (WordPiece, byte-level BPE)");
    }
    const bool bert = m.config.architecture == Architecture::Bert;
    const std::string cls_name = bert ? "[CLS]" : "<s>", sep_name = bert ? "[SEP]" : "</s>";
    const auto cls = impl.bpe ? impl.bpe->token_to_id(cls_name) : impl.tokenizer->token_to_id(cls_name);
    const auto sep = impl.bpe ? impl.bpe->token_to_id(sep_name) : impl.tokenizer->token_to_id(sep_name);
    if (!cls || !sep) {
      impl.tokenizer.reset();
      impl.bpe.reset();
      throw Error(tok_file + ": the vocabulary lacks " + cls_name + " or " + sep_name + ", which " +
                  (bert ? "BERT" : "RoBERTa") + " windows need");
    }
    impl.cls_id = *cls;
    impl.sep_id = *sep;
  }
};


Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

const Manifest& Engine::manifest() const {
  return impl_->manifest;
}
const std::string& Engine::device() const {
  return impl_->device;
}

GemmBackend Engine::gemm_backend() const {
  return impl_->encoder->gemm_backend();
}

const char* Engine::precision() const {
  switch (impl_->encoder->linear_precision()) {
    case LinearPrecision::BFloat16: return "bfloat16";
    case LinearPrecision::Int8Dynamic: return "int8_dynamic_per_token";
    case LinearPrecision::Int8Static: return "int8_static_per_input_channel";
    case LinearPrecision::Float32: break;
  }
  return "float32";
}

std::vector<std::string> supported_kernels(const std::string& device) {
  c10::Device dev(c10::kCPU);
  try {
    dev = c10::Device(device);
  } catch (const std::exception&) {
    throw Error("unknown device '" + device + "' (use cpu or cuda[:N])");
  }
  return supported_kernels(dev);
}

Engine Engine::load(const std::string& dir, const std::string& device, const LoadOptions& options) {
  auto impl = std::make_unique<Impl>();
  c10::Device dev(c10::kCPU);
  try {
    dev = c10::Device(device);
  } catch (const std::exception&) {
    throw Error("unknown device '" + device + "' (use cpu or cuda[:N])");
  }
  if (!dev.is_cpu() && !dev.is_cuda()) throw Error("unsupported device '" + device + "' (use cpu or cuda[:N])");
  impl->device = dev.str();
  impl->manifest = read_manifest(dir);
  const Manifest& m = impl->manifest;
  // The tokenizer is whatever tokenizer.json holds (as engine.features.load_tokenizer). BERT artifacts must have a
  // usable one; RoBERTa artifacts load without (ids only, as before libqaengine had a BPE) and say why on text input.
  try {
    impl->load_tokenizer(dir);
  } catch (const Error& e) {
    if (m.config.architecture == Architecture::Bert) throw;
    impl->tokenizer_error = e.what();
  }
  const SafetensorsFile weights = SafetensorsFile::read(dir + "/weights.safetensors", "weights.safetensors");
  impl->encoder = std::make_unique<Encoder>(m.config, weights, m.dtype, dev, options.gemm, m.quantization,
                                             m.int8_word_embeddings);
  return Engine(std::move(impl));
}

struct EngineAccess {
  static const Encoder& encoder(const Engine& engine) { return *engine.impl_->encoder; }
};

std::pair<at::Tensor, at::Tensor> forward_packed(const Engine& engine, const at::Tensor& input_ids,
                                                 const at::Tensor& token_type_ids, const at::Tensor& cu_seqlens,
                                                 int64_t max_seqlen) {
  return EngineAccess::encoder(engine).forward(input_ids, token_type_ids, cu_seqlens, max_seqlen);
}

Logits Engine::forward_packed(const int64_t* input_ids, const int64_t* token_type_ids, int64_t total,
                              const int32_t* cu_seqlens, int64_t batch, int64_t max_seqlen) const {
  if (total < 0 || batch < 0) throw Error("forward_packed: total and batch must be >= 0");
  if (!cu_seqlens) throw Error("forward_packed: cu_seqlens is null");
  if (total > 0 && (!input_ids || !token_type_ids)) throw Error("forward_packed: input_ids/token_type_ids are null");
  static int64_t dummy_ids = 0;
  auto ids = at::from_blob(const_cast<int64_t*>(total ? input_ids : &dummy_ids), {total}, at::kLong);
  auto types = at::from_blob(const_cast<int64_t*>(total ? token_type_ids : &dummy_ids), {total}, at::kLong);
  auto cu = at::from_blob(const_cast<int32_t*>(cu_seqlens), {batch + 1}, at::kInt);
  auto [s, e] = impl_->encoder->forward(ids, types, cu, max_seqlen);
  s = s.cpu();
  e = e.cpu();
  Logits out;
  out.start.assign(s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
  out.end.assign(e.data_ptr<float>(), e.data_ptr<float>() + e.numel());
  return out;
}

Encoding Engine::tokenize(std::string_view text) const {
  return impl_->encode(text);
}

namespace {

void check_text(std::string_view text, const char* name) {
  std::vector<char32_t> cps;
  std::vector<int64_t> offs;
  unicode::decode_utf8(text, cps, offs);
  for (char32_t c : cps)
    if (!unicode::is_whitespace(c)) return;
  throw Error(std::string(name) + " is empty");
}

}  // namespace

Answer Engine::answer(std::string_view question, std::string_view context, int64_t max_answer_length,
                      std::optional<double> null_threshold) const {
  if (max_answer_length < 1) throw Error("max_answer_length must be >= 1, got " + std::to_string(max_answer_length));
  if (null_threshold && !std::isfinite(*null_threshold)) throw Error("null_threshold must be a finite number");
  check_text(question, "question");
  check_text(context, "context");
  const Manifest& m = impl_->manifest;
  Encoding q = impl_->encode(question);
  if (static_cast<int64_t>(q.ids.size()) > m.windows.max_query_length) q.ids.resize(m.windows.max_query_length);
  if (q.ids.empty()) throw Error("question has no tokens after tokenization");
  const Encoding c = impl_->encode(context);
  if (c.ids.empty()) throw Error("context has no tokens after tokenization");

  const auto windows = make_windows(q.ids, c.ids, m.windows, m.config.architecture, impl_->cls_id, impl_->sep_id);
  std::vector<int64_t> ids, types;
  std::vector<int32_t> cu{0};
  int64_t longest = 0;
  for (const Window& w : windows) {
    ids.insert(ids.end(), w.input_ids.begin(), w.input_ids.end());
    types.insert(types.end(), w.token_type_ids.begin(), w.token_type_ids.end());
    cu.push_back(static_cast<int32_t>(ids.size()));
    longest = std::max<int64_t>(longest, static_cast<int64_t>(w.input_ids.size()));
  }
  const Logits logits = forward_packed(ids.data(), types.data(), static_cast<int64_t>(ids.size()), cu.data(),
                                       static_cast<int64_t>(windows.size()), longest);
  const SpanChoice best = best_span(windows, logits.start.data(), logits.end.data(), cu, max_answer_length);

  Answer a;
  a.null_score = best.null_score;
  a.score = best.found ? best.score : -std::numeric_limits<double>::infinity();
  a.null_score_diff = a.null_score - a.score;
  a.no_answer = !best.found || a.null_score_diff > null_threshold.value_or(m.null_threshold);
  if (a.no_answer) {
    a.score = a.null_score;  // as engine.qa.Answer: a no-answer result carries the null score
  } else {
    a.start = c.starts[best.start_token];
    a.end = c.ends[best.end_token];
    a.start_byte = c.byte_starts[best.start_token];
    a.end_byte = c.byte_ends[best.end_token];
    a.text =
        std::string(context.substr(static_cast<size_t>(a.start_byte), static_cast<size_t>(a.end_byte - a.start_byte)));
  }
  return a;
}

}  // namespace qaengine
