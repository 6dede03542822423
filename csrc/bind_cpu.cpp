// Python bindings of the CPU kernels (module kdfast._C). Integers in, status out.
#include "bind_common.h"
#include "common/kd_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace kdfast;
using namespace kdfast::bind;

PYBIND11_MODULE(_C, m) {
  m.doc() = "kdfast CPU kernels (torch-free; called by kdfast.ops)";
  bind_constants(m);

  m.def("solver_step",
        [](int64_t batch, int64_t inner, const std::array<std::uintptr_t, kNumInputs>& in_ptr,
           const std::array<int64_t, kNumInputs>& in_stride, const std::array<int, kNumInputs>& in_dtype,
           const std::array<std::uintptr_t, kNumOutputs>& out_ptr,
           const std::array<int64_t, kNumOutputs>& out_stride,
           const std::array<int, kNumOutputs>& out_dtype, std::uintptr_t coef, std::uintptr_t coef_rows,
           float guidance_scale,
           int threshold, float clip_value, std::uintptr_t dynamic_scale, int num_threads) {
          Params p = make_step_params(batch, inner, in_ptr, in_stride, in_dtype, out_ptr, out_stride,
                                      out_dtype, coef, coef_rows, guidance_scale, threshold, clip_value,
                                      dynamic_scale);
          p.num_threads = num_threads;
          int status;
          {
            py::gil_scoped_release release;
            status = solver_step::solver_step_cpu(p);
          }
          check_status(status, "solver_step");
        });

  m.def("threshold_scale",
        [](int64_t batch, int64_t inner, const std::array<std::uintptr_t, 3>& ptr,
           const std::array<int64_t, 3>& stride, const std::array<int, 3>& dtype, float x0_from_x,
           float x0_from_model, float guidance_scale, float ratio, float max_value, std::uintptr_t out,
           int num_threads) {
          ThresholdParams p = make_threshold_params(batch, inner, ptr, stride, dtype, x0_from_x,
                                                    x0_from_model, guidance_scale, ratio, max_value, out);
          p.num_threads = num_threads;
          int status;
          {
            py::gil_scoped_release release;
            status = solver_step::threshold_scale_cpu(p);
          }
          check_status(status, "threshold_scale");
        });

  m.def("kd_divergence", [](int64_t rows, int64_t vocab, std::uintptr_t student, int64_t student_stride,
                            int student_dtype, std::uintptr_t teacher, int64_t teacher_stride, int teacher_dtype,
                            std::uintptr_t labels, int64_t ignore_index, std::uintptr_t row_loss,
                            std::uintptr_t grad, int64_t grad_stride, int64_t grad_cols, int grad_dtype, int kind,
                            double beta, float inv_temperature, float loss_scale, std::uintptr_t workspace,
                            int num_threads) {
    kd_divergence::Params p = make_divergence_params(
        rows, vocab, student, student_stride, student_dtype, teacher, teacher_stride, teacher_dtype, labels,
        ignore_index, row_loss, grad, grad_stride, grad_cols, grad_dtype, kind, beta, inv_temperature,
        loss_scale, workspace);
    p.num_threads = num_threads;
    int status;
    {
      py::gil_scoped_release release;
      status = kd_divergence::kd_divergence_cpu(p);
    }
    check_status(status, "kd_divergence");
  });

  m.def("kd_divergence_workspace_floats", [](int64_t vocab, int num_threads) {
    return kd_divergence::workspace_floats_per_thread(vocab) * int64_t(num_threads);
  });

  m.def("kd_topk", [](int64_t rows, int64_t vocab, int64_t k, std::uintptr_t student, int64_t student_stride,
                      int student_dtype, std::uintptr_t ids, std::uintptr_t logprobs, std::uintptr_t labels,
                      int64_t ignore_index, std::uintptr_t row_loss, std::uintptr_t grad, int64_t grad_stride,
                      int grad_dtype, int renormalize, float inv_temperature, float loss_scale, float stored_eps,
                      std::uintptr_t workspace, int num_threads) {
    kd_topk::Params p = make_topk_params(rows, vocab, k, student, student_stride, student_dtype, ids, logprobs,
                                         labels, ignore_index, row_loss, grad, grad_stride, grad_dtype,
                                         renormalize, inv_temperature, loss_scale, stored_eps, workspace);
    p.num_threads = num_threads;
    int status;
    {
      py::gil_scoped_release release;
      status = kd_topk::kd_topk_cpu(p);
    }
    check_status(status, "kd_topk");
  });

  m.def("kd_topk_workspace_floats", [](int64_t vocab, int num_threads) {
    return kd_topk::workspace_floats_per_thread(vocab) * int64_t(num_threads);
  });

  m.def("build_info", []() {
    py::dict d;
    d["cpu_target"] = cpu::has_avx2_fma() ? "avx2+fma" : "baseline";  // the hot loops this CPU runs
#ifdef _OPENMP
    d["openmp"] = py::int_(_OPENMP);
    d["max_threads"] = omp_get_max_threads();
#else
    d["openmp"] = py::none();
#endif
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
    return d;
  });

  // Diffusion-distillation losses (csrc/diffusion_losses): the leading arguments are those of
  // make_diffusion_params in bind_common.h.
  m.def("diffusion_loss_forward",
        [](int kind, int prediction, int combination, int64_t batch, int64_t inner,
           const DLInputs<std::uintptr_t>& in_ptr, const DLInputs<int64_t>& in_stride, const DLInputs<int>& in_dtype,
           const DLSlots<std::uintptr_t>& param_ptr,
           const DLSlots<int64_t>& param_stride, const DLSlots<int>& param_f64, const DLSlots<double>& param_value,
           std::uintptr_t loss, std::uintptr_t aux, std::uintptr_t workspace, int num_threads) {
          diffusion_losses::Params p = make_diffusion_params(kind, prediction, combination, batch, inner, in_ptr,
                                                             in_stride, in_dtype, param_ptr, param_stride, param_f64,
                                                             param_value);
          p.loss = as_ptr<float>(loss);
          p.aux = as_ptr<double>(aux);
          p.workspace = as_ptr<double>(workspace);
          p.num_threads = num_threads;
          int status;
          {
            py::gil_scoped_release release;
            status = diffusion_losses::loss_forward_cpu(p);
          }
          check_status(status, "diffusion_loss_forward");
        });

  m.def("diffusion_loss_backward",
        [](int kind, int prediction, int combination, int64_t batch, int64_t inner,
           const DLInputs<std::uintptr_t>& in_ptr, const DLInputs<int64_t>& in_stride, const DLInputs<int>& in_dtype,
           const DLSlots<std::uintptr_t>& param_ptr,
           const DLSlots<int64_t>& param_stride, const DLSlots<int>& param_f64, const DLSlots<double>& param_value,
           std::uintptr_t aux, std::uintptr_t grad_loss, int64_t grad_loss_stride,
           const std::array<std::uintptr_t, diffusion_losses::kMaxGrads>& grad,
           const std::array<int, diffusion_losses::kMaxGrads>& grad_dtype, int num_threads) {
          diffusion_losses::Params p = make_diffusion_params(kind, prediction, combination, batch, inner, in_ptr,
                                                             in_stride, in_dtype, param_ptr, param_stride, param_f64,
                                                             param_value);
          p.aux = as_ptr<double>(aux);
          p.grad_loss = as_ptr<const float>(grad_loss);
          p.grad_loss_stride = grad_loss_stride;
          for (int k = 0; k < diffusion_losses::kMaxGrads; ++k) {
            p.grad[k] = as_ptr<void>(grad[k]);
            p.grad_dtype[k] = grad_dtype[k];
          }
          p.num_threads = num_threads;
          int status;
          {
            py::gil_scoped_release release;
            status = diffusion_losses::loss_backward_cpu(p);
          }
          check_status(status, "diffusion_loss_backward");
        });

  m.def("sample_combination",
        [](int kind, int prediction, int combination, int64_t batch, int64_t inner,
           const DLInputs<std::uintptr_t>& in_ptr, const DLInputs<int64_t>& in_stride, const DLInputs<int>& in_dtype,
           const DLSlots<std::uintptr_t>& param_ptr,
           const DLSlots<int64_t>& param_stride, const DLSlots<int>& param_f64, const DLSlots<double>& param_value,
           std::uintptr_t out, int out_dtype, int num_threads) {
          diffusion_losses::Params p = make_diffusion_params(kind, prediction, combination, batch, inner, in_ptr,
                                                             in_stride, in_dtype, param_ptr, param_stride, param_f64,
                                                             param_value);
          p.grad[0] = as_ptr<void>(out);
          p.grad_dtype[0] = out_dtype;
          p.num_threads = num_threads;
          int status;
          {
            py::gil_scoped_release release;
            status = diffusion_losses::sample_combination_cpu(p);
          }
          check_status(status, "sample_combination");
        });

  m.def("diffusion_loss_workspace_doubles", [](int64_t batch, int64_t inner) {
    return diffusion_losses::workspace_doubles(batch, inner, diffusion_losses::kCpuTile);
  });

  // Fused group norm + activation (csrc/group_norm): the leading arguments are those of
  // make_group_norm_params in bind_common.h.
  m.def("group_norm",
        [](int64_t batch, int64_t channels, int64_t spatial, int64_t groups, int channels_last, std::uintptr_t x,
           int64_t x_stride, int x_dtype, std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t shift,
           int64_t shift_batch_stride, int64_t shift_channel_stride, int shift_dtype, std::uintptr_t weight,
           std::uintptr_t bias, int affine_dtype, float eps, int activation, std::uintptr_t workspace,
           int num_threads) {
          group_norm::Params p = make_group_norm_params(
              batch, channels, spatial, groups, channels_last, x, x_stride, x_dtype, out, out_stride, out_dtype, shift,
              shift_batch_stride, shift_channel_stride, shift_dtype, weight, bias, affine_dtype, eps, activation);
          p.workspace = as_ptr<float>(workspace);
          p.num_threads = num_threads;
          int status;
          {
            py::gil_scoped_release release;
            status = group_norm::group_norm_cpu(p);
          }
          check_status(status, "group_norm");
        });

  m.def("group_norm_workspace_floats",
        [](int64_t batch, int64_t channels, int64_t spatial, int channels_last, int num_threads) {
          return group_norm::workspace_floats(batch, channels, spatial, channels_last, num_threads);
        });
  // How the GPU launchers cut groups into chunks (the Triton launcher asks here).
  m.def("group_norm_gpu_splits", [](int64_t batch, int64_t channels, int64_t spatial, int64_t groups, int sm_count) {
    return group_norm::gpu_splits(batch, channels, spatial, groups, sm_count);
  });

  // Grid combination (csrc/grid_combination): the leading arguments are those of
  // make_grid_params in bind_common.h.
  m.def("grid_combination",
        [](int64_t rows, int64_t channels, int64_t grid, std::uintptr_t x, int64_t x_row_stride, int x_dtype,
           const std::array<std::uintptr_t, 2>& y, const std::array<int64_t, 2>& y_row_stride,
           const std::array<int, 2>& y_dtype, std::uintptr_t out, int out_dtype, std::uintptr_t coefs,
           int64_t num_coefs, int num_threads) {
          grid_combination::Params p = make_grid_params(rows, channels, grid, x, x_row_stride, x_dtype, y,
                                                        y_row_stride, y_dtype, out, out_dtype, coefs, num_coefs);
          p.num_threads = num_threads;
          int status;
          {
            py::gil_scoped_release release;
            status = grid_combination::grid_combination_cpu(p);
          }
          check_status(status, "grid_combination");
        });
}
