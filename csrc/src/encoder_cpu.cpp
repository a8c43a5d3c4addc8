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

// Per-thread scratch, grown on demand: Slot 0 for the attention kernel, 1 for the FFN's hidden rows, 2 for logits.
template <int Slot>
float* thread_scratch(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}
float* attention_scratch(size_t floats) { return thread_scratch<0>(floats); }

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

void Encoder::forward_cpu_batch(const int64_t* ids, const int64_t* types, const int32_t* cu, int64_t batch,
                                int64_t max_seqlen, float* start, float* end, int threads) const {
  const auto& k = cpu::best_kernels();
  const int64_t T = cu[batch], d = cfg_.hidden, dh = cfg_.head_dim;
  const float eps = static_cast<float>(cfg_.layer_norm_eps);
  if (T == 0) return;
  const bool fused_attention = k.attention_supports(dh);

  // Row chunks: about two per thread, so a thread that falls behind can be covered by the others.
  const int64_t chunks = threads <= 1 ? 1 : std::clamp<int64_t>(T / kChunkRows, 1, 4 * threads);
  auto rows = [&](int64_t c) { return std::pair<int64_t, int64_t>{T * c / chunks, T * (c + 1) / chunks}; };

  int64_t max_width = 0;
  for (const LayerWeights& L : layers_) max_width = std::max(max_width, L.width);
  // (T, d) hidden state (in place), (T, 3w) QKV and (T, w) attention output per layer: in the calling thread's
  // workspace, which outlives the call (fresh allocations per forward can be mapped and faulted in anew by glibc
  // when they exceed its mmap threshold); huge batches allocate instead.
  const int64_t wmax = std::max<int64_t>(max_width, 1);
  const int64_t floats = T * (d + 4 * wmax);
  at::Tensor x, qkv_buf, ctx_buf;
  if (floats <= kWorkspaceFloats) {
    thread_local std::vector<float> workspace;
    if (static_cast<int64_t>(workspace.size()) < floats) workspace.resize(static_cast<size_t>(floats));
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    x = at::from_blob(workspace.data(), {T, d}, opts);
    qkv_buf = at::from_blob(workspace.data() + T * d, {T * 3 * wmax}, opts);
    ctx_buf = at::from_blob(workspace.data() + T * (d + 3 * wmax), {T * wmax}, opts);
  } else {
    x = at::empty({T, d}, at::kFloat);
    qkv_buf = at::empty({T * 3 * wmax}, at::kFloat);
    ctx_buf = at::empty({T * wmax}, at::kFloat);
  }
  float* xp = x.data_ptr<float>();

  // QKV projection of layer l for rows [r0, r1), into the layer's (T, 3w) buffer.
  auto project_qkv = [&](size_t l, int64_t r0, int64_t r1) {
    const LayerWeights& L = layers_[l];
    if (L.heads == 0) return;
    L.qkv.run_into(xp + r0 * d, r1 - r0, qkv_buf.data_ptr<float>() + r0 * 3 * L.width, false);  // bias included
  };
  // Everything of layer l after attention, for rows [r0, r1).
  auto finish_layer = [&](size_t l, int64_t r0, int64_t r1) {
    const LayerWeights& L = layers_[l];
    const int64_t n = r1 - r0;
    float* xr = xp + r0 * d;
    if (L.heads > 0) {  // x += ctx W_Oᵀ + b_O, then LN in place
      L.o.run_into(ctx_buf.data_ptr<float>() + r0 * L.width, n, xr, true);
      cpu::add_layernorm(xr, d, nullptr, 0, nullptr, L.ln1_w.data_ptr<float>(), L.ln1_b.data_ptr<float>(), n, d, eps,
                         k);
    } else {  // 0 heads: LN(x + b_O), not an identity
      cpu::add_layernorm(xr, d, nullptr, 0, L.o_b.data_ptr<float>(), L.ln1_w.data_ptr<float>(),
                         L.ln1_b.data_ptr<float>(), n, d, eps, k);
    }
    if (L.ffn > 0) {  // x += act(x W_inᵀ + b_in) W_outᵀ + b_2, then LN in place
      float* h = thread_scratch<1>(static_cast<size_t>(n * L.ffn));
      L.ffn_in.run_into(xr, n, h, false);
      L.ffn_out.run_into(h, n, xr, true);
      cpu::add_layernorm(xr, d, nullptr, 0, nullptr, L.ln2_w.data_ptr<float>(), L.ln2_b.data_ptr<float>(), n, d, eps,
                         k);
    } else {  // 0 FFN units: LN(h + b_2)
      cpu::add_layernorm(xr, d, nullptr, 0, L.out_b.data_ptr<float>(), L.ln2_w.data_ptr<float>(),
                         L.ln2_b.data_ptr<float>(), n, d, eps, k);
    }
  };

  // Embeddings + LN, then layer 0's QKV.
  cpu::run_items(chunks, threads, [&](int64_t c) {
    const auto [r0, r1] = rows(c);
    std::vector<int64_t> pos(r1 - r0);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = std::max<int64_t>(cu[b], r0); t < std::min<int64_t>(cu[b + 1], r1); ++t)
        pos[t - r0] = cfg_.position_offset + t - cu[b];
    cpu::embed(xp + r0 * d, word_.data_ptr<float>(), position_.data_ptr<float>(), token_type_.data_ptr<float>(),
               ids + r0, pos.data(), types + r0, r1 - r0, d, k);
    cpu::add_layernorm(xp + r0 * d, d, nullptr, 0, nullptr, emb_ln_w_.data_ptr<float>(), emb_ln_b_.data_ptr<float>(),
                       r1 - r0, d, eps, k);
    project_qkv(0, r0, r1);
  });

  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerWeights& L = layers_[l];
    if (L.heads > 0 && fused_attention) {
      cpu::AttentionParams p;
      p.qkv = qkv_buf.data_ptr<float>();
      p.out = ctx_buf.data_ptr<float>();
      p.cu_seqlens = cu;
      p.batch = batch;
      p.heads = L.heads;
      p.head_dim = dh;
      p.ld_qkv = 3 * L.width;
      p.ld_out = L.width;
      p.max_seqlen = max_seqlen;
      // Items: (sequence, head, query chunk). Each item packs its head's K and V again, so queries are split only
      // as far as the threads need: until the items divide evenly among them (or there are 4 per thread).
      const int64_t pairs = batch * L.heads;
      int64_t split = 1;
      while ((pairs * split) % threads != 0 && pairs * split < 4 * threads) ++split;
      int64_t qchunk = std::max<int64_t>(max_seqlen, 1);
      if (split > 1) {  // a multiple of 24 rows: whole query tiles of every ISA (8 or 12 rows)
        qchunk = std::max<int64_t>(24, (qchunk + split - 1) / split);
        qchunk = (qchunk + 23) / 24 * 24;
      }
      const int64_t per_pair = (std::max<int64_t>(max_seqlen, 1) + qchunk - 1) / qchunk;
      const size_t scratch = k.attention_scratch(dh, max_seqlen);
      cpu::run_items(pairs * per_pair, threads, [&](int64_t item) {
        const int64_t b = item / (L.heads * per_pair), h = (item / per_pair) % L.heads;
        const int64_t q0 = (item % per_pair) * qchunk, len = cu[b + 1] - cu[b];
        if (q0 < len) k.attention(p, b, h, q0, std::min(len, q0 + qchunk), attention_scratch(scratch));
      });
    } else if (L.heads > 0) {  // head dims the fused kernel does not cover: ATen SDPA per sequence
      const at::Tensor qkv = qkv_buf.narrow(0, 0, T * 3 * L.width).view({T, 3, L.heads, dh});
      const at::Tensor ctx = ctx_buf.narrow(0, 0, T * L.width).view({T, L.width});
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t n = cu[b + 1] - cu[b];
        if (n == 0) continue;
        auto parts = qkv.narrow(0, cu[b], n).permute({1, 2, 0, 3}).unbind(0);  // (h, s, dh)
        const at::Tensor o = at::scaled_dot_product_attention(parts[0], parts[1], parts[2]);
        ctx.narrow(0, cu[b], n).copy_(o.transpose(0, 1).reshape({n, L.width}));
      }
    }
    const bool last = l + 1 == layers_.size();
    cpu::run_items(chunks, threads, [&](int64_t c) {
      const auto [r0, r1] = rows(c);
      finish_layer(l, r0, r1);
      if (!last) {
        project_qkv(l + 1, r0, r1);
        return;
      }
      float* lp = thread_scratch<2>(static_cast<size_t>(2 * (r1 - r0)));  // (n, 2) logits
      qa_.run_into(xp + r0 * d, r1 - r0, lp, false);
      for (int64_t t = r0; t < r1; ++t) {
        start[t] = lp[2 * (t - r0)];
        end[t] = lp[2 * (t - r0) + 1];
      }
    });
  }
}

}  // namespace qaengine
