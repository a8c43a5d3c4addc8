// read_json_file: a whole JSON file, or qaengine::Error naming the file (missing, unreadable, not JSON).
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "qaengine/error.h"

namespace qaengine {

inline nlohmann::json read_json_file(const std::string& path, const std::string& what = "tokenizer file") {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(what + " " + path + " is missing");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + " is not valid JSON (" + e.what() + ")");
  }
}

}  // namespace qaengine
