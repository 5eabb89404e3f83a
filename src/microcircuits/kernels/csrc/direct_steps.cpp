// The direct path of the C++ step loops: the three cells in float32 on x86 CPUs
// with AVX-512. A step is one call of oneDNN's batch-reduce GEMM micro-kernel
// (at::native::cpublas::brgemm: no ATen op, no allocation, the product accumulated
// straight into the step's gate rows) and one vectorised pass for all of its pointwise
// work (the sigmoids, the memory and the read-out; backward: the gate coefficients and
// the carried dc). The ATen loops (step_loops.cpp) spend ~20 us of op overhead per step
// besides the product (narrow, copy, a new output tensor per oneDNN call).
//
// Threads (torch's own OpenMP threads, one team per layer call, see run_team): the work
// of a step is split one of two ways.
//  * by rows (the default where each thread gets two rows or more): the rows of the
//    batch are independent through the whole recurrence, so each thread runs its block
//    of rows through every step with no synchronisation at all, reading the whole
//    weight per step.
//  * by hidden units (small batches, e.g. one sequence): each thread owns a range of
//    units, i.e. the gate columns of each, and computes their product (one brgemm over
//    its slice of the weight, transposed and permuted so that the slice is contiguous,
//    into a scratch) and their pointwise work, then waits for the others (one barrier
//    per step).
//
// Built into the same extension as step_loops.cpp (microcircuits/kernels/native.py),
// which registers these functions (declared in step_loops.h) in its Python module; the
// equations and the layouts are step_loops.cpp's. Tested against the reference path
// through cpu_fused (tests/test_direct.py).
#include "step_loops.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

#include "simd.h"

using namespace mc_simd;  // NOLINT: gemm, exp16, sigmoid16, tail_mask, direct_cpu

// OpenMP's entry points in the runtime torch loaded (libgomp, or one with its GOMP_
// interface), so that the teams are torch's own threads; weak: null where none is
// loaded, and then the calling thread does all the work.
extern "C" {
__attribute__((weak)) void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads,
                                         unsigned flags);
__attribute__((weak)) void GOMP_barrier(void);
__attribute__((weak)) int omp_get_num_threads(void);
__attribute__((weak)) int omp_get_thread_num(void);
}

namespace {

enum Split : int64_t { kSplitAuto = 0, kSplitRows = 1, kSplitUnits = 2 };

// grad_y (T, B, H) with any strides (e.g. expanded from y.sum()), read at (t, b, j).
struct Strided {
  const float* base;
  int64_t s0, s1, s2;
  // dst[j] = (add ? dst[j] : 0) + grad_y[t, b, j0 + j] for j < n
  void into(float* dst, int64_t t, int64_t b, int64_t j0, int64_t n, bool add) const {
    const float* src = base + t * s0 + b * s1 + j0 * s2;
    if (s2 == 1 && add) {
      for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
    } else if (s2 == 1) {
      std::copy(src, src + n, dst);
    } else {
      for (int64_t j = 0; j < n; ++j) dst[j] = (add ? dst[j] : 0.0f) + src[j * s2];
    }
  }
};

// One thread's part of a team; `barrier` waits for the whole team.
struct Team {
  int64_t size, rank;
  void barrier() const {
    if (size > 1) GOMP_barrier();
  }
};

// [begin, end) of n items for rank of size, in multiples of `align` where possible.
std::pair<int64_t, int64_t> share(int64_t n, int64_t rank, int64_t size, int64_t align) {
  const int64_t chunks = (n + align - 1) / align;
  const int64_t b = std::min(n, chunks * rank / size * align);
  const int64_t e = std::min(n, chunks * (rank + 1) / size * align);
  return {b, e};
}

#if MC_DIRECT

// A 16 x 16 tile: dst[c * dst_ld + r] = src[r * src_ld + c], in registers.
MC_AVX512 void transpose16(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_ld);
  for (int i = 0; i < 8; ++i) {  // lane L of t[2i], t[2i+1]: rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // lane L of r[4i + k]: column 4L + k, rows 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int k = 0; k < 4; ++k) {  // gather lane L of r[k], r[4+k], r[8+k], r[12+k]
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
  }
  for (int k = 0; k < 4; ++k) {  // output row 4L + k
    _mm512_storeu_ps(dst + k * dst_ld, _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88));
    _mm512_storeu_ps(dst + (8 + k) * dst_ld, _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd));
    _mm512_storeu_ps(dst + (4 + k) * dst_ld, _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88));
    _mm512_storeu_ps(dst + (12 + k) * dst_ld, _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xdd));
  }
}

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols: 16 x 16 tiles in
// registers, the edges one by one (4x faster than the scalar loop, ~1.5x than ATen's
// transposing copy).
void transpose(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows,
               int64_t cols) {
  const int64_t rows16 = rows / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t r0 = 0; r0 < rows16; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols16; c0 += 16) {
      transpose16(src + r0 * src_ld + c0, src_ld, dst + c0 * dst_ld + r0, dst_ld);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // the edges: columns >= cols16, then rows >= rows16
    for (int64_t c = cols16; c < cols; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
  }
  for (int64_t r = rows16; r < rows; ++r) {
    for (int64_t c = 0; c < cols16; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
  }
}


// Pre-activation of gate q for units j..j+15 of one row: g[q * gs + j] (+ add[q * as + j]).
MC_AVX512 inline __m512 pre16(const float* g, int64_t gs, const float* add, int64_t as, int64_t q,
                              int64_t j, __mmask16 k) {
  const __m512 v = _mm512_maskz_loadu_ps(k, g + q * gs + j);
  return add ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, add + q * as + j)) : v;
}

