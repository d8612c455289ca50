// bf16 weight rows times a few float32 tokens, widened to float32 as they stream: the matmul under
// the native CPU ops (kept_experts.cpp, softmax_topk.cpp). Why not torch's: on a CPU without bf16
// arithmetic (AVX2 only) torch's bf16 matmul runs at about 9 GFLOP/s whatever the shape, so a GEMV
// reads its weights at 7 GB/s and two tokens take twice as long as one. Here a block of four rows
// is multiplied with all the tokens, three at a time, while it sits in L1, and the blocks ahead are
// prefetched, so the weights are read once and stream at the memory's rate at any token count.
//
// Portable: the AVX512-BF16 and AVX2 + FMA paths are compiled with target attributes and chosen at
// run time; other CPUs run the same loops in plain C++.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
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

// Rows [n0, n1) times all `tokens` in the portable loops: CPUs without a vector path, and the rows
// after the vector paths' last whole block.
void rows_times_all_tokens_plain(const bf16* W, int64_t depth, const float* x, int64_t tokens, float* y,
                                 int64_t y_stride, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < tokens; m += kTokens)
    rows_times_tokens_plain(W, depth, x + m * depth, std::min(kTokens, tokens - m), y + m * y_stride,
                            y_stride, n0, n1);
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
// meanwhile (measured on an AVX2 EPYC: 512 tokens 1.2x faster, 64 tokens 1.25x, 1 token 1.1x). The
// prefetch goes to L2 (T1), not L1: an L1 prefetch holds one of the core's few L1 miss buffers
// until its line arrives, which capped one core at ~12 GB/s; into L2 the same stream reads at
// ~23 GB/s (measured on an AVX-512 EPYC: 1 token 1.5x faster, 512 tokens 1.3x). A prefetch past the
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
        _mm_prefetch(reinterpret_cast<const char*>(row + r * depth + h + ahead), _MM_HINT_T1);
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
  rows_times_all_tokens_plain(W, depth, x, tokens, y, y_stride, n, n1);
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// AVX512-BF16 (Zen 4, Sapphire Rapids and later): VDPBF16PS multiplies 32 bf16 weights with 32 bf16
// token values and adds the pairs into 16 float32 lanes, in one instruction where the AVX2 path
// needs a load, two widening steps and an FMA per 8 weights: twice the arithmetic per instruction
// and no widening, so the loop stays at the memory's rate up to more tokens. The tokens are rounded
// to bf16 once per call, as torch's bf16 matmul rounds them (exact for the bf16 activations the ops
// pass); products are exact and summed in float32, in another order than the AVX2 path.
constexpr int64_t kTokensBf16 = 6;  // 4 rows x 6 tokens: 24 of the 32 zmm registers accumulate

template <int TOKENS>
__attribute__((target("avx512f,avx512bf16"))) void block_avx512bf16(const bf16* W, int64_t depth,
                                                                    const bf16* x, float* y,
                                                                    int64_t y_stride, int64_t n) {
  __m512 acc[kRows][TOKENS];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm512_setzero_ps();
  const bf16* row = W + n * depth;
  const int64_t ahead = kPrefetchBlocks * kRows * depth;
  for (int64_t h = 0; h < depth; h += 32) {  // 32 bf16: one 64-byte line of each row
    for (int r = 0; r < kRows; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(row + r * depth + h + ahead), _MM_HINT_T1);
    __m512bh xs[TOKENS];
    for (int m = 0; m < TOKENS; ++m) xs[m] = (__m512bh)_mm512_loadu_si512(x + m * depth + h);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(row + r * depth + h);
      for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w, xs[m]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) y[m * y_stride + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

using Bf16Block = void (*)(const bf16*, int64_t, const bf16*, float*, int64_t, int64_t);
constexpr Bf16Block kBf16Blocks[kTokensBf16] = {block_avx512bf16<1>, block_avx512bf16<2>, block_avx512bf16<3>,
                                                block_avx512bf16<4>, block_avx512bf16<5>, block_avx512bf16<6>};

// Rows [n0, n1) times all tokens (bf16, any count): as rows_times_tokens_avx2, 6 tokens at a time.
void rows_times_tokens_avx512bf16(const bf16* W, int64_t depth, const bf16* xb, const float* x,
                                  int64_t tokens, float* y, int64_t y_stride, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows)
    for (int64_t m = 0; m < tokens; m += kTokensBf16)
      kBf16Blocks[std::min(kTokensBf16, tokens - m) - 1](W, depth, xb + m * depth, y + m * y_stride, y_stride, n);
  rows_times_all_tokens_plain(W, depth, x, tokens, y, y_stride, n, n1);
}

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

// y[m, :] = W x[m] for all m < tokens (any count): rows split across threads.
void matmul_rows(const bf16* W, int64_t rows, int64_t depth, const float* x, int64_t tokens, float* y) {
#ifdef BEAM_X86
  const bool dot_bf16 = cpu_has_avx512_bf16() && depth % 32 == 0;
  const bool vector = cpu_has_avx2_fma() && depth % 8 == 0;
#else
  const bool dot_bf16 = false, vector = false;
#endif
  std::vector<bf16> xb(dot_bf16 ? tokens * depth : 0);
  for (size_t i = 0; i < xb.size(); ++i) xb[i] = static_cast<bf16>(x[i]);  // round to nearest even
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kRows * depth));  // ~128 KB of weights a task
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kRows, n1 = std::min(rows, b1 * kRows);
#ifdef BEAM_X86
    if (dot_bf16) {
      rows_times_tokens_avx512bf16(W, depth, xb.data(), x, tokens, y, rows, n0, n1);
      return;
    }
    if (vector) {
      rows_times_tokens_avx2(W, depth, x, tokens, y, rows, n0, n1);
      return;
    }
#endif
    rows_times_all_tokens_plain(W, depth, x, tokens, y, rows, n0, n1);
  });
}

// What torch's bf16 matmul and activation store: float32 rounded to bf16.
inline float round_bf16(float v) { return static_cast<float>(static_cast<bf16>(v)); }

}  // namespace
