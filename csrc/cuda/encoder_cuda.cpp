// The encoder's CUDA forward (-DQAENGINE_CUDA=ON builds): cuBLAS GEMMs through at::addmm (fp32, no TF32), the
// varlen attention and residual + LayerNorm kernels of this directory, ATen gathers for the embeddings.
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>

#include <vector>

#include "../src/encoder.h"
#include "ops.h"

namespace qaengine {

std::pair<at::Tensor, at::Tensor> Encoder::forward_cuda(const at::Tensor& ids, const at::Tensor& types,
                                                        const at::Tensor& cu_seqlens, int64_t max_seqlen) const {
  const at::Tensor cu = cu_seqlens.cpu().contiguous();  // (B+1) host copy, already validated by forward()
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t T = ids.size(0), batch = cu.size(0) - 1;
  const auto on_device = at::TensorOptions().device(device_);
  if (T == 0) return {at::empty({0}, on_device.dtype(at::kFloat)), at::empty({0}, on_device.dtype(at::kFloat))};
  std::vector<int64_t> pos(T);
  packed_position_ids(c, batch, cfg_.position_offset, 0, T, pos.data());
  const at::Tensor pos_d = at::from_blob(pos.data(), {T}, at::kLong).to(device_);
  const at::Tensor ids_d = ids.to(device_), types_d = types.to(device_), cu_d = cu.to(device_);

  // (T, d) hidden state
  at::Tensor x = at::add(at::add(at::index_select(word_, 0, ids_d), at::index_select(position_, 0, pos_d)),
                         at::index_select(token_type_, 0, types_d));
  const double eps = cfg_.layer_norm_eps;
  cuda::add_layernorm_(x, std::nullopt, std::nullopt, emb_ln_w_, emb_ln_b_, eps);
  for (const LayerWeights& L : layers_) {
    if (L.heads > 0) {
      const at::Tensor qkv = L.qkv(x);  // (T, 3w), bias included
      const at::Tensor ctx = cuda::varlen_attention(qkv, std::nullopt, cu_d, L.heads, max_seqlen);  // (T, w)
      cuda::add_layernorm_(x, L.o(ctx), std::nullopt, L.ln1_w, L.ln1_b, eps);
    } else {
      cuda::add_layernorm_(x, std::nullopt, L.o_b, L.ln1_w, L.ln1_b, eps);
    }
    if (L.ffn > 0) {
      cuda::add_layernorm_(x, L.ffn_out(L.ffn_in(x)), std::nullopt, L.ln2_w, L.ln2_b, eps);
    } else {
      cuda::add_layernorm_(x, std::nullopt, L.out_b, L.ln2_w, L.ln2_b, eps);
    }
  }
  const at::Tensor logits = qa_(x);  // (T, 2)
  return {logits.select(1, 0).contiguous(), logits.select(1, 1).contiguous()};
}

}  // namespace qaengine