// The forward pointwise work of 16 units (j .. j + 15, `k` of them valid) of one row.
MC_AVX512 __attribute__((always_inline)) inline void forward16(
    Kind kind, float* __restrict g, int64_t gs, const float* __restrict add, int64_t as,
    const float* c_prev, float* c_next, float* __restrict y, const float* __restrict decay,
    const float* __restrict m, int64_t j, __mmask16 k, __m512& c_out, __m512& h_out) {
  const int64_t zq = kind == kFix ? 1 : 2, oq = kind == kFix ? 2 : 3;
  const bool lstm = kind == kLSTM;  // c = f c_prev + i z m, h = o tanh(c), z = tanh(.)
  const __m512 i = sigmoid16(pre16(g, gs, add, as, 0, j, k));
  __m512 z = lstm ? tanh16(pre16(g, gs, add, as, zq, j, k))
                  : sigmoid16(pre16(g, gs, add, as, zq, j, k));
  const __m512 o = sigmoid16(pre16(g, gs, add, as, oq, j, k));
  const __m512 f = kind == kFix ? _mm512_maskz_loadu_ps(k, decay + j)
                                : sigmoid16(pre16(g, gs, add, as, 1, j, k));
  const __m512 zm = m ? _mm512_mul_ps(z, _mm512_maskz_loadu_ps(k, m + j)) : z;
  const __m512 cp = _mm512_maskz_loadu_ps(k, c_prev + j);
  if (lstm) {
    c_out = _mm512_fmadd_ps(f, cp, _mm512_mul_ps(i, zm));
    h_out = _mm512_mul_ps(o, tanh16(c_out));
  } else {
    c_out = _mm512_sub_ps(_mm512_fmadd_ps(f, cp, zm), i);
    h_out = _mm512_sub_ps(sigmoid16(c_out), o);
  }
  if (kind != kFix) _mm512_mask_storeu_ps(g + gs + j, k, f);
  _mm512_mask_storeu_ps(g + j, k, i);
  _mm512_mask_storeu_ps(g + zq * gs + j, k, z);  // saved without the mask
  _mm512_mask_storeu_ps(g + oq * gs + j, k, o);
}

// A forward step for `count` units of one row. Gate q of unit j: g[q * gs + j] (plus
// add[q * as + j] when the recurrent product is in a scratch), replaced by its
// activation. c' goes to c_next (which may be c_prev), h' = sigma(c') - o to y. Two
// vectors per iteration: independent work for the out-of-order core.
MC_AVX512 void forward_units(Kind kind, float* g, int64_t gs, const float* add, int64_t as,
                             const float* c_prev, float* c_next, float* y, const float* decay,
                             const float* m, int64_t count) {
  int64_t j = 0;
  for (; j + 32 <= count; j += 32) {
    __m512 c0, h0, c1, h1;
    forward16(kind, g, gs, add, as, c_prev, c_next, y, decay, m, j, 0xFFFF, c0, h0);
    forward16(kind, g, gs, add, as, c_prev, c_next, y, decay, m, j + 16, 0xFFFF, c1, h1);
    _mm512_storeu_ps(c_next + j, c0);
    _mm512_storeu_ps(c_next + j + 16, c1);
    _mm512_storeu_ps(y + j, h0);
    _mm512_storeu_ps(y + j + 16, h1);
  }
  for (; j < count; j += 16) {
    const __mmask16 k = tail_mask(count - j);
    __m512 c0, h0;
    forward16(kind, g, gs, add, as, c_prev, c_next, y, decay, m, j, k, c0, h0);
    _mm512_mask_storeu_ps(c_next + j, k, c0);
    _mm512_mask_storeu_ps(y + j, k, h0);
  }
}

MC_AVX512 inline __m512d low_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
MC_AVX512 inline __m512d high_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// The carried dc of the next (earlier) step, values at most `cut` flushed to zero.
MC_AVX512 inline void store_carry(float* carry, __mmask16 k, __m512 next, bool flush,
                                  float cut) {
  if (flush) {
    const __mmask16 small =
        _mm512_cmp_ps_mask(_mm512_abs_ps(next), _mm512_set1_ps(cut), _CMP_LE_OQ);
    next = _mm512_mask_blend_ps(small, next, _mm512_setzero_ps());
  }
  _mm512_mask_storeu_ps(carry, k, next);
}

