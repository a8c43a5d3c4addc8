// The per-ISA body of the fused CPU kernels (see kernels.h for the contract and limits).
//
// Included once by each of kernels_{base,avx2,avx512}.cpp, which define:
//   QAENGINE_VW     floats per vector (4, 8, 16)
//   QAENGINE_ACC    vector accumulators a register tile may hold (8 of 16 registers, 24 of 32)
//   QAENGINE_ISA    the Isa enumerator, QAENGINE_NAME its name, QAENGINE_TABLE the table function's name.
// The code uses GCC vector extensions, so one source serves every ISA; it is compiled with -ffp-contract=fast so
// a*b+c becomes an FMA. Everything lives in an anonymous namespace and calls no out-of-line std:: templates, so no
// ISA-specific instantiation can leak into code that runs on a CPU without that ISA.
#pragma once

#include <cstdint>

#include "kernels.h"
#include "vec_impl.h"

namespace qaengine::cpu {
namespace {

constexpr int ACC = QAENGINE_ACC;

// ---------------------------------------------------------------------------------------------------------------
// Attention: one (sequence, head, query range) per call. Kᵀ and V (+ bias) are packed once into scratch; query rows
// go in tiles of kRows, keys in blocks of kKeyBlock with an online softmax (running max m, running sum l, rescaled
// accumulator). Register tiles: kRows x kKeyVecs vectors of scores for QKᵀ, RP rows x NV vectors for P·V.
// Scores are kept in base-2 units: q is pre-scaled by log2(e)/sqrt(d_h), so p = 2^(s - m).

constexpr int kRows = ACC >= 24 ? 12 : 8;                     // query rows per tile
constexpr int64_t kKeyBlock = 256;                            // keys per softmax block
constexpr int kKeyVecs = ACC / kRows >= 1 ? ACC / kRows : 1;  // key vectors per QKᵀ tile

inline size_t scratch_floats(int64_t head_dim, int64_t max_seqlen) {
  const int64_t sp = round_up(max_seqlen > 0 ? max_seqlen : 1, W * kKeyVecs);
  return static_cast<size_t>(2 * head_dim * sp + 2 * kRows * head_dim + kRows * kKeyBlock + 2 * kRows + W);
}

template <int NV>
void attention_tile(const AttentionParams& p, int64_t b, int64_t h, int64_t q_begin, int64_t q_end, float* scratch) {
  constexpr int DH = NV * W;
  constexpr int RP = ACC / NV >= kRows ? kRows : (ACC / NV >= 1 ? ACC / NV : 1);  // rows per P·V tile
  static_assert(kRows % RP == 0, "P·V row tile must divide the query tile");
  constexpr int64_t KT = W * kKeyVecs;  // keys per QKᵀ tile

  const int64_t s0 = p.cu_seqlens[b];
  const int64_t S = p.cu_seqlens[b + 1] - s0;
  if (S <= 0 || q_begin >= q_end) return;
  const int64_t width = p.heads * DH, ld = p.ld_qkv;
  const float* base = p.qkv + s0 * ld;
  static const float kZeros[256] = {};  // stands in for a null bias (head_dim <= 256)
  const float* bq = p.bias ? p.bias + h * DH : kZeros;
  const float* bk = p.bias ? p.bias + width + h * DH : kZeros;
  const float* bv = p.bias ? p.bias + 2 * width + h * DH : kZeros;
  const int64_t sp = round_up(S, KT);

  float* kt = scratch;           // [DH, sp]   Kᵀ with bias, zero-padded
  float* vp = kt + DH * sp;      // [sp, DH]   V with bias, contiguous rows
  float* qs = vp + DH * sp;      // [kRows, DH] scaled q with bias
  float* acc = qs + kRows * DH;  // [kRows, DH] unnormalised output
  float* sc = acc + kRows * DH;  // [kRows, kKeyBlock] scores, then probabilities
  float* mrow = sc + kRows * kKeyBlock;
  float* lrow = mrow + kRows;

  // Pack Kᵀ and V (+ bias) once per call: the tiles below stream them many times, and rows of the packed qkv are
  // ld floats apart (one TLB page each at MiniLM's sizes).
  constexpr int64_t kAhead = 16;  // rows of software prefetch: the row stride defeats the hardware prefetchers
  for (int64_t j = 0; j < S; ++j) {
    if (j + kAhead < S) {
      const float* next = base + (j + kAhead) * ld + width + h * DH;
      for (int c = 0; c < DH; c += 16) {
        __builtin_prefetch(next + c);
        __builtin_prefetch(next + width + c);
      }
    }
    const float* k = base + j * ld + width + h * DH;
    for (int d = 0; d < DH; ++d) kt[d * sp + j] = k[d] + bk[d];
    const float* v = base + j * ld + 2 * width + h * DH;
    for (int n = 0; n < NV; ++n) store(vp + j * DH + n * W, load(v + n * W) + load(bv + n * W));
  }
  for (int d = 0; d < DH; ++d)
    for (int64_t j = S; j < sp; ++j) kt[d * sp + j] = 0.f;

  const float qscale = kLog2e / __builtin_sqrtf(static_cast<float>(DH));
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kRows) {
    const int64_t nr = imin(kRows, q_end - q0);
    for (int r = 0; r < kRows; ++r) {
      const float* q = base + (q0 + imin(r, nr - 1)) * ld + h * DH;  // spare rows repeat the last one
      if (q0 + kRows + r < q_end)
        for (int c = 0; c < DH; c += 16) __builtin_prefetch(q + kRows * ld + c);  // the next tile's rows
      for (int n = 0; n < NV; ++n) store(qs + r * DH + n * W, (load(q + n * W) + load(bq + n * W)) * qscale);
      for (int n = 0; n < NV; ++n) store(acc + r * DH + n * W, splat(0.f));
      mrow[r] = kNegInf;
      lrow[r] = 0.f;
    }
    for (int64_t k0 = 0; k0 < S; k0 += kKeyBlock) {
      const int64_t kn = imin(kKeyBlock, S - k0);
      const int64_t knp = round_up(kn, KT);
      // Scores: s[r, j] = qs[r] · kt[:, k0 + j]
      for (int64_t c = 0; c < knp; c += KT) {
        vf s[kRows][kKeyVecs];
        for (int r = 0; r < kRows; ++r)
          for (int i = 0; i < kKeyVecs; ++i) s[r][i] = splat(0.f);
        const float* ktc = kt + k0 + c;
        for (int d = 0; d < DH; ++d) {
          vf kv[kKeyVecs];
          for (int i = 0; i < kKeyVecs; ++i) kv[i] = load(ktc + d * sp + i * W);
          for (int r = 0; r < kRows; ++r) {
            const vf qv = splat(qs[r * DH + d]);
            for (int i = 0; i < kKeyVecs; ++i) s[r][i] += qv * kv[i];
          }
        }
        for (int r = 0; r < kRows; ++r)
          for (int i = 0; i < kKeyVecs; ++i) store(sc + r * kKeyBlock + c + i * W, s[r][i]);
      }
      // Online softmax over this block.
      for (int r = 0; r < kRows; ++r) {
        float* sr = sc + r * kKeyBlock;
        for (int64_t j = kn; j < knp; ++j) sr[j] = kNegInf;
        vf mv = splat(kNegInf);
        for (int64_t c = 0; c < knp; c += W) mv = vmax(mv, load(sr + c));
        const float m_new = smax(mrow[r], hmax(mv));
        const float alpha = mrow[r] == kNegInf ? 0.f : __builtin_exp2f(mrow[r] - m_new);
        mrow[r] = m_new;
        // Padding keys (score -inf) come out as 2^-126 rather than 0; P·V never reads them, and their share of
        // the row sum (< 16 * 1.2e-38) is far below fp32 resolution.
        vf sum = splat(0.f);
        for (int64_t c = 0; c < knp; c += W) {
          const vf e = exp2v(load(sr + c) - m_new);
          store(sr + c, e);
          sum += e;
        }
        lrow[r] = lrow[r] * alpha + hsum(sum);
        if (alpha != 1.f)
          for (int n = 0; n < NV; ++n) store(acc + r * DH + n * W, load(acc + r * DH + n * W) * alpha);
      }
      // acc[r] += sum_j p[r, j] v[j]
      for (int r0 = 0; r0 < kRows; r0 += RP) {
        vf o[RP][NV];
        for (int rr = 0; rr < RP; ++rr)
          for (int n = 0; n < NV; ++n) o[rr][n] = load(acc + (r0 + rr) * DH + n * W);
        const float* vrow = vp + k0 * DH;
        for (int64_t j = 0; j < kn; ++j, vrow += DH) {
          vf vv[NV];
          for (int n = 0; n < NV; ++n) vv[n] = load(vrow + n * W);
          for (int rr = 0; rr < RP; ++rr) {
            const vf pv = splat(sc[(r0 + rr) * kKeyBlock + j]);
            for (int n = 0; n < NV; ++n) o[rr][n] += pv * vv[n];
          }
        }
        for (int rr = 0; rr < RP; ++rr)
          for (int n = 0; n < NV; ++n) store(acc + (r0 + rr) * DH + n * W, o[rr][n]);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const float inv = 1.f / lrow[r];
      float* out = p.out + (s0 + q0 + r) * p.ld_out + h * DH;
      for (int n = 0; n < NV; ++n) store(out + n * W, load(acc + r * DH + n * W) * inv);
    }
  }
}

bool attention_supports(int64_t head_dim) {
  if (head_dim <= 0 || head_dim % W) return false;
  const int64_t nv = head_dim / W;
  return nv == 1 || nv == 2 || nv == 4 || nv == 8 || (nv == 16 && head_dim <= 256);
}

size_t attention_scratch(int64_t head_dim, int64_t max_seqlen) {
  return scratch_floats(head_dim, max_seqlen);
}

void attention(const AttentionParams& p, int64_t b, int64_t h, int64_t q_begin, int64_t q_end, float* scratch) {
  switch (p.head_dim / W) {
    case 1: return attention_tile<1>(p, b, h, q_begin, q_end, scratch);
    case 2: return attention_tile<2>(p, b, h, q_begin, q_end, scratch);
    case 4: return attention_tile<4>(p, b, h, q_begin, q_end, scratch);
    case 8: return attention_tile<8>(p, b, h, q_begin, q_end, scratch);
    case 16: return attention_tile<16>(p, b, h, q_begin, q_end, scratch);
    default: return;  // unreachable: the launcher checks attention_supports
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row-wise element kernels. Tails narrower than a vector go through a zero-padded vector, so every element sees
// the same arithmetic.

void bias_act(float* x, int64_t ld, const float* bias, int64_t rows, int64_t cols, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    int64_t c = 0;
    for (; c + W <= cols; c += W) store(row + c, act_v(load(row + c) + (bias ? load(bias + c) : splat(0.f)), act));
    if (c < cols) {
      float tmp[W] = {};
      for (int64_t i = c; i < cols; ++i) tmp[i - c] = row[i] + (bias ? bias[i] : 0.f);
      store(tmp, act_v(load(tmp), act));
      for (int64_t i = c; i < cols; ++i) row[i] = tmp[i - c];
    }
  }
}

void add_layernorm(float* x, int64_t ldx, const float* y, int64_t ldy, const float* bias, const float* gamma,
                   const float* beta, int64_t rows, int64_t cols, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * ldx;
    const float* yr = y ? y + r * ldy : nullptr;
    // pass 1: v = x + y + bias (stored in x), sum
    vf s = splat(0.f);
    float tail = 0.f;
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      vf v = load(xr + c);
      if (yr) v += load(yr + c);
      if (bias) v += load(bias + c);
      store(xr + c, v);
      s += v;
    }
    for (int64_t i = c; i < cols; ++i) {
      float v = xr[i] + (yr ? yr[i] : 0.f) + (bias ? bias[i] : 0.f);
      xr[i] = v;
      tail += v;
    }
    const float mean = (hsum(s) + tail) / static_cast<float>(cols);
    // pass 2: variance around the mean (two-pass, as accurate as torch's)
    vf q = splat(0.f);
    float qt = 0.f;
    for (c = 0; c + W <= cols; c += W) {
      const vf d = load(xr + c) - mean;
      q += d * d;
    }
    for (int64_t i = c; i < cols; ++i) qt += (xr[i] - mean) * (xr[i] - mean);
    const float var = (hsum(q) + qt) / static_cast<float>(cols);
    const float rstd = 1.f / __builtin_sqrtf(var + eps);
    for (c = 0; c + W <= cols; c += W) store(xr + c, (load(xr + c) - mean) * rstd * load(gamma + c) + load(beta + c));
    for (int64_t i = c; i < cols; ++i) xr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
  }
}

void embed(float* x, const float* word, const float* position, const float* token_type, const int64_t* ids,
           const int64_t* positions, const int64_t* types, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = word + ids[r] * d;
    const float* b = position + positions[r] * d;
    const float* t = token_type + types[r] * d;
    float* out = x + r * d;
    int64_t c = 0;
    for (; c + W <= d; c += W) store(out + c, load(a + c) + load(b + c) + load(t + c));
    for (; c < d; ++c) out[c] = a[c] + b[c] + t[c];
  }
}

}  // namespace

const KernelTable& QAENGINE_TABLE() {
  static const KernelTable table{QAENGINE_ISA,        QAENGINE_NAME,      W,
                                 &attention_supports, &attention_scratch, &attention,
                                 &bias_act,           &add_layernorm,     &embed};
  return table;
}

}  // namespace qaengine::cpu
