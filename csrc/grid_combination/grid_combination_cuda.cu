// CUDA launcher for the grid combination: a thread per output element (flat over rows x
// channels, so that narrow rows still fill whole warps), add_weighted's terms in its order.
// Consecutive threads read consecutive channels of each grid point: the loads of a warp are
// coalesced runs of C elements, and a zero weight skips its grid point's memory.
#include "grid_combination.h"

#include <cuda_runtime.h>

#include "common/kd_cuda.h"

namespace kdfast {
namespace grid_combination {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) grid_combination_kernel(const Params p) {
  const int64_t total = p.rows * p.channels;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / p.channels;
    const int64_t c = e - r * p.channels;
    float acc = add_weighted(0.f, p.sample_weight, p.sample_weight == 0.f ? 0.f
                                                     : load_as_float(p.x, p.x_dtype, r * p.x_row_stride + c));
    for (int k = 0; k < p.num_outputs; ++k) {
      const int64_t row = r * p.y_row_stride[k] + c;
      for (int64_t g = 0; g < p.grid; ++g) {
        const float w = p.weights[k * p.grid + g];
        if (w != 0.f) acc = add_weighted(acc, w, load_as_float(p.y[k], p.y_dtype[k], row + g * p.channels));
      }
    }
    store_from_float(p.out, p.out_dtype, e, acc);
  }
}

}  // namespace

int grid_combination_cuda(const Params& p) {
  if (!valid_params(p)) return kBadArgument;
  if (!valid_dtypes(p)) return kBadDType;
  if (p.rows == 0 || p.channels == 0) return kOk;
  const int64_t blocks = (p.rows * p.channels + kThreads - 1) / kThreads;
  // Enough blocks to fill the GPU; each thread loops over the rest.
  const unsigned grid = unsigned(grid_cap(blocks < 65536 ? blocks : 65536));
  grid_combination_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  return launch_status();
}

}  // namespace grid_combination
}  // namespace kdfast
