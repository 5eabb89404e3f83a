// The step loops of the ELM neuron's fused path (microcircuits/elm/fused.py), in C++.
//
// On the published Branch-ELM shapes (batch 8, 20 memory units, MLP 65 -> 40 -> 20) a
// step is a few thousand flops; from Python each of its ~10 ops costs 3-8 us of
// interpreter and dispatch time, more than the arithmetic. Here a step is its GEMMs
// (ATen's addmm/mm, i.e. BLAS) and plain loops for everything else. The equations are
// those of microcircuits/elm/equations.py, split as fused.py explains:
//   trace:   b_t = k_b b_{t-1} + d_t
//   memory:  a_0 = pre_t + W_0m (k_m m_{t-1}),  a_k = W_k act(a_{k-1}) + c_k,
//            u_t = tanh(2/3 a_L),  m_t = k_m m_{t-1} + gain 1.7159 u_t
// and backward the reverse sweeps written out in fused.py (its Python loops are the same
// arithmetic, and both are tested against the reference loop in tests/test_elm_fused.py).
//
// Built into the same extension as step_loops.cpp (microcircuits/kernels/native.py), whose
// PYBIND11_MODULE is the extension's Python module; these functions are registered as
// torch operators instead, torch.ops.microcircuits_elm.*, when the library is loaded.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

using namespace mc_simd;  // NOLINT: gemm, sigmoid16, tail_mask, direct_cpu

namespace {

constexpr double kTanhScale = 1.7159;
enum Activation : int64_t { kRelu = 0, kSilu = 1 };

// Per-step products smaller than this (multiply-adds) run on one thread: on the
// NeuronIO shape (8 x 20 @ 20 x 40) two threads made the loops 3x slower on a shared
// 2-core machine (OpenMP hand-offs and stalls), see microcircuits/elm/fused.py.
constexpr int64_t kSerialProductMax = int64_t(1) << 20;

// The direct path gives each thread a block of at least this many rows of the batch
// (NeuronIO's batch of 8 runs on one thread, SHD's 32 on two).
constexpr int64_t kDirectRows = 16;

// Sets torch's threads to one for its lifetime when `serial`.
class SerialThreads {
 public:
  explicit SerialThreads(bool serial) : serial_(serial), all_(at::get_num_threads()) {
    if (serial_) at::set_num_threads(1);
  }
  ~SerialThreads() {
    if (serial_) at::set_num_threads(all_);
  }

