// The per-ISA body of the quantization and epilogue kernels (quant.h). Included by each of
// kernels_{base,avx2,avx512}.cpp after kernels_impl.h, with the same macros (QAENGINE_VW floats per vector,
// QAENGINE_ISA, QAENGINE_NAME, QAENGINE_TABLE); it defines quant_<QAENGINE_TABLE>(), e.g. quant_kernels_avx2().
//
// Self-contained on purpose: its helpers live in their own namespace (q8), so it does not depend on the internals of
// kernels_impl.h. GCC vector extensions, compiled with -ffp-contract=fast; where the order of roundings matters (the
// product x · (127 / a) must be rounded to fp32 before it is rounded to an integer, as torch does),
// QAENGINE_Q8_ROUNDED stops the compiler from fusing it into an FMA.
#pragma once

#include <cstdint>

#include "quant.h"
#include "vec_impl.h"

// QAENGINE_Q8_ROUNDED(v): v, rounded to fp32 where it stands (no FMA contraction with what follows). On x86 an empty
// asm that takes the value in a vector register; GCC 12's __builtin_assoc_barrier does the same job but splits a
// vector into lanes to do it.
#if defined(__x86_64__) || defined(__i386__)
#define QAENGINE_Q8_ROUNDED(v) q8::rounded(v)
#elif defined(__has_builtin)
#if __has_builtin(__builtin_assoc_barrier)
#define QAENGINE_Q8_ROUNDED(v) __builtin_assoc_barrier(v)
#endif
#endif
#if !defined(QAENGINE_Q8_ROUNDED)
#define QAENGINE_Q8_ROUNDED(v) (v)  // no barrier available: products may be fused (a rare tie may round otherwise)
#endif

