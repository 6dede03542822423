// What the CUDA launchers share: how a launch reports failure, and the online log-sum-exp of
// the softmax kernels.
#pragma once
#include <cuda_runtime.h>

#include "common/kd_common.h"

// The launches cap the blocks along each grid axis (CUDA's y and z axes stop at 65535; past a
// few thousand blocks the GPU is full anyway) and the kernels loop over the rest. The tests'
// CUDA emulator builds with a cap of a few blocks, so that every batch of a few rows runs
// those loops (a batch past 65535 rows would take it minutes).
#ifndef KDFAST_GRID_CAP
#define KDFAST_GRID_CAP 65536
#endif

namespace kdfast {

// ``blocks``, or KDFAST_GRID_CAP when that is smaller.
constexpr int64_t grid_cap(int64_t blocks) { return blocks < KDFAST_GRID_CAP ? blocks : KDFAST_GRID_CAP; }

// The status of the launches just made. The error itself is left pending (peeked, not
// cleared) so that the binding can name it (bind_cuda.cpp's check_launch clears it).
inline int launch_status() { return cudaPeekAtLastError() == cudaSuccess ? kOk : kLaunchFailed; }

// Running (max, sum of exp((x - max) / T)) of a stream of logits x, the max in logit units
// (kd_common.h: tempered_shift; inv_t = 1 / T). NaN is sticky in both: a NaN entry must leave
// the row without a distribution (NaN loss and gradient), and the -inf checks below would
// otherwise drop a NaN partner in a merge.
struct Lse {
  float m, z;
};

__device__ __forceinline__ Lse lse_push(Lse a, float x, float inv_t) {
  if (x != x || a.m != a.m) return Lse{NAN, NAN};
  if (x == -INFINITY) return a;  // probability 0 (also keeps -inf - -inf out of exp)
  if (x <= a.m) return Lse{a.m, a.z + kd_exp(tempered_shift(x, a.m, inv_t))};
  // x is a new maximum (or a.m is -inf): rescale the running sum.
  const float z = a.m == -INFINITY ? 0.f : a.z * kd_exp(tempered_shift(a.m, x, inv_t));
  return Lse{x, z + 1.f};
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b, float inv_t) {
  if (a.m != a.m || b.m != b.m) return Lse{NAN, NAN};
  if (a.m < b.m) { const Lse t = a; a = b; b = t; }
  if (b.m == -INFINITY) return a;
  return Lse{a.m, a.z + b.z * kd_exp(tempered_shift(b.m, a.m, inv_t))};
}

}  // namespace kdfast
