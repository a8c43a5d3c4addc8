// qaengine::Error: every failure the library reports (bad artifact, bad input, unsupported model).
#pragma once

#include <stdexcept>
#include <string>

namespace qaengine {

/// Thrown for invalid artifacts and invalid inputs; the message names the file, tensor or field and the fix.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace qaengine
