// The per-step loops of microcircuits.kernels.cpu_fused, in C++.
//
// Each step of a small layer (workload C: batch 20, 200 units) is one GEMM of ~80 us plus
// a handful of pointwise ops on a few thousand numbers; run from Python, each op costs
// 3-8 us of interpreter and dispatch overhead, as much as the arithmetic. Here a step is
// the GEMM (ATen, i.e. MKL), ATen's vectorised sigmoid/tanh over whole blocks, and one or
// two plain loops that do all the other arithmetic of the step in one pass.
//
// The equations are the cells' (microcircuits/cells.py is their definition; the
// backward is the one spelled out in cpu_fused.py's docstring and the Triton kernels):
//   subLSTM      [i, f, z, o] = sigma(pre)      c' = f c + z m - i   h' = sigma(c') - o
//   fix-subLSTM  [i, z, o]    = sigma(pre)      f = sigma(phi), given as `decay`
//   LSTM         i, f, o = sigma, z = tanh      c' = f c + z m i     h' = tanh(c') o
// (m: the update-dropout mask, if any). Packed sequences come sorted by length with
// batch_sizes[t] rows alive at step t (empty: all rows at every step), as cuDNN and
// oneDNN take them: a step works on the first rows only. The per-step products run on BLAS
// (ATen's addmm) or, for large weights, on oneDNN with the weight packed once per call
// (mkldnn::_linear_pointwise.binary, as cpu_fused chooses). Tested against the reference
// path through cpu_fused (tests/test_native.py, tests/test_kernels.py).
//
// The subtractive cells' float32 steps on AVX-512 CPUs take the direct path instead
// (direct_steps.cpp); its functions are declared in step_loops.h and registered here,
// in the extension's one Python module.
#include "step_loops.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>

namespace {

// Pointwise work on one thread, GEMMs on all of torch's threads (see "Threads" in
// cpu_fused.py: a parallel region per small op risks a stall on a shared machine).
class Threads {
 public:
  explicit Threads(bool serial) : serial_(serial), all_(at::get_num_threads()) {
    if (serial_) at::set_num_threads(1);
  }
  ~Threads() {
    if (serial_) at::set_num_threads(all_);
  }
  void gemm() const {
    if (serial_) at::set_num_threads(all_);
  }
  void pointwise() const {
    if (serial_) at::set_num_threads(1);
  }

 private:
  bool serial_;
  int all_;
};

// The per-step products with one recurrent weight: `w` is R^T (H, G*H) for forward and
// R (G*H, H) for backward on BLAS, or that matrix packed by
// mkldnn::_reorder_linear_weight (as nn.Linear's weight: out = in w^T) on oneDNN.
class Products {
 public:
  Products(at::Tensor w, bool onednn) : w_(std::move(w)), onednn_(onednn) {}

  // out = add + a w, written into out; add may be undefined (zero), or be out itself.
  void run(at::Tensor& out, const at::Tensor& a, const at::Tensor& add) const {
    if (!onednn_) {
      if (!add.defined()) {
        at::mm_out(out, a, w_);
      } else if (add.is_same(out)) {
        out.addmm_(a, w_);
      } else {
        at::addmm_out(out, add, a, w_);
      }
      return;
    }
    const at::Tensor other = add.defined() ? add.contiguous() : at::zeros_like(out);
    out.copy_(linear_add(a, other));
  }

 private:
  // mkldnn::_linear_pointwise.binary(X, other, W, None, "add") = X W^T + other, called
  // boxed (robust to how the C++ signature spells its types across torch versions).
  at::Tensor linear_add(const at::Tensor& x, const at::Tensor& other) const {
    static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(
        "mkldnn::_linear_pointwise", "binary");
    torch::jit::Stack stack;
    stack.reserve(5);
    stack.emplace_back(x);
    stack.emplace_back(other);
    stack.emplace_back(w_);
    stack.emplace_back(c10::IValue());
    stack.emplace_back(std::string("add"));
    op.callBoxed(&stack);
    return stack.back().toTensor();
  }

