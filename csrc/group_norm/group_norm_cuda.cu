// CUDA launcher of the fused group norm + activation. Enough (sample, group) pairs to fill the
// GPU: one block per pair reads its group three times (sum, squared deviation, output), the
// second and third reads from L2 for groups up to a few MB. Too few pairs (a batch of one or
// two at SD sizes): each group is cut into chunks (gpu_splits in group_norm.h), one kernel
// writes each chunk's moments about a per-group pivot and a second gathers them and
// normalises the chunk. Sums are double, in a fixed order (deterministic). The per-element
// math is group_norm.h's, the code the CPU launcher runs.
#include "group_norm.h"

#include <cuda_runtime.h>

#include "common/kd_cuda.h"

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

// 32-bit division (a group holds fewer than 2^31 elements: the launcher checks).
__device__ __forceinline__ GroupIndex group_index(const Params& p, int64_t c0, int64_t cpg, int64_t i) {
  const uint32_t ii = uint32_t(i);
  if (p.channels_last) {
    const uint32_t px = ii / uint32_t(cpg), c = ii - px * uint32_t(cpg);
    return GroupIndex{c0 + c, int64_t(px) * p.channels + c0 + c};
  }
  const uint32_t c = ii / uint32_t(p.spatial), s = ii - c * uint32_t(p.spatial);
  return GroupIndex{c0 + c, (c0 + c) * p.spatial + s};
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
  // its spread keeps float accuracy), and x + shift is formed in double (a shift far larger
  // than the spread of x, which float would round to it, keeps x's accuracy); memory, not
  // arithmetic, bounds this kernel.
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const GroupIndex k = group_index(p, c0, cpg, i);
    s += double(load_as_float(p.x, p.x_dtype, x0 + k.offset)) + double(shift_at(p, b, k.c));
  }
  const double mean = block_sum(s, scratch) / double(n);

  double sq = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const GroupIndex k = group_index(p, c0, cpg, i);
    const double d = double(load_as_float(p.x, p.x_dtype, x0 + k.offset)) - (mean - double(shift_at(p, b, k.c)));
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

// ---- split groups: block (pair, chunk) of a grid of pairs * splits blocks.

// The value the statistics are taken about: the group's first element (plus its shift), so
// that the double sums see deviations of the order of the spread, not of the mean.
__device__ __forceinline__ double group_pivot(const Params& p, int64_t b, int64_t c0) {
  return double(load_as_float(p.x, p.x_dtype, b * p.x_stride + group_index(p, c0, 1, 0).offset)) +
         double(shift_at(p, b, c0));
}

__global__ void __launch_bounds__(kThreads) chunk_moments_kernel(const Params p, int64_t splits, int64_t chunk,
                                                                  double* partial) {
  __shared__ double scratch[kWarps];
  const int64_t pair = blockIdx.x / splits, k = blockIdx.x % splits;
  const int64_t b = pair / p.groups, g = pair % p.groups;
  const int64_t cpg = p.channels / p.groups, c0 = g * cpg, n = cpg * p.spatial;
  const int64_t i1 = min(n, (k + 1) * chunk), x0 = b * p.x_stride;
  const double pivot = group_pivot(p, b, c0);
  double s = 0.0, sq = 0.0;
  for (int64_t i = k * chunk + threadIdx.x; i < i1; i += kThreads) {
    const GroupIndex at = group_index(p, c0, cpg, i);
    const double d = double(load_as_float(p.x, p.x_dtype, x0 + at.offset)) + double(shift_at(p, b, at.c)) - pivot;
    s += d;
    sq += d * d;
  }
  s = block_sum(s, scratch);
  sq = block_sum(sq, scratch);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = s;
    partial[2 * blockIdx.x + 1] = sq;
  }
}

__global__ void __launch_bounds__(kThreads) chunk_normalize_kernel(const Params p, int64_t splits, int64_t chunk,
                                                                    const double* partial) {
  __shared__ double scratch[kWarps];
  const int64_t pair = blockIdx.x / splits, k = blockIdx.x % splits;
  const int64_t b = pair / p.groups, g = pair % p.groups;
  const int64_t cpg = p.channels / p.groups, c0 = g * cpg, n = cpg * p.spatial;
  const int64_t i1 = min(n, (k + 1) * chunk), x0 = b * p.x_stride, o0 = b * p.out_stride;
  // every block of the group gathers the same partials in the same order
  double s = 0.0, sq = 0.0;
  for (int64_t j = threadIdx.x; j < splits; j += kThreads) {
    s += partial[2 * (pair * splits + j)];
    sq += partial[2 * (pair * splits + j) + 1];
  }
  s = block_sum(s, scratch) / double(n);
  sq = block_sum(sq, scratch) / double(n);
  const double mean = group_pivot(p, b, c0) + s;
  const double var = sq - s * s;
  const float rstd = inverse_std(var < 0.0 ? 0.0 : var, p.eps);  // (a NaN stays NaN)
  for (int64_t i = k * chunk + threadIdx.x; i < i1; i += kThreads) {
    const GroupIndex at = group_index(p, c0, cpg, i);
    const ChannelConsts cc = channel_consts(mean, rstd, shift_at(p, b, at.c), weight_at(p, at.c), bias_at(p, at.c));
    store_from_float(p.out, p.out_dtype, o0 + at.offset,
                     normalize(cc, p.activation, load_as_float(p.x, p.x_dtype, x0 + at.offset)));
  }
}

}  // namespace

int group_norm_cuda(const Params& p) {
  if (!valid_params(p)) return kBadArgument;
  if (!valid_dtype(p.x_dtype) || !valid_dtype(p.out_dtype) || !valid_dtype(p.affine_dtype) ||
      (p.shift && !valid_dtype(p.shift_dtype)))
    return kBadDType;
  const int64_t pairs = p.batch * p.groups, n_group = p.channels / p.groups * p.spatial;
  if (pairs == 0) return kOk;
  if (n_group > 0x7fffffffLL) return kBadArgument;  // group_index divides in 32 bits
  const int64_t splits = gpu_splits(p.batch, p.channels, p.spatial, p.groups, p.sm_count);
  if (pairs * splits > 0x7fffffffLL) return kBadArgument;
  const auto stream = static_cast<cudaStream_t>(p.stream);
  if (splits == 1) {
    group_norm_kernel<<<unsigned(pairs), kThreads, 0, stream>>>(p);
  } else {
    if (!p.cuda_workspace) return kBadArgument;
    double* partial = static_cast<double*>(p.cuda_workspace);
    const int64_t chunk = gpu_chunk(n_group, splits);
    chunk_moments_kernel<<<unsigned(pairs * splits), kThreads, 0, stream>>>(p, splits, chunk, partial);
    chunk_normalize_kernel<<<unsigned(pairs * splits), kThreads, 0, stream>>>(p, splits, chunk, partial);
  }
  return launch_status();
}

}  // namespace group_norm
}  // namespace kdfast
