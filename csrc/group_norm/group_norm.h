// Fused group normalisation + activation for UNet inference: y = act(GroupNorm(x + shift)),
// one read for the statistics, one for the variance and one read + one write for the output,
// where torch runs an add, a group norm and an activation as three kernels (each a full
// read and write of the feature map).
//
// x is [batch, channels, spatial...], each sample one dense block laid out channel-major
// ([channels, spatial], torch's contiguous format) or channels-last ([spatial, channels]).
// `shift` ([batch, channels], optional) is added to x before the statistics: the time / class
// embedding a UNet ResBlock adds between its convolutions, never materialised. Statistics are
// two-pass (mean, then the mean squared deviation from it) with float partial sums gathered
// in double, so a group of any size keeps float32 accuracy; the mean's sums are of deviations
// from the group's first element, so they stay of the order of the group's spread at any
// offset (a constant group's mean is exact, its output act(bias), as torch gives).
//
// The per-element math below is shared by the CPU and CUDA launchers (and mirrored by the
// torch reference in kdfast/reference/group_norm.py).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/kd_common.h"
#include "common/kd_cpu.h"

namespace kdfast {
namespace group_norm {

// Same order as ACTIVATIONS in kdfast/ops/group_norm.py.
enum Activation : int { kIdentity = 0, kSiLU = 1 };
constexpr int kNumActivations = 2;

struct Params {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t spatial = 0;  // elements per channel of one sample (H * W, or 1)
  int64_t groups = 1;
  int channels_last = 0;  // x and out: [spatial, channels] per sample, else [channels, spatial]
  const void* x = nullptr;
  int64_t x_stride = 0;  // elements between samples
  int x_dtype = kFloat32;
  void* out = nullptr;   // laid out as x, not overlapping it (the CUDA split path reads x again)
  int64_t out_stride = 0;
  int out_dtype = kFloat32;
  const void* shift = nullptr;  // [batch, channels] at these strides, or null
  int64_t shift_batch_stride = 0;
  int64_t shift_channel_stride = 0;
  int shift_dtype = kFloat32;
  const void* weight = nullptr;  // [channels] contiguous, or null (1)
  const void* bias = nullptr;    // [channels] contiguous, or null (0)
  int affine_dtype = kFloat32;
  float eps = 1e-5f;
  int activation = kSiLU;
  float* workspace = nullptr;  // CPU: workspace_floats(batch, channels, spatial, channels_last, num_threads)
  int num_threads = 1;
  // CUDA: the device's multiprocessor count (it decides gpu_splits) and, when groups are
  // split, cuda_workspace_doubles(...) doubles of 8-byte aligned scratch in `cuda_workspace`
  int sm_count = 1;
  void* cuda_workspace = nullptr;
  void* stream = nullptr;
};

// CPU: fp16 / bf16 samples are widened to fp32 in blocks of this many elements.
constexpr int64_t kCpuBlock = 4096;

// CPU, channels-last: pixels per block, the unit of the float partial sums (at most 256, so
// float rounding stays that of a 256-term sum for any image size) and of the widening.
inline int64_t cl_rows_per_block(int64_t channels) {
  const int64_t rows = kCpuBlock / channels;
  return rows < 1 ? 1 : (rows > 256 ? 256 : rows);
}
inline int64_t cl_blocks(int64_t channels, int64_t spatial) {
  const int64_t rows = cl_rows_per_block(channels);
  return (spatial + rows - 1) / rows;
}

// CPU, channel-major: below this many elements per channel a task takes a run of whole groups
// (one block) and sweeps it flat, since per-channel loops of a few elements cost more in
// overhead than they compute.
constexpr int64_t kSmallSpatial = 64;
inline bool small_groups(int channels_last, int64_t channels, int64_t spatial, int64_t groups) {
  return !channels_last && spatial < kSmallSpatial && (channels / groups) * spatial <= kCpuBlock;
}

// CPU scratch of one thread: per-channel and per-group double sums, per-channel constants,
// one widened block (of one pixel at least; an even count, so every thread's share stays
// 8-byte aligned) and the block's per-element centers, scales and biases (small groups).
inline int64_t block_floats(int64_t channels) {
  return channels > kCpuBlock ? channels + (channels & 1) : kCpuBlock;
}
inline int64_t per_thread_floats(int64_t channels) { return 10 * channels + block_floats(channels) + 3 * kCpuBlock; }

// Whether a channels-last call splits samples into (sample, block) tasks: when there are fewer
// samples than threads, a sample has more than one block and there is work enough for two
// threads (below that, one thread does the whole call: waking the others costs more).
inline bool split_samples(int channels_last, int64_t batch, int64_t channels, int64_t spatial, int num_threads) {
  return channels_last && batch < num_threads && cl_blocks(channels, spatial) > 1 &&
         batch * channels * spatial >= 2 * cpu::kMinElementsPerThread;
}

// The CPU launcher's workspace (floats) for a call: per-thread scratch, plus, when samples are
// split, every block's partial sums and every sample's sums and constants.
inline int64_t workspace_floats(int64_t batch, int64_t channels, int64_t spatial, int channels_last,
                                int num_threads) {
  const int64_t threads = num_threads < 1 ? 1 : num_threads;
  int64_t total = per_thread_floats(channels) * threads;
  if (split_samples(channels_last, batch, channels, spatial, num_threads))
    total += 4 * batch * channels + batch * cl_blocks(channels, spatial) * channels + 3 * batch * channels;
  return total;
}

// GPU (CUDA and Triton): one block per (sample, group) reads its group three times, the last
// two from L2. When there are too few (sample, group) pairs to fill the GPU, each group is cut
// into up to kGpuMaxSplits chunks of at least kGpuChunk elements instead: one kernel writes
// each chunk's moments, a second gathers them and normalises the chunk.
constexpr int64_t kGpuChunk = 4096;
constexpr int64_t kGpuMaxSplits = 64;
inline int64_t gpu_splits(int64_t batch, int64_t channels, int64_t spatial, int64_t groups, int sm_count) {
  const int64_t pairs = batch * groups, n_group = channels / groups * spatial;
  const int64_t wanted_blocks = 4 * int64_t(sm_count < 1 ? 1 : sm_count);
  if (pairs == 0 || pairs >= wanted_blocks / 2 || n_group < 2 * kGpuChunk) return 1;
  int64_t splits = (wanted_blocks + pairs - 1) / pairs;
  const int64_t most = n_group / kGpuChunk;  // every chunk at least kGpuChunk elements
  if (splits > most) splits = most;
  return splits > kGpuMaxSplits ? kGpuMaxSplits : splits;
}
inline int64_t gpu_chunk(int64_t n_group, int64_t splits) { return (n_group + splits - 1) / splits; }
// Two doubles (sum and sum of squares about the group's pivot) per chunk of a split group.
inline int64_t cuda_workspace_doubles(int64_t batch, int64_t channels, int64_t spatial, int64_t groups, int sm_count) {
  const int64_t splits = gpu_splits(batch, channels, spatial, groups, sm_count);
  return splits > 1 ? 2 * batch * groups * splits : 0;
}

KD_HD float activate(int activation, float y) {
  // silu(y) = y * sigmoid(y) = y / (1 + exp(-y)): one exponential and one division.
  return activation == kSiLU ? y / (1.f + kd_exp(-y)) : y;
}

// The normalised, affine, activated value of element v of a channel whose group has mean and
// 1 / std given, folded into two per-channel constants: out = act((v - center) * scale + bias),
// where center = mean - shift (so v + shift is never formed) and scale = rstd * weight.
struct ChannelConsts {
  float center, scale, bias;
};

KD_HD ChannelConsts channel_consts(double group_mean, float rstd, float shift, float weight, float bias) {
  return ChannelConsts{float(group_mean - double(shift)), rstd * weight, bias};
}

KD_HD float normalize(const ChannelConsts& k, int activation, float v) {
  return activate(activation, (v - k.center) * k.scale + k.bias);
}

// Finite inputs have a finite mean square deviation (below 1e78 in double): an infinite one is the
// float partial sums' overflow (deviations past ~1.8e19). It gives NaN, as torch's contiguous
// float32 group norm does, not 1 / inf = 0, which would quietly turn every output of the group
// into act(bias).
// (msd - msd: 0 when finite, NaN when infinite; not folded away without fast-math.)
KD_HD float inverse_std(double mean_square_deviation, float eps) {
  return float(1.0 / std::sqrt(mean_square_deviation + double(eps)) + (mean_square_deviation - mean_square_deviation));
}

KD_HD float shift_at(const Params& p, int64_t b, int64_t c) {
  return p.shift ? load_as_float(p.shift, p.shift_dtype, b * p.shift_batch_stride + c * p.shift_channel_stride)
                 : 0.f;
}

KD_HD float weight_at(const Params& p, int64_t c) {
  return p.weight ? load_as_float(p.weight, p.affine_dtype, c) : 1.f;
}

KD_HD float bias_at(const Params& p, int64_t c) {
  return p.bias ? load_as_float(p.bias, p.affine_dtype, c) : 0.f;
}

// Host-side argument check shared by the launchers (kernels never throw).
inline bool valid_params(const Params& p) {
  return p.batch >= 0 && p.channels > 0 && p.spatial > 0 && p.groups > 0 && p.channels % p.groups == 0 &&
         p.activation >= 0 && p.activation < kNumActivations && p.x && p.out && p.eps >= 0.f;
}

int group_norm_cpu(const Params& p);
int group_norm_cuda(const Params& p);

}  // namespace group_norm
}  // namespace kdfast
