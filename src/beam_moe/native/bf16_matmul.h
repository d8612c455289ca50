// bf16 weight rows times a few float32 tokens, widened to float32 as they stream: the matmul under
// the native CPU ops (kept_experts.cpp, softmax_topk.cpp). Why not torch's: on a CPU without bf16
// arithmetic (AVX2 only) torch's bf16 matmul runs at about 9 GFLOP/s whatever the shape, so a GEMV
// reads its weights at 7 GB/s and two tokens take twice as long as one. Here a block of four rows
// is multiplied with all the tokens, three at a time, while it sits in L1, and the blocks ahead are
// prefetched, so the weights are read once and stream at the memory's rate at any token count.
// The four rows of a block come from the four quarters of the matrix (rows b, b + Q, b + 2Q, b + 3Q),
// so a core reads four long sequential streams rather than one: one core's read rate rises with
// the streams in flight (measured on a Zen 4 EPYC, a plain read of 9.4 MB chunks: 22 GB/s with one
// stream, 27-28 with four and a prefetch; 128 experts one after another at 1 token: 53 -> 45 ms).
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
// How far ahead in its stream each row's line is prefetched: nearer for blocks of a few tokens,
// whose loop is fast (measured on 2 threads of a Zen 4 EPYC, the experts op: 1024 bytes 6-10%
// faster than 2048 at 1-64 tokens, 12% slower at 512, where 2048 and 4096 tie).
template <int TOKENS>
constexpr int64_t prefetch_bytes() {
  return TOKENS <= 3 ? 1024 : 2048;
}
// On the AVX512-BF16 path, blocks of more tokens also prefetch each row's line this far ahead
// with the T2 hint: their loop is compute-bound for part of each block, and the early request
// keeps the memory busy meanwhile (measured on the Zen 4, the experts op at 512 tokens: 1 thread
// 80.0 -> 73.7 ms, 2 threads 37.4 -> 35.6; decode-sized blocks gained nothing, nor did the AVX2
// path at any size, which therefore has no far prefetch).
template <int TOKENS>
constexpr bool far_prefetch() {
  return TOKENS > 3;
}
constexpr int64_t kFarPrefetchBytes = 8192;

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

// One block: rows b + r * quarter (r < kRows) times TOKENS tokens, depth % 8 == 0.
// Each row's line prefetch_bytes ahead in its stream is prefetched as this one is read: with a few
// tokens the loop is compute-bound and the hardware prefetcher alone leaves the memory idle
// meanwhile (measured on an AVX2 EPYC: 512 tokens 1.2x faster, 64 tokens 1.25x, 1 token 1.1x). The
// prefetch goes to L2 (T1), not L1: an L1 prefetch holds one of the core's few L1 miss buffers
// until its line arrives, which capped one core at ~12 GB/s; into L2 the same stream reads at
// ~23 GB/s (measured on an AVX-512 EPYC: 1 token 1.5x faster, 512 tokens 1.3x). A prefetch past the
// end of the weights is harmless (it never faults). A line takes this loop about twice as long as
// the AVX512-BF16 one, so its distance is that of twice the tokens (on the Zen 4 with this path
// forced, 1 thread, the experts op against the one-stream layout: 1 token 0.82 -> 0.63 ms, 64 tokens
// 26.4 -> 20.7, 512 98 -> 96; with the AVX512-BF16 distances 512 tokens were 10% slower).
template <int TOKENS>
__attribute__((target("avx2,fma"))) void block_avx2(const bf16* W, int64_t depth, int64_t quarter,
                                                    const float* x, float* y, int64_t y_stride, int64_t b) {
  __m256 acc[kRows][TOKENS];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm256_setzero_ps();
  const bf16* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = W + (b + r * quarter) * depth;
  for (int64_t h = 0; h < depth; h += 8) {
    if (h % 32 == 0)
      for (int r = 0; r < kRows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + h) + prefetch_bytes<2 * TOKENS>(), _MM_HINT_T1);
    __m256 xs[TOKENS];
    for (int m = 0; m < TOKENS; ++m) xs[m] = _mm256_loadu_ps(x + m * depth + h);
    for (int r = 0; r < kRows; ++r) {
      const __m256 w = load8(rows[r] + h);
      for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm256_fmadd_ps(w, xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) y[m * y_stride + b + r * quarter] = sum8(acc[r][m]);
}

// Blocks [b0, b1) times all `tokens` (any count) in chunks of kTokens, each block's chunks back to
// back, so a block is read from memory once and its later chunks find it in L1.
__attribute__((target("avx2,fma"))) void blocks_times_tokens_avx2(const bf16* W, int64_t depth,
                                                                  int64_t quarter, const float* x,
                                                                  int64_t tokens, float* y,
                                                                  int64_t y_stride, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t m = 0; m < tokens; m += kTokens) {
      const int64_t count = std::min(kTokens, tokens - m);
      const float* xm = x + m * depth;
      float* ym = y + m * y_stride;
      if (count == 1) block_avx2<1>(W, depth, quarter, xm, ym, y_stride, b);
      else if (count == 2) block_avx2<2>(W, depth, quarter, xm, ym, y_stride, b);
      else block_avx2<3>(W, depth, quarter, xm, ym, y_stride, b);
    }
  }
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
                                                                    int64_t quarter, const bf16* x,
                                                                    float* y, int64_t y_stride, int64_t b) {
  __m512 acc[kRows][TOKENS];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm512_setzero_ps();
  const bf16* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = W + (b + r * quarter) * depth;
  for (int64_t h = 0; h < depth; h += 32) {  // 32 bf16: one 64-byte line of each row
    for (int r = 0; r < kRows; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + h) + prefetch_bytes<TOKENS>(), _MM_HINT_T1);
      if (far_prefetch<TOKENS>())
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + h) + kFarPrefetchBytes, _MM_HINT_T2);
    }
    __m512bh xs[TOKENS];
    for (int m = 0; m < TOKENS; ++m) xs[m] = (__m512bh)_mm512_loadu_si512(x + m * depth + h);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(rows[r] + h);
      for (int m = 0; m < TOKENS; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w, xs[m]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < TOKENS; ++m) y[m * y_stride + b + r * quarter] = _mm512_reduce_add_ps(acc[r][m]);
}