 private:
  bool serial_;
  int all_;
};

bool small_products(int64_t batch, const std::vector<at::Tensor>& weights) {
  int64_t largest = 0;
  for (const auto& w : weights) largest = std::max(largest, batch * w.size(0) * w.size(1));
  return largest < kSerialProductMax;
}

// out = rows of `add` (broadcast (C,) or (B, C)) + a w, via a plain copy and addmm_ in
// place (addmm_out's own copy of a broadcast bias costs more than the product here).
template <typename scalar_t>
void add_product(at::Tensor& out, const at::Tensor& add, const at::Tensor& a, const at::Tensor& w) {
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* s = add.data_ptr<scalar_t>();
  const int64_t n = out.numel();
  if (add.dim() == 1) {
    const int64_t cols = out.size(1);
    for (int64_t i = 0; i < n; ++i) o[i] = s[i % cols];
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = s[i];
  }
  out.addmm_(a, w);
}

template <typename scalar_t>
void trace_forward_impl(const at::Tensor& drive, const at::Tensor& branch0,
                        const at::Tensor& decay, at::Tensor& out) {
  const int64_t steps = drive.size(0), row = drive.size(1) * drive.size(2);
  const int64_t size = drive.size(2);
  const scalar_t* d = drive.data_ptr<scalar_t>();
  const scalar_t* k = decay.data_ptr<scalar_t>();
  const scalar_t* prev = branch0.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  for (int64_t t = 0; t < steps; ++t) {
    const scalar_t* dt = d + t * row;
    scalar_t* ot = o + t * row;
    for (int64_t r = 0; r < row; r += size) {
      for (int64_t j = 0; j < size; ++j) ot[r + j] = k[j] * prev[r + j] + dt[r + j];
    }
    prev = ot;
  }
}

template <typename scalar_t>
void trace_backward_impl(const at::Tensor& grad, const at::Tensor& decay, at::Tensor& out) {
  const int64_t steps = grad.size(0), row = grad.size(1) * grad.size(2);
  const int64_t size = grad.size(2);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* k = decay.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  for (int64_t n = 0; n < row; ++n) o[(steps - 1) * row + n] = g[(steps - 1) * row + n];
  for (int64_t t = steps - 2; t >= 0; --t) {
    const scalar_t* gt = g + t * row;
    const scalar_t* next = o + (t + 1) * row;
    scalar_t* ot = o + t * row;
    for (int64_t r = 0; r < row; r += size) {
      for (int64_t j = 0; j < size; ++j) ot[r + j] = gt[r + j] + k[j] * next[r + j];
    }
  }
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// out[t] = decay * out[t-1] + drive[t], out[-1] = branch0; all (T, B, N) / (B, N) / (N,).
void elm_trace_forward(const at::Tensor& drive, const at::Tensor& branch0,
                       const at::Tensor& decay, const at::Tensor& out_) {
  at::Tensor out = out_;
  check(drive, "drive");
  check(branch0, "branch0");
  check(decay, "decay");
  check(out, "out");
  if (drive.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(drive.scalar_type(), "elm_trace_forward",
                             [&] { trace_forward_impl<scalar_t>(drive, branch0, decay, out); });
}

// The transposed scan: out[t] = grad[t] + decay * out[t+1].
void elm_trace_backward(const at::Tensor& grad, const at::Tensor& decay,
                        const at::Tensor& out_) {
  at::Tensor out = out_;
  check(grad, "grad");
  check(decay, "decay");
  check(out, "out");
  if (grad.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "elm_trace_backward",
                             [&] { trace_backward_impl<scalar_t>(grad, decay, out); });
}

namespace {

template <typename scalar_t>
void activate(const scalar_t* a, scalar_t* h, int64_t size, int64_t activation) {
  if (activation == kRelu) {
    for (int64_t n = 0; n < size; ++n) h[n] = a[n] > 0 ? a[n] : scalar_t(0);
  } else {
    for (int64_t n = 0; n < size; ++n) h[n] = a[n] / (scalar_t(1) + std::exp(-a[n]));
  }
}

// g *= act'(a), in place.
template <typename scalar_t>
void times_activation_grad(const scalar_t* a, scalar_t* g, int64_t size, int64_t activation) {
  if (activation == kRelu) {
    for (int64_t n = 0; n < size; ++n) {
      if (!(a[n] > 0)) g[n] = 0;
    }
  } else {
    for (int64_t n = 0; n < size; ++n) {
      const scalar_t s = scalar_t(1) / (scalar_t(1) + std::exp(-a[n]));
      g[n] *= s * (scalar_t(1) + a[n] * (scalar_t(1) - s));
    }
  }
}

template <typename scalar_t>
void memory_forward_impl(const at::Tensor& pre, const at::Tensor& memory0,
                         const at::Tensor& decay, const at::Tensor& gain,
                         const std::vector<at::Tensor>& weights,
                         const std::vector<at::Tensor>& biases, int64_t activation,
                         at::Tensor& memories, const std::vector<at::Tensor>& hidden,
                         const at::Tensor& tanh_out) {
  const int64_t steps = pre.size(0), batch = pre.size(1), size = memory0.size(1);
  const int64_t layers = static_cast<int64_t>(weights.size());
  const bool save = tanh_out.defined() && tanh_out.numel() > 0;
  const SerialThreads threads(small_products(batch, weights));
  const scalar_t* k = decay.data_ptr<scalar_t>();
  const scalar_t* gamma = gain.data_ptr<scalar_t>();
  std::vector<at::Tensor> transposed;
  for (const auto& w : weights) transposed.push_back(w.t());
  at::Tensor decayed = at::empty({batch, size}, memory0.options());
  at::Tensor last = at::empty({batch, size}, memory0.options());  // a_L when not saved
  std::vector<at::Tensor> a_buffers, h_buffers;                   // when not saved
  for (int64_t l = 0; l + 1 < layers; ++l) {
    a_buffers.push_back(at::empty({batch, weights[l].size(0)}, pre.options()));
    h_buffers.push_back(at::empty({batch, weights[l].size(0)}, pre.options()));
  }
  scalar_t* dec = decayed.data_ptr<scalar_t>();
  const scalar_t* prev = memory0.data_ptr<scalar_t>();
  scalar_t* mem = memories.data_ptr<scalar_t>();
  const int64_t mrow = batch * size;
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < size; ++j) dec[b * size + j] = k[j] * prev[b * size + j];
    }
    // a_0 = pre_t + decayed W_0m^T, then the other layers
    at::Tensor a = layers > 1 ? (save ? hidden[0].select(0, t) : a_buffers[0])
                              : (save ? tanh_out.select(0, t) : last);
    add_product<scalar_t>(a, pre.select(0, t), decayed, transposed[0]);
    for (int64_t l = 1; l < layers; ++l) {
      at::Tensor& h = h_buffers[l - 1];
      activate<scalar_t>(a.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), h.numel(), activation);
      at::Tensor next = l + 1 < layers ? (save ? hidden[l].select(0, t) : a_buffers[l])
                                       : (save ? tanh_out.select(0, t) : last);
      add_product<scalar_t>(next, biases[l - 1], h, transposed[l]);
      a = next;
    }
    // u = tanh(2/3 a_L) in place of a_L (a_L is not saved), m_t = decayed + gain 1.7159 u
    a.mul_(scalar_t(2) / scalar_t(3));
    at::tanh_out(a, a);
    const scalar_t* u = a.data_ptr<scalar_t>();
    scalar_t* m = mem + t * mrow;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < size; ++j) {
        const int64_t n = b * size + j;
        m[n] = dec[n] + gamma[j] * scalar_t(kTanhScale) * u[n];
      }
    }
    prev = m;
  }
}


