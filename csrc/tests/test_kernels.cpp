// Fused CPU kernels of every ISA this CPU runs, against plain double-precision references at awkward sizes.
#include <cmath>
#include <random>
#include <vector>

#include "cpu/kernels.h"
#include "test_util.h"

namespace qaengine::test {
namespace {

using cpu::KernelTable;

// softmax(QKᵀ/sqrt(d)) V per sequence and head, with the qkv bias, in double.
std::vector<float> attention_ref(const std::vector<float>& qkv, const std::vector<float>& bias,
                                 const std::vector<int32_t>& cu, int64_t heads, int64_t dh) {
  const int64_t w = heads * dh, ld = 3 * w, total = cu.back();
  std::vector<float> out(total * w, 0.f);
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int64_t s0 = cu[b], S = cu[b + 1] - cu[b];
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        std::vector<double> p(S);
        double m = -1e300;
        for (int64_t j = 0; j < S; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < dh; ++d) {
            dot += (double(qkv[(s0 + i) * ld + h * dh + d]) + bias[h * dh + d]) *
                   (double(qkv[(s0 + j) * ld + w + h * dh + d]) + bias[w + h * dh + d]);
          }
          p[j] = dot / std::sqrt(double(dh));
          m = std::max(m, p[j]);
        }
        double sum = 0;
        for (auto& x : p) sum += (x = std::exp(x - m));
        for (int64_t d = 0; d < dh; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < S; ++j)
            acc += p[j] * (double(qkv[(s0 + j) * ld + 2 * w + h * dh + d]) + bias[2 * w + h * dh + d]);
          out[(s0 + i) * w + h * dh + d] = static_cast<float>(acc / sum);
        }
      }
    }
  }
  return out;
}

TEST(Kernels, AttentionMatchesReferenceOnEveryIsa) {
  const std::vector<std::vector<int32_t>> batches = {{0, 1}, {0, 5, 22, 22, 86}, {0, 257}, {0, 300, 301}};
  for (const KernelTable* k : cpu::available_kernels()) {
    for (int64_t dh : {8, 16, 24, 32, 64, 128}) {
      if (!k->attention_supports(dh)) continue;
      for (const auto& cu : batches) {
        const int64_t heads = 3, total = cu.back();
        int64_t longest = 0;
        for (size_t b = 0; b + 1 < cu.size(); ++b) longest = std::max<int64_t>(longest, cu[b + 1] - cu[b]);
        // Large logits (scale 2 on q and k) exercise the running-max rescaling across key blocks.
        const auto qkv = randn(total * 3 * heads * dh, 7 + dh, 2.f);
        const auto bias = randn(3 * heads * dh, 11, 0.5f);
        for (int threads : {1, 3}) {  // 3: query chunks split across the pool's threads
        std::vector<float> out(total * heads * dh, -1.f);
        cpu::AttentionParams p;
        p.qkv = qkv.data();
        p.bias = bias.data();
        p.out = out.data();
        p.cu_seqlens = cu.data();
        p.batch = static_cast<int64_t>(cu.size()) - 1;
        p.heads = heads;
        p.head_dim = dh;
        p.ld_qkv = 3 * heads * dh;
        p.ld_out = heads * dh;
        p.max_seqlen = longest;
        cpu::varlen_attention(p, *k, threads);
        const auto ref = attention_ref(qkv, bias, cu, heads, dh);
        float err = 0;
        for (size_t i = 0; i < ref.size(); ++i) err = std::max(err, std::abs(out[i] - ref[i]));
        EXPECT_LT(err, 2e-5f) << k->name << " dh=" << dh << " total=" << total << " threads=" << threads;
        }
      }
    }
  }
}

TEST(Kernels, AttentionSupportsItsDocumentedHeadDims) {
  for (const KernelTable* k : cpu::available_kernels()) {
    EXPECT_TRUE(k->attention_supports(32)) << k->name;
    EXPECT_TRUE(k->attention_supports(64)) << k->name;
    EXPECT_FALSE(k->attention_supports(0)) << k->name;
    EXPECT_FALSE(k->attention_supports(k->vector_width + 1)) << k->name;
  }
}

TEST(Kernels, BiasActivation) {
  for (const KernelTable* k : cpu::available_kernels()) {
    for (Activation act : {Activation::Gelu, Activation::GeluTanh, Activation::Relu}) {
      for (int64_t cols : {1, 13, 64, 100}) {
        const int64_t rows = 5, ld = cols + 3;
        auto x = randn(rows * ld, 3, 3.f);
        const auto bias = randn(cols, 4);
        const auto x0 = x;
        cpu::bias_act(x.data(), ld, bias.data(), rows, cols, act, *k);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < ld; ++c) {
            const float got = x[r * ld + c];
            if (c >= cols) {
              EXPECT_EQ(got, x0[r * ld + c]);  // outside the row: untouched
            } else {
              const double want = act_ref(double(x0[r * ld + c]) + bias[c], act);
              EXPECT_NEAR(got, want, 2e-6 * (1 + std::abs(want))) << k->name << " cols=" << cols;
            }
          }
        }
      }
    }
  }
}

TEST(Kernels, AddLayerNorm) {
  for (const KernelTable* k : cpu::available_kernels()) {
    for (int64_t cols : {1, 7, 96, 385}) {
      for (int variant = 0; variant < 3; ++variant) {  // x + y + bias, x + bias, x
        const int64_t rows = 9;
        auto x = randn(rows * cols, 1, 2.f);
        const auto y = randn(rows * cols, 2), bias = randn(cols, 3), g = randn(cols, 4), b = randn(cols, 5);
        const auto x0 = x;
        const float* yp = variant == 0 ? y.data() : nullptr;
        const float* bp = variant <= 1 ? bias.data() : nullptr;
        cpu::add_layernorm(x.data(), cols, yp, cols, bp, g.data(), b.data(), rows, cols, 1e-5f, *k);
        for (int64_t r = 0; r < rows; ++r) {
          std::vector<double> v(cols);
          double mean = 0, var = 0;
          for (int64_t c = 0; c < cols; ++c) {
            v[c] = x0[r * cols + c] + (yp ? yp[r * cols + c] : 0.0) + (bp ? bp[c] : 0.0);
            mean += v[c];
          }
          mean /= cols;
          for (double e : v) var += (e - mean) * (e - mean);
          var /= cols;
          for (int64_t c = 0; c < cols; ++c) {
            const double want = (v[c] - mean) / std::sqrt(var + 1e-5) * g[c] + b[c];
            EXPECT_NEAR(x[r * cols + c], want, 2e-5 * (1 + std::abs(want))) << k->name << " cols=" << cols;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace qaengine::test