using Bf16Block = void (*)(const bf16*, int64_t, int64_t, const bf16*, float*, int64_t, int64_t);
constexpr Bf16Block kBf16Blocks[kTokensBf16] = {block_avx512bf16<1>, block_avx512bf16<2>, block_avx512bf16<3>,
                                                block_avx512bf16<4>, block_avx512bf16<5>, block_avx512bf16<6>};

// Blocks [b0, b1) times all tokens (bf16, any count): as blocks_times_tokens_avx2, 6 tokens at a time.
void blocks_times_tokens_avx512bf16(const bf16* W, int64_t depth, int64_t quarter, const bf16* xb,
                                    int64_t tokens, float* y, int64_t y_stride, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m = 0; m < tokens; m += kTokensBf16)
      kBf16Blocks[std::min(kTokensBf16, tokens - m) - 1](W, depth, quarter, xb + m * depth,
                                                         y + m * y_stride, y_stride, b);
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
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kRows * depth));  // ~128 KB of weights a task
  if (!dot_bf16 && !vector) {
    at::parallel_for(0, (rows + kRows - 1) / kRows, grain, [&](int64_t b0, int64_t b1) {
      rows_times_all_tokens_plain(W, depth, x, tokens, y, rows, b0 * kRows, std::min(rows, b1 * kRows));
    });
    return;
  }
  // block b: rows b + r * quarter; index `quarter` stands for the rows after kRows * quarter, which
  // go to the portable loops
  const int64_t quarter = rows / kRows;
  at::parallel_for(0, quarter + 1, grain, [&](int64_t b0, int64_t b1) {
    const int64_t end = std::min(b1, quarter);
#ifdef BEAM_X86
    if (dot_bf16) blocks_times_tokens_avx512bf16(W, depth, quarter, xb.data(), tokens, y, rows, b0, end);
    else blocks_times_tokens_avx2(W, depth, quarter, x, tokens, y, rows, b0, end);
#endif
    if (b1 == quarter + 1) rows_times_all_tokens_plain(W, depth, x, tokens, y, rows, kRows * quarter, rows);
  });
}

// What torch's bf16 matmul and activation store: float32 rounded to bf16.
inline float round_bf16(float v) { return static_cast<float>(static_cast<bf16>(v)); }

}  // namespace