#if MC_DIRECT

// The memory recursion in float32 on the direct path (see elm_memory_forward_direct).
struct MemoryDirect {
  int64_t steps, batch, size, activation;
  const float* pre;      // (T, B, H_0)
  const float* memory0;  // (B, M)
  const float* decay;    // (M,)
  const float* gain;     // (M,)
  std::vector<const float*> wt;  // layer l's weight transposed, (K_l, N_l) row-major
  std::vector<int64_t> width;    // N_l; K_0 = M, K_l = N_{l-1}
  std::vector<const float*> bias;  // bias[l] (N_l,) for l >= 1; bias[0] unused
  float* memories;               // (T, B, M)
  std::vector<float*> hidden;    // (T, B, N_l) for l < L - 1 when saved, else empty
  float* tanh_out;               // (T, B, M) when saved, else null
};

// h = act(a) over n values.
MC_AVX512 void activate_direct(const float* a, float* h, int64_t n, int64_t activation) {
  if (activation == kRelu) {
    for (int64_t i = 0; i < n; ++i) h[i] = a[i] > 0.0f ? a[i] : 0.0f;
    return;
  }
  for (int64_t i = 0; i < n; i += 16) {  // silu: a sigma(a)
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(k, a + i);
    _mm512_mask_storeu_ps(h + i, k, _mm512_mul_ps(v, sigmoid16(v)));
  }
}

// a <- u = tanh(2/3 a) = 2 sigma(4/3 a) - 1, m = dec + gain 1.7159 u, for rows x size.
MC_AVX512 void memory_update_direct(float* a, const float* dec, const float* gain, float* m,
                                    int64_t rows, int64_t size) {
  const __m512 two = _mm512_set1_ps(2.0f), one = _mm512_set1_ps(1.0f);
  const __m512 slope = _mm512_set1_ps(4.0f / 3.0f);
  const __m512 scale = _mm512_set1_ps(static_cast<float>(kTanhScale));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < size; j += 16) {
      const __mmask16 k = tail_mask(size - j);
      const int64_t n = r * size + j;
      const __m512 s = sigmoid16(_mm512_mul_ps(slope, _mm512_maskz_loadu_ps(k, a + n)));
      const __m512 u = _mm512_fmsub_ps(two, s, one);
      _mm512_mask_storeu_ps(a + n, k, u);
      const __m512 g = _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(k, gain + j));
      _mm512_mask_storeu_ps(m + n, k, _mm512_fmadd_ps(g, u, _mm512_maskz_loadu_ps(k, dec + n)));
    }
  }
}

