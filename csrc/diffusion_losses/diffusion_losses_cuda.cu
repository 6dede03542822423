// CUDA launcher of the fused diffusion losses. Grid (tiles, samples): each block reduces one
// tile of kCudaTile elements of one sample into the workspace (float64 partial sums), and a
// one-warp-per-sample kernel adds a sample's partials in tile order (deterministic, no atomics)
// and writes its loss. The backward and the combination are one element pass on the same grid.
// The element math is forward_terms / grad_element from diffusion_losses.h, the code the CPU
// launcher runs.
#include "diffusion_losses.h"

#include <cuda_runtime.h>

#include "common/kd_cuda.h"

namespace kdfast {
namespace diffusion_losses {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = grid_cap(65535);

struct SampleConsts {
  float c;
  double ca, cb;
};

__device__ __forceinline__ SampleConsts sample_consts(const Params& p, int64_t b) {
  SampleConsts k{0.f, 0.0, 0.0};
  if (p.kind == kPseudoHuber || p.kind == kPseudoHuberElementwise) k.c = float(p.param[kC].at(b));
  if (p.kind == kProgressiveMSE) sample_coefficients(p, b, kPDTarget, k.ca, k.cb);
  return k;
}

// Inputs the kind does not read alias in[0] (their values are never used).
__device__ __forceinline__ float load_input(const Params& p, int i, int64_t b, int64_t e) {
  return load_as_float(p.in[i], p.in_dtype[i], b * p.in_stride[i] + e);
}

template <int KIND>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const Params p, int64_t tiles) {
  __shared__ double scratch[2][kWarps];
  const int num_inputs = KIND == kPseudoHuber || KIND == kPseudoHuberElementwise ? 2 : 3;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const SampleConsts k = sample_consts(p, b);
    const int64_t start = int64_t(blockIdx.x) * kCudaTile;
    const int64_t end = p.inner < start + kCudaTile ? p.inner : start + kCudaTile;
    double s0 = 0.0, s1 = 0.0;
    for (int64_t e = start + threadIdx.x; e < end; e += kThreads) {
      const float v0 = load_input(p, 0, b, e), v1 = load_input(p, 1, b, e);
      const float v2 = num_inputs > 2 ? load_input(p, 2, b, e) : v0;
      double t0, t1;
      forward_terms<KIND>(v0, v1, v2, k.c, k.ca, k.cb, t0, t1);
      s0 += t0;
      s1 += t1;
    }
    for (int o = 16; o > 0; o >>= 1) {
      s0 += __shfl_xor_sync(0xffffffffu, s0, o);
      s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) {
      scratch[0][warp] = s0;
      scratch[1][warp] = s1;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double r0 = 0.0, r1 = 0.0;
      for (int i = 0; i < kWarps; ++i) {
        r0 += scratch[0][i];
        r1 += scratch[1][i];
      }
      const int64_t slot = b * tiles + blockIdx.x;
      p.workspace[2 * slot] = r0;
      p.workspace[2 * slot + 1] = r1;
    }
  }
}

// One warp per sample: the sample's partial sums in a fixed order, then its loss.
__global__ void finish_kernel(const Params p, int64_t tiles) {
  const int64_t b = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= p.batch) return;
  double s0 = 0.0, s1 = 0.0;
  for (int64_t j = lane; j < tiles; j += 32) {
    s0 += p.workspace[2 * (b * tiles + j)];
    s1 += p.workspace[2 * (b * tiles + j) + 1];
  }
  for (int o = 16; o > 0; o >>= 1) {
    s0 += __shfl_xor_sync(0xffffffffu, s0, o);
    s1 += __shfl_xor_sync(0xffffffffu, s1, o);
  }
  if (lane != 0) return;
  double raw, stat;
  finish_sample(p.kind, s0, s1, p.param[kC].at(b), p.inner, raw, stat);
  p.loss[b] = weighted(p.param[kWeight].at(b), raw);
  p.aux[2 * b] = raw;
  p.aux[2 * b + 1] = stat;
}

template <int KIND>
__global__ void __launch_bounds__(kThreads) grad_kernel(const Params p) {
  const int num_inputs = KIND == kPseudoHuber || KIND == kPseudoHuberElementwise ? 2 : 3;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const SampleConsts k = sample_consts(p, b);
    const double w = p.param[kWeight].at(b);
    const double scale = w == 0.0 ? 0.0 : w * double(p.grad_loss[b * p.grad_loss_stride]);
    const double factor = grad_factor(KIND, scale, p.aux[2 * b + 1], p.inner);
    const int64_t start = int64_t(blockIdx.x) * kCudaTile;
    const int64_t end = p.inner < start + kCudaTile ? p.inner : start + kCudaTile;
    for (int64_t e = start + threadIdx.x; e < end; e += kThreads) {
      const float v1 = load_input(p, 1, b, e);
      const float v0 = KIND == kDMD ? v1 : load_input(p, 0, b, e);  // DMD's gradient ignores x_t
      const float v2 = num_inputs > 2 ? load_input(p, 2, b, e) : v0;
      // a sample of zero weight (or zero incoming gradient) gets 0, even where it holds NaN or inf,
      // as the forward leaves it out of the loss
      const float g = scale == 0.0 ? 0.f : float(grad_element<KIND>(v0, v1, v2, k.c, k.ca, k.cb, factor));
      if (p.grad[0]) store_from_float(p.grad[0], p.grad_dtype[0], b * p.inner + e, g);
      if (p.grad[1]) store_from_float(p.grad[1], p.grad_dtype[1], b * p.inner + e, -g);
    }
  }
}

