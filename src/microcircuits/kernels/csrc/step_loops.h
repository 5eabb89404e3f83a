// Declarations shared by the sources of the C++ step loops (step_loops.cpp, which holds
// the extension's Python module, and direct_steps.cpp, the direct path), built into one
// extension by microcircuits/kernels/native.py.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// The cells, numbered as microcircuits.cells.CellKind.code.
enum Kind : int64_t { kLSTM = 0, kSub = 1, kFix = 2 };

// The direct path (direct_steps.cpp; see the comments there).
bool direct_available();
at::Tensor transposed(at::Tensor src);
void forward_direct(int64_t kind_id, at::Tensor gates, at::Tensor h, at::Tensor memory,
                    at::Tensor y, at::Tensor r, c10::optional<at::Tensor> decay,
                    c10::optional<at::Tensor> mask, bool keep_memory,
                    std::vector<int64_t> batch_sizes, int64_t split, int64_t parts);
void backward_direct(int64_t kind_id, at::Tensor act, at::Tensor memory, at::Tensor y,
                     c10::optional<at::Tensor> decay, c10::optional<at::Tensor> mask,
                     at::Tensor r, at::Tensor grad_y, at::Tensor dh, at::Tensor dc_carry,
                     c10::optional<at::Tensor> phi_sum, bool need_dh0, bool flush, double tiny,
                     std::vector<int64_t> batch_sizes, int64_t split, int64_t parts);