namespace qaengine::cpu {
namespace {
namespace q8 {

typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef uint8_t vb __attribute__((vector_size(W)));

constexpr float kTiny = 1e-30f;  // floor of a row's max |x| (engine/quant.py _TINY): an all-zero row quantizes to 0
constexpr float kQmax = 127.f;
// 1.5 · 2^23 + 128: adding it to v (|v| <= 2^21) rounds v to an integer n (to nearest, ties to even, since the
// constant is even) held in the low mantissa bits, whose low byte is then n + 128 for n in [-128, 127].
constexpr float kMagicU8 = 12582912.f + 128.f;

#if defined(__x86_64__) || defined(__i386__)
inline vf rounded(vf v) {
  asm("" : "+v"(v));
  return v;
}
#endif
typedef uint8_t vb4 __attribute__((vector_size(W * 4)));

// Rounded v (|v| <= 127.5) + 128 as uint8: the low byte of each lane of v + kMagicU8. A byte shuffle, because GCC
// 12 narrows int32 -> uint8 vectors (__builtin_convertvector) one lane at a time.
inline void store_u8(uint8_t* p, vf v) {
  const vb4 bytes = (vb4)(v + kMagicU8);
#if QAENGINE_VW == 16
  const vb b = __builtin_shufflevector(bytes, bytes, 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
#elif QAENGINE_VW == 8
  const vb b = __builtin_shufflevector(bytes, bytes, 0, 4, 8, 12, 16, 20, 24, 28);
#elif QAENGINE_VW == 4
  const vb b = __builtin_shufflevector(bytes, bytes, 0, 4, 8, 12);
#else
#error "quant_impl.h: QAENGINE_VW must be 4, 8 or 16"
#endif
  __builtin_memcpy(p, &b, sizeof b);
}

// ---- activations (fp32; vec_impl.h, the formulas of the fp32 kernels, so int8/bf16 layers match the fp32 ones) ---

inline vf maybe_act_v(vf x, std::optional<Activation> act) {  // act(x), or x when `act` is empty
  return act ? act_v(x, *act) : x;
}

// ---- kernels ----------------------------------------------------------------------------------------------------
// Tails narrower than a vector go through a zero-padded vector, so every element sees the same arithmetic.

void quantize_per_token(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* out, int64_t ldo,
                        float* scale) {
  const int64_t body = cols / W * W;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* o = out + r * ldo;
    vf m = splat(0.f);
    for (int64_t c = 0; c < body; c += W) m = vmax(m, vabs(load(xr + c)));
    float a = hmax(m);
    for (int64_t c = body; c < cols; ++c) {
      const float v = xr[c] < 0.f ? -xr[c] : xr[c];
      a = v > a ? v : a;
    }
    a = a > kTiny ? a : kTiny;
    // As torch evaluates 127 / amax (reciprocal, then times 127) and then x · that, each product rounded to fp32.
    const float inv = (1.f / a) * kQmax;
    scale[r] = a / kQmax;
    const vf vinv = splat(inv);
    for (int64_t c = 0; c < body; c += W) store_u8(o + c, QAENGINE_Q8_ROUNDED(load(xr + c) * vinv));
    if (body < cols) {
      float tmp[W] = {};
      uint8_t tb[W];
      for (int64_t c = body; c < cols; ++c) tmp[c - body] = xr[c];
      store_u8(tb, QAENGINE_Q8_ROUNDED(load(tmp) * vinv));
      for (int64_t c = body; c < cols; ++c) o[c] = tb[c - body];
    }
  }
}

void quantize_static(const float* x, int64_t ldx, int64_t rows, int64_t cols, const float* inv_scale, uint8_t* out,
                     int64_t ldo) {
  const int64_t body = cols / W * W;
  const vf lo = splat(-kQmax), hi = splat(kQmax);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* o = out + r * ldo;
    // Clamping before rounding equals clamping after it: the bounds are integers.
    for (int64_t c = 0; c < body; c += W) {
      const vf v = QAENGINE_Q8_ROUNDED(load(xr + c) * load(inv_scale + c));
      store_u8(o + c, vmin(vmax(v, lo), hi));
    }
    if (body < cols) {
      float tx[W] = {}, ts[W] = {};
      uint8_t tb[W];
      for (int64_t c = body; c < cols; ++c) {
        tx[c - body] = xr[c];
        ts[c - body] = inv_scale[c];
      }
      const vf v = QAENGINE_Q8_ROUNDED(load(tx) * load(ts));
      store_u8(tb, vmin(vmax(v, lo), hi));
      for (int64_t c = body; c < cols; ++c) o[c] = tb[c - body];
    }
  }
}

void epilogue(float* y, int64_t ld, const float* row_scale, const float* bias, int64_t rows, int64_t cols,
              std::optional<Activation> act) {
  const int64_t body = cols / W * W;
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * ld;
    const vf s = splat(row_scale ? row_scale[r] : 1.f);
    for (int64_t c = 0; c < body; c += W) {
      vf v = load(yr + c);
      if (row_scale) v = v * s;
      if (bias) v = v + load(bias + c);
      store(yr + c, maybe_act_v(v, act));
    }
    if (body < cols) {
      float tmp[W] = {}, tb[W] = {};
      for (int64_t c = body; c < cols; ++c) {
        tmp[c - body] = yr[c];
        if (bias) tb[c - body] = bias[c];
      }
      vf v = load(tmp);
      if (row_scale) v = v * s;
      if (bias) v = v + load(tb);
      store(tmp, maybe_act_v(v, act));
      for (int64_t c = body; c < cols; ++c) yr[c] = tmp[c - body];
    }
  }
}

void widen_bf16(const uint16_t* in, int64_t ldi, float* out, int64_t ldo, int64_t rows, int64_t cols,
                std::optional<Activation> act) {
  const int64_t body = cols / W * W;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* ir = in + r * ldi;
    float* o = out + r * ldo;
    for (int64_t c = 0; c < body; c += W) {
      vh h;
      __builtin_memcpy(&h, ir + c, sizeof h);
      store(o + c, maybe_act_v((vf)(__builtin_convertvector(h, vu) << 16), act));
    }
    if (body < cols) {
      vh h = {};
      float tmp[W];
      for (int64_t c = body; c < cols; ++c) h[c - body] = ir[c];
      store(tmp, maybe_act_v((vf)(__builtin_convertvector(h, vu) << 16), act));
      for (int64_t c = body; c < cols; ++c) o[c] = tmp[c - body];
    }
  }
}

}  // namespace q8
}  // namespace

#define QAENGINE_Q8_CAT2(a, b) a##b
#define QAENGINE_Q8_CAT(a, b) QAENGINE_Q8_CAT2(a, b)

const QuantKernels& QAENGINE_Q8_CAT(quant_, QAENGINE_TABLE)() {
  static const QuantKernels table{QAENGINE_ISA,         QAENGINE_NAME, &q8::quantize_per_token,
                                  &q8::quantize_static, &q8::epilogue, &q8::widen_bf16};
  return table;
}

}  // namespace qaengine::cpu
