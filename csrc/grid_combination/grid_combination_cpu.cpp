// CPU launcher for the grid combination. A task takes a tile of rows x channels (a whole number
// of rows when they are narrow: pi-Flow's rows hold 16 to 64 channels); each row's fp32
// accumulator (in L1, or the fp32 output itself) starts as a * x and adds its grid points in
// order, reading the row's outputs front to back once. The terms are add_weighted's, in its
// order, so the results are those of the CUDA launcher.
#include "grid_combination.h"

#include "common/kd_cpu.h"

#include <algorithm>

namespace kdfast {
namespace grid_combination {
namespace {

constexpr int64_t kTile = 512;       // elements per tile
constexpr int64_t kRowFloats = 4096;  // a widened half-precision output row (grid x channels)

KD_CPU_INLINE void add_row(float* __restrict__ acc, float w, const float* __restrict__ v, int64_t n) {
  for (int64_t e = 0; e < n; ++e) acc[e] = acc[e] + w * v[e];
}

// Rows [r0, r0 + nr), channels [c0, c0 + n), into acc (nr rows of n, one after another). N > 0:
// n == N, a row width known at compile time (fully unrolled: pi-Flow's rows are 16 to 64 wide).
// A half-precision output row is widened whole, in one call, when the tile spans whole rows and
// it fits `wide` (kRowFloats): per grid point, 16 to 64 elements are too few to widen well.
template <int64_t N>
KD_CPU_INLINE void combine_rows(const Params& p, int64_t r0, int64_t nr, int64_t c0, int64_t n, float* acc,
                                float* buf, float* wide) {
  const int64_t width = N > 0 ? N : n;
  const int64_t row_width = p.grid * p.channels;
  const bool whole_rows = width == p.channels && row_width <= kRowFloats;
  std::fill(acc, acc + nr * width, 0.f);
  for (int64_t i = 0; i < nr; ++i) {
    float* a = acc + i * width;
    const int64_t r = r0 + i;
    if (p.sample_weight != 0.f)
      add_row(a, p.sample_weight, cpu::load_floats(p.x, p.x_dtype, r * p.x_row_stride + c0, width, buf), width);
    for (int k = 0; k < p.num_outputs; ++k) {
      const int64_t row = r * p.y_row_stride[k] + c0;
      // The row's grid points as fp32: in place, widened whole, or (nullptr) widened one by one below
      const float* y = p.y_dtype[k] == kFloat32 ? static_cast<const float*>(p.y[k]) + row
                       : whole_rows            ? cpu::load_floats(p.y[k], p.y_dtype[k], row, row_width, wide)
                                               : nullptr;
      for (int64_t g = 0; g < p.grid; ++g) {
        const float w = p.weights[k * p.grid + g];
        if (w == 0.f) continue;  // add_weighted's rule: the grid point is not used
        add_row(a, w, y ? y + g * p.channels : cpu::load_floats(p.y[k], p.y_dtype[k], row + g * p.channels, width, buf),
                width);
      }
    }
  }
}

// Built for AVX2 and for baseline x86-64, picked for the CPU it runs on; not with FMA, so that
// products round before sums as in add_weighted.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void combine_tile(const Params& p, int64_t r0, int64_t nr, int64_t c0, int64_t n, float* acc, float* buf,
                  float* wide) {
  switch (n) {
    case 16: return combine_rows<16>(p, r0, nr, c0, n, acc, buf, wide);
    case 32: return combine_rows<32>(p, r0, nr, c0, n, acc, buf, wide);
    case 64: return combine_rows<64>(p, r0, nr, c0, n, acc, buf, wide);
    default: return combine_rows<0>(p, r0, nr, c0, n, acc, buf, wide);
  }
}

}  // namespace

int grid_combination_cpu(const Params& p) {
  if (!valid_params(p)) return kBadArgument;
  if (!valid_dtypes(p)) return kBadDType;
  if (p.rows == 0 || p.channels == 0) return kOk;

  const int64_t n = std::min(kTile, p.channels);     // channels per tile
  const int64_t rows_per_tile = std::max<int64_t>(1, kTile / n);
  const int64_t column_tiles = (p.channels + n - 1) / n;
  const int64_t row_tiles = (p.rows + rows_per_tile - 1) / rows_per_tile;
  const int64_t tiles = row_tiles * column_tiles;
  const int64_t work = p.rows * p.channels * (1 + p.num_outputs * p.grid);
  const int nthreads = cpu::threads_for(p.num_threads, tiles, work);

#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = (t / column_tiles) * rows_per_tile;
    const int64_t nr = std::min(rows_per_tile, p.rows - r0);
    const int64_t c0 = (t % column_tiles) * n;
    const int64_t nc = std::min(n, p.channels - c0);
    alignas(64) float acc_buf[kTile], load_buf[kTile], wide_buf[kRowFloats];
    // The tile is contiguous in the output when it spans whole rows or is one row's piece.
    const int64_t at = r0 * p.channels + c0;
    float* acc = cpu::float_target(p.out, p.out_dtype, at, acc_buf);
    combine_tile(p, r0, nr, c0, nc, acc, load_buf, wide_buf);
    cpu::store_floats(p.out, p.out_dtype, at, nr * nc, acc);
  }
  return kOk;
}

}  // namespace grid_combination
}  // namespace kdfast
