// Vector math shared by the per-ISA kernel bodies (kernels_impl.h, quant_impl.h): GCC vector types of QAENGINE_VW
// floats, loads/stores, exp2/exp/erf polynomials and the activations. Included once per ISA translation unit, in an
// anonymous namespace, like the bodies themselves.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace qaengine::cpu {
namespace {

constexpr int W = QAENGINE_VW;
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));

constexpr float kNegInf = -__builtin_inff();
constexpr float kLog2e = 1.4426950408889634f;

inline vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) {
  __builtin_memcpy(p, &v, sizeof v);
}
inline vf splat(float s) {
  return vf{} + s;
}
inline vf vmax(vf a, vf b) {
  return a > b ? a : b;
}
inline vf vabs(vf x) {
  return (vf)((vu)x & 0x7fffffffu);
}
inline vf vmin(vf a, vf b) {
  return a < b ? a : b;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float smax(float a, float b) {
  return a > b ? a : b;
}
inline int64_t imin(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// 2^x, x clamped to [-126, 126]; relative error about 2e-7.
inline vf exp2v(vf x) {
  x = vmin(vmax(x, splat(-126.f)), splat(126.f));
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: x + magic rounds x to an integer in the low mantissa bits
  const vf t = x + magic;
  const vi n = (vi)t - (vi)magic;
  const vf f = x - (t - magic);  // in [-0.5, 0.5]
  // 2^f = e^(f ln 2), Taylor to degree 6 (truncation error < 1.3e-7 on |f| <= 0.5)
  vf poly = splat(1.5403530393381608e-4f);
  poly = poly * f + 1.3333558146428443e-3f;
  poly = poly * f + 9.6181291076284772e-3f;
  poly = poly * f + 5.5504108664821580e-2f;
  poly = poly * f + 2.4022650695910071e-1f;
  poly = poly * f + 6.9314718055994531e-1f;
  poly = poly * f + 1.f;
  const vi bits = (n + 127) << 23;
  return poly * (vf)bits;
}

inline vf expv(vf x) {
  return exp2v(x * kLog2e);
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), the formula ATen's vectorized GELU uses.
inline vf erfv(vf x) {
  const vf ax = vmax(x, -x);
  const vf t = 1.f / (ax * 0.3275911f + 1.f);
  vf r = splat(1.061405429f);
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const vf y = 1.f - r * t * expv(-(x * x));
  return x < 0.f ? -y : y;
}

inline vf gelu_v(vf x) {
  return 0.5f * x * (1.f + erfv(x * 0.70710678118654752f));
}

inline vf gelu_tanh_v(vf x) {
  const vf inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
  const vf th = 1.f - 2.f / (expv(2.f * inner) + 1.f);
  return 0.5f * x * (1.f + th);
}

inline vf act_v(vf x, Activation act) {
  switch (act) {
    case Activation::Gelu: return gelu_v(x);
    case Activation::GeluTanh: return gelu_tanh_v(x);
    case Activation::Relu:
    default: return vmax(x, splat(0.f));
  }
}


}  // namespace
}  // namespace qaengine::cpu