// The LSTM's backward step (gates i, f, z = tanh, o; c_next = c_t): dc = carry + dh o
// (1 - tanh(c)^2); d pre: dc z m i (1 - i), dc c_prev f (1 - f), dc i m (1 - z^2), dh
// tanh(c) o (1 - o); the carried dc is dc f.
MC_AVX512 void backward_units_lstm(float* a, int64_t gs, const float* c_prev,
                                   const float* c_next, const float* m, const float* dh,
                                   float* carry, bool flush, float cut, int64_t count) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 k = tail_mask(count - j);
    const __m512 i = _mm512_maskz_loadu_ps(k, a + j);
    const __m512 f = _mm512_maskz_loadu_ps(k, a + gs + j);
    const __m512 z = _mm512_maskz_loadu_ps(k, a + 2 * gs + j);
    const __m512 o = _mm512_maskz_loadu_ps(k, a + 3 * gs + j);
    const __m512 mm = m ? _mm512_maskz_loadu_ps(k, m + j) : one;
    const __m512 d_h = _mm512_maskz_loadu_ps(k, dh + j);
    const __m512 tc = tanh16(_mm512_maskz_loadu_ps(k, c_next + j));
    const __m512 dc = _mm512_fmadd_ps(_mm512_mul_ps(d_h, o), _mm512_fnmadd_ps(tc, tc, one),
                                      _mm512_maskz_loadu_ps(k, carry + j));
    const __m512 di = _mm512_mul_ps(_mm512_mul_ps(dc, _mm512_mul_ps(z, mm)),
                                    _mm512_mul_ps(i, _mm512_sub_ps(one, i)));
    const __m512 df = _mm512_mul_ps(_mm512_mul_ps(dc, _mm512_maskz_loadu_ps(k, c_prev + j)),
                                    _mm512_mul_ps(f, _mm512_sub_ps(one, f)));
    const __m512 dz = _mm512_mul_ps(_mm512_mul_ps(dc, _mm512_mul_ps(i, mm)),
                                    _mm512_fnmadd_ps(z, z, one));
    const __m512 d_o = _mm512_mul_ps(_mm512_mul_ps(d_h, tc),
                                     _mm512_mul_ps(o, _mm512_sub_ps(one, o)));
    _mm512_mask_storeu_ps(a + j, k, di);
    _mm512_mask_storeu_ps(a + gs + j, k, df);
    _mm512_mask_storeu_ps(a + 2 * gs + j, k, dz);
    _mm512_mask_storeu_ps(a + 3 * gs + j, k, d_o);
    store_carry(carry + j, k, _mm512_mul_ps(dc, f), flush, cut);
  }
}

// A backward step for `count` units of one row (the equations of backward_subtractive;
// the LSTM's go to backward_units_lstm):
// gate q of unit j at a[q * gs + j], the activations replaced by d pre; carry is the
// carried dc; phi (float64) gets dc c_prev when given.
MC_AVX512 void backward_units(Kind kind, float* a, int64_t gs, const float* c_prev,
                              const float* c_next, const float* y, const float* decay,
                              const float* m, const float* dh, float* carry, double* phi,
                              bool flush, float cut, int64_t count) {
  if (kind == kLSTM) {
    backward_units_lstm(a, gs, c_prev, c_next, m, dh, carry, flush, cut, count);
    return;
  }
  const int64_t zq = kind == kFix ? 1 : 2, oq = kind == kFix ? 2 : 3;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 k = tail_mask(count - j);
    const __m512 i = _mm512_maskz_loadu_ps(k, a + j);
    const __m512 z = _mm512_maskz_loadu_ps(k, a + zq * gs + j);
    const __m512 o = _mm512_maskz_loadu_ps(k, a + oq * gs + j);
    const __m512 f = kind == kSub ? _mm512_maskz_loadu_ps(k, a + gs + j)
                                  : _mm512_maskz_loadu_ps(k, decay + j);
    const __m512 cp = _mm512_maskz_loadu_ps(k, c_prev + j);
    const __m512 d_h = _mm512_maskz_loadu_ps(k, dh + j);
    const __m512 sc = _mm512_add_ps(_mm512_maskz_loadu_ps(k, y + j), o);  // sigma(c_t)
    const __m512 dc = _mm512_fmadd_ps(_mm512_mul_ps(d_h, sc), _mm512_sub_ps(one, sc),
                                      _mm512_maskz_loadu_ps(k, carry + j));
    if (phi) {
      const __mmask8 lo = static_cast<__mmask8>(k & 0xFF);
      const __mmask8 hi = static_cast<__mmask8>(k >> 8);
      _mm512_mask_storeu_pd(phi + j, lo, _mm512_fmadd_pd(low_pd(dc), low_pd(cp),
                                                         _mm512_maskz_loadu_pd(lo, phi + j)));
      _mm512_mask_storeu_pd(phi + j + 8, hi,
                            _mm512_fmadd_pd(high_pd(dc), high_pd(cp),
                                            _mm512_maskz_loadu_pd(hi, phi + j + 8)));
    }
    // -i (1 - i) dc, c_prev f (1 - f) dc, m z (1 - z) dc, -o (1 - o) dh
    _mm512_mask_storeu_ps(a + j, k, _mm512_mul_ps(_mm512_mul_ps(i, _mm512_sub_ps(i, one)), dc));
    if (kind == kSub) {
      const __m512 kf = _mm512_mul_ps(cp, _mm512_mul_ps(f, _mm512_sub_ps(one, f)));
      _mm512_mask_storeu_ps(a + gs + j, k, _mm512_mul_ps(kf, dc));
    }
    __m512 kz = _mm512_mul_ps(z, _mm512_sub_ps(one, z));
    if (m) kz = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, m + j), kz);
    _mm512_mask_storeu_ps(a + zq * gs + j, k, _mm512_mul_ps(kz, dc));
    _mm512_mask_storeu_ps(a + oq * gs + j, k,
                          _mm512_mul_ps(_mm512_mul_ps(o, _mm512_sub_ps(o, one)), d_h));
    store_carry(carry + j, k, _mm512_mul_ps(dc, f), flush, cut);
  }
}

