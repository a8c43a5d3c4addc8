// ByteLevelBPETokenizer::from_json_file: a HF tokenizers byte-level BPE `tokenizer.json` (RoBERTa, GPT-2) read into the
// tokenizer's vocabulary, merges, added tokens and options (bpe.h), refusing every setting bpe.cpp does not implement
// with the file and the field named.
#include <string>
#include <utility>
#include <vector>

#include "check.h"
#include "qaengine/bpe.h"
#include "tokenizer_common.h"

namespace qaengine {

using json = nlohmann::json;

namespace {

bool flag(const json& obj, const char* key, bool fallback, const std::string& where) {
  if (!obj.contains(key) || obj[key].is_null()) return fallback;
  QAENGINE_CHECK(obj[key].is_boolean(), where + "." + key + " must be true or false");
  return obj[key].get<bool>();
}

/// trim_offsets settings of one post-processor block; false if it does not trim.
bool read_trim(const json& p, const std::string& path, ByteLevelBPEOptions& opt) {
  const std::string type = p.is_object() ? p.value("type", "") : "";
  if (type == "RobertaProcessing" || type == "ByteLevel") {
    opt.trim_offsets = flag(p, "trim_offsets", true, path + ": post_processor");
    opt.trim_prefix_space = flag(p, "add_prefix_space", true, path + ": post_processor");
    return opt.trim_offsets;
  }
  QAENGINE_CHECK(type == "TemplateProcessing" || type == "BertProcessing",
                 path + ": post_processor type '" + type +
                     "' is not supported (RobertaProcessing, ByteLevel, TemplateProcessing, BertProcessing, Sequence)");
  return false;
}

}  // namespace

ByteLevelBPETokenizer ByteLevelBPETokenizer::from_json_file(const std::string& path) {
  const json j = read_tokenizer_json(path);
  auto fail = [&](const std::string& msg) { return Error(path + ": " + msg); };
  const json& model = j["model"];
  const std::string type = model.value("type", "");
  if (type != "BPE") throw fail("model type '" + type + "' is not a byte-level BPE (RoBERTa/GPT-2) model");
  ByteLevelBPEOptions opt;
  const std::string where = path + ": model";
  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0.0)
    throw fail("model.dropout is set; BPE dropout is for training, set it to null for inference");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(k) && !model[k].is_null() && model[k] != "")
      throw fail(std::string("model.") + k + " is not supported by the byte-level BPE (it must be empty or null)");
  }
  if (flag(model, "byte_fallback", false, where)) throw fail("model.byte_fallback is not supported (byte-level BPE)");
  opt.ignore_merges = flag(model, "ignore_merges", false, where);
  opt.fuse_unk = flag(model, "fuse_unk", false, where);
  if (model.contains("unk_token") && model["unk_token"].is_string()) opt.unk_token = model["unk_token"];

  const json norm = j.value("normalizer", json());
  if (!norm.is_null()) throw fail("normalizer " + norm.dump().substr(0, 80) + " is not supported (byte-level BPE "
                                  "tokenizers such as RoBERTa's have none)");
  const json pre = j.value("pre_tokenizer", json());
  if (!pre.is_object() || pre.value("type", "") != "ByteLevel") {
    throw fail("pre_tokenizer " + pre.dump().substr(0, 80) + " is not supported (ByteLevel only)");
  }
  opt.add_prefix_space = flag(pre, "add_prefix_space", true, path + ": pre_tokenizer");
  opt.use_regex = flag(pre, "use_regex", true, path + ": pre_tokenizer");
  opt.trim_offsets = false;
  const json post = j.value("post_processor", json());
  if (post.is_object() && post.value("type", "") == "Sequence") {
    int trimming = 0;
    for (const json& p : post.value("processors", json::array())) trimming += read_trim(p, path, opt) ? 1 : 0;
    if (trimming > 1) throw fail("post_processor trims offsets more than once; not supported");
  } else if (!post.is_null()) {
    read_trim(post, path, opt);
  }

  std::vector<std::pair<std::string, int64_t>> vocab = read_vocab(model, path);
  if (!model.contains("merges") || !model["merges"].is_array()) throw fail("model.merges must be a list");
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(model["merges"].size());
  for (const json& m : model["merges"]) {
    if (m.is_string()) {  // "left right"
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        throw fail("merge '" + s + "' must be two tokens separated by one space");
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      throw fail("model.merges entries must be \"a b\" strings or [a, b] pairs, got " + m.dump().substr(0, 40));
    }
  }
  std::vector<AddedToken> added;
  for (const json& t : j.value("added_tokens", json::array())) {
    if (!t.is_object() || !t.contains("content") || !t.contains("id"))
      throw fail("added_tokens entries need content and id");
    const std::string w = path + ": added token " + t["content"].dump();
    if (flag(t, "single_word", false, w)) throw fail("added token " + t["content"].dump() + " sets single_word, "
                                                     "which is not supported");
    added.push_back(AddedToken{t["content"].get<std::string>(), t["id"].get<int64_t>(), flag(t, "lstrip", false, w),
                               flag(t, "rstrip", false, w), flag(t, "normalized", true, w)});
  }
  try {
    return ByteLevelBPETokenizer(std::move(vocab), merges, opt, std::move(added));
  } catch (const Error& e) {
    throw fail(e.what());
  }
}

}  // namespace qaengine
