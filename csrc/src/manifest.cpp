// engine.json validation; mirrors engine/artifact.py read_manifest + load_artifact (same checks, same wording).
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "check.h"
#include "qaengine/config.h"
#include "qaengine/error.h"

namespace qaengine {
namespace {

using json = nlohmann::json;
constexpr int64_t kFormatVersion = 1;      // float artifacts
constexpr int64_t kInt8FormatVersion = 2;  // int8 artifacts (docs/ARTIFACT.md "Int8 artifacts")
constexpr int64_t kEmbFormatVersion = 3;   // any dtype + an `embeddings` block ("Int8 word embeddings"); the newest
const char* kEmbScheme = "int8_symmetric_per_row";
const char* kManifest = "engine.json";
const char* kWeightScheme = "int8_symmetric_per_output_channel";
const char* kDynamic = "dynamic_per_token";
const char* kStatic = "static_per_input_channel";
const char* kKernelPerToken = "int8_gemm_per_token";
const char* kKernelStatic = "int8_gemm_static";

std::string join(const std::set<std::string>& names) {
  std::string out = "[";
  for (const auto& n : names) out += (out.size() > 1 ? ", '" : "'") + n + "'";
  return out + "]";
}

// A JSON value as Python's repr() of its json.loads value would print it, so messages match engine/artifact.py.
std::string py_repr(const json& v) {
  if (v.is_string()) return "'" + v.get<std::string>() + "'";
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + py_repr(v[i]);
    return out + "]";
  }
  if (v.is_object()) {
    std::string out = "{";
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it, first = false)
      out += (first ? "'" : ", '") + it.key() + "': " + py_repr(it.value());
    return out + "}";
  }
  return v.dump();
}

std::string list_repr(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", '" : "'") + names[i] + "'";
  return out + "]";
}

bool is_int(const json& v) {
  return v.is_number_integer();
}

int64_t get_int(const json& obj, const std::string& key, const std::string& where) {
  QAENGINE_CHECK(is_int(obj.at(key)), where + " must be an integer, got " + obj.at(key).dump());
  return obj.at(key).get<int64_t>();
}

void check_keys(const json& obj, std::set<std::string> required, const std::set<std::string>& optional,
                const std::string& where, const char* also_required = nullptr) {
  if (also_required) required.insert(also_required);
  std::set<std::string> missing, unknown;
  for (const auto& k : required)
    if (!obj.contains(k)) missing.insert(k);
  for (auto it = obj.begin(); it != obj.end(); ++it)
    if (!required.count(it.key()) && !optional.count(it.key())) unknown.insert(it.key());
  QAENGINE_CHECK(missing.empty(), where + ": missing field(s) " + join(missing));
  QAENGINE_CHECK(unknown.empty(), where + ": unknown field(s) " + join(unknown));
}