void flush_small(float* d, int64_t n, float cut) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::abs(d[j]) <= cut) d[j] = 0.0f;
  }
}

// Runs body(team) on a team of up to `want` of torch's OpenMP threads (the caller
// included; fewer in a nested region), with the caller's flush-to-zero and
// denormals-are-zero flags. Everything the body could reject is checked before, so
// nothing throws inside.
struct TeamCall {
  const std::function<void(const Team&)>* body;
  unsigned csr;
};

void team_entry(void* data) {
  auto* call = static_cast<TeamCall*>(data);
  const unsigned saved = _mm_getcsr();
  constexpr unsigned kFlushBits = 0x8040u;  // FTZ | DAZ
  _mm_setcsr((saved & ~kFlushBits) | (call->csr & kFlushBits));
  const Team team{omp_get_num_threads(), omp_get_thread_num()};
  (*call->body)(team);
  _mm_setcsr(saved);
}

bool teams_available() {
  return GOMP_parallel != nullptr && GOMP_barrier != nullptr &&
         omp_get_num_threads != nullptr && omp_get_thread_num != nullptr;
}

void run_team(int64_t want, const std::function<void(const Team&)>& body) {
  if (want <= 1 || !teams_available()) {
    body(Team{1, 0});
    return;
  }
  TeamCall call{&body, _mm_getcsr()};
  GOMP_parallel(team_entry, &call, static_cast<unsigned>(want), 0);
}

// How to split a layer call over threads: `split` and `parts` as asked, else (kSplitAuto,
// 0) one part per torch thread, by rows where each thread gets at least two, else by
// units; then capped by the rows or 16-unit blocks there are. (By units saves L3 traffic
// on large weights but costs a barrier per step and strided pointwise work: LM-650 at 2
// threads, per layer forward: 7.1 ms against 6.8 by rows.)
std::pair<Split, int64_t> plan(int64_t split, int64_t parts, int64_t batch, int64_t hidden) {
  int64_t want = parts > 0 ? parts : (teams_available() ? at::get_num_threads() : 1);
  Split how = static_cast<Split>(split);
  if (how == kSplitAuto) how = batch >= 2 * want ? kSplitRows : kSplitUnits;
  want = std::min(want, how == kSplitRows ? batch : (hidden + 15) / 16);
  return {how, std::max<int64_t>(1, want)};
}

// Which steps are alive: all rows below batch_sizes[t] (all rows when unpacked).
inline int64_t alive_at(const std::vector<int64_t>& batch_sizes, int64_t t, int64_t batch) {
  return batch_sizes.empty() ? batch : batch_sizes[t];
}

// The layer call's tensors, as raw float32 pointers and sizes.
struct Layer {
  Kind kind;
  int64_t steps, batch, hidden, gates;  // gates: G*H
  const std::vector<int64_t>* batch_sizes;
  float* act;           // (T, B, G*H): the input projection, then the activations / d pre
  float* memory;        // (T+1, B, H) (training), or (B, H) updated in place
  int64_t c_step;       // B*H, or 0 for the in-place memory
  float* y;             // (T, B, H)
  float* h;             // (B, H): h0 on entry, the final state on exit (forward)
  const float* decay;   // (H) fix-subLSTM
  const float* mask;    // (B, H) or null
  int64_t alive(int64_t t) const { return alive_at(*batch_sizes, t, batch); }
  float* a_row(int64_t t, int64_t b) const { return act + (t * batch + b) * gates; }
  float* c_row(int64_t t, int64_t b) const { return memory + t * c_step + b * hidden; }
  float* y_row(int64_t t, int64_t b) const { return y + (t * batch + b) * hidden; }
  const float* m_row(int64_t b) const { return mask ? mask + b * hidden : nullptr; }
};

