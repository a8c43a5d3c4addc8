// The fp32 CPU forward of the ragged encoder (engine/model.py semantics) on padding-free packed batches.
//
// Threads. Work is shared with cpu::run_items (pool.h), never with one OpenMP region per op: on a shared machine
// every OpenMP barrier waits for a descheduled thread, which made 2 threads several times slower than 1. Inside an
// item everything (oneDNN GEMMs, fused kernels) runs single-threaded.
// - Several sequences: groups of whole sequences (<= kGroupTokens tokens) run the full layer stack independently,
//   with no synchronisation at all until the end.
// - One sequence (or groups that would balance badly): the tokens are cut into row chunks. Per layer there are two
//   passes, each ending in one wait: attention over (sequence, head, query chunk) items, then one row pass that
//   runs the output projection, LN1, the FFN, LN2 and the next layer's QKV projection on each chunk.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scaled_dot_product_attention.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/pool.h"
#include "encoder.h"

namespace qaengine {
namespace {

constexpr int64_t kGroupTokens = 512;  // tokens per independent sequence group
constexpr int64_t kWorkspaceFloats = int64_t{1} << 22;  // per-thread workspace cap: 16 MB
constexpr int64_t kChunkRows = 64;     // minimum rows per row chunk: oneDNN runs M=32 about 12% slower than M=64
// At most this many row chunks per thread, so a thread that falls behind (descheduled on a shared machine) is covered
// by the others.
constexpr int64_t kRowChunksPerThread = 4;

// Per-thread scratch, grown on demand: slot 1 for the FFN's hidden rows, 2 for logits.
template <int Slot>
float* thread_scratch(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}

}  // namespace

std::pair<at::Tensor, at::Tensor> Encoder::forward_cpu(const at::Tensor& ids, const at::Tensor& types,
                                                       const at::Tensor& cu_seqlens, int64_t max_seqlen) const {
  const int64_t T = ids.size(0), batch = cu_seqlens.size(0) - 1;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  at::Tensor start = at::empty({T}, at::kFloat), end = at::empty({T}, at::kFloat);
  if (T == 0) return {start, end};
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* tp = types.data_ptr<int64_t>();
  float* sp = start.data_ptr<float>();
  float* ep = end.data_ptr<float>();
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();

  std::vector<int64_t> first{0};  // group g holds sequences [first[g], first[g + 1])
  for (int64_t b = 1; b < batch; ++b)
    if (cu[b + 1] - cu[first.back()] > kGroupTokens) first.push_back(b);
  first.push_back(batch);
  const int64_t groups = static_cast<int64_t>(first.size()) - 1;
  if (threads < 2 || groups < 2 || (groups < 2 * threads && groups % threads != 0)) {
    forward_cpu_batch(ip, tp, cu, batch, max_seqlen, sp, ep, threads);
    return {start, end};
  }
  cpu::run_items(groups, threads, [&](int64_t g) {
    const int64_t b0 = first[g], b1 = first[g + 1], t0 = cu[b0];
    std::vector<int32_t> local(b1 - b0 + 1);
    int64_t longest = 0;
    for (int64_t b = b0; b <= b1; ++b) {
      local[b - b0] = cu[b] - static_cast<int32_t>(t0);
      if (b > b0) longest = std::max<int64_t>(longest, cu[b] - cu[b - 1]);
    }
    forward_cpu_batch(ip + t0, tp + t0, local.data(), b1 - b0, longest, sp + t0, ep + t0, 1);
  });
  return {start, end};
}

// One packed batch through the layer stack on `threads` threads: the buffers of one forward and its steps.
class Encoder::CpuBatch {
 public:
  CpuBatch(const Encoder& e, const int64_t* ids, const int64_t* types, const int32_t* cu, int64_t batch,
           int64_t max_seqlen, int threads)
      : e_(e), k_(cpu::best_kernels()), ids_(ids), types_(types), cu_(cu), batch_(batch), max_seqlen_(max_seqlen),
        T_(cu[batch]), d_(e.cfg_.hidden), threads_(threads), eps_(static_cast<float>(e.cfg_.layer_norm_eps)) {
    chunks_ = threads <= 1 ? 1 : std::clamp<int64_t>(T_ / kChunkRows, 1, kRowChunksPerThread * threads);
    allocate();
  }

