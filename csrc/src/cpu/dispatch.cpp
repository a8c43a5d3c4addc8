// ISA selection and the multi-threaded launchers of the fused CPU kernels (kernels.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels.h"
#include "pool.h"
#include "qaengine/error.h"

namespace qaengine::cpu {

#if !defined(QAENGINE_X86_KERNELS)
// Non-x86 builds compile only the portable table.
const KernelTable& kernels_avx2() {
  return kernels_base();
}
const KernelTable& kernels_avx512() {
  return kernels_base();
}
#endif

bool cpu_supports(Isa isa) {
#if defined(QAENGINE_X86_KERNELS)
  switch (isa) {
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Base: return true;
  }
  return false;
#else
  return isa == Isa::Base;
#endif
}

const KernelTable& best_kernels() {
  static const KernelTable& best = cpu_supports(Isa::Avx512) ? kernels_avx512()
                                   : cpu_supports(Isa::Avx2) ? kernels_avx2()
                                                             : kernels_base();
  return best;
}

std::vector<const KernelTable*> available_kernels() {
  std::vector<const KernelTable*> out{&kernels_base()};
  if (cpu_supports(Isa::Avx2)) out.push_back(&kernels_avx2());
  if (cpu_supports(Isa::Avx512)) out.push_back(&kernels_avx512());
  return out;
}

namespace {
// Rows per task for the cheap row-wise kernels: about 64K elements (~20 us), so a small batch stays on one thread
// instead of paying a fork/join.
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1));
}
}  // namespace

namespace {
// Attention query chunks are whole multiples of this many rows: a multiple of every ISA's query tile (8 rows on AVX2,
// 12 on AVX-512), so only a sequence's last chunk can end in a partial tile.
constexpr int64_t kQueryTileRows = 24;
// Query splitting stops at this many items per thread: each item packs its head's K and V again (O(S d_h) against
// O(S² d_h) of work), so splitting further costs more than the balance gains.
constexpr int64_t kMaxAttentionItemsPerThread = 4;
}  // namespace

AttentionSchedule AttentionSchedule::make(int64_t batch, int64_t heads, int64_t max_seqlen, int threads) {
  AttentionSchedule s;
  s.heads = heads;
  const int64_t pairs = batch * heads, longest = std::max<int64_t>(max_seqlen, 1);
  int64_t split = 1;  // until the items divide evenly among the threads, or there are enough of them
  while ((pairs * split) % threads != 0 && pairs * split < kMaxAttentionItemsPerThread * threads) ++split;
  s.query_chunk = longest;
  if (split > 1) {
    s.query_chunk = std::max<int64_t>(kQueryTileRows, (longest + split - 1) / split);
    s.query_chunk = (s.query_chunk + kQueryTileRows - 1) / kQueryTileRows * kQueryTileRows;
  }
  s.chunks_per_pair = (longest + s.query_chunk - 1) / s.query_chunk;
  s.items = pairs * s.chunks_per_pair;
  return s;
}

void varlen_attention(const AttentionParams& p, const KernelTable& k, int threads) {
  if (!k.attention_supports(p.head_dim)) {
    throw Error(std::string("fused CPU attention (") + k.name + ") does not support head_dim " +
                std::to_string(p.head_dim));
  }
  if (p.batch <= 0 || p.heads <= 0) return;
  const AttentionSchedule s = AttentionSchedule::make(p.batch, p.heads, p.max_seqlen, std::max(threads, 1));
  const size_t scratch = k.attention_scratch(p.head_dim, p.max_seqlen);
  run_items(s.items, threads, [&](int64_t item) {
    const int64_t b = item / (p.heads * s.chunks_per_pair), h = (item / s.chunks_per_pair) % p.heads;
    const int64_t q0 = (item % s.chunks_per_pair) * s.query_chunk, len = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
    thread_local std::vector<float> buf;
    if (buf.size() < scratch) buf.resize(scratch);
    if (q0 < len) k.attention(p, b, h, q0, std::min(len, q0 + s.query_chunk), buf.data());
  });
}

void bias_act(float* x, int64_t ld, const float* bias, int64_t rows, int64_t cols, Activation act,
              const KernelTable& k) {
  at::parallel_for(0, rows, row_grain(cols),
                   [&](int64_t begin, int64_t end) { k.bias_act(x + begin * ld, ld, bias, end - begin, cols, act); });
}

void add_layernorm(float* x, int64_t ldx, const float* y, int64_t ldy, const float* bias, const float* gamma,
                   const float* beta, int64_t rows, int64_t cols, float eps, const KernelTable& k) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    k.add_layernorm(x + begin * ldx, ldx, y ? y + begin * ldy : nullptr, ldy, bias, gamma, beta, end - begin, cols,
                    eps);
  });
}

void embed(float* x, const float* word, const float* position, const float* token_type, const int64_t* ids,
           const int64_t* positions, const int64_t* types, int64_t rows, int64_t d, const KernelTable& k) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    k.embed(x + begin * d, word, position, token_type, ids + begin, positions + begin, types + begin, end - begin, d);
  });
}

}  // namespace qaengine::cpu
