// Grid combination: params struct and the per-element math shared by the CPU and CUDA launchers.
//
// A model that predicts a grid of G values per channel (pi-Flow's policy models) has an output
// G times wider than the sample in its last dimension, grid point g of row r at
// y[r, g * C:(g + 1) * C]. A step of such a sampler is a fixed linear combination of the sample
// and the grid points, with weights the host computes once per step:
//
//   out[r, c] = a * x[r, c] + sum_k sum_g w[k][g] * y_k[r, g * C + c]
//
// for one or two outputs y_k (two: the unconditional and conditional outputs, guidance folded
// into their weights). One pass: x and each y_k are read once, out written once. The weights
// travel by value (kernel arguments), so a launch reads no host memory and can be captured.
#pragma once
#include <cstdint>

#include "../common/kd_common.h"

namespace kdfast {
namespace grid_combination {

constexpr int kMaxOutputs = 2;
constexpr int kMaxWeights = 128;  // outputs * grid; more go to the reference implementation

struct Params {
  int64_t rows = 0;      // sample rows: every dimension of the sample but the last
  int64_t channels = 0;  // C: the sample's last dimension, contiguous
  int64_t grid = 0;      // G: grid points per channel
  int num_outputs = 0;   // 1 or 2
  const void* x = nullptr;
  int64_t x_row_stride = 0;  // elements between rows
  int x_dtype = 0;
  const void* y[kMaxOutputs] = {};
  int64_t y_row_stride[kMaxOutputs] = {};  // elements between rows of G * C
  int y_dtype[kMaxOutputs] = {};
  void* out = nullptr;  // [rows, C], contiguous
  int out_dtype = 0;
  float sample_weight = 0.f;   // a
  float weights[kMaxWeights] = {};  // w[k][g] at k * grid + g
  int num_threads = 1;  // CPU launcher only
  void* stream = nullptr;  // CUDA launcher only
};

// One term. A zero weight drops its term (a grid point holding inf or NaN that the step does
// not use cannot poison it), and the product is rounded before the sum (no FMA), so that the
// CPU and CUDA launchers give the same bits.
KD_HD float add_weighted(float acc, float w, float v) {
#if defined(__CUDA_ARCH__)
  return w == 0.f ? acc : __fadd_rn(acc, __fmul_rn(w, v));
#else
  return w == 0.f ? acc : acc + w * v;
#endif
}

// Launchers: return a Status; never throw.
int grid_combination_cpu(const Params& p);
#if defined(KDFAST_WITH_CUDA)
int grid_combination_cuda(const Params& p);
#endif

// Checks shared by the launchers.
inline bool valid_params(const Params& p) {
  if (p.rows < 0 || p.channels < 0 || p.grid < 1 || p.num_outputs < 1 || p.num_outputs > kMaxOutputs) return false;
  if (int64_t(p.num_outputs) * p.grid > kMaxWeights || !p.x || !p.out) return false;
  for (int k = 0; k < p.num_outputs; ++k)
    if (!p.y[k]) return false;
  return true;
}
inline bool valid_dtypes(const Params& p) {
  if (!valid_dtype(p.x_dtype) || !valid_dtype(p.out_dtype)) return false;
  for (int k = 0; k < p.num_outputs; ++k)
    if (!valid_dtype(p.y_dtype[k])) return false;
  return true;
}

}  // namespace grid_combination
}  // namespace kdfast