// Rows [b0, b1) of the batch through every step: rows are independent through the whole
// recursion, so a block needs no synchronisation with the others.
MC_AVX512 void memory_rows_direct(const MemoryDirect& p, int64_t b0, int64_t b1) {
  const int64_t rows = b1 - b0, size = p.size, layers = static_cast<int64_t>(p.wt.size());
  const bool save = p.tanh_out != nullptr;
  std::vector<float> dec(rows * size);
  std::vector<std::vector<float>> a_buf(layers), h_buf(layers);
  for (int64_t l = 0; l < layers; ++l) {
    if (!save) a_buf[l].resize(rows * p.width[l]);
    h_buf[l].resize(rows * p.width[l]);
  }
  const float* prev = p.memory0 + b0 * size;
  for (int64_t t = 0; t < p.steps; ++t) {
    const int64_t row0 = t * p.batch + b0;  // first row of the block at step t
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < size; ++j) dec[r * size + j] = p.decay[j] * prev[r * size + j];
    }
    auto layer_out = [&](int64_t l) -> float* {  // where a_l goes
      if (!save) return a_buf[l].data();
      return l + 1 < layers ? p.hidden[l] + row0 * p.width[l] : p.tanh_out + row0 * size;
    };
    float* a = layer_out(0);
    std::copy(p.pre + row0 * p.width[0], p.pre + (row0 + rows) * p.width[0], a);
    gemm(rows, p.width[0], size, dec.data(), size, p.wt[0], p.width[0], a, p.width[0], true);
    for (int64_t l = 1; l < layers; ++l) {
      const int64_t k = p.width[l - 1], n = p.width[l];
      float* h = h_buf[l - 1].data();
      activate_direct(a, h, rows * k, p.activation);
      float* next = layer_out(l);
      for (int64_t r = 0; r < rows; ++r) std::copy(p.bias[l], p.bias[l] + n, next + r * n);
      gemm(rows, n, k, h, k, p.wt[l], n, next, n, true);
      a = next;
    }
    float* m = p.memories + row0 * size;
    memory_update_direct(a, dec.data(), p.gain, m, rows, size);
    prev = m;
  }
}


// The reverse sweep in float32 on the direct path (see elm_memory_backward_direct).
struct MemoryBackDirect {
  int64_t steps, batch, size, activation;
  const float* grad;       // (T, B, M)
  const float* memories;   // (T+1, B, M), m_0 first
  const float* tanh;       // (T, B, M)
  std::vector<const float*> hidden;  // (T, B, N_l), l < L - 1
  const float* decay;      // (M,)
  const float* gain;       // (M,)
  std::vector<const float*> w;  // layer l's weight (N_l, K_l) row-major, contiguous
  std::vector<int64_t> width;   // N_l
  std::vector<float*> da;       // (T, B, N_l)
};

// g *= act'(a) over n values.
MC_AVX512 void times_activation_grad_direct(const float* a, float* g, int64_t n,
                                            int64_t activation) {
  if (activation == kRelu) {
    for (int64_t i = 0; i < n; ++i) g[i] = a[i] > 0.0f ? g[i] : 0.0f;
    return;
  }
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {  // silu': s (1 + a (1 - s))
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(k, a + i);
    const __m512 s = sigmoid16(v);
    const __m512 d = _mm512_mul_ps(s, _mm512_fmadd_ps(v, _mm512_sub_ps(one, s), one));
    _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, g + i), d));
  }
}

// Rows [b0, b1) back through every step; the carried gradient of m_0 goes to carry_out
// (B, M) and this block's sums over its rows to grad_decay, grad_gain (M,).
MC_AVX512 void backward_rows_direct(const MemoryBackDirect& p, int64_t b0, int64_t b1,
                                    float* carry_out, float* grad_decay, float* grad_gain) {
  const int64_t rows = b1 - b0, size = p.size, layers = static_cast<int64_t>(p.w.size());
  const float slope = static_cast<float>(kTanhScale * 2.0 / 3.0);
  const float scale = static_cast<float>(kTanhScale);
  std::vector<float> carry(rows * size, 0.0f), g(rows * size);
  for (int64_t t = p.steps - 1; t >= 0; --t) {
    const int64_t row0 = t * p.batch + b0;
    const float* gt = p.grad + row0 * size;
    const float* u = p.tanh + row0 * size;
    float* d_last = p.da[layers - 1] + row0 * size;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < size; ++j) {
        const int64_t n = r * size + j;
        const float gn = gt[n] + carry[n];
        g[n] = gn;
        grad_gain[j] += gn * u[n] * scale;
        d_last[n] = gn * p.gain[j] * slope * (1.0f - u[n] * u[n]);
      }
    }
    for (int64_t l = layers - 1; l > 0; --l) {  // da[l-1] = (da[l] W_l) act'(a_{l-1})
      const int64_t n = p.width[l], k = p.width[l - 1];
      float* below = p.da[l - 1] + row0 * k;
      gemm(rows, k, n, p.da[l] + row0 * n, n, p.w[l], k, below, k, false);
      times_activation_grad_direct(p.hidden[l - 1] + row0 * k, below, rows * k, p.activation);
    }
    // dd = g + da[0] W_0m, into g; then grad_decay += dd m_{t-1}, carry = dd k
    gemm(rows, size, p.width[0], p.da[0] + row0 * p.width[0], p.width[0], p.w[0], size,
         g.data(), size, true);
    const float* m_prev = p.memories + row0 * size;  // m_{t-1}: row t of (T+1, B, M)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < size; ++j) {
        const int64_t n = r * size + j;
        grad_decay[j] += g[n] * m_prev[n];
        carry[n] = g[n] * p.decay[j];
      }
    }
  }
  std::copy(carry.begin(), carry.end(), carry_out + b0 * size);
}

