// CUDA launcher for the fused solver step and the dynamic-threshold quantile. The element
// math is step_element from solver_step.h; the CPU launcher's step_tile runs the same terms in
// the same order over tiles (sharing its helpers), so only the gpu tests run step_element.
#include "solver_step.h"

#include <cuda_runtime.h>

#include "common/kd_cuda.h"

namespace kdfast {
namespace solver_step {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = grid_cap(65535);
constexpr int64_t kMaxGridX = grid_cap(4096);  // (enough to fill the GPU; each thread loops over the rest)
constexpr int64_t kMaxThresholdBlocks = grid_cap(65536);  // (more samples: each block loops over several)

// Params travels by value in the kernel's parameter space (well under the 4 KB limit), so a
// captured CUDA graph holds each step's coefficients without any device-side table. With a
// row per sample (kRowPerSample: p.coef_rows, a device table the caller keeps alive), each
// thread loads its sample's row into registers before its elements. A block is blockDim.y
// samples of blockDim.x elements: one row of 256 threads for a large sample, several samples
// per block for a small one (a row per token of a few channels), so no thread idles.
template <bool kRowPerSample>
__global__ void __launch_bounds__(kThreads) solver_step_kernel(const Params p) {
  const bool has_cond = p.in[kInCond] != nullptr;
  const unsigned absent = absent_sources(p);
  for (int64_t b = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; b < p.batch;
       b += int64_t(gridDim.y) * blockDim.y) {
    const float dyn = p.threshold == kThresholdDynamic ? p.dynamic_scale[b] : 1.f;
    float row[kRowPerSample ? kNumCoefs : 1];
    if (kRowPerSample) {
#pragma unroll
      for (int i = 0; i < kNumCoefs; ++i) row[i] = __ldg(p.coef_rows + b * kNumCoefs + i);
    }
    const float* c = kRowPerSample ? row : p.coef;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.inner;
         e += int64_t(gridDim.x) * blockDim.x) {
      float vin[kNumInputs], vout[kNumOutputs];
#pragma unroll
      for (int i = 0; i < kNumInputs; ++i)
        vin[i] = p.in[i] ? load_as_float(p.in[i], p.in_dtype[i], b * p.in_stride[i] + e) : 0.f;
      step_element(c, p.guidance_scale, has_cond, p.threshold, p.clip_value, dyn, absent, vin, vout);
#pragma unroll
      for (int k = 0; k < kNumOutputs; ++k)
        if (p.out[k]) store_from_float(p.out[k], p.out_dtype[k], b * p.out_stride[k] + e, vout[k]);
    }
  }
}

__device__ float abs_x0(const ThresholdParams& p, int64_t b, int64_t i) {
  const bool has_cond = p.cond != nullptr;
  const float m = guided(load_as_float(p.model, p.model_dtype, b * p.model_stride + i),
                         has_cond ? load_as_float(p.cond, p.cond_dtype, b * p.cond_stride + i) : 0.f,
                         has_cond, p.guidance_scale);
  return fabsf(p.x0_from_x * load_as_float(p.x, p.x_dtype, b * p.x_stride + i) + p.x0_from_model * m);
}

// k-th smallest |x0| of sample b by 4 radix passes of 8 bits over the float bit pattern
// (non-negative floats order like their bits). Recomputes |x0| each pass instead of
// materialising it: the inputs stay in L2 for SD-sized latents. NaN when a |x0| is NaN (bits
// above inf's), as torch.quantile gives. The counts are 64-bit: a sample of 2^32 or more
// elements (an 8 GiB bf16 video latent) would wrap 32-bit ones and pick the wrong bin.
__device__ float radix_select(const ThresholdParams& p, int64_t b, int64_t k, unsigned long long* hist,
                              unsigned* shared_prefix, long long* shared_k) {
  unsigned prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    int nan_seen = 0;
    // Whole warps step together (blockDim.x is a multiple of 32), so that each warp can add its
    // lanes' counts once per distinct bin: nearby magnitudes share their top byte, and one
    // atomic per lane would serialise on one or two bins in the first pass.
    for (int64_t base = 0; base < p.inner; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      unsigned bin = 256u;  // no count: past the end, or outside the prefix found so far
      if (i < p.inner) {
        const unsigned bits = __float_as_uint(abs_x0(p, b, i));
        nan_seen |= bits > 0x7f800000u;
        if ((bits & mask) == prefix) bin = (bits >> shift) & 255u;
      }
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin < 256u && __ffs(peers) - 1 == int(threadIdx.x & 31u)) atomicAdd(&hist[bin], (unsigned long long)__popc(peers));
    }
    if (__syncthreads_or(nan_seen)) return NAN;  // the same answer in every thread: a uniform exit
    if (threadIdx.x == 0) {
      long long kk = k;
      unsigned bin = 0;
      for (; bin < 255; ++bin) {
        if (kk < (long long)hist[bin]) break;
        kk -= (long long)hist[bin];
      }
      *shared_prefix = prefix | (bin << shift);
      *shared_k = kk;
    }
    __syncthreads();
    prefix = *shared_prefix;
    k = *shared_k;
    mask |= 255u << shift;
    __syncthreads();
  }
  return __uint_as_float(prefix);
}

