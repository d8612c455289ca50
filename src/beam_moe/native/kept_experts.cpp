// SwiGLU experts on the kept (token, expert) pairs of a few tokens, on a CPU, in one op:
//   out[t] = sum over kept slots k of w[t, k] * down[e] (silu(gate[e] x_t) * up[e] x_t),  e = ids[t, k],
// with slots whose id is >= E masked (never computed). Weights as transformers and vLLM store them:
// gate_up [E, 2I, H] (gate rows first) and down [E, H, I], row-major, bf16.
//
// Why: the weights stream through `matmul_rows` (bf16_matmul.h) at the memory's rate where torch's
// bf16 matmul is compute-bound (CPUs without bf16 arithmetic), and the whole layer is one dispatch
// instead of a dozen cold small ops. Intermediates are rounded to bf16 where torch's bf16 matmul
// would round them, so the result matches the `grouped` backend to bf16 rounding.
// Threads: with a few experts each expert's rows are split across them; with many, each thread
// takes whole experts, so no thread waits at a barrier per expert (measured on 2 threads of a Zen 4
// EPYC, 32-512 tokens: 4-7% faster). Each pair's output is kept apart and each token's pairs are
// summed in slot order, so the result has the same bits on any number of threads.
// Built by `python -m beam_moe.native build`.
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "bf16_matmul.h"

namespace {

// Below this many experts with kept pairs per thread, each expert's rows are split across the
// threads instead of whole experts handed to threads: few experts split unevenly.
constexpr int64_t kExpertsPerThread = 4;

// The buffers one thread needs for one expert at a time, sized for the widest expert.
struct Scratch {
  std::vector<float> x, g, a, y;
  Scratch(int64_t widest, int64_t hidden_size, int64_t intermediate)
      : x(widest * hidden_size), g(widest * 2 * intermediate), a(widest * intermediate), y(widest * hidden_size) {}
};

// Expert e on its `rows` kept pairs (slots[0..rows)): each pair's weighted output into pair_out.
template <typename hidden_t>
void expert_pairs(const hidden_t* hidden, const bf16* gate_up, const bf16* down, const int64_t* slots,
                  int64_t rows, const float* slot_weights, float* pair_out, int64_t top_k,
                  int64_t hidden_size, int64_t intermediate, Scratch& s) {
  const int64_t two_i = 2 * intermediate;
  for (int64_t m = 0; m < rows; ++m) {
    const hidden_t* src = hidden + (slots[m] / top_k) * hidden_size;
    for (int64_t h = 0; h < hidden_size; ++h) s.x[m * hidden_size + h] = static_cast<float>(src[h]);
  }
  matmul_rows(gate_up, two_i, hidden_size, s.x.data(), rows, s.g.data());
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < intermediate; ++i) {
      const float gate = round_bf16(s.g[m * two_i + i]);
      const float up = round_bf16(s.g[m * two_i + intermediate + i]);
      const float silu = round_bf16(gate / (1.f + std::exp(-gate)));
      s.a[m * intermediate + i] = round_bf16(silu * up);
    }
  }
  matmul_rows(down, hidden_size, intermediate, s.a.data(), rows, s.y.data());
  for (int64_t m = 0; m < rows; ++m) {
    const float w = slot_weights[slots[m]];
    float* dst = pair_out + m * hidden_size;
    for (int64_t h = 0; h < hidden_size; ++h) dst[h] = w * round_bf16(s.y[m * hidden_size + h]);
  }
}

