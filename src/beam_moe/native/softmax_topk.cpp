// The softmax Top-K router of the Qwen-style transformers families (Qwen2/3-MoE, Qwen3-Next, OLMoE,
// FlexOlmo), on a CPU, in one op:
//   logits = x W^T (bf16, as torch's bf16 matmul rounds it), probs = softmax(float32 logits),
//   (top values, ids) = Top-K of probs, values / their sum when normalize, values cast to bf16.
// Why: the router is a 128 x H GEMV at decode and a GEMM at prefill; on a CPU without bf16
// arithmetic torch's bf16 matmul under it is compute-bound (about 9 GFLOP/s: 30 ms of a 512-token
// layer), and at decode its five small ops each start cold after the previous layer's experts.
// Here the weights stream through `matmul_rows` (bf16_matmul.h) and the rest are the router's own
// ATen ops, called from C++ (one Python dispatch), so values and the order of ties are torch's.
#include <torch/library.h>

#include <tuple>

#include "bf16_matmul.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_topk(const at::Tensor& hidden, const at::Tensor& weight,
                                                            int64_t top_k, bool normalize) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "softmax_topk runs on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "softmax_topk: hidden [T, H] and weight [E, H], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && hidden.scalar_type() == at::kBFloat16,
              "softmax_topk: hidden and router weight must be bfloat16, got ", hidden.scalar_type(),
              " and ", weight.scalar_type());
  const int64_t tokens = hidden.size(0), hidden_size = hidden.size(1), experts = weight.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= experts, "softmax_topk: top_k ", top_k, " is not in [1, ", experts, "]");
  const auto x = hidden.to(at::kFloat).contiguous();
  const auto w = weight.contiguous();
  auto logits = at::empty({tokens, experts}, x.options());
  matmul_rows(w.data_ptr<bf16>(), experts, hidden_size, x.data_ptr<float>(), tokens, logits.data_ptr<float>());
  logits = logits.to(at::kBFloat16);
  // from here the router's own ATen ops, so values and the order of ties are torch's
  auto [values, ids] = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);
  if (normalize) values.div_(values.sum(-1, true));
  return {logits, values.to(at::kBFloat16), ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(beam_moe, m) {
  m.def("softmax_topk(Tensor hidden, Tensor weight, int top_k, bool normalize) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(beam_moe, CPU, m) { m.impl("softmax_topk", softmax_topk); }
