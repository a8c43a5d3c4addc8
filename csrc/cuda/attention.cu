// Varlen attention for packed sequences, fp32 (see params.h for the contract and limits).
//
// Grid: (query tiles of kRowsPerBlock rows over max_seqlen, batch * heads). Each query row is owned by G = head_dim/32
// threads; thread g of a row holds the 32 dims {g, g+G, g+2G, ...} of q and of the output accumulator, so the shared
// memory reads of one warp touch consecutive banks. Keys and values stream through shared memory in tiles of kKeys
// rows; the softmax is online (running max m, running sum l, accumulator rescaled when m grows), in base 2 with
// log2(e)/sqrt(d) folded into q. A block whose tile starts past its sequence's end exits at once.
#include <cfloat>

#include "params.h"

namespace qaengine::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kKeys = 32;  // keys per shared-memory tile

template <int DH>
__global__ void __launch_bounds__(kThreads) varlen_attention_kernel(VarlenAttentionParams p) {
  constexpr int G = DH / 32;  // threads per query row
  constexpr int kRowsPerBlock = kThreads / G;
  __shared__ float ks[kKeys][DH];
  __shared__ float vs[kKeys][DH];

  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int s0 = p.cu_seqlens[b];
  const int len = p.cu_seqlens[b + 1] - s0;
  const int tile0 = blockIdx.x * kRowsPerBlock;
  if (tile0 >= len) return;

  const int width = p.heads * DH;
  const int row = tile0 + threadIdx.x / G;  // query row within the sequence
  const int g = threadIdx.x % G;
  const bool active = row < len;
  const float* bias_q = p.bias ? p.bias + h * DH : nullptr;
  const float* bias_k = p.bias ? p.bias + width + h * DH : nullptr;
  const float* bias_v = p.bias ? p.bias + 2 * width + h * DH : nullptr;
  const float scale = 1.4426950408889634f * rsqrtf(static_cast<float>(DH));

  float q[32], acc[32];
  const float* qrow = p.qkv + static_cast<int64_t>(s0 + (active ? row : 0)) * p.ld_qkv + h * DH;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int d = g + G * i;
    q[i] = (qrow[d] + (bias_q ? bias_q[d] : 0.f)) * scale;
    acc[i] = 0.f;
  }
  float m = -FLT_MAX, l = 0.f;

  for (int k0 = 0; k0 < len; k0 += kKeys) {
    const int kn = min(kKeys, len - k0);
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < kKeys * DH; idx += kThreads) {
      const int j = idx / DH, d = idx % DH;
      float kv = 0.f, vv = 0.f;
      if (j < kn) {
        const float* src = p.qkv + static_cast<int64_t>(s0 + k0 + j) * p.ld_qkv + h * DH + d;
        kv = src[width] + (bias_k ? bias_k[d] : 0.f);
        vv = src[2 * width] + (bias_v ? bias_v[d] : 0.f);
      }
      ks[j][d] = kv;
      vs[j][d] = vv;
    }
    __syncthreads();

    float s[kKeys];
    float tile_max = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < 32; ++i) dot = fmaf(q[i], ks[j][g + G * i], dot);
#pragma unroll
      for (int off = 1; off < G; off <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);  // G lanes of a row
      s[j] = j < kn ? dot : -FLT_MAX;
      tile_max = fmaxf(tile_max, s[j]);
    }
    const float m_new = fmaxf(m, tile_max);
    const float alpha = exp2f(m - m_new);
    m = m_new;
    float tile_sum = 0.f;
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      s[j] = j < kn ? exp2f(s[j] - m_new) : 0.f;
      tile_sum += s[j];
    }
    l = l * alpha + tile_sum;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      float a = acc[i] * alpha;
#pragma unroll
      for (int j = 0; j < kKeys; ++j) a = fmaf(s[j], vs[j][g + G * i], a);
      acc[i] = a;
    }
  }
  if (!active) return;
  const float inv = 1.f / l;
  float* orow = p.out + static_cast<int64_t>(s0 + row) * p.ld_out + h * DH;
#pragma unroll
  for (int i = 0; i < 32; ++i) orow[g + G * i] = acc[i] * inv;
}

}  // namespace

bool attention_supports(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

cudaError_t launch_varlen_attention(const VarlenAttentionParams& p, cudaStream_t stream) {
  if (!attention_supports(p.head_dim) || p.batch < 0 || p.heads < 1 || p.max_seqlen < 0 || !p.qkv || !p.out ||
      !p.cu_seqlens || p.ld_qkv < 3LL * p.heads * p.head_dim || p.ld_out < static_cast<int64_t>(p.heads) * p.head_dim) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.max_seqlen == 0) return cudaSuccess;
  const int rows_per_block = kThreads / (p.head_dim / 32);
  const dim3 grid((p.max_seqlen + rows_per_block - 1) / rows_per_block, p.batch * p.heads);
  switch (p.head_dim) {
    case 32: varlen_attention_kernel<32><<<grid, kThreads, 0, stream>>>(p); break;
    case 64: varlen_attention_kernel<64><<<grid, kThreads, 0, stream>>>(p); break;
    default: varlen_attention_kernel<128><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace qaengine::cuda
