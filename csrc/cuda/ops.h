// ATen binding of the CUDA kernels: checks every tensor (device, dtype, shape, contiguity) and launches on the current
// stream. Compiled only in -DQAENGINE_CUDA=ON builds (it needs a CUDA build of torch).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace qaengine::cuda {

/// qkv `[T, 3*heads*head_dim]` fp32 CUDA, bias `[3*heads*head_dim]` or none, cu_seqlens int32 `[B+1]` (any device)
/// -> `[T, heads*head_dim]`. `max_seqlen` must be >= the longest sequence (checked on the host).
at::Tensor varlen_attention(const at::Tensor& qkv, const std::optional<at::Tensor>& bias, const at::Tensor& cu_seqlens,
                            int64_t heads, int64_t max_seqlen);

/// In place: x = LayerNorm(x + residual + bias) * gamma + beta over the last dim of a `[rows, cols]` fp32 CUDA x.
void add_layernorm_(at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& bias,
                    const at::Tensor& gamma, const at::Tensor& beta, double eps);

}  // namespace qaengine::cuda
