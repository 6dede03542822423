// Turns the integers that kdfast/ops passes (addresses, sizes, strides, dtype codes) into the
// torch-free params structs. Included by bind_cpu.cpp and bind_cuda.cpp, the only two files
// that know about Python.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kd_divergence/kd_divergence.h"
#include "kd_topk/kd_topk.h"
#include "solver_step/solver_step.h"
#include "diffusion_losses/diffusion_losses.h"
#include "group_norm/group_norm.h"
#include "grid_combination/grid_combination.h"

namespace kdfast {
namespace bind {

namespace py = pybind11;
using namespace solver_step;

template <typename T>
inline T* as_ptr(std::uintptr_t addr) { return reinterpret_cast<T*>(addr); }

inline Params make_step_params(int64_t batch, int64_t inner,
                               const std::array<std::uintptr_t, kNumInputs>& in_ptr,
                               const std::array<int64_t, kNumInputs>& in_stride,
                               const std::array<int, kNumInputs>& in_dtype,
                               const std::array<std::uintptr_t, kNumOutputs>& out_ptr,
                               const std::array<int64_t, kNumOutputs>& out_stride,
                               const std::array<int, kNumOutputs>& out_dtype,
                               std::uintptr_t coef_host_ptr, std::uintptr_t coef_rows_ptr,
                               float guidance_scale, int threshold,
                               float clip_value, std::uintptr_t dynamic_scale_ptr) {
  Params p;
  p.batch = batch;
  p.inner = inner;
  for (int i = 0; i < kNumInputs; ++i) {
    p.in[i] = as_ptr<const void>(in_ptr[i]);
    p.in_stride[i] = in_stride[i];
    p.in_dtype[i] = in_dtype[i];
  }
  for (int k = 0; k < kNumOutputs; ++k) {
    p.out[k] = as_ptr<void>(out_ptr[k]);
    p.out_stride[k] = out_stride[k];
    p.out_dtype[k] = out_dtype[k];
  }
  // One row for the batch lives on the host (CUDA receives it by value in the launch); rows
  // per sample (coef_rows_ptr, else 0) live on the kernel's device and are read there.
  if ((coef_host_ptr == 0) == (coef_rows_ptr == 0))
    throw std::invalid_argument("solver_step: pass exactly one of coef (one row) and coef_rows (a row per sample)");
  p.coef_rows = as_ptr<const float>(coef_rows_ptr);
  if (coef_host_ptr) {
    const float* coef = as_ptr<const float>(coef_host_ptr);
    for (int c = 0; c < kNumCoefs; ++c) p.coef[c] = coef[c];
  }
  p.guidance_scale = guidance_scale;
  p.threshold = threshold;
  p.clip_value = clip_value;
  p.dynamic_scale = as_ptr<const float>(dynamic_scale_ptr);
  return p;
}

inline ThresholdParams make_threshold_params(int64_t batch, int64_t inner,
                                             const std::array<std::uintptr_t, 3>& ptr,
                                             const std::array<int64_t, 3>& stride,
                                             const std::array<int, 3>& dtype, float x0_from_x,
                                             float x0_from_model, float guidance_scale,
                                             float ratio, float max_value, std::uintptr_t out) {
  ThresholdParams p;
  p.batch = batch;
  p.inner = inner;
  p.x = as_ptr<const void>(ptr[0]);
  p.model = as_ptr<const void>(ptr[1]);
  p.cond = as_ptr<const void>(ptr[2]);
  p.x_stride = stride[0];
  p.model_stride = stride[1];
  p.cond_stride = stride[2];
  p.x_dtype = dtype[0];
  p.model_dtype = dtype[1];
  p.cond_dtype = dtype[2];
  p.x0_from_x = x0_from_x;
  p.x0_from_model = x0_from_model;
  p.guidance_scale = guidance_scale;
  p.ratio = ratio;
  p.max_value = max_value;
  p.out = as_ptr<float>(out);
  return p;
}

// Arguments: rows, vocab, (student address, row stride, dtype), (teacher ...), labels address
// (0: none), ignore_index, row_loss address, (grad address (0: none), row stride, columns,
// dtype), kind, beta, 1/T, loss scale, workspace address.
inline kd_divergence::Params make_divergence_params(
    int64_t rows, int64_t vocab, std::uintptr_t student, int64_t student_stride, int student_dtype,
    std::uintptr_t teacher, int64_t teacher_stride, int teacher_dtype, std::uintptr_t labels,
    int64_t ignore_index, std::uintptr_t row_loss, std::uintptr_t grad, int64_t grad_stride,
    int64_t grad_cols, int grad_dtype, int kind, double beta, float inv_temperature, float loss_scale,
    std::uintptr_t workspace) {
  kd_divergence::Params p;
  p.rows = rows;
  p.vocab = vocab;
  p.student = as_ptr<const void>(student);
  p.student_stride = student_stride;
  p.student_dtype = student_dtype;
  p.teacher = as_ptr<const void>(teacher);
  p.teacher_stride = teacher_stride;
  p.teacher_dtype = teacher_dtype;
  p.labels = as_ptr<const int64_t>(labels);
  p.ignore_index = ignore_index;
  p.row_loss = as_ptr<float>(row_loss);
  p.grad = as_ptr<void>(grad);
  p.grad_stride = grad_stride;
  p.grad_cols = grad_cols;
  p.grad_dtype = grad_dtype;
  p.kind = kind;
  p.beta = beta;
  p.inv_temperature = inv_temperature;
  p.loss_scale = loss_scale;
  p.workspace = as_ptr<float>(workspace);
  return p;
}

// Arguments: rows, vocab, k, (student address, row stride, dtype), ids address, log-probability
// address, labels address (0: none), ignore_index, row_loss address, (grad address (0: none),
// row stride, dtype), renormalize, 1/T, loss scale, stored epsilon, workspace address.
inline kd_topk::Params make_topk_params(int64_t rows, int64_t vocab, int64_t k, std::uintptr_t student,
                                        int64_t student_stride, int student_dtype, std::uintptr_t ids,
                                        std::uintptr_t logprobs, std::uintptr_t labels, int64_t ignore_index,
                                        std::uintptr_t row_loss, std::uintptr_t grad, int64_t grad_stride,
                                        int grad_dtype, int renormalize, float inv_temperature, float loss_scale,
                                        float stored_eps, std::uintptr_t workspace) {
  kd_topk::Params p;
  p.rows = rows;
  p.vocab = vocab;
  p.k = k;
  p.student = as_ptr<const void>(student);
  p.student_stride = student_stride;
  p.student_dtype = student_dtype;
  p.ids = as_ptr<const int64_t>(ids);
  p.logprobs = as_ptr<const float>(logprobs);
  p.labels = as_ptr<const int64_t>(labels);
  p.ignore_index = ignore_index;
  p.row_loss = as_ptr<float>(row_loss);
  p.grad = as_ptr<void>(grad);
  p.grad_stride = grad_stride;
  p.grad_dtype = grad_dtype;
  p.renormalize = renormalize;
  p.inv_temperature = inv_temperature;
  p.loss_scale = loss_scale;
  p.stored_eps = stored_eps;
  p.workspace = as_ptr<float>(workspace);
  return p;
}

template <typename T>
using DLInputs = std::array<T, diffusion_losses::kMaxInputs>;
template <typename T>
using DLSlots = std::array<T, diffusion_losses::kNumSlots>;

// Arguments shared by the diffusion-loss entry points: kind, prediction type, combination,
// batch, elements per sample, the latent inputs (address, sample stride, dtype code; address 0:
// absent) and the per-sample scalars (address (0: use the value), stride, is-float64, value).
inline diffusion_losses::Params make_diffusion_params(
    int kind, int prediction, int combination, int64_t batch, int64_t inner,
    const std::array<std::uintptr_t, diffusion_losses::kMaxInputs>& in_ptr,
    const std::array<int64_t, diffusion_losses::kMaxInputs>& in_stride,
    const std::array<int, diffusion_losses::kMaxInputs>& in_dtype,
    const std::array<std::uintptr_t, diffusion_losses::kNumSlots>& param_ptr,
    const std::array<int64_t, diffusion_losses::kNumSlots>& param_stride,
    const std::array<int, diffusion_losses::kNumSlots>& param_f64,
    const std::array<double, diffusion_losses::kNumSlots>& param_value) {
  diffusion_losses::Params p;
  p.kind = kind;
  p.prediction = prediction;
  p.combination = combination;
  p.batch = batch;
  p.inner = inner;
  for (int i = 0; i < diffusion_losses::kMaxInputs; ++i) {
    p.in[i] = as_ptr<const void>(in_ptr[i]);
    p.in_stride[i] = in_stride[i];
    p.in_dtype[i] = in_dtype[i];
  }
  for (int k = 0; k < diffusion_losses::kNumSlots; ++k) {
    p.param[k].ptr = as_ptr<const void>(param_ptr[k]);
    p.param[k].stride = param_stride[k];
    p.param[k].is_double = param_f64[k];
    p.param[k].value = param_value[k];
  }
  return p;
}

// Arguments: batch, channels, spatial, groups, channels_last, (x address, sample stride, dtype),
// (out ...), (shift address (0: none), batch stride, channel stride, dtype), weight and bias
// addresses (0: none) and their dtype, eps, activation.
inline group_norm::Params make_group_norm_params(int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                                                 int channels_last, std::uintptr_t x, int64_t x_stride, int x_dtype,
                                                 std::uintptr_t out, int64_t out_stride, int out_dtype,
                                                 std::uintptr_t shift, int64_t shift_batch_stride,
                                                 int64_t shift_channel_stride, int shift_dtype, std::uintptr_t weight,
                                                 std::uintptr_t bias, int affine_dtype, float eps, int activation) {
  group_norm::Params p;
  p.batch = batch;
  p.channels = channels;
  p.spatial = spatial;
  p.groups = groups;
  p.channels_last = channels_last;
  p.x = as_ptr<const void>(x);
  p.x_stride = x_stride;
  p.x_dtype = x_dtype;
  p.out = as_ptr<void>(out);
  p.out_stride = out_stride;
  p.out_dtype = out_dtype;
  p.shift = as_ptr<const void>(shift);
  p.shift_batch_stride = shift_batch_stride;
  p.shift_channel_stride = shift_channel_stride;
  p.shift_dtype = shift_dtype;
  p.weight = as_ptr<const void>(weight);
  p.bias = as_ptr<const void>(bias);
  p.affine_dtype = affine_dtype;
  p.eps = eps;
  p.activation = activation;
  return p;
}

// The coefficients are read from a host float32 array, [a, w[0][0..grid), w[1][0..grid)], into
// the params struct, which CUDA receives by value in the launch.
inline grid_combination::Params make_grid_params(int64_t rows, int64_t channels, int64_t grid, std::uintptr_t x,
                                                 int64_t x_row_stride, int x_dtype,
                                                 const std::array<std::uintptr_t, 2>& y,
                                                 const std::array<int64_t, 2>& y_row_stride,
                                                 const std::array<int, 2>& y_dtype, std::uintptr_t out, int out_dtype,
                                                 std::uintptr_t coefs, int64_t num_coefs) {
  grid_combination::Params p;
  p.rows = rows;
  p.channels = channels;
  p.grid = grid;
  p.num_outputs = y[1] ? 2 : 1;
  const int64_t num_weights = num_coefs - 1;
  if (!y[0] || !coefs || grid < 1 || num_weights != p.num_outputs * grid ||
      num_weights > grid_combination::kMaxWeights)
    throw std::invalid_argument("grid_combination: need an output and 1 + outputs * grid coefficients, at most " +
                                std::to_string(1 + grid_combination::kMaxWeights));
  p.x = as_ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.x_dtype = x_dtype;
  for (int k = 0; k < 2; ++k) {
    p.y[k] = as_ptr<const void>(y[k]);
    p.y_row_stride[k] = y_row_stride[k];
    p.y_dtype[k] = y_dtype[k];
  }
  p.out = as_ptr<void>(out);
  p.out_dtype = out_dtype;
  const float* c = as_ptr<const float>(coefs);
  p.sample_weight = c[0];
  for (int64_t i = 0; i < num_weights; ++i) p.weights[i] = c[1 + i];
  return p;
}

inline void check_status(int status, const char* op) {
  if (status == kOk) return;
  const char* what = status == kBadDType ? "unsupported dtype code"
                     : status == kBadArgument ? "invalid argument"
                     : status == kOutOfMemory ? "out of memory (host scratch)"
                                              : "kernel launch failed";
  throw std::runtime_error(std::string("kdfast.") + op + ": " + what);
}

inline void bind_constants(py::module_& m) {
  m.attr("NUM_INPUTS") = int(kNumInputs);
  m.attr("NUM_OUTPUTS") = int(kNumOutputs);
  m.attr("NUM_SOURCES") = int(kNumSources);
  m.attr("NUM_COEFS") = int(kNumCoefs);
  m.attr("NUM_DIVERGENCE_KINDS") = int(kd_divergence::kNumKinds);
  m.attr("MAX_GRID_WEIGHTS") = int(grid_combination::kMaxWeights);
}

}  // namespace bind
}  // namespace kdfast