__global__ void __launch_bounds__(kThreads) combination_kernel(const Params p) {
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    double ca, cb;
    sample_coefficients(p, b, p.combination, ca, cb);
    const int64_t start = int64_t(blockIdx.x) * kCudaTile;
    const int64_t end = p.inner < start + kCudaTile ? p.inner : start + kCudaTile;
    for (int64_t e = start + threadIdx.x; e < end; e += kThreads) {
      const double v = ca * double(load_input(p, 0, b, e)) + cb * double(load_input(p, 1, b, e));
      store_from_float(p.grad[0], p.grad_dtype[0], b * p.inner + e, float(v));
    }
  }
}

int check_inputs(const Params& p, int num_inputs) {
  if (p.batch < 0 || p.inner <= 0) return kBadArgument;
  for (int i = 0; i < num_inputs; ++i) {
    if (!p.in[i]) return kBadArgument;
    if (!valid_dtype(p.in_dtype[i])) return kBadDType;
  }
  return kOk;
}

int inputs_of(int kind) { return kind == kPseudoHuber || kind == kPseudoHuberElementwise ? 2 : 3; }

dim3 tile_grid(const Params& p, int64_t tiles) {
  return dim3(unsigned(tiles), unsigned(p.batch < kMaxGridY ? p.batch : kMaxGridY));
}


}  // namespace

int loss_forward_cuda(const Params& p) {
  if (p.kind < 0 || p.kind >= kNumKinds || !p.loss || !p.aux || !p.workspace) return kBadArgument;
  if (int s = check_inputs(p, inputs_of(p.kind))) return s;
  if (p.batch == 0) return kOk;
  const int64_t tiles = tiles_per_sample(p.inner, kCudaTile);
  if (tiles > 0x7fffffff) return kBadArgument;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const dim3 grid = tile_grid(p, tiles);
  switch (p.kind) {
    case kPseudoHuber: reduce_kernel<kPseudoHuber><<<grid, kThreads, 0, stream>>>(p, tiles); break;
    case kPseudoHuberElementwise:
      reduce_kernel<kPseudoHuberElementwise><<<grid, kThreads, 0, stream>>>(p, tiles);
      break;
    case kDMD: reduce_kernel<kDMD><<<grid, kThreads, 0, stream>>>(p, tiles); break;
    default: reduce_kernel<kProgressiveMSE><<<grid, kThreads, 0, stream>>>(p, tiles); break;
  }
  const int per_block = kThreads / 32;
  finish_kernel<<<unsigned((p.batch + per_block - 1) / per_block), kThreads, 0, stream>>>(p, tiles);
  return launch_status();
}

int loss_backward_cuda(const Params& p) {
  if (p.kind < 0 || p.kind >= kNumKinds || !p.aux || !p.grad_loss) return kBadArgument;
  if (int s = check_inputs(p, inputs_of(p.kind))) return s;
  for (int k = 0; k < kMaxGrads; ++k)
    if (p.grad[k] && !valid_dtype(p.grad_dtype[k])) return kBadDType;
  if (p.grad[1] && !(p.kind == kPseudoHuber || p.kind == kPseudoHuberElementwise)) return kBadArgument;
  if ((!p.grad[0] && !p.grad[1]) || p.batch == 0) return kOk;
  const int64_t tiles = tiles_per_sample(p.inner, kCudaTile);
  if (tiles > 0x7fffffff) return kBadArgument;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const dim3 grid = tile_grid(p, tiles);
  switch (p.kind) {
    case kPseudoHuber: grad_kernel<kPseudoHuber><<<grid, kThreads, 0, stream>>>(p); break;
    case kPseudoHuberElementwise: grad_kernel<kPseudoHuberElementwise><<<grid, kThreads, 0, stream>>>(p); break;
    case kDMD: grad_kernel<kDMD><<<grid, kThreads, 0, stream>>>(p); break;
    default: grad_kernel<kProgressiveMSE><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return launch_status();
}

int sample_combination_cuda(const Params& p) {
  if (p.combination < 0 || p.combination >= kNumCombinations || !p.grad[0]) return kBadArgument;
  if (int s = check_inputs(p, 2)) return s;
  if (!valid_dtype(p.grad_dtype[0])) return kBadDType;
  if (p.batch == 0) return kOk;
  const int64_t tiles = tiles_per_sample(p.inner, kCudaTile);
  if (tiles > 0x7fffffff) return kBadArgument;
  combination_kernel<<<tile_grid(p, tiles), kThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  return launch_status();
}

}  // namespace diffusion_losses
}  // namespace kdfast
