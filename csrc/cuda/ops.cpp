#include "ops.h"

#include <ATen/ops/empty.h>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)  // a CUDA build of torch: launch on torch's current stream
#include <c10/cuda/CUDAStream.h>
#define QAENGINE_TORCH_STREAMS 1
#endif

#include <string>

#include "../src/check.h"
#include "params.h"
#include "qaengine/error.h"

namespace qaengine::cuda {
namespace {

void check_cuda_f32(const at::Tensor& t, const char* name, int64_t dim) {
  QAENGINE_CHECK(t.defined(), std::string(name) + " is undefined");
  QAENGINE_CHECK(t.is_cuda(), std::string(name) + " must be a CUDA tensor, got " + t.device().str());
  QAENGINE_CHECK(t.scalar_type() == at::kFloat,
                 std::string(name) + " must be float32, got " + c10::toString(t.scalar_type()));
  QAENGINE_CHECK(t.dim() == dim,
                 std::string(name) + " must have " + std::to_string(dim) + " dims, got " + std::to_string(t.dim()));
  QAENGINE_CHECK(t.is_contiguous(), std::string(name) + " must be contiguous");
}

cudaStream_t current_stream(const at::Tensor& t) {
#if defined(QAENGINE_TORCH_STREAMS)
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  // Only compiled by the compile check against a CPU build of torch, which cannot run this code.
  (void)t;
  return nullptr;
#endif
}

void check_launch(cudaError_t err, const char* what) {
  QAENGINE_CHECK(err == cudaSuccess, std::string(what) + " launch failed: " + cudaGetErrorString(err));
}

}  // namespace

at::Tensor varlen_attention(const at::Tensor& qkv, const std::optional<at::Tensor>& bias, const at::Tensor& cu_seqlens,
                            int64_t heads, int64_t max_seqlen) {
  check_cuda_f32(qkv, "qkv", 2);
  QAENGINE_CHECK(
      heads >= 1 && qkv.size(1) % (3 * heads) == 0,
      "qkv width " + std::to_string(qkv.size(1)) + " is not 3 * heads * head_dim for heads=" + std::to_string(heads));
  const int64_t head_dim = qkv.size(1) / (3 * heads);
  QAENGINE_CHECK(attention_supports(static_cast<int>(head_dim)),
                 "CUDA attention supports head_dim 32, 64 or 128, got " + std::to_string(head_dim));
  if (bias) {
    check_cuda_f32(*bias, "bias", 1);
    QAENGINE_CHECK(bias->size(0) == qkv.size(1), "bias must have " + std::to_string(qkv.size(1)) + " entries");
    QAENGINE_CHECK(bias->device() == qkv.device(), "bias must be on " + qkv.device().str());
  }
  QAENGINE_CHECK(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
                 "cu_seqlens must be int32 [batch + 1]");
  // Validate offsets on the host (one small copy): a bad cu_seqlens would make the kernel read out of bounds.
  const at::Tensor cu_host = cu_seqlens.cpu().contiguous();
  const int32_t* c = cu_host.data_ptr<int32_t>();
  const int64_t batch = cu_host.size(0) - 1;
  QAENGINE_CHECK(c[0] == 0, "cu_seqlens[0] must be 0");
  for (int64_t b = 0; b < batch; ++b) {
    QAENGINE_CHECK(c[b + 1] >= c[b], "cu_seqlens must be non-decreasing");
    QAENGINE_CHECK(c[b + 1] - c[b] <= max_seqlen,
                   "max_seqlen " + std::to_string(max_seqlen) + " is shorter than sequence " + std::to_string(b));
  }
  QAENGINE_CHECK(c[batch] <= qkv.size(0), "cu_seqlens ends past the " + std::to_string(qkv.size(0)) + " rows of qkv");
  const at::Tensor cu_dev = cu_seqlens.to(qkv.device()).contiguous();
  at::Tensor out = at::empty({qkv.size(0), heads * head_dim}, qkv.options());

  VarlenAttentionParams p;
  p.qkv = qkv.data_ptr<float>();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.cu_seqlens = cu_dev.data_ptr<int32_t>();
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.head_dim = static_cast<int>(head_dim);
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.ld_qkv = qkv.size(1);
  p.ld_out = out.size(1);
  check_launch(launch_varlen_attention(p, current_stream(qkv)), "varlen attention");
  return out;
}

void add_layernorm_(at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& bias,
                    const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  check_cuda_f32(x, "x", 2);
  const int64_t cols = x.size(1);
  for (const auto& [t, name] : {std::pair{gamma, "gamma"}, std::pair{beta, "beta"}}) {
    check_cuda_f32(t, name, 1);
    QAENGINE_CHECK(t.size(0) == cols, std::string(name) + " must have " + std::to_string(cols) + " entries");
  }
  if (residual) {
    check_cuda_f32(*residual, "residual", 2);
    QAENGINE_CHECK(residual->sizes() == x.sizes(), "residual must have the shape of x");
  }
  if (bias) {
    check_cuda_f32(*bias, "bias", 1);
    QAENGINE_CHECK(bias->size(0) == cols, "bias must have " + std::to_string(cols) + " entries");
  }
  AddLayerNormParams p;
  p.x = x.data_ptr<float>();
  p.residual = residual ? residual->data_ptr<float>() : nullptr;
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.gamma = gamma.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.rows = x.size(0);
  p.cols = cols;
  p.ld_x = cols;
  p.ld_residual = cols;
  p.eps = static_cast<float>(eps);
  check_launch(launch_add_layernorm(p, current_stream(x)), "add_layernorm");
}

}  // namespace qaengine::cuda
