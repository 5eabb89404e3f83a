// Shared by the direct paths of the C++ loops (direct_steps.cpp: the subtractive cells;
// elm_loops.cpp: the ELM neuron's memory loop): oneDNN's brgemm micro-kernel as a plain
// row-major product, and AVX-512 exp / sigmoid. MC_DIRECT is 1 where torch was built
// with the float32 brgemm on x86; direct_cpu() says whether this CPU has AVX-512.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<ATen/native/CPUBlas.h>)
#include <ATen/native/CPUBlas.h>
#endif
#endif
#if defined(__x86_64__) && defined(CPUBLAS_BRGEMM_F32F32F32)
#include <immintrin.h>
#define MC_DIRECT 1
#define MC_AVX512 __attribute__((target("avx512f")))
#else
#define MC_DIRECT 0
#endif

namespace mc_simd {

#if MC_DIRECT

inline bool direct_cpu() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// C (M, N; ld_c) (+)= A (M, K; ld_a) B (K, N; ld_b), row-major, on the calling thread.
// Long products run in slices of K so that A's slice stays in L1 across N (LM-650's
// backward, K = 2600: 303 against 494 us per step, one thread; up to K = 1024 one slice
// is as fast), and wide ones in bands of N whose slice of B fits in L2, read from L3
// once rather than once per block of rows of the micro-kernel (LM-650's forward, K = 650,
// N = 2600: 276 against 388 us with 20 rows, 140 against 196 with 10).
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kWhole = 1024, kSlice = 256, kBandBytes = 768 << 10;
  if (m == 0 || n == 0) return;
  const int64_t step = k <= kWhole ? k : kSlice;
  const int64_t band = std::max<int64_t>(64, kBandBytes / (4 * step) / 64 * 64);
  for (int64_t n0 = 0; n0 < n; n0 += band) {
    const int64_t width = std::min(band, n - n0);
    for (int64_t k0 = 0; k0 < k; k0 += step) {
      at::native::cpublas::brgemm(m, width, std::min(step, k - k0), lda, ldb, ldc,
                                  accumulate || k0 > 0, a + k0, b + k0 * ldb + n0, c + n0,
                                  false);
    }
  }
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : static_cast<__mmask16>((1u << static_cast<unsigned>(left)) - 1u);
}

// exp(x): Cephes' single-precision polynomial (~1 ulp), 2^n applied by vscalefps.
MC_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + exp(-x)): the reciprocal as vrcp14ps refined by one Newton step (~1 ulp,
// a third of a division's cost; exp16 stays finite, so the denominator does too).
MC_AVX512 inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
}

// tanh(x) = 2 sigma(2x) - 1 (absolute error ~1e-7; relative error grows near 0).
MC_AVX512 inline __m512 tanh16(__m512 x) {
  const __m512 s = sigmoid16(_mm512_add_ps(x, x));
  return _mm512_fmsub_ps(_mm512_set1_ps(2.0f), s, _mm512_set1_ps(1.0f));
}

#endif  // MC_DIRECT

}  // namespace mc_simd