#endif  // MC_DIRECT

template <typename scalar_t>
std::vector<at::Tensor> memory_backward_impl(const at::Tensor& grad, const at::Tensor& memories,
                                             const at::Tensor& tanh_saved,
                                             const std::vector<at::Tensor>& hidden,
                                             const at::Tensor& decay, const at::Tensor& gain,
                                             const std::vector<at::Tensor>& weights,
                                             int64_t activation, std::vector<at::Tensor>& da) {
  const int64_t steps = grad.size(0), batch = grad.size(1), size = grad.size(2);
  const int64_t layers = static_cast<int64_t>(weights.size());
  const int64_t mrow = batch * size;
  const SerialThreads threads(small_products(batch, weights));
  const scalar_t* k = decay.data_ptr<scalar_t>();
  const scalar_t* gamma = gain.data_ptr<scalar_t>();
  at::Tensor carry = at::zeros({batch, size}, grad.options());
  at::Tensor g = at::empty({batch, size}, grad.options());
  at::Tensor dd = at::empty({batch, size}, grad.options());
  at::Tensor grad_decay = at::zeros({size}, grad.options());
  at::Tensor grad_gain = at::zeros({size}, grad.options());
  scalar_t* c = carry.data_ptr<scalar_t>();
  scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* ddp = dd.data_ptr<scalar_t>();
  scalar_t* gk = grad_decay.data_ptr<scalar_t>();
  scalar_t* gg = grad_gain.data_ptr<scalar_t>();
  const scalar_t* gr = grad.data_ptr<scalar_t>();
  const scalar_t* us = tanh_saved.data_ptr<scalar_t>();
  const scalar_t* ms = memories.data_ptr<scalar_t>();
  const scalar_t slope = scalar_t(kTanhScale * 2.0 / 3.0);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const scalar_t* gt = gr + t * mrow;
    const scalar_t* u = us + t * mrow;
    at::Tensor d_last = da[layers - 1].select(0, t);
    scalar_t* dl = d_last.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < size; ++j) {
        const int64_t n = b * size + j;
        const scalar_t gn = gt[n] + c[n];
        gp[n] = gn;
        gg[j] += gn * u[n] * scalar_t(kTanhScale);
        dl[n] = gn * gamma[j] * slope * (scalar_t(1) - u[n] * u[n]);
      }
    }
    for (int64_t l = layers - 1; l > 0; --l) {
      at::Tensor below = da[l - 1].select(0, t);
      at::mm_out(below, da[l].select(0, t), weights[l]);
      times_activation_grad<scalar_t>(hidden[l - 1].select(0, t).data_ptr<scalar_t>(),
                                      below.data_ptr<scalar_t>(), below.numel(), activation);
    }
    add_product<scalar_t>(dd, g, da[0].select(0, t), weights[0]);
    const scalar_t* mp = ms + t * mrow;  // m_{t-1}
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < size; ++j) {
        const int64_t n = b * size + j;
        gk[j] += ddp[n] * mp[n];
        c[n] = ddp[n] * k[j];
      }
    }
  }
  return {carry, grad_decay, grad_gain};
}

}  // namespace