  void run(float* start, float* end) {
    each_chunk([&](int64_t r0, int64_t r1) {
      embed(r0, r1);
      project_qkv(0, r0, r1);
    });
    for (size_t l = 0; l < e_.layers_.size(); ++l) {
      attention(l);
      const bool last = l + 1 == e_.layers_.size();
      each_chunk([&](int64_t r0, int64_t r1) {
        finish_layer(l, r0, r1);
        if (last) {
          qa_head(r0, r1, start, end);
        } else {
          project_qkv(l + 1, r0, r1);
        }
      });
    }
  }

 private:
  // Row chunk c of `chunks_` (rows [T c / chunks, T (c + 1) / chunks)), all of them in parallel.
  template <class Fn>
  void each_chunk(Fn fn) {
    cpu::run_items(chunks_, threads_, [&](int64_t c) { fn(T_ * c / chunks_, T_ * (c + 1) / chunks_); });
  }

  // (T, d) hidden state (updated in place), (T, 3w) QKV and (T, w) attention output per layer: in the calling
  // thread's workspace, which outlives the call (fresh allocations per forward can be mapped and faulted in anew by
  // glibc when they exceed its mmap threshold); huge batches allocate instead.
  void allocate() {
    int64_t wmax = 1;
    for (const LayerWeights& L : e_.layers_) wmax = std::max(wmax, L.width);
    const int64_t floats = T_ * (d_ + 4 * wmax);
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    if (floats <= kWorkspaceFloats) {
      thread_local std::vector<float> workspace;
      if (static_cast<int64_t>(workspace.size()) < floats) workspace.resize(static_cast<size_t>(floats));
      x_ = at::from_blob(workspace.data(), {T_, d_}, opts);
      qkv_ = at::from_blob(workspace.data() + T_ * d_, {T_ * 3 * wmax}, opts);
      ctx_ = at::from_blob(workspace.data() + T_ * (d_ + 3 * wmax), {T_ * wmax}, opts);
    } else {
      x_ = at::empty({T_, d_}, opts);
      qkv_ = at::empty({T_ * 3 * wmax}, opts);
      ctx_ = at::empty({T_ * wmax}, opts);
    }
    xp_ = x_.data_ptr<float>();
  }

  // Embeddings + LayerNorm of rows [r0, r1).
  void embed(int64_t r0, int64_t r1) {
    std::vector<int64_t> pos(r1 - r0);
    packed_position_ids(cu_, batch_, e_.cfg_.position_offset, r0, r1, pos.data());
    cpu::embed(xp_ + r0 * d_, e_.word_.data_ptr<float>(), e_.position_.data_ptr<float>(),
               e_.token_type_.data_ptr<float>(), ids_ + r0, pos.data(), types_ + r0, r1 - r0, d_, k_);
    layernorm(r0, r1, nullptr, e_.emb_ln_w_, e_.emb_ln_b_);
  }

  // x[r0:r1] = LN(x[r0:r1] + bias) in place; `bias` may be null.
  void layernorm(int64_t r0, int64_t r1, const float* bias, const at::Tensor& gamma, const at::Tensor& beta) {
    cpu::add_layernorm(xp_ + r0 * d_, d_, nullptr, 0, bias, gamma.data_ptr<float>(), beta.data_ptr<float>(), r1 - r0,
                       d_, eps_, k_);
  }

  // QKV projection of layer l for rows [r0, r1), into the layer's (T, 3w) buffer (bias included).
  void project_qkv(size_t l, int64_t r0, int64_t r1) {
    const LayerWeights& L = e_.layers_[l];
    if (L.heads > 0) L.qkv.run_into(xp_ + r0 * d_, r1 - r0, qkv_.data_ptr<float>() + r0 * 3 * L.width, false);
  }