// Forward, rows [r0, r1) of the batch on this thread; rT = R^T (H, G*H). (Blocks of
// consecutive rows: interleaved rows, which balance packed sequences better, put two
// threads' writes of h and c into shared cache lines every row, ~1.5x slower.)
void forward_by_rows(const Layer& L, const float* rT, int64_t r0, int64_t r1, bool keep_memory) {
  const bool packed = !L.batch_sizes->empty();
  const int64_t H = L.hidden, GH = L.gates;
  for (int64_t t = 0; t < L.steps; ++t) {
    const int64_t rows = std::max<int64_t>(0, std::min(L.alive(t), r1) - r0);
    if (rows == 0) {  // every sequence of the block has ended: carry the memory to the end
      for (int64_t u = t + 1; keep_memory && u <= L.steps; ++u) {
        std::copy(L.c_row(t, r0), L.c_row(t, r1), L.c_row(u, r0));
      }
      break;
    }
    // h_{t-1} of the block: h0, or the previous step's outputs (packed: the state,
    // which ended sequences keep)
    const float* h_prev = (packed || t == 0) ? L.h + r0 * H : L.y_row(t - 1, r0);
    gemm(rows, GH, H, h_prev, H, rT, GH, L.a_row(t, r0), GH, true);
    for (int64_t b = r0; b < r0 + rows; ++b) {
      forward_units(L.kind, L.a_row(t, b), H, nullptr, 0, L.c_row(t, b), L.c_row(t + 1, b),
                    L.y_row(t, b), L.decay, L.m_row(b), H);
    }
    if (packed) std::copy(L.y_row(t, r0), L.y_row(t, r0 + rows), L.h + r0 * H);
    if (keep_memory && r0 + rows < r1) {  // ended sequences keep their memory
      std::copy(L.c_row(t, r0 + rows), L.c_row(t, r1), L.c_row(t + 1, r0 + rows));
    }
  }
  if (!packed && L.steps > 0) {
    std::copy(L.y_row(L.steps - 1, r0), L.y_row(L.steps - 1, r1), L.h + r0 * H);
  }
}

// Forward, units [j0, j1) of every row on this thread, one barrier per step; rTp = R^T
// with each block's columns together: block [j0, j1) at columns [G j0, G j1), gate q of
// unit j0 + u at G j0 + q (j1 - j0) + u.
void forward_by_units(const Layer& L, const float* rTp, int64_t j0, int64_t j1,
                      bool keep_memory, const Team& team) {
  const int64_t H = L.hidden, GH = L.gates, G = GH / H, w = j1 - j0;
  std::vector<float> scratch(static_cast<size_t>(L.batch * G * std::max<int64_t>(w, 1)));
  int64_t t = 0;
  for (; t < L.steps; ++t) {
    const int64_t rows = L.alive(t);  // the same on every thread
    if (rows == 0) {  // every sequence has ended: carry the memory to the end
      for (int64_t u = t + 1; keep_memory && u <= L.steps; ++u) {
        for (int64_t b = 0; b < L.batch; ++b) {
          std::copy(L.c_row(t, b) + j0, L.c_row(t, b) + j1, L.c_row(u, b) + j0);
        }
      }
      break;
    }
    if (w > 0) {
      // h_{t-1}: h0, or the previous outputs (rows alive at t were alive at t - 1)
      const float* h_prev = t == 0 ? L.h : L.y_row(t - 1, 0);
      gemm(rows, G * w, H, h_prev, H, rTp + G * j0, GH, scratch.data(), G * w, false);
      for (int64_t b = 0; b < rows; ++b) {
        forward_units(L.kind, L.a_row(t, b) + j0, H, scratch.data() + b * G * w, w,
                      L.c_row(t, b) + j0, L.c_row(t + 1, b) + j0, L.y_row(t, b) + j0,
                      L.decay ? L.decay + j0 : nullptr, L.m_row(b) ? L.m_row(b) + j0 : nullptr,
                      w);
      }
      for (int64_t b = rows; keep_memory && b < L.batch; ++b) {
        std::copy(L.c_row(t, b) + j0, L.c_row(t, b) + j1, L.c_row(t + 1, b) + j0);
      }
    }
    team.barrier();  // h_t complete before any thread's next product
  }
  // the final state: each row's output at its last step (h0 where it has none); no thread
  // reads h any more (the barrier after step 0)
  for (int64_t b = 0; b < L.batch && w > 0; ++b) {
    int64_t last = -1;
    if (L.batch_sizes->empty()) {
      last = t - 1;
    } else {
      while (last + 1 < t && (*L.batch_sizes)[last + 1] > b) ++last;
    }
    if (last >= 0) std::copy(L.y_row(last, b) + j0, L.y_row(last, b) + j1, L.h + b * H + j0);
  }
}

