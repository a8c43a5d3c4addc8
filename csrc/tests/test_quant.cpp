// Quantization / epilogue kernels of every ISA this CPU runs (cpu/quant.h) against scalar references that follow
// engine/quant.py operation by operation: the uint8 codes must be bit-identical, the epilogues within a few ulps.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/quant.h"
#include "test_util.h"

namespace qaengine::test {
namespace {

using OptAct = std::optional<Activation>;  // an epilogue's activation; empty: none
using cpu::QuantKernels;

// torch.round on a float product: round to nearest, ties to even (the default rounding mode of std::nearbyint).
uint8_t code(float v) {
  return static_cast<uint8_t>(static_cast<int>(std::nearbyint(v)) + 128);
}

TEST(QuantKernels, PerTokenCodesAreBitExact) {
  for (const QuantKernels* k : cpu::available_quant_kernels()) {
    // The last case has about a million elements, so that a scale off by one ulp (127 / a instead of (1 / a) · 127)
    // flips some codes and shows up.
    for (int64_t cols : {1, 3, 16, 17, 37, 384, 1000, 384 + 2}) {
      const int64_t rows = cols == 386 ? 3000 : 7, ldx = cols + 5, ldo = cols + 2;
      auto x = randn(rows * ldx, 10 + cols, 2.f);
      for (int64_t c = 0; c < cols; ++c) x[2 * ldx + c] = 0.f;     // an all-zero token
      for (int64_t c = 0; c < cols; ++c) x[3 * ldx + c] *= 1e-6f;  // a tiny one
      x[4 * ldx + cols - 1] = -50.f;                               // its max in the tail, negative
      std::vector<uint8_t> out(rows * ldo, 7);
      std::vector<float> scale(rows, -1.f);
      k->quantize_per_token(x.data(), ldx, rows, cols, out.data(), ldo, scale.data());
      for (int64_t r = 0; r < rows; ++r) {
        float a = 0.f;
        for (int64_t c = 0; c < cols; ++c) a = std::max(a, std::abs(x[r * ldx + c]));
        a = std::max(a, 1e-30f);
        const float inv = (1.f / a) * 127.f;  // engine.quant._per_token_u8: 127 / amax, then x * that
        EXPECT_EQ(scale[r], a / 127.f) << k->name;
        for (int64_t c = 0; c < ldo; ++c) {
          if (c >= cols) {
            EXPECT_EQ(out[r * ldo + c], 7) << "wrote past the row";
            continue;
          }
          const float v = x[r * ldx + c] * inv;
          ASSERT_EQ(out[r * ldo + c], code(v)) << k->name << " cols=" << cols << " r=" << r << " c=" << c;
        }
        if (r == 2)
          for (int64_t c = 0; c < cols; ++c) EXPECT_EQ(out[r * ldo + c], 128);
      }
      // The largest |x| of each non-zero row maps to ±127 (code 255 or 1), never to -128 (code 0).
      for (int64_t r = 0; r < rows; ++r) {
        int hi = 0;
        for (int64_t c = 0; c < cols; ++c) {
          EXPECT_NE(out[r * ldo + c], 0);
          hi = std::max(hi, std::abs(int(out[r * ldo + c]) - 128));
        }
        if (r != 2) EXPECT_EQ(hi, 127) << k->name;
      }
    }
  }
}

TEST(QuantKernels, StaticCodesRoundTiesToEvenAndSaturate) {
  for (const QuantKernels* k : cpu::available_quant_kernels()) {
    // Ties, saturation and ordinary values, in the vector body and in the tail (37 columns).
    const std::vector<float> special = {0.5f,   1.5f,    2.5f,   -0.5f,   -1.5f, -2.5f, 126.5f,   -126.5f, 127.4f,
                                        127.6f, -127.6f, 1000.f, -1000.f, 0.f,   -0.f,  3.49999f, 64.f};
    for (int64_t cols : {1, 5, 17, 37, 96}) {
      const int64_t rows = 3;
      auto x = randn(rows * cols, 20 + cols, 40.f);
      auto inv = randn(cols, 30 + cols, 1.f);
      for (auto& v : inv) v = std::abs(v) + 0.05f;
      for (int64_t c = 0; c < cols; ++c) {
        x[c] = special[c % special.size()];
        inv[c] = c % 3 == 0 ? 1.f : inv[c];
      }
      std::vector<uint8_t> out(rows * cols);
      k->quantize_static(x.data(), cols, rows, cols, inv.data(), out.data(), cols);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const float v = std::min(127.f, std::max(-127.f, x[r * cols + c] * inv[c]));
          ASSERT_EQ(out[r * cols + c], code(v)) << k->name << " x=" << x[r * cols + c] << " inv=" << inv[c];
        }
      }
      if (cols >= 12) {  // inv = 1 at c % 3 == 0: 0.5 -> 0, -1.5 -> -2, 126.5 -> 126, 1000 -> 127 (the 12th)
        EXPECT_EQ(out[0], 128);
        EXPECT_EQ(out[3], 128);
        EXPECT_EQ(out[6], 128 + 126);
        EXPECT_EQ(out[9], 128 + 127);
      }
    }
  }
}