// The memory recursion over all steps (see fused.py, _MemoryLoop). Writes m_1..m_T into
// `memories` (T, B, M); when `tanh_out` is non-empty also u_t into it (T, B, M) and each
// hidden layer's pre-activation into `hidden` (T, B, H).
void elm_memory_forward(const at::Tensor& pre, const at::Tensor& memory0,
                        const at::Tensor& decay, const at::Tensor& gain,
                        const std::vector<at::Tensor>& weights,
                        const std::vector<at::Tensor>& biases, int64_t activation,
                        const at::Tensor& memories_, const std::vector<at::Tensor>& hidden,
                        const at::Tensor& tanh_out) {
  at::Tensor memories = memories_;
  check(pre, "pre");
  check(memory0, "memory0");
  check(decay, "decay");
  check(gain, "gain");
  check(memories, "memories");
  for (const auto& w : weights) check(w, "weight");
  for (const auto& h : hidden) check(h, "hidden");
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "elm_memory_forward", [&] {
    memory_forward_impl<scalar_t>(pre, memory0, decay, gain, weights, biases, activation,
                                  memories, hidden, tanh_out);
  });
}

// elm_memory_forward in float32 with oneDNN's brgemm for the products and AVX-512 for
// the activations (no ATen op per step: ~10 us of dispatch each on the SHD shape); the
// batch's rows in blocks of at least kDirectRows, one per thread, with no synchronisation
// between steps. Returns false, doing nothing, where the direct path is not available
// (another dtype, no brgemm or AVX-512): then call elm_memory_forward.
bool elm_memory_forward_direct(const at::Tensor& pre, const at::Tensor& memory0,
                               const at::Tensor& decay, const at::Tensor& gain,
                               const std::vector<at::Tensor>& weights,
                               const std::vector<at::Tensor>& biases, int64_t activation,
                               const at::Tensor& memories, const std::vector<at::Tensor>& hidden,
                               const at::Tensor& tanh_out) {
#if MC_DIRECT
  if (!direct_cpu() || pre.scalar_type() != at::kFloat) return false;
  for (const at::Tensor* t : {&pre, &memory0, &decay, &gain, &memories}) {
    check(*t, "elm_memory_forward_direct: every tensor");
  }
  const bool save = tanh_out.defined() && tanh_out.numel() > 0;
  MemoryDirect p;
  p.steps = pre.size(0);
  p.batch = pre.size(1);
  p.size = memory0.size(1);
  p.activation = activation;
  p.pre = pre.data_ptr<float>();
  p.memory0 = memory0.data_ptr<float>();
  p.decay = decay.data_ptr<float>();
  p.gain = gain.data_ptr<float>();
  std::vector<at::Tensor> alive;  // the transposed weights and contiguous biases
  for (size_t l = 0; l < weights.size(); ++l) {
    alive.push_back(weights[l].t().contiguous());
    p.wt.push_back(alive.back().data_ptr<float>());
    p.width.push_back(weights[l].size(0));
    if (l > 0) alive.push_back(biases[l - 1].contiguous());
    p.bias.push_back(l > 0 ? alive.back().data_ptr<float>() : nullptr);
  }
  p.memories = memories.data_ptr<float>();
  p.tanh_out = save ? tanh_out.data_ptr<float>() : nullptr;
  if (save) {
    for (const auto& h : hidden) {
      check(h, "hidden");
      p.hidden.push_back(h.data_ptr<float>());
    }
  }
  at::parallel_for(0, p.batch, kDirectRows,
                   [&](int64_t b0, int64_t b1) { memory_rows_direct(p, b0, b1); });
  return true;
#else
  return false;
#endif
}

// The reverse sweep: writes da[l][t] (gradient of layer l's pre-activation) for every
// layer and step; returns the gradients of m_0, k_m and gain.
std::vector<at::Tensor> elm_memory_backward(const at::Tensor& grad, const at::Tensor& memories,
                                            const at::Tensor& tanh_saved,
                                            const std::vector<at::Tensor>& hidden,
                                            const at::Tensor& decay, const at::Tensor& gain,
                                            const std::vector<at::Tensor>& weights,
                                            int64_t activation,
                                            const std::vector<at::Tensor>& da_) {
  std::vector<at::Tensor> da = da_;
  check(grad, "grad");
  check(memories, "memories");
  check(tanh_saved, "tanh");
  for (const auto& d : da) check(d, "da");
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "elm_memory_backward", [&] {
    result = memory_backward_impl<scalar_t>(grad, memories, tanh_saved, hidden,
                                            decay.contiguous(), gain.contiguous(), weights,
                                            activation, da);
  });
  return result;
}

