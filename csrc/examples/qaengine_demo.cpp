// qaengine_demo: answer one question from the command line and print the answer as JSON. BERT (WordPiece) and
// RoBERTa (byte-level BPE) artifacts alike.
//
//   qaengine_demo ARTIFACT_DIR --question "Who ...?" --context-file context.txt [--device cpu] [--threads N]
//                 [--max-answer-length 30] [--null-threshold X]
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "qaengine/engine.h"

namespace {

int usage(const char* argv0) {
  std::cerr << "usage: " << argv0
            << " ARTIFACT_DIR --question Q (--context-file F | --context C) [--device cpu] [--threads N]"
               " [--max-answer-length 30] [--null-threshold X]\n"
               "  ARTIFACT_DIR: a BERT (WordPiece) or RoBERTa (byte-level BPE) artifact from python -m engine.build_model\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage(argv[0]);
  std::string dir, question, context, context_file, device = "cpu";
  int threads = 0;
  int64_t max_answer_length = 30;
  std::optional<double> null_threshold;
  bool have_context = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw qaengine::Error("option " + a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--question") {
        question = value();
      } else if (a == "--context-file") {
        context_file = value();
      } else if (a == "--context") {
        context = value();
        have_context = true;
      } else if (a == "--device") {
        device = value();
      } else if (a == "--threads") {
        threads = std::stoi(value());
      } else if (a == "--max-answer-length") {
        max_answer_length = std::stoll(value());
      } else if (a == "--null-threshold") {
        null_threshold = std::stod(value());
      } else if (a == "-h" || a == "--help") {
        usage(argv[0]);
        return 0;
      } else if (!a.empty() && a[0] == '-') {
        std::cerr << "unknown option " << a << "\n";
        return usage(argv[0]);
      } else {
        dir = a;
      }
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      return usage(argv[0]);
    }
  }
  if (dir.empty() || question.empty() || (context_file.empty() && !have_context)) return usage(argv[0]);
  try {
    if (!context_file.empty()) {
      std::ifstream in(context_file, std::ios::binary);
      if (!in) throw qaengine::Error("cannot read context file " + context_file);
      std::stringstream ss;
      ss << in.rdbuf();
      context = ss.str();
    }
    if (threads > 0) qaengine::set_num_threads(threads);
    const auto t0 = std::chrono::steady_clock::now();
    const qaengine::Engine engine = qaengine::Engine::load(dir, device);
    const auto t1 = std::chrono::steady_clock::now();
    const qaengine::Answer a = engine.answer(question, context, max_answer_length, null_threshold);
    const auto t2 = std::chrono::steady_clock::now();
    nlohmann::json out = {
        {"text", a.text},
        {"start", a.start},
        {"end", a.end},
        {"start_byte", a.start_byte},
        {"end_byte", a.end_byte},
        {"score", a.score},
        {"null_score", a.null_score},
        {"null_score_diff", a.null_score_diff},
        {"no_answer", a.no_answer},
        {"load_ms", std::chrono::duration<double, std::milli>(t1 - t0).count()},
        {"answer_ms", std::chrono::duration<double, std::milli>(t2 - t1).count()},
    };
    std::cout << out.dump(2) << std::endl;
    return 0;
  } catch (const qaengine::Error& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "internal error: " << e.what() << std::endl;
    return 1;
  }
}
