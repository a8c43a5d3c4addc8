// QAENGINE_CHECK(cond, message): throw qaengine::Error(message) when cond is false. The message expression is only
// evaluated on failure, so checks inside per-element loops cost a comparison.
#pragma once

#include "qaengine/error.h"

#define QAENGINE_CHECK(cond, ...)                      \
  do {                                                 \
    if (!(cond)) throw ::qaengine::Error(__VA_ARGS__); \
  } while (0)