// The rest of a backward call: R (G*H, H), grad_y, the carried dh and dc, phi's sum.
struct Grads {
  const float* r;
  Strided grad_y;
  float* dh;
  float* carry;
  double* phi;
  bool need_dh0, flush;
  float cut;
};

// Backward, rows [r0, r1) on this thread (phi: this block's own sum).
void backward_by_rows(const Layer& L, const Grads& D, double* phi, int64_t r0, int64_t r1) {
  const int64_t H = L.hidden, GH = L.gates;
  int64_t alive_after = r0;  // rows of the block alive at step t + 1 end here
  for (int64_t t = L.steps - 1; t >= 0; --t) {
    const int64_t end = std::max<int64_t>(r0, std::min(L.alive(t), r1));
    if (end == r0) continue;
    for (int64_t b = alive_after; b < end; ++b) {  // sequences whose last step is t
      D.grad_y.into(D.dh + b * H, t, b, 0, H, true);
    }
    alive_after = end;
    for (int64_t b = r0; b < end; ++b) {
      backward_units(L.kind, L.a_row(t, b), H, L.c_row(t, b), L.c_row(t + 1, b),
                     L.y_row(t, b), L.decay, L.m_row(b), D.dh + b * H, D.carry + b * H, phi,
                     D.flush, D.cut, H);
    }
    if (t > 0 || D.need_dh0) {  // dh_{t-1} = grad_y[t-1] + dpre_t R (dh0's part: dpre_0 R)
      for (int64_t b = r0; b < end; ++b) {
        if (t > 0) {
          D.grad_y.into(D.dh + b * H, t - 1, b, 0, H, false);
        } else {
          std::fill(D.dh + b * H, D.dh + (b + 1) * H, 0.0f);
        }
      }
      gemm(end - r0, H, GH, L.a_row(t, r0), GH, D.r, H, D.dh + r0 * H, H, true);
      if (D.flush) flush_small(D.dh + r0 * H, (end - r0) * H, D.cut);
    }
  }
}

// Backward, units [j0, j1) of every row on this thread, one barrier per step.
void backward_by_units(const Layer& L, const Grads& D, int64_t j0, int64_t j1,
                       const Team& team) {
  const int64_t H = L.hidden, GH = L.gates, w = j1 - j0;
  int64_t alive_after = 0;
  for (int64_t t = L.steps - 1; t >= 0; --t) {
    const int64_t rows = L.alive(t);  // the same on every thread
    if (rows == 0) continue;
    for (int64_t b = alive_after; b < rows && w > 0; ++b) {
      D.grad_y.into(D.dh + b * H + j0, t, b, j0, w, true);
    }
    alive_after = rows;
    for (int64_t b = 0; b < rows && w > 0; ++b) {
      backward_units(L.kind, L.a_row(t, b) + j0, H, L.c_row(t, b) + j0,
                     L.c_row(t + 1, b) + j0, L.y_row(t, b) + j0,
                     L.decay ? L.decay + j0 : nullptr, L.m_row(b) ? L.m_row(b) + j0 : nullptr,
                     D.dh + b * H + j0, D.carry + b * H + j0, D.phi ? D.phi + j0 : nullptr,
                     D.flush, D.cut, w);
    }
    team.barrier();  // d pre_t complete before any thread's product
    if ((t > 0 || D.need_dh0) && w > 0) {
      for (int64_t b = 0; b < rows; ++b) {
        if (t > 0) {
          D.grad_y.into(D.dh + b * H + j0, t - 1, b, j0, w, false);
        } else {
          std::fill(D.dh + b * H + j0, D.dh + b * H + j1, 0.0f);
        }
      }
      gemm(rows, w, GH, L.a_row(t, 0), GH, D.r + j0, H, D.dh + j0, H, true);
      for (int64_t b = 0; D.flush && b < rows; ++b) flush_small(D.dh + b * H + j0, w, D.cut);
    }
  }
}

#endif  // MC_DIRECT

}  // namespace

// Whether forward_direct/backward_direct run here (built with oneDNN's brgemm, on an x86
// CPU with AVX-512).
bool direct_available() {
#if MC_DIRECT
  return direct_cpu();
#else
  return false;
#endif
}