// elm_memory_backward in float32 on the direct path (brgemm products, AVX-512 activation
// slopes, no ATen op per step), the batch in blocks of rows as the forward; each block
// sums its own grad_decay and grad_gain, added up at the end. Returns {} where the direct
// path is not available: then call elm_memory_backward.
std::vector<at::Tensor> elm_memory_backward_direct(
    const at::Tensor& grad, const at::Tensor& memories, const at::Tensor& tanh_saved,
    const std::vector<at::Tensor>& hidden, const at::Tensor& decay, const at::Tensor& gain,
    const std::vector<at::Tensor>& weights, int64_t activation,
    const std::vector<at::Tensor>& da) {
#if MC_DIRECT
  if (!direct_cpu() || grad.scalar_type() != at::kFloat) return {};
  check(grad, "grad");
  check(memories, "memories");
  check(tanh_saved, "tanh");
  for (const auto& d : da) check(d, "da");
  for (const auto& h : hidden) check(h, "hidden");
  MemoryBackDirect p;
  p.steps = grad.size(0);
  p.batch = grad.size(1);
  p.size = grad.size(2);
  p.activation = activation;
  p.grad = grad.data_ptr<float>();
  p.memories = memories.data_ptr<float>();
  p.tanh = tanh_saved.data_ptr<float>();
  for (const auto& h : hidden) p.hidden.push_back(h.data_ptr<float>());
  const at::Tensor k = decay.contiguous(), gamma = gain.contiguous();
  p.decay = k.data_ptr<float>();
  p.gain = gamma.data_ptr<float>();
  std::vector<at::Tensor> alive;
  for (const auto& w : weights) {
    alive.push_back(w.contiguous());
    p.w.push_back(alive.back().data_ptr<float>());
    p.width.push_back(w.size(0));
  }
  for (const auto& d : da) p.da.push_back(d.data_ptr<float>());
  at::Tensor carry = at::empty({p.batch, p.size}, grad.options());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                p.batch / kDirectRows));
  at::Tensor sums = at::zeros({blocks, 2, p.size}, grad.options());  // per block: k, gain
  float* out = carry.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t b0 = p.batch * i / blocks, b1 = p.batch * (i + 1) / blocks;
      backward_rows_direct(p, b0, b1, out, sp + 2 * i * p.size, sp + (2 * i + 1) * p.size);
    }
  });
  const at::Tensor total = sums.sum(0);
  return {carry, total[0], total[1]};
#else
  return {};
#endif
}

TORCH_LIBRARY_FRAGMENT(microcircuits_elm, m) {
  m.def(
      "elm_trace_forward(Tensor drive, Tensor branch0, Tensor decay, Tensor(a!) out) -> ()",
      &elm_trace_forward);
  m.def("elm_trace_backward(Tensor grad, Tensor decay, Tensor(a!) out) -> ()",
        &elm_trace_backward);
  m.def(
      "elm_memory_forward(Tensor pre, Tensor memory0, Tensor decay, Tensor gain, "
      "Tensor[] weights, Tensor[] biases, int activation, Tensor(a!) memories, "
      "Tensor(b!)[] hidden, Tensor(c!) tanh_out) -> ()",
      &elm_memory_forward);
  m.def(
      "elm_memory_forward_direct(Tensor pre, Tensor memory0, Tensor decay, Tensor gain, "
      "Tensor[] weights, Tensor[] biases, int activation, Tensor(a!) memories, "
      "Tensor(b!)[] hidden, Tensor(c!) tanh_out) -> bool",
      &elm_memory_forward_direct);
  m.def(
      "elm_memory_backward_direct(Tensor grad, Tensor memories, Tensor tanh_saved, "
      "Tensor[] hidden, Tensor decay, Tensor gain, Tensor[] weights, int activation, "
      "Tensor(a!)[] da) -> Tensor[]",
      &elm_memory_backward_direct);
  m.def(
      "elm_memory_backward(Tensor grad, Tensor memories, Tensor tanh_saved, Tensor[] hidden, "
      "Tensor decay, Tensor gain, Tensor[] weights, int activation, Tensor(a!)[] da) "
      "-> Tensor[]",
      &elm_memory_backward);
}
