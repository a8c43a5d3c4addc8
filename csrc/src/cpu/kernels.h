// Fused fp32 CPU kernels of the encoder, compiled once per ISA (base, AVX2, AVX-512) and picked at run time.
//
// Limits (checked by the launchers in dispatch.cpp):
// - attention: head_dim a multiple of the ISA's vector width (16 floats on AVX-512, 8 on AVX2, 4 otherwise) and at
//   most 256; other head dims take the ATen fallback in encoder.cpp. fp32 only.
// - every pointer is to dense row-major fp32 data with the given leading dimension; no alignment required.
// The per-ISA functions work on a range of rows / items and are single-threaded; dispatch.cpp runs attention on the
// engine's pool (pool.h) and the row-wise kernels with at::parallel_for.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qaengine/config.h"

namespace qaengine::cpu {

enum class Isa { Base, Avx2, Avx512 };

/// Packed varlen attention. `qkv` `[T, ld_qkv]` holds Q | K | V blocks of width heads*head_dim each (head j at
/// columns j*head_dim within a block); `bias` `[3*heads*head_dim]`, when not null, is added inside the kernel.
/// `out` `[T, ld_out]` receives softmax(Q Kᵀ / sqrt(d_h)) V per head, concatenated.
struct AttentionParams {
  const float* qkv = nullptr;
  const float* bias = nullptr;
  float* out = nullptr;
  const int32_t* cu_seqlens = nullptr;  // [batch + 1]
  int64_t batch = 0, heads = 0, head_dim = 0, ld_qkv = 0, ld_out = 0, max_seqlen = 0;
};

/// One ISA's single-threaded kernels.
struct KernelTable {
  Isa isa;
  const char* name;
  int64_t vector_width;  // floats per vector
  bool (*attention_supports)(int64_t head_dim);
  /// Floats of scratch one call of `attention` needs.
  size_t (*attention_scratch)(int64_t head_dim, int64_t max_seqlen);
  /// Query rows [q_begin, q_end) (within sequence b) of head h.
  void (*attention)(const AttentionParams& p, int64_t b, int64_t h, int64_t q_begin, int64_t q_end, float* scratch);
  /// x[r, c] = act(x[r, c] + bias[c]) for rows [0, rows); `bias` may be null.
  void (*bias_act)(float* x, int64_t ld, const float* bias, int64_t rows, int64_t cols, Activation act);
  /// x[r] = LayerNorm(x[r] + y[r] + bias) * gamma + beta; `y` and `bias` may be null.
  void (*add_layernorm)(float* x, int64_t ldx, const float* y, int64_t ldy, const float* bias, const float* gamma,
                        const float* beta, int64_t rows, int64_t cols, float eps);
  /// x[r] = word[ids[r]] + position[positions[r]] + token_type[types[r]] (rows of width d).
  void (*embed)(float* x, const float* word, const float* position, const float* token_type, const int64_t* ids,
                const int64_t* positions, const int64_t* types, int64_t rows, int64_t d);
};

const KernelTable& kernels_base();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

/// Whether this CPU can run `isa`.
bool cpu_supports(Isa isa);
/// The fastest table this CPU runs.
const KernelTable& best_kernels();
/// Tables this CPU runs (for tests).
std::vector<const KernelTable*> available_kernels();

/// How varlen attention splits into work items (sequence, head, query chunk): queries are split only as far as the
/// threads need, until the items divide evenly among them or there are a few per thread.
struct AttentionSchedule {
  int64_t heads = 0, query_chunk = 1, chunks_per_pair = 1, items = 0;
  static AttentionSchedule make(int64_t batch, int64_t heads, int64_t max_seqlen, int threads);
};

/// The encoder's attention: AttentionSchedule's items on `threads` threads of the engine's pool (pool.h).
void varlen_attention(const AttentionParams& p, const KernelTable& k, int threads);

// Multi-threaded launchers of the row-wise kernels over ATen's intra-op threads (single-threaded inside a pool item).
void bias_act(float* x, int64_t ld, const float* bias, int64_t rows, int64_t cols, Activation act,
              const KernelTable& k);
void add_layernorm(float* x, int64_t ldx, const float* y, int64_t ldy, const float* bias, const float* gamma,
                   const float* beta, int64_t rows, int64_t cols, float eps, const KernelTable& k);
void embed(float* x, const float* word, const float* position, const float* token_type, const int64_t* ids,
           const int64_t* positions, const int64_t* types, int64_t rows, int64_t d, const KernelTable& k);

}  // namespace qaengine::cpu
