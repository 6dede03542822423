// Python bindings of the CPU kernels (module kdfast._C). Integers in, status out.
#include "bind_common.h"

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
           const std::array<int, kNumOutputs>& out_dtype, std::uintptr_t coef, float guidance_scale,
           int threshold, float clip_value, std::uintptr_t dynamic_scale, int num_threads) {
          Params p = make_step_params(batch, inner, in_ptr, in_stride, in_dtype, out_ptr, out_stride,
                                      out_dtype, coef, guidance_scale, threshold, clip_value, dynamic_scale);
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
                            float beta, float inv_temperature, float loss_scale, std::uintptr_t workspace,
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

  m.def("build_info", []() {
    py::dict d;
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
}