  at::Tensor w_;
  bool onednn_;
};

// dh_{t-1} = grad_y[t-1] + dpre_t R into the first `rows` rows of dh (dh_0's part of dh0
// = dpre_0 R at t = 0), entries below `cut` zeroed when flushing (float32 denormals
// never chain).
template <typename scalar_t>
void previous_dh(const Products& products, const Threads& threads, at::Tensor& dh,
                 const at::Tensor& dpre_t, const at::Tensor& grad_y, int64_t t, int64_t rows,
                 bool flush, scalar_t cut) {
  at::Tensor out = dh.narrow(0, 0, rows);
  threads.gemm();
  products.run(out, dpre_t.narrow(0, 0, rows),
               t > 0 ? grad_y.select(0, t - 1).narrow(0, 0, rows) : at::Tensor());
  threads.pointwise();
  if (flush) {
    scalar_t* d = dh.data_ptr<scalar_t>();
    for (int64_t n = 0, size = rows * dh.size(1); n < size; ++n) {
      if (std::abs(d[n]) <= cut) d[n] = 0;
    }
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must have unit stride along its last dimension");
}

// sigma (subtractive cells) or tanh (LSTM) of the gate pre-activations, in place.
void activate(Kind kind, at::Tensor& pre, int64_t hidden) {
  if (kind == kLSTM) {
    pre.narrow(1, 0, 2 * hidden).sigmoid_();
    pre.narrow(1, 2 * hidden, hidden).tanh_();
    pre.narrow(1, 3 * hidden, hidden).sigmoid_();
  } else {
    pre.sigmoid_();
  }
}

// c' from the activated gates and c; writes c' into c_next and into y (which then gets
// the read-out nonlinearity). c_prev and c_next may be the same memory.
template <typename scalar_t>
void memory_update(Kind kind, const scalar_t* g, const scalar_t* c_prev, scalar_t* c_next,
                   scalar_t* y, const scalar_t* decay, const scalar_t* mask, int64_t batch,
                   int64_t hidden, int64_t gate_cols) {
  const int64_t z_block = kind == kFix ? 1 : 2;
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t* gb = g + b * gate_cols;
    const scalar_t* i = gb;
    const scalar_t* f = kind == kFix ? decay : gb + hidden;
    const scalar_t* z = gb + z_block * hidden;
    const scalar_t* m = mask ? mask + b * hidden : nullptr;
    const scalar_t* cp = c_prev + b * hidden;
    scalar_t* cn = c_next + b * hidden;
    scalar_t* yb = y + b * hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      const scalar_t zm = m ? z[j] * m[j] : z[j];
      const scalar_t c = kind == kLSTM ? f[j] * cp[j] + zm * i[j] : f[j] * cp[j] + zm - i[j];
      cn[j] = c;
      yb[j] = c;
    }
  }
}

// h' = sigma(c') - o (subtractive) or tanh(c') o (LSTM), given y = sigma(c') or tanh(c').
template <typename scalar_t>
void readout(Kind kind, const scalar_t* g, scalar_t* y, int64_t batch, int64_t hidden,
             int64_t gate_cols) {
  const int64_t o_block = gate_cols / hidden - 1;
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t* o = g + b * gate_cols + o_block * hidden;
    scalar_t* yb = y + b * hidden;
    if (kind == kLSTM) {
      for (int64_t j = 0; j < hidden; ++j) yb[j] *= o[j];
    } else {
      for (int64_t j = 0; j < hidden; ++j) yb[j] -= o[j];
    }
  }
}

}  // namespace

