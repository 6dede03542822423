// CUDA launcher of the fused group norm + activation: one block per (sample, group). The
// block reads its group three times (sum, squared deviation, output); the second and third
// reads hit L2 for groups up to a few MB. Sums are double, in a fixed order (deterministic). The per-element math is group_norm.h's, the code
// the CPU launcher runs.
#include "group_norm.h"

#include <cuda_runtime.h>

namespace kdfast {
namespace group_norm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Element i of a group (of cpg channels x spatial) -> (channel within the group, offset within
// the sample). Channels-last: consecutive i walk the group's channels of one pixel first.
struct GroupIndex {
  int64_t c;
  int64_t offset;
};

__device__ __forceinline__ GroupIndex group_index(const Params& p, int64_t c0, int64_t cpg, int64_t i) {
  if (p.channels_last) {
    const int64_t px = i / cpg, c = c0 + i % cpg;
    return GroupIndex{c, px * p.channels + c};
  }
  const int64_t c = c0 + i / p.spatial;
  return GroupIndex{c, c * p.spatial + i % p.spatial};
}

// The block's sum of `v` (one value per thread), returned to every thread.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

__global__ void __launch_bounds__(kThreads) group_norm_kernel(const Params p) {
  __shared__ double scratch[kWarps];
  const int64_t task = blockIdx.x;
  const int64_t b = task / p.groups, g = task % p.groups;
  const int64_t cpg = p.channels / p.groups, c0 = g * cpg, n = cpg * p.spatial;
  const int64_t x0 = b * p.x_stride, o0 = b * p.out_stride;

  // double per-thread sums: a thread adds n / 256 terms of any size (a group mean 1e4 times
  // its spread keeps float accuracy); memory, not arithmetic, bounds this kernel.
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const GroupIndex k = group_index(p, c0, cpg, i);
    s += load_as_float(p.x, p.x_dtype, x0 + k.offset) + shift_at(p, b, k.c);
  }
  const double mean = block_sum(s, scratch) / double(n);

  double sq = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const GroupIndex k = group_index(p, c0, cpg, i);
    const float d = load_as_float(p.x, p.x_dtype, x0 + k.offset) - float(mean - double(shift_at(p, b, k.c)));
    sq += d * d;
  }
  const float rstd = inverse_std(block_sum(sq, scratch) / double(n), p.eps);

  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const GroupIndex k = group_index(p, c0, cpg, i);
    const ChannelConsts cc = channel_consts(mean, rstd, shift_at(p, b, k.c), weight_at(p, k.c), bias_at(p, k.c));
    store_from_float(p.out, p.out_dtype, o0 + k.offset,
                     normalize(cc, p.activation, load_as_float(p.x, p.x_dtype, x0 + k.offset)));
  }
}

bool valid_dtype(int d) { return d == kFloat32 || d == kFloat16 || d == kBFloat16; }

}  // namespace

int group_norm_cuda(const Params& p) {
  if (!valid_params(p)) return kBadArgument;
  if (!valid_dtype(p.x_dtype) || !valid_dtype(p.out_dtype) || !valid_dtype(p.affine_dtype) ||
      (p.shift && !valid_dtype(p.shift_dtype)))
    return kBadDType;
  const int64_t blocks = p.batch * p.groups;
  if (blocks == 0) return kOk;
  if (blocks > 0x7fffffffLL) return kBadArgument;
  group_norm_kernel<<<unsigned(blocks), kThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
}

}  // namespace group_norm
}  // namespace kdfast
