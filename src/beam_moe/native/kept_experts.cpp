// SwiGLU experts on the kept (token, expert) pairs of a few tokens, on a CPU, in one op:
//   out[t] = sum over kept slots k of w[t, k] * down[e] (silu(gate[e] x_t) * up[e] x_t),  e = ids[t, k],
// with slots whose id is >= E masked (never computed). Weights as transformers and vLLM store them:
// gate_up [E, 2I, H] (gate rows first) and down [E, H, I], row-major, bf16.
//
// Why: on a CPU without bf16 arithmetic (AVX2 only) torch's bf16 matmul runs at about 9 GFLOP/s
// whatever the shape, so a GEMV reads its weights at 7 GB/s and two tokens on one expert take twice
// as long as one. Here each weight row is widened to float32 as it is loaded; a block of four rows
// is multiplied with all of an expert's tokens, three at a time, while it sits in L1, and the blocks
// ahead are prefetched, so the weights are read once and stream at the memory's rate at any token
// count; and the whole layer is one dispatch instead of a dozen cold small ops.
// Intermediates are rounded to bf16 where torch's bf16 matmul would round them, so
// the result matches the `grouped` backend to bf16 rounding.
//
// Portable: the AVX2 + FMA path is compiled with a target attribute and chosen at run time; other
// CPUs run the same loops in plain C++. Built by `python -m beam_moe.native build`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BEAM_X86 1
#endif

namespace {

constexpr int64_t kRows = 4;    // weight rows per block
constexpr int64_t kTokens = 3;  // tokens multiplied with a block at once
constexpr int64_t kPrefetchBlocks = 2;  // how far ahead of the block being multiplied its rows are prefetched

using bf16 = at::BFloat16;

// y[m, n] = sum_h W[n, h] * x[m, h] for n in [n0, n1), m < tokens (<= kTokens); portable loops.
void rows_times_tokens_plain(const bf16* W, int64_t depth, const float* x, int64_t tokens,
                             float* y, int64_t y_stride, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const bf16* row = W + n * depth;
    for (int64_t m = 0; m < tokens; ++m) {
      const float* xm = x + m * depth;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t h = 0;
      for (; h + 4 <= depth; h += 4) {
        for (int j = 0; j < 4; ++j) acc[j] += static_cast<float>(row[h + j]) * xm[h + j];
      }
      for (; h < depth; ++h) acc[0] += static_cast<float>(row[h]) * xm[h];
      y[m * y_stride + n] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  }
}

#ifdef BEAM_X86
__attribute__((target("avx2,fma"))) inline __m256 load8(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One block: kRows weight rows times TOKENS tokens, depth % 8 == 0.
// Each 64-byte line of the block kPrefetchBlocks ahead is prefetched as this block's is read: with a
// few tokens the loop is compute-bound and the hardware prefetcher alone leaves the memory idle
// meanwhile (measured: 512 tokens 1.2x faster, 64 tokens 1.25x, 1 token 1.1x). A prefetch past the
// end of the weights is harmless (it never faults).
template <int TOKENS>
__attribute__((target("avx2,fma"))) void block_avx2(const bf16* W, int64_t depth, const float* x,
                                                    float* y, int64_t y_stride, int64_t n) {
  __m256 acc[kRows][TOKENS];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm256_setzero_ps();
  const bf16* row = W + n * depth;
  const int64_t ahead = kPrefetchBlocks * kRows * depth;
  for (int64_t h = 0; h < depth; h += 8) {
    if (h % 32 == 0)
      for (int r = 0; r < kRows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(row + r * depth + h + ahead), _MM_HINT_T0);
    __m256 xs[TOKENS];
    for (int m = 0; m < TOKENS; ++m) xs[m] = _mm256_loadu_ps(x + m * depth + h);
    for (int r = 0; r < kRows; ++r) {
      const __m256 w = load8(row + r * depth + h);
      for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm256_fmadd_ps(w, xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) y[m * y_stride + n + r] = sum8(acc[r][m]);
}

// All `tokens` (any count) in chunks of kTokens, each block's chunks back to back, so a block is
// read from memory once and its later chunks find it in L1.
__attribute__((target("avx2,fma"))) void rows_times_tokens_avx2(const bf16* W, int64_t depth,
                                                                const float* x, int64_t tokens,
                                                                float* y, int64_t y_stride,
                                                                int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) {
    for (int64_t m = 0; m < tokens; m += kTokens) {
      const int64_t count = std::min(kTokens, tokens - m);
      const float* xm = x + m * depth;
      float* ym = y + m * y_stride;
      if (count == 1) block_avx2<1>(W, depth, xm, ym, y_stride, n);
      else if (count == 2) block_avx2<2>(W, depth, xm, ym, y_stride, n);
      else block_avx2<3>(W, depth, xm, ym, y_stride, n);
    }
  }
  for (int64_t m = 0; m < tokens; m += kTokens)
    rows_times_tokens_plain(W, depth, x + m * depth, std::min(kTokens, tokens - m), y + m * y_stride,
                            y_stride, n, n1);
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// y[m, :] = W x[m] for all m < tokens (any count): rows split across threads.
void matmul_rows(const bf16* W, int64_t rows, int64_t depth, const float* x, int64_t tokens, float* y) {
#ifdef BEAM_X86
  const bool vector = cpu_has_avx2_fma() && depth % 8 == 0;
#else
  const bool vector = false;
#endif
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kRows * depth));  // ~128 KB of weights a task
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kRows, n1 = std::min(rows, b1 * kRows);
#ifdef BEAM_X86
    if (vector) {
      rows_times_tokens_avx2(W, depth, x, tokens, y, rows, n0, n1);
      return;
    }
#endif
    for (int64_t m = 0; m < tokens; m += kTokens)
      rows_times_tokens_plain(W, depth, x + m * depth, std::min(kTokens, tokens - m), y + m * rows, rows,
                              n0, n1);
  });
}