// Forward over T steps. gates (T, B, G*H), contiguous: the input projection on entry;
// each step adds h R^T (w = R^T, (H, G*H)) and the gate activations replace it (kept for
// backward). h (B, H), contiguous: h0 on entry, the final state on exit. memory:
// (T+1, B, H) with memory[0] = c0 when keep_memory (training: every c_t is kept; rows
// past their sequence's end carry c over), else (B, H), updated in place. y (T, B, H):
// the outputs (rows past a sequence's end are not written: the caller zeroes y).
void forward_steps(int64_t kind_id, at::Tensor gates, at::Tensor h, at::Tensor memory,
                   at::Tensor y, at::Tensor w, bool onednn, c10::optional<at::Tensor> decay,
                   c10::optional<at::Tensor> mask, bool keep_memory, bool serial,
                   std::vector<int64_t> batch_sizes) {
  const Kind kind = static_cast<Kind>(kind_id);
  TORCH_CHECK(kind_id >= 0 && kind_id <= 2, "unknown cell kind ", kind_id);
  TORCH_CHECK(gates.is_contiguous() && y.is_contiguous() && memory.is_contiguous() &&
                  h.is_contiguous(),
              "gates, h, y and memory must be contiguous");
  TORCH_CHECK(kind != kFix || decay.has_value(), "fix-subLSTM needs its decay");
  const int64_t steps = gates.size(0), batch = gates.size(1), gate_cols = gates.size(2);
  const int64_t hidden = y.size(2);
  const bool packed = !batch_sizes.empty();
  TORCH_CHECK(!packed || static_cast<int64_t>(batch_sizes.size()) == steps,
              "batch_sizes must have one entry per step");
  if (mask.has_value()) {
    TORCH_CHECK(mask->is_contiguous() && mask->size(0) == batch, "mask must be (B, H)");
  }
  Threads threads(serial);
  const Products products(w, onednn);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "forward_steps", [&] {
    const scalar_t* decay_ptr = decay.has_value() ? decay->data_ptr<scalar_t>() : nullptr;
    const scalar_t* mask_ptr = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
    scalar_t* c_base = memory.data_ptr<scalar_t>();
    const int64_t c_step = keep_memory ? batch * hidden : 0;
    at::Tensor h_prev = h;  // unpacked: the previous output row block, no copies
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t rows = packed ? batch_sizes[t] : batch;
      scalar_t* c_prev = c_base + t * c_step;
      scalar_t* c_next = c_base + (t + 1) * c_step;
      if (rows == 0) {  // every sequence has ended: carry the memory to the end
        if (keep_memory) {
          for (int64_t u = t + 1; u <= steps; ++u) {
            std::copy(c_prev, c_prev + batch * hidden, c_base + u * c_step);
          }
        }
        break;
      }
      at::Tensor pre = gates.select(0, t).narrow(0, 0, rows);
      threads.gemm();
      products.run(pre, h_prev.narrow(0, 0, rows), pre);
      threads.pointwise();
      activate(kind, pre, hidden);
      at::Tensor yt = y.select(0, t).narrow(0, 0, rows);
      const scalar_t* g = pre.data_ptr<scalar_t>();
      memory_update<scalar_t>(kind, g, c_prev, c_next, yt.data_ptr<scalar_t>(), decay_ptr,
                              mask_ptr, rows, hidden, gate_cols);
      if (keep_memory && rows < batch) {  // ended sequences keep their memory
        std::copy(c_prev + rows * hidden, c_prev + batch * hidden, c_next + rows * hidden);
      }
      if (kind == kLSTM) {
        yt.tanh_();
      } else {
        yt.sigmoid_();
      }
      readout<scalar_t>(kind, g, yt.data_ptr<scalar_t>(), rows, hidden, gate_cols);
      if (packed) {  // ended sequences keep their h: the state lives in h
        const scalar_t* src = yt.data_ptr<scalar_t>();
        std::copy(src, src + rows * hidden, h.data_ptr<scalar_t>());
      } else {
        h_prev = yt;
      }
    }
    if (!packed && steps > 0) h.copy_(y.select(0, steps - 1));
  });
}

// dh of the rows whose sequences end at step t: their output gradient enters there.
// Rows [alive_after, rows) are alive at t but not at t + 1 (unpacked: all rows at T-1).
void enter_output_gradient(at::Tensor& dh, const at::Tensor& grad_y, int64_t t,
                           int64_t alive_after, int64_t rows) {
  if (rows > alive_after) {
    dh.narrow(0, alive_after, rows - alive_after)
        .add_(grad_y.select(0, t).narrow(0, alive_after, rows - alive_after));
  }
}

// The reverse sweep both backwards share: for t = T-1 .. 0, over the rows alive at t,
// the output gradients entering at t, then `step(t, rows, dpre_t)` (the step's pointwise
// work: d pre of the alive rows written into row block t of dpre, and the carried dc),
// then the carried dh through the product (dh_{t-1} = grad_y[t-1] + dpre_t R).
template <typename scalar_t, typename Step>
void reverse_sweep(const at::Tensor& dpre, at::Tensor& dh, const at::Tensor& grad_y,
                   const std::vector<int64_t>& batch_sizes, const Products& products,
                   const Threads& threads, bool need_dh0, bool flush, scalar_t cut,
                   Step&& step) {
  const int64_t steps = dpre.size(0), batch = dpre.size(1);
  int64_t alive_after = 0;  // rows alive at step t + 1
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t rows = batch_sizes.empty() ? batch : batch_sizes[t];
    if (rows == 0) continue;
    enter_output_gradient(dh, grad_y, t, alive_after, rows);
    alive_after = rows;
    at::Tensor dpre_t = dpre.select(0, t);
    step(t, rows, dpre_t.data_ptr<scalar_t>());
    if (t > 0 || need_dh0) {
      previous_dh<scalar_t>(products, threads, dh, dpre_t, grad_y, t, rows, flush, cut);
    }
  }
}

