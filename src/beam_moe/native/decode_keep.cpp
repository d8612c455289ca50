// BEAM's mask decision for a few tokens on a CPU, in one op:
//   z[t, k] = W[ids[t, k]] . x[t] (+ b[ids[t, k]]),  soft = sigmoid(z),  keep = soft >= threshold,
// and whether every slot is kept. A router-aware head (mask.py) also adds
//   scale * r[t, k] + offset,  r = max(log(max(g_k / max_j g_j, exp(-floor))), -floor)
// from the router's Top-K weights g (a token whose weights are all <= 0 gets ratio 1).
// The same values as MaskHead.slot_logits + routing.apply_slot_mask (up to float rounding of the
// dot product); one dispatch instead of seven, which matters at decode, where each op of a MoE
// layer starts with caches that the layer's weights just flushed.
// Portable C++ (no CPU-specific flags), built by `python -m beam_moe.native build`.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

struct RouterTerm {
  const float* g = nullptr;  // [T, K] router weights; null: a linear head
  float scale = 0.f, offset = 0.f, floor = 0.f, min_ratio = 0.f;
};

template <typename scalar_t, typename index_t>
bool decide(const scalar_t* x, const float* w, const float* b, const index_t* ids, float* soft,
            bool* keep, int64_t tokens, int64_t top_k, int64_t hidden, int64_t experts,
            float threshold, const RouterTerm& router) {
  bool all_kept = true;
  for (int64_t t = 0; t < tokens; ++t) {
    const scalar_t* xt = x + t * hidden;
    float top = 0.f;
    if (router.g != nullptr) {
      for (int64_t k = 0; k < top_k; ++k) top = std::max(top, std::max(router.g[t * top_k + k], 0.f));
    }
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t e = static_cast<int64_t>(ids[t * top_k + k]);
      TORCH_CHECK(e >= 0 && e < experts, "decode_keep: expert id ", e, " is outside [0, ", experts, ")");
      const float* we = w + e * hidden;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t h = 0;
      for (; h + 4 <= hidden; h += 4) {
        acc[0] += we[h] * static_cast<float>(xt[h]);
        acc[1] += we[h + 1] * static_cast<float>(xt[h + 1]);
        acc[2] += we[h + 2] * static_cast<float>(xt[h + 2]);
        acc[3] += we[h + 3] * static_cast<float>(xt[h + 3]);
      }
      for (; h < hidden; ++h) acc[0] += we[h] * static_cast<float>(xt[h]);
      float z = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      if (b != nullptr) z += b[e];
      if (router.g != nullptr) {
        const float g = std::max(router.g[t * top_k + k], 0.f);
        const float ratio = top > 0.f ? g / top : 1.f;
        const float r = std::max(std::log(std::max(ratio, router.min_ratio)), -router.floor);
        z = (z + router.scale * r) + router.offset;
      }
      const float s = 1.f / (1.f + std::exp(-z));
      soft[t * top_k + k] = s;
      const bool kept = s >= threshold;
      keep[t * top_k + k] = kept;
      all_kept = all_kept && kept;
    }
  }
  return all_kept;
}

std::tuple<at::Tensor, at::Tensor, bool> decode_keep(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& ids, double threshold, const std::optional<at::Tensor>& router_weights,
    const std::optional<at::Tensor>& router_scale, const std::optional<at::Tensor>& router_offset,
    double router_floor) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && ids.dim() == 2,
              "decode_keep: hidden [T, H], weight [E, H] and ids [T, K] must be 2-D");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "decode_keep: hidden has ", hidden.size(1),
              " features, the mask head ", weight.size(1));
  TORCH_CHECK(ids.size(0) == hidden.size(0), "decode_keep: ", ids.size(0), " rows of ids for ",
              hidden.size(0), " tokens");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "decode_keep: the mask head must be float32");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "decode_keep: ids must be int32 or int64");
  const at::Tensor x = hidden.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor i = ids.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == weight.size(0),
                "decode_keep: the bias must be float32 [E]");
    b = bias->contiguous();
  }
  RouterTerm router;
  at::Tensor g;
  if (router_weights.has_value() && router_weights->defined()) {
    TORCH_CHECK(router_weights->scalar_type() == at::kFloat && router_weights->sizes() == ids.sizes(),
                "decode_keep: the router's weights must be float32 shaped like ids");
    TORCH_CHECK(router_scale.has_value() && router_offset.has_value() && router_scale->numel() == 1 &&
                    router_offset->numel() == 1,
                "decode_keep: a router-aware head needs its scale and offset");
    g = router_weights->contiguous();
    router.g = g.data_ptr<float>();
    router.scale = router_scale->to(at::kFloat).item<float>();
    router.offset = router_offset->to(at::kFloat).item<float>();
    router.floor = static_cast<float>(router_floor);
    router.min_ratio = static_cast<float>(std::exp(-router_floor));
  }
  at::Tensor soft = at::empty(ids.sizes(), ids.options().dtype(at::kFloat));
  at::Tensor keep = at::empty(ids.sizes(), ids.options().dtype(at::kBool));
  const int64_t tokens = i.size(0), top_k = i.size(1), size = w.size(1), experts = w.size(0);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  bool all_kept = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "decode_keep", [&] {
    if (i.scalar_type() == at::kInt) {
      all_kept = decide<scalar_t, int32_t>(x.data_ptr<scalar_t>(), w.data_ptr<float>(), bp,
                                           i.data_ptr<int32_t>(), soft.data_ptr<float>(),
                                           keep.data_ptr<bool>(), tokens, top_k, size, experts,
                                           static_cast<float>(threshold), router);
    } else {
      all_kept = decide<scalar_t, int64_t>(x.data_ptr<scalar_t>(), w.data_ptr<float>(), bp,
                                           i.data_ptr<int64_t>(), soft.data_ptr<float>(),
                                           keep.data_ptr<bool>(), tokens, top_k, size, experts,
                                           static_cast<float>(threshold), router);
    }
  });
  return {soft, keep, all_kept};
}

}  // namespace

TORCH_LIBRARY(beam_moe, m) {
  m.def(
      "decode_keep(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, float threshold, "
      "Tensor? router_weights, Tensor? router_scale, Tensor? router_offset, float router_floor) "
      "-> (Tensor, Tensor, bool)");
}

TORCH_LIBRARY_IMPL(beam_moe, CPU, m) { m.impl("decode_keep", &decode_keep); }
