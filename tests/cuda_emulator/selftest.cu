// Kernels that pin down the emulator's CUDA semantics (tests/test_cuda_emulator.py): the
// collectives kdfast's kernels use, per-block shared memory, and the launch failures it
// reports where a GPU would hang or misbehave. Built by the emulator only (module _emu_selftest).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Per block: the sum of (thread index + 1) by warp shuffles, then across warps through shared
// memory, as kdfast's block reductions do; also the block's index read back from shared memory
// after a barrier (every block has its own copy).
__global__ void block_sums(int* sums, int* echo) {
  __shared__ int scratch[32];
  __shared__ int mine;
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int block = blockIdx.x + blockIdx.y * gridDim.x;
  int v = tid + 1;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (tid == 0) mine = block;
  if (tid % 32 == 0) scratch[tid / 32] = v;
  __syncthreads();
  if (tid == 0) {
    int total = 0;
    for (unsigned w = 0; w < blockDim.x * blockDim.y / 32; ++w) total += scratch[w];
    sums[block] = total;
    echo[block] = mine;
  }
}

// __syncthreads_or over a flag that one thread sets, and __match_any_sync with the per-bin
// atomicAdd of the radix select: counts of (thread index % 3) in a block of 64.
__global__ void collectives(int flagged, int* any, unsigned* hist) {
  any[threadIdx.x] = __syncthreads_or(int(threadIdx.x) == flagged);
  const unsigned bin = threadIdx.x % 3;
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  if (__ffs(peers) - 1 == int(threadIdx.x & 31u)) atomicAdd(&hist[bin], unsigned(__popc(peers)));
}

// The first half of the block waits at one barrier, the second half at another.
__global__ void split_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Two shuffles on one line, half of the warp in each.
__global__ void split_shuffle(int* out) {
  const int v = int(threadIdx.x);
  out[threadIdx.x] = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_xor_sync(0xffffffffu, v, 2);
}

// A kernel that launches another.
__global__ void parent(int* out);

// Thread 0 waits at a barrier for its warp, whose other lanes wait in a shuffle for thread 0.
__global__ void crossed_waits(int* out) {
  int v = int(threadIdx.x);
  if (threadIdx.x == 0)
    __syncthreads();
  else
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lane 0 exits while the rest of its warp shuffles.
__global__ void lane_exits(int* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Half of the block exits before a barrier: exited threads do not hold it up.
__global__ void early_exit(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Thread 0 broadcasts its block's index through shared memory, with or without the barrier
// that the readers need.
__global__ void broadcast(bool sync, int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = int(blockIdx.x) + 1;
  if (sync) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

// Each thread adds its element and the next one: the last thread reads one past the end.
__global__ void sum_pairs(const int* in, int* out) { out[threadIdx.x] = in[threadIdx.x] + in[threadIdx.x + 1]; }

__global__ void write_index(int* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = int(threadIdx.x); }

__global__ void __launch_bounds__(64) bounded_write_index(int* out) { out[threadIdx.x] = int(threadIdx.x); }

__global__ void parent(int* out) {
  if (threadIdx.x == 0) write_index<<<1, 32>>>(out);
}

// Shared memory as a GPU leaves it: not zeroed, and nothing carried over from another block (a
// template kernel's too, whose statics the host compiler places apart).
__global__ void shared_on_entry(unsigned* out) {
  __shared__ unsigned count;
  if (threadIdx.x == 0) {
    out[blockIdx.x] = count;
    count = 12345u;
  }
}

template <int K>
__global__ void templated_shared_on_entry(unsigned* out) {
  __shared__ unsigned count;
  if (threadIdx.x == 0) {
    out[blockIdx.x] = count;
    count = 12345u + K;
  }
}

// The error of the launch just made ("" when it succeeded), cleared.
std::string launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

}  // namespace

PYBIND11_MODULE(_emu_selftest, m) {
  m.def("block_sums", [](unsigned gx, unsigned gy, unsigned bx, unsigned by) {
    std::vector<int> sums(gx * gy, -1), echo(gx * gy, -1);
    block_sums<<<dim3(gx, gy), dim3(bx, by)>>>(sums.data(), echo.data());
    return py::make_tuple(sums, echo, launch_error());
  });
  m.def("collectives", [](int flagged) {
    std::vector<int> any(64, -1);
    std::vector<unsigned> hist(3, 0);
    collectives<<<1, 64>>>(flagged, any.data(), hist.data());
    return py::make_tuple(any, hist, launch_error());
  });
  m.def("broadcast", [](bool sync) {
    std::vector<int> out(4 * 64, 0);
    broadcast<<<4, 64>>>(sync, out.data());
    return py::make_tuple(out, launch_error());
  });
  m.def("shared_on_entry", []() {
    std::vector<unsigned> out(3, 0), templated(3, 0);
    shared_on_entry<<<3, 32>>>(out.data());
    templated_shared_on_entry<1><<<3, 32>>>(templated.data());
    return py::make_tuple(out, templated);
  });
  m.def("read_past_the_end", []() {
    std::vector<int> in(32, 1), out(32, 0);
    sum_pairs<<<1, 32>>>(in.data(), out.data());
    return out;
  });
  m.def("failing", [](const std::string& which) {
    std::vector<int> out(1024, 0);
    if (which == "split_barrier") split_barrier<<<1, 64>>>(out.data());
    if (which == "split_shuffle") split_shuffle<<<1, 32>>>(out.data());
    if (which == "nested_launch") parent<<<1, 32>>>(out.data());
    if (which == "crossed_waits") crossed_waits<<<1, 64>>>(out.data());
    if (which == "lane_exits") lane_exits<<<1, 32>>>(out.data());
    if (which == "early_exit") early_exit<<<1, 64>>>(out.data());
    if (which == "too_many_threads") write_index<<<1, 2048>>>(out.data());
    if (which == "no_blocks") write_index<<<0, 32>>>(out.data());
    if (which == "past_launch_bounds") bounded_write_index<<<1, 128>>>(out.data());
    return py::make_tuple(out, launch_error());
  });
}