// The reverse sweep of backward (see cpu_fused._reverse_sweep, whose unpacked loop this
// is). coef (T, B, G*H): the gate coefficients K on entry, dpre on exit. readout
// (T, B, H): S on entry, dc of every step on exit. forget (T, B, H), any strides with a
// unit last one (fix-subLSTM: its (H,) decay expanded). w = R (G*H, H). grad_y (T, B, H),
// any strides (e.g. expanded). dh (B, H): grad_hn on entry (each row's output gradient
// is added at its sequence's last step), dh0 on exit when need_dh0. dc_carry (B, H): grad_cn on entry, dc0 on
// exit. flush zeroes carried values below tiny (float32 denormals never chain).
void backward_steps(at::Tensor coef, at::Tensor readout_dc, at::Tensor forget, at::Tensor w,
                    bool onednn, at::Tensor grad_y, at::Tensor dh, at::Tensor dc_carry,
                    bool need_dh0, bool flush, double tiny, bool serial,
                    std::vector<int64_t> batch_sizes) {
  TORCH_CHECK(coef.is_contiguous() && dh.is_contiguous() && dc_carry.is_contiguous(),
              "coef, dh and dc_carry must be contiguous");
  check_rows(readout_dc, "readout");
  check_rows(forget, "forget");
  const int64_t gate_cols = coef.size(2);
  const int64_t hidden = dh.size(1);
  const int64_t blocks = gate_cols / hidden;
  Threads threads(serial);
  const Products products(w, onednn);
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "backward_steps", [&] {
    const scalar_t cut = static_cast<scalar_t>(tiny);
    scalar_t* dh_ptr = dh.data_ptr<scalar_t>();
    scalar_t* carry = dc_carry.data_ptr<scalar_t>();
    scalar_t* s_base = readout_dc.data_ptr<scalar_t>();
    const scalar_t* f_base = forget.data_ptr<scalar_t>();
    const int64_t s0 = readout_dc.stride(0), s1 = readout_dc.stride(1);
    const int64_t f0 = forget.stride(0), f1 = forget.stride(1);
    reverse_sweep<scalar_t>(coef, dh, grad_y, batch_sizes, products, threads, need_dh0, flush,
                            cut, [&](int64_t t, int64_t rows, scalar_t* k) {
      for (int64_t b = 0; b < rows; ++b) {
        scalar_t* kb = k + b * gate_cols;
        scalar_t* s = s_base + t * s0 + b * s1;
        const scalar_t* f = f_base + t * f0 + b * f1;
        scalar_t* dhb = dh_ptr + b * hidden;
        scalar_t* cb = carry + b * hidden;
        for (int64_t j = 0; j < hidden; ++j) {
          const scalar_t dc = cb[j] + dhb[j] * s[j];
          s[j] = dc;
          for (int64_t q = 0; q + 1 < blocks; ++q) kb[q * hidden + j] *= dc;
          kb[(blocks - 1) * hidden + j] *= dhb[j];
          scalar_t next = dc * f[j];
          if (flush && std::abs(next) <= cut) next = 0;
          cb[j] = next;
        }
      }
    });
  });
}

