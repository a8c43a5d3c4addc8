// ATen entry point of libqaengine: packed forward on tensors (used by the Python binding engine._C).
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "qaengine/engine.h"

namespace qaengine {

/// `input_ids`, `token_type_ids`: int64 `[T]`; `cu_seqlens`: int32 `[B+1]`, 0 = c[0] <= ... <= c[B] = T;
/// `max_seqlen` >= the longest sequence. Returns fp32 (start, end) logits `[T]` each, on the engine's device.
/// Every input is checked (dtype, rank, contiguity, ranges); violations raise qaengine::Error.
std::pair<at::Tensor, at::Tensor> forward_packed(const Engine& engine, const at::Tensor& input_ids,
                                                 const at::Tensor& token_type_ids, const at::Tensor& cu_seqlens,
                                                 int64_t max_seqlen);

}  // namespace qaengine