  // Attention of layer l over the whole batch: the fused kernel, or ATen SDPA per sequence for head dims it lacks.
  void attention(size_t l) {
    const LayerWeights& L = e_.layers_[l];
    if (L.heads == 0) return;
    const int64_t dh = e_.cfg_.head_dim;
    if (!k_.attention_supports(dh)) {
      const at::Tensor qkv = qkv_.narrow(0, 0, T_ * 3 * L.width).view({T_, 3, L.heads, dh});
      const at::Tensor ctx = ctx_.narrow(0, 0, T_ * L.width).view({T_, L.width});
      for (int64_t b = 0; b < batch_; ++b) {
        const int64_t n = cu_[b + 1] - cu_[b];
        if (n == 0) continue;
        auto parts = qkv.narrow(0, cu_[b], n).permute({1, 2, 0, 3}).unbind(0);  // (h, s, dh)
        const at::Tensor o = at::scaled_dot_product_attention(parts[0], parts[1], parts[2]);
        ctx.narrow(0, cu_[b], n).copy_(o.transpose(0, 1).reshape({n, L.width}));
      }
      return;
    }
    cpu::AttentionParams p;
    p.qkv = qkv_.data_ptr<float>();
    p.out = ctx_.data_ptr<float>();
    p.cu_seqlens = cu_;
    p.batch = batch_;
    p.heads = L.heads;
    p.head_dim = dh;
    p.ld_qkv = 3 * L.width;
    p.ld_out = L.width;
    p.max_seqlen = max_seqlen_;
    cpu::varlen_attention(p, k_, threads_);
  }

  // Everything of layer l after attention, for rows [r0, r1).
  void finish_layer(size_t l, int64_t r0, int64_t r1) {
    const LayerWeights& L = e_.layers_[l];
    const int64_t n = r1 - r0;
    float* xr = xp_ + r0 * d_;
    if (L.heads > 0) {  // x += ctx W_Oᵀ + b_O, then LN in place
      L.o.run_into(ctx_.data_ptr<float>() + r0 * L.width, n, xr, true);
      layernorm(r0, r1, nullptr, L.ln1_w, L.ln1_b);
    } else {  // 0 heads: LN(x + b_O), not an identity
      layernorm(r0, r1, L.o_b.data_ptr<float>(), L.ln1_w, L.ln1_b);
    }
    if (L.ffn > 0) {  // x += act(x W_inᵀ + b_in) W_outᵀ + b_2, then LN in place
      float* h = thread_scratch<1>(static_cast<size_t>(n * L.ffn));
      L.ffn_in.run_into(xr, n, h, false);
      L.ffn_out.run_into(h, n, xr, true);
      layernorm(r0, r1, nullptr, L.ln2_w, L.ln2_b);
    } else {  // 0 FFN units: LN(h + b_2)
      layernorm(r0, r1, L.out_b.data_ptr<float>(), L.ln2_w, L.ln2_b);
    }
  }

  // Start and end logits of rows [r0, r1).
  void qa_head(int64_t r0, int64_t r1, float* start, float* end) {
    float* lp = thread_scratch<2>(static_cast<size_t>(2 * (r1 - r0)));  // (n, 2) logits
    e_.qa_.run_into(xp_ + r0 * d_, r1 - r0, lp, false);
    for (int64_t t = r0; t < r1; ++t) {
      start[t] = lp[2 * (t - r0)];
      end[t] = lp[2 * (t - r0) + 1];
    }
  }

  const Encoder& e_;
  const cpu::KernelTable& k_;
  const int64_t* ids_;
  const int64_t* types_;
  const int32_t* cu_;
  const int64_t batch_, max_seqlen_, T_, d_;
  const int threads_;
  const float eps_;
  int64_t chunks_ = 1;
  at::Tensor x_, qkv_, ctx_;
  float* xp_ = nullptr;
};

void Encoder::forward_cpu_batch(const int64_t* ids, const int64_t* types, const int32_t* cu, int64_t batch,
                                int64_t max_seqlen, float* start, float* end, int threads) const {
  if (cu[batch] == 0) return;
  CpuBatch(*this, ids, types, cu, batch, max_seqlen, threads).run(start, end);
}

}  // namespace qaengine
