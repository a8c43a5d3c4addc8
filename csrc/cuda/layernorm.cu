// Fused residual + bias + LayerNorm, fp32, in place (see params.h). One warp per row: pass 1 forms
// v = x + residual + bias (written back to x) and its sum, pass 2 the variance around the mean (two-pass, as
// accurate as the CPU path), pass 3 normalises. Rows are re-read from L1/L2, so any width works.
#include "params.h"

namespace qaengine::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void __launch_bounds__(32 * kWarpsPerBlock) add_layernorm_kernel(AddLayerNormParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= p.rows) return;
  const int lane = threadIdx.x % 32;
  float* x = p.x + r * p.ld_x;
  const float* y = p.residual ? p.residual + r * p.ld_residual : nullptr;
  float sum = 0.f;
  for (int64_t c = lane; c < p.cols; c += 32) {
    const float v = x[c] + (y ? y[c] : 0.f) + (p.bias ? p.bias[c] : 0.f);
    x[c] = v;
    sum += v;
  }
  const float mean = warp_sum(sum) / static_cast<float>(p.cols);
  float sq = 0.f;
  for (int64_t c = lane; c < p.cols; c += 32) {
    const float d = x[c] - mean;
    sq = fmaf(d, d, sq);
  }
  const float rstd = rsqrtf(warp_sum(sq) / static_cast<float>(p.cols) + p.eps);
  for (int64_t c = lane; c < p.cols; c += 32) x[c] = (x[c] - mean) * rstd * p.gamma[c] + p.beta[c];
}

}  // namespace

cudaError_t launch_add_layernorm(const AddLayerNormParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 1 || !p.x || !p.gamma || !p.beta || p.ld_x < p.cols ||
      (p.residual && p.ld_residual < p.cols)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  add_layernorm_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace qaengine::cuda