__global__ void __launch_bounds__(kThreads) threshold_scale_kernel(const ThresholdParams p) {
  __shared__ unsigned long long hist[256];
  __shared__ unsigned shared_prefix;
  __shared__ long long shared_k;
  const QuantilePosition at = quantile_position(p.ratio, p.inner);
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const float vlo = radix_select(p, b, at.lo, hist, &shared_prefix, &shared_k);
    const float vhi = at.hi == at.lo ? vlo : radix_select(p, b, at.hi, hist, &shared_prefix, &shared_k);
    if (threadIdx.x == 0) {
      const float s = quantile_lerp(vlo, vhi, at.frac);
      const float clamped_lo = s < 1.f ? 1.f : s;
      p.out[b] = clamped_lo > p.max_value ? p.max_value : clamped_lo;
    }
  }
}

}  // namespace

int solver_step_cuda(const Params& p) {
  if (p.batch < 0 || p.inner < 0 || !p.in[kInX] || !p.in[kInModel]) return kBadArgument;
  if (!valid_dtypes(p)) return kBadDType;
  if (p.threshold == kThresholdDynamic && !p.dynamic_scale) return kBadArgument;
  if (p.batch == 0 || p.inner == 0) return kOk;
  // Threads per sample: 256, or the sample's size rounded up to a warp when it is smaller,
  // the block's other threads taking the next samples.
  const int64_t warps = (p.inner + 31) / 32;
  const unsigned threads_x = unsigned(warps * 32 < kThreads ? warps * 32 : kThreads);
  const unsigned threads_y = kThreads / threads_x;
  const int64_t blocks_x = (p.inner + threads_x - 1) / threads_x;
  const int64_t blocks_y = (p.batch + threads_y - 1) / threads_y;
  // Enough blocks to fill the GPU; each thread loops over the rest.
  const dim3 grid(unsigned(blocks_x < kMaxGridX ? blocks_x : kMaxGridX),
                  unsigned(blocks_y < kMaxGridY ? blocks_y : kMaxGridY));
  const dim3 block(threads_x, threads_y);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (p.coef_rows)
    solver_step_kernel<true><<<grid, block, 0, stream>>>(p);
  else
    solver_step_kernel<false><<<grid, block, 0, stream>>>(p);
  return launch_status();
}

int threshold_scale_cuda(const ThresholdParams& p) {
  if (p.batch < 0 || p.inner <= 0 || !p.x || !p.model || !p.out) return kBadArgument;
  if (!valid_dtypes(p)) return kBadDType;
  if (p.batch == 0) return kOk;
  // One block per sample, the blocks looping over the samples past the grid's limit.
  const unsigned blocks = unsigned(p.batch < kMaxThresholdBlocks ? p.batch : kMaxThresholdBlocks);
  threshold_scale_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  return launch_status();
}

}  // namespace solver_step
}  // namespace kdfast