template <typename hidden_t, typename index_t>
int64_t run(const hidden_t* hidden, const bf16* gate_up, const bf16* down, const index_t* ids,
         const float* slot_weights, float* out, int64_t tokens, int64_t top_k, int64_t hidden_size,
         int64_t intermediate, int64_t experts) {
  // kept pairs grouped by expert (counting sort; slot order within an expert)
  std::vector<int64_t> count(experts + 1, 0);
  for (int64_t s = 0; s < tokens * top_k; ++s) {
    const int64_t e = static_cast<int64_t>(ids[s]);
    TORCH_CHECK(e >= 0, "kept_experts: expert id ", e, " is negative");
    if (e < experts) ++count[e + 1];
  }
  for (int64_t e = 0; e < experts; ++e) count[e + 1] += count[e];
  const int64_t pairs = count[experts];
  std::vector<int64_t> slots(pairs), row_of_slot(tokens * top_k, -1);
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  for (int64_t s = 0; s < tokens * top_k; ++s) {
    const int64_t e = static_cast<int64_t>(ids[s]);
    if (e < experts) {
      row_of_slot[s] = next[e];
      slots[next[e]++] = s;
    }
  }
  std::vector<int64_t> active;
  int64_t widest = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = count[e + 1] - count[e];
    if (rows > 0) active.push_back(e);
    widest = std::max(widest, rows);
  }
  // every row is written by its expert, so not zero-filled first (5 MB at 512 tokens)
  const std::unique_ptr<float[]> pair_out(new float[pairs * hidden_size]);
  const int64_t two_i = 2 * intermediate;
  auto one_expert = [&](int64_t e, Scratch& s) {
    expert_pairs(hidden, gate_up + e * two_i * hidden_size, down + e * hidden_size * intermediate,
                 slots.data() + count[e], count[e + 1] - count[e], slot_weights,
                 pair_out.get() + count[e] * hidden_size, top_k, hidden_size, intermediate, s);
  };
  const int64_t n = static_cast<int64_t>(active.size());
  if (n >= kExpertsPerThread * at::get_num_threads()) {
    // whole experts per thread: each streams its own experts, no barrier between experts
    at::parallel_for(0, n, 1, [&](int64_t a0, int64_t a1) {
      Scratch s(widest, hidden_size, intermediate);
      for (int64_t a = a0; a < a1; ++a) one_expert(active[a], s);
    });
  } else {
    Scratch s(widest, hidden_size, intermediate);
    for (int64_t a = 0; a < n; ++a) one_expert(active[a], s);  // rows split inside matmul_rows
  }
  // each token's kept pairs summed in slot order, whichever thread computed them
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* dst = out + t * hidden_size;
      std::fill(dst, dst + hidden_size, 0.f);
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t row = row_of_slot[t * top_k + k];
        if (row < 0) continue;
        const float* src = pair_out.get() + row * hidden_size;
        for (int64_t h = 0; h < hidden_size; ++h) dst[h] += src[h];
      }
    }
  });
  return pairs;
}

std::tuple<at::Tensor, int64_t> kept_experts(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
                        const at::Tensor& ids, const at::Tensor& slot_weights) {
  TORCH_CHECK(hidden.device().is_cpu() && gate_up.device().is_cpu() && down.device().is_cpu(),
              "kept_experts runs on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && ids.dim() == 2 && slot_weights.sizes() == ids.sizes(),
              "kept_experts: hidden [T, H], ids and weights [T, K]");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3, "kept_experts: gate_up [E, 2I, H], down [E, H, I]");
  const int64_t experts = gate_up.size(0), hidden_size = hidden.size(1), intermediate = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * intermediate && gate_up.size(2) == hidden_size &&
                  down.size(0) == experts && down.size(1) == hidden_size,
              "kept_experts: gate_up ", gate_up.sizes(), " and down ", down.sizes(),
              " are not [E, 2I, H] and [E, H, I] for H = ", hidden_size);
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && down.scalar_type() == at::kBFloat16,
              "kept_experts: expert weights must be bfloat16, got ", gate_up.scalar_type(), " and ",
              down.scalar_type());
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "kept_experts: weights must be contiguous, as transformers and vLLM store them");
  TORCH_CHECK(ids.size(0) == hidden.size(0), "kept_experts: ids has ", ids.size(0), " rows for ",
              hidden.size(0), " tokens");
  const auto x = hidden.contiguous();
  const auto i = ids.contiguous();
  const auto w = slot_weights.to(at::kFloat).contiguous();
  auto out = at::empty({hidden.size(0), hidden_size}, hidden.options().dtype(at::kFloat));
  const int64_t tokens = ids.size(0), top_k = ids.size(1);
  int64_t rows = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kept_experts", [&] {
    using hidden_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(i.scalar_type(), "kept_experts_ids", [&] {
      rows = run(x.data_ptr<hidden_t>(), gate_up.data_ptr<bf16>(), down.data_ptr<bf16>(),
                 i.data_ptr<index_t>(), w.data_ptr<float>(), out.data_ptr<float>(), tokens, top_k,
                 hidden_size, intermediate, experts);
    });
  });
  return {out.to(hidden.scalar_type()), rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(beam_moe, m) {
  m.def("kept_experts(Tensor hidden, Tensor gate_up, Tensor down, Tensor ids, Tensor weights) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(beam_moe, CPU, m) { m.impl("kept_experts", kept_experts); }