// src (R, C) -> a new contiguous (C, R) (float32 in AVX-512 tiles where the direct path
// runs, else ATen's transposing copy): the whole-sequence weight gradients' operands and
// results, which oneDNN wants contiguous (ATen's copy is ~5x slower here).
at::Tensor transposed(at::Tensor src) {
  TORCH_CHECK(src.dim() == 2, "transposed: a matrix");
  at::Tensor dst = at::empty({src.size(1), src.size(0)}, src.options());
#if MC_DIRECT
  if (direct_available() && src.scalar_type() == at::kFloat && src.is_contiguous()) {
    transpose(src.data_ptr<float>(), src.size(1), dst.data_ptr<float>(), src.size(0),
              src.size(0), src.size(1));
    return dst;
  }
#endif
  dst.copy_(src.t());
  return dst;
}

// The checks forward_direct and backward_direct share: the packed batch sizes, the
// fix-subLSTM decay (H,) and the dropout mask (B, H).
static void check_direct_extras(const std::vector<int64_t>& batch_sizes,
                                const c10::optional<at::Tensor>& decay,
                                const c10::optional<at::Tensor>& mask, int64_t steps,
                                int64_t batch, int64_t hidden) {
  TORCH_CHECK(batch_sizes.empty() || static_cast<int64_t>(batch_sizes.size()) == steps,
              "batch_sizes must have one entry per step");
  for (int64_t t = 0; t < static_cast<int64_t>(batch_sizes.size()); ++t) {
    TORCH_CHECK(batch_sizes[t] >= 0 && batch_sizes[t] <= batch &&
                    (t == 0 || batch_sizes[t] <= batch_sizes[t - 1]),
                "batch_sizes must be non-increasing and within the batch");
  }
  if (decay.has_value()) {
    TORCH_CHECK(decay->scalar_type() == at::kFloat && decay->is_contiguous() &&
                    decay->numel() == hidden, "decay must be (H,) contiguous float32");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->is_contiguous() &&
                    mask->numel() == batch * hidden, "mask must be (B, H) contiguous float32");
  }
}

// forward_steps of the three cells in float32 on the direct path. r = R (G*H, H)
// contiguous (transposed here); split: 0 auto, 1 by rows, 2 by units; parts: threads
// (0: torch's). The rest as in forward_steps.
void forward_direct(int64_t kind_id, at::Tensor gates, at::Tensor h, at::Tensor memory,
                    at::Tensor y, at::Tensor r, c10::optional<at::Tensor> decay,
                    c10::optional<at::Tensor> mask, bool keep_memory,
                    std::vector<int64_t> batch_sizes, int64_t split, int64_t parts) {
  const Kind kind = static_cast<Kind>(kind_id);
  TORCH_CHECK(direct_available(), "forward_direct: not available on this build or CPU");
  TORCH_CHECK(kind == kLSTM || kind == kSub || kind == kFix, "forward_direct: a cell kind");
  TORCH_CHECK(split >= 0 && split <= 2, "forward_direct: split is 0, 1 or 2");
  for (const at::Tensor* t : {&gates, &h, &memory, &y, &r}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "forward_direct: gates, h, memory, y and r must be contiguous float32");
  }
  TORCH_CHECK(kind != kFix || decay.has_value(), "fix-subLSTM needs its decay");
  const int64_t steps = gates.size(0), batch = gates.size(1), gate_cols = gates.size(2);
  const int64_t hidden = y.size(2);
  TORCH_CHECK(r.size(0) == gate_cols && r.size(1) == hidden, "r must be (G*H, H)");
  TORCH_CHECK(h.numel() == batch * hidden && y.size(0) == steps && y.size(1) == batch,
              "h must be (B, H) and y (T, B, H)");
  TORCH_CHECK(memory.numel() == (keep_memory ? steps + 1 : 1) * batch * hidden,
              "memory must be (T+1, B, H) when kept, else (B, H)");
  check_direct_extras(batch_sizes, decay, mask, steps, batch, hidden);
#if MC_DIRECT
  const Layer L{kind, steps, batch, hidden, gate_cols, &batch_sizes, gates.data_ptr<float>(),
                memory.data_ptr<float>(), keep_memory ? batch * hidden : 0,
                y.data_ptr<float>(), h.data_ptr<float>(),
                decay.has_value() ? decay->data_ptr<float>() : nullptr,
                mask.has_value() ? mask->data_ptr<float>() : nullptr};
  const auto [how, want] = plan(split, parts, batch, hidden);
  const int64_t G = gate_cols / hidden;
  at::Tensor rT = at::empty({hidden, gate_cols}, r.options());
  const float* rp = r.data_ptr<float>();
  float* rTp = rT.data_ptr<float>();
  run_team(want, [&](const Team& team) {
    if (how == kSplitRows) {  // R^T, each thread a share of its columns
      const auto [n0, n1] = share(gate_cols, team.rank, team.size, 16);
      transpose(rp + n0 * hidden, hidden, rTp + n0, gate_cols, n1 - n0, hidden);
      team.barrier();
      const auto [b0, b1] = share(batch, team.rank, team.size, 1);
      forward_by_rows(L, rTp, b0, b1, keep_memory);
      return;
    }
    const auto [j0, j1] = share(hidden, team.rank, team.size, 16);
    for (int64_t q = 0; q < G; ++q) {  // this thread's columns of R^T, together
      transpose(rp + (q * hidden + j0) * hidden, hidden, rTp + G * j0 + q * (j1 - j0),
                gate_cols, j1 - j0, hidden);
    }
    forward_by_units(L, rTp, j0, j1, keep_memory, team);
  });