EncoderConfig parse_config(const json& c) {
  const std::string where = std::string(kManifest) + ": field 'config'";
  QAENGINE_CHECK(c.is_object(), where + " must be an object");
  check_keys(c,
             {"architecture", "vocab_size", "hidden", "head_dim", "heads", "ffn", "max_position_embeddings",
              "type_vocab_size", "layer_norm_eps", "activation", "pad_token_id"},
             {"position_offset"}, where);
  EncoderConfig cfg;
  QAENGINE_CHECK(c["architecture"].is_string(), where + ": architecture must be a string");
  const auto arch = c["architecture"].get<std::string>();
  QAENGINE_CHECK(arch == "bert" || arch == "roberta",
                 where + ": unknown architecture '" + arch + "' (bert or roberta)");
  cfg.architecture = arch == "bert" ? Architecture::Bert : Architecture::Roberta;
  QAENGINE_CHECK(c["activation"].is_string(), where + ": activation must be a string");
  const auto act = c["activation"].get<std::string>();
  const std::optional<Activation> parsed = parse_activation(act);
  if (!parsed) throw Error(where + ": unknown activation '" + act + "' (gelu, gelu_new or relu)");
  cfg.activation = *parsed;
  for (const char* k : {"vocab_size", "hidden", "head_dim", "max_position_embeddings", "type_vocab_size"}) {
    const int64_t v = get_int(c, k, where + "." + k);
    QAENGINE_CHECK(v >= 1, where + ": field '" + k + "' must be >= 1, got " + std::to_string(v));
  }
  cfg.vocab_size = c["vocab_size"].get<int64_t>();
  cfg.hidden = c["hidden"].get<int64_t>();
  cfg.head_dim = c["head_dim"].get<int64_t>();
  cfg.max_position_embeddings = c["max_position_embeddings"].get<int64_t>();
  cfg.type_vocab_size = c["type_vocab_size"].get<int64_t>();
  QAENGINE_CHECK(c["layer_norm_eps"].is_number() && !c["layer_norm_eps"].is_boolean(),
                 where + ": layer_norm_eps must be a number");
  cfg.layer_norm_eps = c["layer_norm_eps"].get<double>();
  QAENGINE_CHECK(std::isfinite(cfg.layer_norm_eps) && cfg.layer_norm_eps >= 0, where + ": layer_norm_eps must be >= 0");
  cfg.pad_token_id = get_int(c, "pad_token_id", where + ".pad_token_id");
  cfg.position_offset = c.contains("position_offset") ? get_int(c, "position_offset", where + ".position_offset") : 0;
  QAENGINE_CHECK(cfg.position_offset >= 0, where + ": position_offset must be >= 0");
  for (const char* k : {"heads", "ffn"}) {
    QAENGINE_CHECK(c[k].is_array(), where + ": field '" + k + "' must be a list of integers");
    auto& dst = std::string(k) == "heads" ? cfg.heads : cfg.ffn;
    for (size_t i = 0; i < c[k].size(); ++i) {
      QAENGINE_CHECK(is_int(c[k][i]), where + ": " + k + "[" + std::to_string(i) + "] must be an integer");
      dst.push_back(c[k][i].get<int64_t>());
    }
  }
  QAENGINE_CHECK(cfg.heads.size() == cfg.ffn.size(), where + ": config has " + std::to_string(cfg.heads.size()) +
                                                         " per-layer head counts but " +
                                                         std::to_string(cfg.ffn.size()) + " FFN widths");
  QAENGINE_CHECK(!cfg.heads.empty(), where + ": config has no layers");
  for (size_t i = 0; i < cfg.heads.size(); ++i) {
    QAENGINE_CHECK(cfg.heads[i] >= 0 && cfg.ffn[i] >= 0,
                   where + ": layer " + std::to_string(i) + ": head count and FFN width must be >= 0, got heads=" +
                       std::to_string(cfg.heads[i]) + " ffn=" + std::to_string(cfg.ffn[i]));
  }
  return cfg;
}

// engine/artifact.py parse_quantization: the `quantization` block of a version-2 manifest.
Quantization parse_quantization(const json& q) {
  const std::string where = std::string(kManifest) + ": field 'quantization'";
  QAENGINE_CHECK(q.is_object(), where + " must be an object");
  const std::set<std::string> keys = {"weights", "activations", "linears", "float_dtype", "kernels", "calibration"};
  std::set<std::string> missing, unknown;
  for (const auto& k : keys)
    if (!q.contains(k)) missing.insert(k);
  for (auto it = q.begin(); it != q.end(); ++it)
    if (!keys.count(it.key())) unknown.insert(it.key());
  QAENGINE_CHECK(missing.empty(), where + ": missing key(s) " + join(missing));
  QAENGINE_CHECK(unknown.empty(), where + ": unknown key(s) " + join(unknown));
  QAENGINE_CHECK(q["weights"] == kWeightScheme, where + ": weights is " + py_repr(q["weights"]) +
                                                    ", this SparseQA reads only '" + kWeightScheme + "'");
  const json& act = q["activations"];
  QAENGINE_CHECK(act == kDynamic || act == kStatic, where + ": activations is " + py_repr(act) +
                                                        ", expected one of ['" + kDynamic + "', '" + kStatic + "']");
  Quantization out;
  out.activations = act == kDynamic ? ActivationQuant::DynamicPerToken : ActivationQuant::StaticPerInputChannel;
  const json linears = json::array({"qkv", "o", "ffn_in", "ffn_out"});
  QAENGINE_CHECK(q["linears"] == linears,
                 where + ": linears must be " + py_repr(linears) + ", got " + py_repr(q["linears"]));
  QAENGINE_CHECK(q["float_dtype"] == "float32",
                 where + ": float_dtype must be 'float32', got " + py_repr(q["float_dtype"]));
  const json& kernels = q["kernels"];
  bool names_ok = kernels.is_array();
  if (names_ok)
    for (const json& k : kernels) names_ok = names_ok && k.is_string();
  QAENGINE_CHECK(names_ok, where + ": kernels must be a list of kernel names");
  std::set<std::string> unknown_k;
  for (const json& k : kernels) {
    out.kernels.push_back(k.get<std::string>());
    if (k != kKernelPerToken && k != kKernelStatic) unknown_k.insert(k.get<std::string>());
  }
  QAENGINE_CHECK(unknown_k.empty(), where + ": requires kernel(s) " + join(unknown_k) +
                                        " that this SparseQA does not know (known: ['" + kKernelPerToken + "', '" +
                                        kKernelStatic + "']); upgrade SparseQA");
  const std::string need = out.activations == ActivationQuant::DynamicPerToken ? kKernelPerToken : kKernelStatic;
  QAENGINE_CHECK(out.kernels == std::vector<std::string>{need},
                 where + ": activations " + py_repr(act) + " need kernels ['" + need + "'], but the manifest lists " +
                     list_repr(out.kernels));
  const json& cal = q["calibration"];
  if (out.activations == ActivationQuant::StaticPerInputChannel) {
    QAENGINE_CHECK(cal.is_object(), where + ": static activation scales need a 'calibration' object");
  } else {
    QAENGINE_CHECK(cal.is_null(), where + ": calibration must be null for " + py_repr(act) + " activations");
  }
  return out;
}

}  // namespace