// What torch's bf16 matmul and activation store: float32 rounded to bf16.
inline float round_bf16(float v) { return static_cast<float>(static_cast<bf16>(v)); }

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
  std::vector<int64_t> slots(count[experts]);
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  for (int64_t s = 0; s < tokens * top_k; ++s) {
    const int64_t e = static_cast<int64_t>(ids[s]);
    if (e < experts) slots[next[e]++] = s;
  }
  int64_t widest = 0;
  for (int64_t e = 0; e < experts; ++e) widest = std::max(widest, count[e + 1] - count[e]);
  const int64_t two_i = 2 * intermediate;
  std::vector<float> x(widest * hidden_size), g(widest * two_i), a(widest * intermediate),
      y(widest * hidden_size);
  std::fill(out, out + tokens * hidden_size, 0.f);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = count[e], rows = count[e + 1] - first;
    if (rows == 0) continue;
    for (int64_t m = 0; m < rows; ++m) {
      const hidden_t* src = hidden + (slots[first + m] / top_k) * hidden_size;
      for (int64_t h = 0; h < hidden_size; ++h) x[m * hidden_size + h] = static_cast<float>(src[h]);
    }
    matmul_rows(gate_up + e * two_i * hidden_size, two_i, hidden_size, x.data(), rows, g.data());
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t i = 0; i < intermediate; ++i) {
        const float gate = round_bf16(g[m * two_i + i]);
        const float up = round_bf16(g[m * two_i + intermediate + i]);
        const float silu = round_bf16(gate / (1.f + std::exp(-gate)));
        a[m * intermediate + i] = round_bf16(silu * up);
      }
    }
    matmul_rows(down + e * hidden_size * intermediate, hidden_size, intermediate, a.data(), rows, y.data());
    for (int64_t m = 0; m < rows; ++m) {
      const int64_t s = slots[first + m];
      const float w = slot_weights[s];
      float* dst = out + (s / top_k) * hidden_size;
      for (int64_t h = 0; h < hidden_size; ++h) dst[h] += w * round_bf16(y[m * hidden_size + h]);
    }
  }
  return count[experts];
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