#endif
}

// backward_subtractive in float32 on the direct path: r = R (G*H, H) contiguous, split
// and parts as in forward_direct (the rest as in backward_subtractive).
void backward_direct(int64_t kind_id, at::Tensor act, at::Tensor memory, at::Tensor y,
                     c10::optional<at::Tensor> decay, c10::optional<at::Tensor> mask,
                     at::Tensor r, at::Tensor grad_y, at::Tensor dh, at::Tensor dc_carry,
                     c10::optional<at::Tensor> phi_sum, bool need_dh0, bool flush, double tiny,
                     std::vector<int64_t> batch_sizes, int64_t split, int64_t parts) {
  const Kind kind = static_cast<Kind>(kind_id);
  TORCH_CHECK(direct_available(), "backward_direct: not available on this build or CPU");
  TORCH_CHECK(kind == kLSTM || kind == kSub || kind == kFix, "backward_direct: a cell kind");
  TORCH_CHECK(split >= 0 && split <= 2, "backward_direct: split is 0, 1 or 2");
  for (const at::Tensor* t : {&act, &memory, &y, &r, &dh, &dc_carry}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "backward_direct: act, memory, y, r, dh and dc_carry must be contiguous "
                "float32");
  }
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat && grad_y.dim() == 3,
              "backward_direct: grad_y must be float32 (T, B, H)");
  TORCH_CHECK(kind != kFix || decay.has_value(), "fix-subLSTM needs its decay");
  const int64_t steps = act.size(0), batch = act.size(1), gate_cols = act.size(2);
  const int64_t hidden = dh.size(1);
  TORCH_CHECK(r.size(0) == gate_cols && r.size(1) == hidden, "r must be (G*H, H)");
  TORCH_CHECK(dh.numel() == batch * hidden && dc_carry.numel() == batch * hidden &&
                  memory.numel() == (steps + 1) * batch * hidden && y.numel() == steps * batch * hidden,
              "dh, dc_carry (B, H), memory (T+1, B, H) and y (T, B, H) expected");
  TORCH_CHECK(grad_y.size(0) == steps && grad_y.size(1) == batch && grad_y.size(2) == hidden,
              "grad_y must be (T, B, H)");
  check_direct_extras(batch_sizes, decay, mask, steps, batch, hidden);
  double* phi = nullptr;
  if (phi_sum.has_value()) {
    TORCH_CHECK(phi_sum->scalar_type() == at::kDouble && phi_sum->is_contiguous() &&
                    phi_sum->numel() == hidden, "phi_sum must be (H,) contiguous float64");
    phi = phi_sum->data_ptr<double>();
  }
#if MC_DIRECT
  const Layer L{kind, steps, batch, hidden, gate_cols, &batch_sizes, act.data_ptr<float>(),
                memory.data_ptr<float>(), batch * hidden, y.data_ptr<float>(), nullptr,
                decay.has_value() ? decay->data_ptr<float>() : nullptr,
                mask.has_value() ? mask->data_ptr<float>() : nullptr};
  const Grads D{r.data_ptr<float>(),
                Strided{grad_y.data_ptr<float>(), grad_y.stride(0), grad_y.stride(1),
                        grad_y.stride(2)},
                dh.data_ptr<float>(), dc_carry.data_ptr<float>(), phi, need_dh0, flush,
                static_cast<float>(tiny)};
  const auto [how, want] = plan(split, parts, batch, hidden);
  // by rows, each thread sums its own dc c_prev (added up after); by units they are apart
  std::vector<double> phi_parts(phi != nullptr && how == kSplitRows ? want * hidden : 0, 0.0);
  run_team(want, [&](const Team& team) {
    if (how == kSplitRows) {
      double* own = phi == nullptr ? nullptr : phi_parts.data() + team.rank * hidden;
      const auto [b0, b1] = share(batch, team.rank, team.size, 1);
      backward_by_rows(L, D, own, b0, b1);
      return;
    }
    const auto [j0, j1] = share(hidden, team.rank, team.size, 16);
    backward_by_units(L, D, j0, j1, team);
  });
  for (int64_t p = 0; p * hidden < static_cast<int64_t>(phi_parts.size()); ++p) {
    for (int64_t j = 0; j < hidden; ++j) phi[j] += phi_parts[p * hidden + j];
  }
#else
  (void)phi;
#endif
}