double epi_ref(double x, OptAct a) {
  return a ? act_ref(x, *a) : x;
}

TEST(QuantKernels, EpilogueScalesAddsBiasAndActivates) {
  for (const QuantKernels* k : cpu::available_quant_kernels()) {
    for (OptAct act : {OptAct(), OptAct(Activation::Gelu), OptAct(Activation::GeluTanh), OptAct(Activation::Relu)}) {
      for (int64_t cols : {1, 13, 64, 100}) {
        for (int variant = 0; variant < 3; ++variant) {  // scale + bias, bias only, neither
          const int64_t rows = 5, ld = cols + 3;
          auto y = randn(rows * ld, 3, 300.f);
          const auto bias = randn(cols, 4);
          auto scale = randn(rows, 5, 0.01f);
          const auto y0 = y;
          const float* sp = variant == 0 ? scale.data() : nullptr;
          const float* bp = variant <= 1 ? bias.data() : nullptr;
          k->epilogue(y.data(), ld, sp, bp, rows, cols, act);
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t c = 0; c < ld; ++c) {
              const float got = y[r * ld + c];
              if (c >= cols) {
                EXPECT_EQ(got, y0[r * ld + c]);
                continue;
              }
              const double pre = double(y0[r * ld + c]) * (sp ? sp[r] : 1.0) + (bp ? bp[c] : 0.0);
              const double want = epi_ref(pre, act);
              // fp32 multiply-add (<= 1 ulp of the larger term) through an activation of slope <= 1.13.
              const double mag = std::abs(double(y0[r * ld + c]) * (sp ? sp[r] : 1.0)) + (bp ? std::abs(bp[c]) : 0);
              EXPECT_NEAR(got, want, 1.2e-7 * 1.13 * mag + 2e-6 * (1 + std::abs(want))) << k->name << " cols=" << cols;
            }
          }
        }
      }
    }
  }
}

TEST(QuantKernels, WidenBf16IsExact) {
  for (const QuantKernels* k : cpu::available_quant_kernels()) {
    for (int64_t cols : {1, 9, 32, 45}) {
      const int64_t rows = 4, ldi = cols + 1, ldo = cols + 2;
      const auto f = randn(rows * ldi, 8, 10.f);
      std::vector<uint16_t> h(rows * ldi);
      for (size_t i = 0; i < h.size(); ++i) {
        uint32_t bits;
        std::memcpy(&bits, &f[i], 4);
        h[i] = static_cast<uint16_t>(bits >> 16);
      }
      for (OptAct act : {OptAct(), OptAct(Activation::Gelu)}) {
        std::vector<float> out(rows * ldo, -7.f);
        k->widen_bf16(h.data(), ldi, out.data(), ldo, rows, cols, act);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < ldo; ++c) {
            if (c >= cols) {
              EXPECT_EQ(out[r * ldo + c], -7.f);
              continue;
            }
            const uint32_t bits = static_cast<uint32_t>(h[r * ldi + c]) << 16;
            float want;
            std::memcpy(&want, &bits, 4);
            if (!act) {
              EXPECT_EQ(out[r * ldo + c], want) << k->name;
            } else {
              EXPECT_NEAR(out[r * ldo + c], epi_ref(want, act), 2e-6 * (1 + std::abs(want))) << k->name;
            }
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace qaengine::test