// The whole backward recurrence of the subtractive cells, from the saved activations:
// the gate coefficients K and the read-out derivative S are computed per step in the
// sweep (no whole-sequence passes before it), with sigma(c_t) = h_t + o_t read back from
// the output (h' = sigma(c') - o), so no transcendental is evaluated at all.
//   dc_t = dc_carry + dh_t sigma(c_t)(1 - sigma(c_t))
//   dpre = [-i(1-i) dc, c_{t-1} f(1-f) dc (subLSTM), m z(1-z) dc, -o(1-o) dh]
//   dc_carry = f dc,   dh_{t-1} = grad_y[t-1] + dpre_t R
// act (T, B, G*H), contiguous: the activations on entry, dpre on exit. memory
// (T+1, B, H): c_0 .. c_T. y (T, B, H): the outputs h_1 .. h_T. decay (H): fix-subLSTM's
// f. phi_sum (H, float64), fix-subLSTM only: gets sum_{t,b} dc_t c_{t-1} (d phi is that
// times f(1-f)). The rest as in backward_steps.
void backward_subtractive(int64_t kind_id, at::Tensor act, at::Tensor memory, at::Tensor y,
                          c10::optional<at::Tensor> decay, c10::optional<at::Tensor> mask,
                          at::Tensor w, bool onednn, at::Tensor grad_y, at::Tensor dh,
                          at::Tensor dc_carry, c10::optional<at::Tensor> phi_sum,
                          bool need_dh0, bool flush, double tiny, bool serial,
                          std::vector<int64_t> batch_sizes) {
  const Kind kind = static_cast<Kind>(kind_id);
  TORCH_CHECK(kind == kSub || kind == kFix, "backward_subtractive: subLSTM or fix-subLSTM");
  TORCH_CHECK(act.is_contiguous() && memory.is_contiguous() && y.is_contiguous() &&
                  dh.is_contiguous() && dc_carry.is_contiguous(),
              "act, memory, y, dh and dc_carry must be contiguous");
  TORCH_CHECK(kind != kFix || decay.has_value(), "fix-subLSTM needs its decay");
  const int64_t batch = act.size(1), gate_cols = act.size(2);
  const int64_t hidden = dh.size(1);
  const int64_t o_block = gate_cols / hidden - 1;
  const int64_t z_block = kind == kFix ? 1 : 2;
  if (mask.has_value()) {
    TORCH_CHECK(mask->is_contiguous() && mask->size(0) == batch, "mask must be (B, H)");
  }
  double* phi_acc = nullptr;
  if (phi_sum.has_value()) {
    TORCH_CHECK(phi_sum->scalar_type() == at::kDouble && phi_sum->is_contiguous(),
                "phi_sum must be a contiguous float64 tensor");
    phi_acc = phi_sum->data_ptr<double>();
  }
  Threads threads(serial);
  const Products products(w, onednn);
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "backward_subtractive", [&] {
    const scalar_t cut = static_cast<scalar_t>(tiny);
    const scalar_t* decay_ptr = decay.has_value() ? decay->data_ptr<scalar_t>() : nullptr;
    const scalar_t* mask_ptr = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
    const scalar_t* c_base = memory.data_ptr<scalar_t>();
    const scalar_t* y_base = y.data_ptr<scalar_t>();
    scalar_t* dh_ptr = dh.data_ptr<scalar_t>();
    scalar_t* carry = dc_carry.data_ptr<scalar_t>();
    reverse_sweep<scalar_t>(act, dh, grad_y, batch_sizes, products, threads, need_dh0, flush,
                            cut, [&](int64_t t, int64_t rows, scalar_t* a) {
      for (int64_t b = 0; b < rows; ++b) {
        scalar_t* ab = a + b * gate_cols;
        const scalar_t* cp = c_base + (t * batch + b) * hidden;  // c_{t-1} of this row
        const scalar_t* yb = y_base + (t * batch + b) * hidden;
        const scalar_t* m = mask_ptr ? mask_ptr + b * hidden : nullptr;
        scalar_t* dhb = dh_ptr + b * hidden;
        scalar_t* cb = carry + b * hidden;
        scalar_t* ai = ab;
        scalar_t* af = ab + hidden;  // subLSTM only
        scalar_t* az = ab + z_block * hidden;
        scalar_t* ao = ab + o_block * hidden;
        for (int64_t j = 0; j < hidden; ++j) {
          const scalar_t i = ai[j], z = az[j], o = ao[j];
          const scalar_t f = kind == kFix ? decay_ptr[j] : af[j];
          const scalar_t sc = yb[j] + o;  // sigma(c_t)
          const scalar_t dc = cb[j] + dhb[j] * sc * (1 - sc);
          if (phi_acc) phi_acc[j] += static_cast<double>(dc) * static_cast<double>(cp[j]);
          ai[j] = -i * (1 - i) * dc;
          if (kind == kSub) af[j] = cp[j] * f * (1 - f) * dc;
          az[j] = (m ? m[j] : scalar_t(1)) * z * (1 - z) * dc;
          ao[j] = -o * (1 - o) * dhb[j];
          scalar_t next = dc * f;
          if (flush && std::abs(next) <= cut) next = 0;
          cb[j] = next;
        }
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "microcircuits: the per-step loops of the fused CPU kernel";
  // the loops only call ATen: Python's other threads may run meanwhile
  m.def("forward_steps", &forward_steps, "forward over all steps (see step_loops.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_steps", &backward_steps, "the reverse sweep (see step_loops.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_subtractive", &backward_subtractive,
        "the subtractive cells' whole backward recurrence (see step_loops.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("direct_available", &direct_available,
        "whether forward_direct/backward_direct run here (see direct_steps.cpp)");
  m.def("transposed", &transposed, "a contiguous transposed copy (see direct_steps.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("forward_direct", &forward_direct,
        "the subtractive cells' forward on the direct path (see direct_steps.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_direct", &backward_direct,
        "the subtractive cells' backward on the direct path (see direct_steps.cpp)",
        py::call_guard<py::gil_scoped_release>());
}
