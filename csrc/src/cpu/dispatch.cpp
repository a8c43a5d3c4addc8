// ISA selection and the multi-threaded launchers of the fused CPU kernels (kernels.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels.h"
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

void varlen_attention(const AttentionParams& p, const KernelTable& k) {
  if (!k.attention_supports(p.head_dim)) {
    throw Error(std::string("fused CPU attention (") + k.name + ") does not support head_dim " +
                std::to_string(p.head_dim));
  }
  if (p.batch <= 0 || p.heads <= 0) return;
  // Work items are (sequence, head, query chunk). Split queries only when (sequence, head) pairs are too few to
  // keep every thread busy; each chunk re-packs Kᵀ, which costs O(S d_h) against O(S² d_h) of work.
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = p.batch * p.heads;
  int64_t chunk = std::max<int64_t>(p.max_seqlen, 1);
  if (pairs < 4 * threads) {
    const int64_t splits = (4 * threads + pairs - 1) / pairs;
    chunk = std::max<int64_t>(32, (chunk + splits - 1) / splits);
  }
  chunk = (chunk + 7) / 8 * 8;
  const int64_t chunks = (std::max<int64_t>(p.max_seqlen, 1) + chunk - 1) / chunk;
  const size_t scratch = k.attention_scratch(p.head_dim, p.max_seqlen);
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (p.heads * chunks);
      const int64_t h = (item / chunks) % p.heads;
      const int64_t q0 = (item % chunks) * chunk;
      const int64_t len = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
      if (q0 < len) k.attention(p, b, h, q0, std::min(len, q0 + chunk), buf.data());
    }
  });
}

void bias_act(float* x, int64_t ld, const float* bias, int64_t rows, int64_t cols, Act act, const KernelTable& k) {
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