Manifest read_manifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifest;
  std::ifstream in(path, std::ios::binary);
  QAENGINE_CHECK(static_cast<bool>(in),
                 path + " is missing: not an engine artifact (build one with python -m engine.build_model)");
  std::stringstream ss;
  ss << in.rdbuf();
  json m;
  try {
    m = json::parse(ss.str());
  } catch (const json::exception& e) {
    throw Error(path + " is not valid JSON (" + e.what() + ")");
  }
  QAENGINE_CHECK(m.is_object(), path + " must hold a JSON object");
  const std::string fmt = m.contains("format") ? m["format"].dump() : "None";
  QAENGINE_CHECK(m.contains("format") && m["format"] == "sparseqa-engine",
                 std::string(kManifest) + ": field 'format' must be 'sparseqa-engine', got " + fmt);
  QAENGINE_CHECK(m.contains("format_version") && is_int(m["format_version"]),
                 std::string(kManifest) + ": field 'format_version' must be an integer");
  const int64_t ver = m["format_version"].get<int64_t>();
  QAENGINE_CHECK(ver <= kEmbFormatVersion, std::string(kManifest) + ": format_version " + std::to_string(ver) +
                                               " was written by a newer SparseQA (this one reads up to " +
                                               std::to_string(kEmbFormatVersion) + "); upgrade SparseQA");
  QAENGINE_CHECK(ver == kFormatVersion || ver == kInt8FormatVersion || ver == kEmbFormatVersion,
                 std::string(kManifest) + ": format_version " + std::to_string(ver) + " is not supported");
  // Version 1 holds float artifacts, version 2 int8 ones (a float artifact is always written as version 1); version
  // 3 adds an `embeddings` block to either (and is written only when the word embeddings are int8).
  const bool int8_dtype = m.contains("dtype") && m["dtype"] == "int8";
  if (ver == kFormatVersion) {
    QAENGINE_CHECK(!(m.contains("dtype") && m["dtype"] == "int8"),
                   std::string(kManifest) + ": dtype 'int8' needs format_version 2 and a 'quantization' block, " +
                       "got format_version " + std::to_string(ver));
  } else if (ver == kInt8FormatVersion && m.contains("dtype")) {
    QAENGINE_CHECK(m["dtype"] == "int8", std::string(kManifest) + ": format_version " + std::to_string(ver) +
                                             " is for int8 artifacts, but dtype is " + py_repr(m["dtype"]) +
                                             " (float artifacts use format_version 1)");
  }
  std::set<std::string> top = {"format", "format_version", "config", "dtype", "weights", "tokenizer", "null_threshold",
                               "source"};
  if (ver == kEmbFormatVersion) top.insert("embeddings");
  check_keys(m, top, {}, kManifest,
             ver == kInt8FormatVersion || (ver == kEmbFormatVersion && int8_dtype) ? "quantization" : nullptr);

  Manifest out;
  out.format_version = ver;
  QAENGINE_CHECK(m["dtype"].is_string(), std::string(kManifest) + ": field 'dtype' is " + py_repr(m["dtype"]) +
                                             ", expected one of ['bfloat16', 'float16', 'float32', 'int8']");
  out.dtype = m["dtype"].get<std::string>();
  QAENGINE_CHECK(out.dtype == "float32" || out.dtype == "bfloat16" || out.dtype == "float16" || out.dtype == "int8",
                 std::string(kManifest) + ": field 'dtype' is '" + out.dtype +
                     "', expected one of ['bfloat16', 'float16', 'float32', 'int8']");
  if (m.contains("quantization")) out.quantization = parse_quantization(m["quantization"]);
  if (ver == kEmbFormatVersion) {  // engine/artifact.py parse_embeddings
    const json& e = m["embeddings"];
    const std::string where = std::string(kManifest) + ": field 'embeddings'";
    QAENGINE_CHECK(e.is_object(), where + " must be an object");
    check_keys(e, {"word"}, {}, where);
    QAENGINE_CHECK(e["word"] == kEmbScheme,
                   where + ": word is " + py_repr(e["word"]) + ", this SparseQA reads only '" + kEmbScheme + "'");
    out.int8_word_embeddings = true;
  }
  QAENGINE_CHECK(m["weights"] == "weights.safetensors",
                 std::string(kManifest) + ": field 'weights' must be 'weights.safetensors'");

  const json& t = m["tokenizer"];
  const std::set<std::string> tok_keys = {"max_seq_length", "doc_stride",    "max_query_length",
                                          "do_lower_case",  "strip_accents", "files"};
  bool keys_ok = t.is_object() && t.size() == tok_keys.size();
  if (keys_ok)
    for (const auto& k : tok_keys) keys_ok = keys_ok && t.contains(k);
  QAENGINE_CHECK(keys_ok, std::string(kManifest) + ": field 'tokenizer' must have keys " + join(tok_keys));
  for (const char* k : {"max_seq_length", "doc_stride", "max_query_length"}) {
    QAENGINE_CHECK(is_int(t[k]),
                   std::string(kManifest) + ": tokenizer." + k + " must be an integer, got " + t[k].dump());
  }
  out.windows = {t["max_seq_length"].get<int64_t>(), t["doc_stride"].get<int64_t>(),
                 t["max_query_length"].get<int64_t>()};
  for (const char* k : {"do_lower_case", "strip_accents"}) {
    QAENGINE_CHECK(t[k].is_boolean(), std::string(kManifest) + ": tokenizer." + k + " must be true or false");
  }
  out.do_lower_case = t["do_lower_case"].get<bool>();
  out.strip_accents = t["strip_accents"].get<bool>();
  bool files_ok = t["files"].is_array();
  bool has_tok = false;
  if (files_ok) {
    for (const json& f : t["files"]) {
      files_ok = files_ok && f.is_string();
      if (f.is_string()) {
        out.tokenizer_files.push_back(f.get<std::string>());
        has_tok = has_tok || f == "tokenizer.json";
      }
    }
  }
  QAENGINE_CHECK(files_ok && has_tok,
                 std::string(kManifest) + ": tokenizer.files must list the tokenizer files, including tokenizer.json");
  const json& nt = m["null_threshold"];
  QAENGINE_CHECK(nt.is_number() && std::isfinite(nt.get<double>()),
                 std::string(kManifest) + ": null_threshold must be a finite number, got " + nt.dump());
  out.null_threshold = nt.get<double>();
  QAENGINE_CHECK(m["source"].is_object(), std::string(kManifest) + ": field 'source' must be an object");

  out.config = parse_config(m["config"]);

  // WindowSettings.validate
  const auto& w = out.windows;
  const int64_t specials = out.config.architecture == Architecture::Bert ? 3 : 4;
  const std::string ws = std::string(kManifest) + ": tokenizer settings: ";
  QAENGINE_CHECK(w.max_seq_length <= out.config.max_position_embeddings,
                 ws + "max_seq_length " + std::to_string(w.max_seq_length) + " exceeds the model's " +
                     std::to_string(out.config.max_position_embeddings) + " positions");
  QAENGINE_CHECK(w.max_query_length >= 1 && w.doc_stride >= 0,
                 ws + "max_query_length must be >= 1 and doc_stride >= 0");
  const int64_t room = w.max_seq_length - w.max_query_length - specials;
  QAENGINE_CHECK(room > w.doc_stride,
                 ws + "max_seq_length " + std::to_string(w.max_seq_length) + " leaves " + std::to_string(room) +
                     " context tokens per window after a " + std::to_string(w.max_query_length) +
                     "-token question, which must exceed doc_stride " + std::to_string(w.doc_stride));
  for (const auto& f : out.tokenizer_files) {
    std::ifstream probe(dir + "/" + f);
    QAENGINE_CHECK(static_cast<bool>(probe), "tokenizer file " + dir + "/" + f + " listed in engine.json is missing");
  }
  return out;
}

}  // namespace qaengine
