"""The host emulation of CUDA (tests/cuda_emulator) that runs kdfast's CUDA kernels here.

Its semantics are pinned by small kernels (tests/cuda_emulator/selftest.cu): reductions by warp
shuffles and shared memory over 1-D and 2-D blocks and grids, the collectives of the radix
select, and the launch failures where a GPU would hang or be undefined. That kdfast's kernels
run through it is shown by the op tests (the ``cuda`` entries of ``usable_backends``) and here
by one call of each op against the CPU backend.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

import cuda_emulator
from conftest import CUDA_EMULATED

pytestmark = pytest.mark.skipif(not CUDA_EMULATED, reason="a GPU is present, or KDFAST_TEST_CUDA_EMU=0")


@pytest.fixture(scope="module")
def selftest():
    path = cuda_emulator.build("_emu_selftest", [cuda_emulator.HERE / "selftest.cu"],
                               sanitize=cuda_emulator.sanitizer_loaded())
    return cuda_emulator.load_extension(path, "_emu_selftest")


@pytest.mark.parametrize("grid,block", [((1, 1), (32, 1)), ((3, 2), (64, 4)), ((2, 1), (1024, 1)), ((1, 1), (96, 1))])
def test_block_reductions_and_shared_memory(selftest, grid, block):
    sums, echo, error = selftest.block_sums(*grid, *block)
    n = block[0] * block[1]
    assert error == ""
    assert sums == [n * (n + 1) // 2] * (grid[0] * grid[1])
    assert echo == list(range(grid[0] * grid[1]))  # each block its own shared memory


@pytest.mark.parametrize("flagged", [-1, 0, 37, 63])
def test_syncthreads_or_and_match_any(selftest, flagged):
    any_flag, hist, error = selftest.collectives(flagged)
    assert error == ""
    assert any_flag == [int(flagged >= 0)] * 64
    assert hist == [22, 21, 21]  # thread indices 0..63 by index % 3, one atomic per warp and bin


@pytest.mark.parametrize("which,message", [
    ("split_barrier", r"cudaErrorLaunchFailure: .*meet at different barriers: selftest\.cu:\d+ and selftest\.cu:\d+"),
    ("split_shuffle", r"cudaErrorLaunchFailure: .*different barriers: selftest\.cu:(\d+) and selftest\.cu:\1 \(two"),
    ("nested_launch", r"cudaErrorLaunchFailure: .*launch from inside a kernel"),
    ("crossed_waits", r"cudaErrorLaunchFailure: .*barrier at selftest\.cu:\d+ that some live threads .*never reach"),
    ("lane_exits", r"cudaErrorLaunchFailure: .*(exited|live lanes)"),
    ("too_many_threads", r"cudaErrorInvalidConfiguration: .*block 2048x1x1"),
    ("no_blocks", r"cudaErrorInvalidConfiguration: .*grid 0x1x1"),
    ("past_launch_bounds", r"cudaErrorLaunchOutOfResources: .*block of 128 threads, __launch_bounds__\(64\)"),
])
def test_launch_failures_are_reported(selftest, which, message):
    _, error = selftest.failing(which)
    assert error, f"{which} launched without an error"
    assert re.search(message, error), error
    assert selftest.block_sums(1, 1, 32, 1)[2] == ""  # the error was cleared; later launches run


def test_shared_memory_starts_uninitialised(selftest):
    """0xff bytes in every block (a GPU's shared memory is not zeroed), a template kernel's too:
    its statics started zeroed and kept the previous block's values."""
    plain, templated = selftest.shared_on_entry()
    assert plain == [0xFFFFFFFF] * 3 and templated == [0xFFFFFFFF] * 3


def test_shared_declarations_are_registered_on_their_line():
    source = "  __shared__ Lse lse_scratch[2][kWarps];\n  __shared__ unsigned long long hist[256];\n"
    assert cuda_emulator.register_shared(source) == (
        "  __shared__ Lse lse_scratch[2][kWarps]; static ::cuda_emu::SharedRegion cuda_emu_region_lse_scratch"
        "(&lse_scratch, sizeof(lse_scratch));\n"
        "  __shared__ unsigned long long hist[256]; static ::cuda_emu::SharedRegion cuda_emu_region_hist"
        "(&hist, sizeof(hist));\n")
    with pytest.raises(ValueError, match="__shared__ declaration"):
        cuda_emulator.register_shared("__shared__ float a[4], b[4];")


def test_exited_threads_do_not_hold_a_barrier(selftest):
    out, error = selftest.failing("early_exit")
    assert error == ""
    assert out[:32] == [1] * 32 and out[32:64] == [0] * 32


def test_a_missing_barrier_shows_in_the_results(selftest):
    """Threads run in index order in one block and in reverse in the next: a read of shared
    memory that no barrier orders after its write sees a stale value in one of them."""
    synced, error = selftest.broadcast(True)
    assert error == "" and synced == [b + 1 for b in range(4) for _ in range(64)]
    racy, error = selftest.broadcast(False)
    assert error == "" and racy != synced


def test_launch_rewrite():
    source = ("k<<<blocks, kThreads, 0, stream>>>(p, c);\n"
              "ns::kernel<kForwardKL><<<dim3(a, b), 256, 0, static_cast<cudaStream_t>(p.stream)>>>(p);\n")
    assert cuda_emulator.rewrite_launches("__global__ void __launch_bounds__(kThreads) k(P p) {}\n" + source) == (
        "__global__ void __launch_bounds__(kThreads) k(P p) {}\n"
        "::cuda_emu::launch(k, blocks, kThreads, 0, stream).bounded(kThreads)(p, c);\n"
        "::cuda_emu::launch(ns::kernel<kForwardKL>, dim3(a, b), 256, 0, static_cast<cudaStream_t>(p.stream))(p);\n")
    multiline = "k<<<grid, block,\n  0, stream>>>\n    (p);\n"
    assert cuda_emulator.rewrite_launches(multiline) == "::cuda_emu::launch(k, grid, block,\n  0, stream)\n    (p);\n"
    with pytest.raises(ValueError, match="launch the emulator's rewrite does not recognise"):
        cuda_emulator.rewrite_launches("(*table[i])<<<1, 32>>>(p);")


def test_a_patch_of_the_test_beside_unemulated_backends(monkeypatch, unemulated_backends):
    from kdfast import _ext, backends

    assert backends.op("solver_step").reason("cuda", "cpu") is not None  # kdfast's own registry
    monkeypatch.setattr(_ext, "cuda", lambda: (None, "patched by the test"))


def test_the_emulator_is_back_after_them():
    """(runs after the test above: their undos restored the emulator's hooks in order)"""
    from kdfast import _ext, backends

    assert backends.op("solver_step").reason("cuda", "cpu") is None
    assert _ext.cuda()[0] is not None


def test_every_cuda_source_is_emulated():
    """The emulated module is built from the sources CMake builds kdfast._C_cuda from."""
    cmake = (cuda_emulator.REPO / "CMakeLists.txt").read_text()
    listed = cmake.split("set(KDFAST_CUDA_SOURCES", 1)[1].split(")", 1)[0].split()
    assert sorted(listed) == [str(p.relative_to(cuda_emulator.REPO)) for p in cuda_emulator.cuda_sources()]


def test_each_op_runs_the_emulated_kernels():
    """One call of every op on the cuda backend (CPU tensors through the emulated kernels)
    against the cpu backend. The op tests cover each op's options and dtypes."""
    from kdfast import backends, ops

    assert backends.op("solver_step").select("cpu", "cuda").backend == "cuda"
    g = torch.Generator().manual_seed(0)
    x, m, y = (torch.randn(3, 4, 9, 9, generator=g) for _ in range(3))
    s, t = torch.randn(5, 300, generator=g), torch.randn(5, 300, generator=g)
    coefs = torch.tensor(ops.coefficients(1.2, -0.4, sample={"x": 0.7, "x0": 0.3}), dtype=torch.float64)
    sample, outputs = torch.randn(6, 5, generator=g), torch.randn(6, 3 * 5, generator=g)
    ids = torch.stack([torch.randperm(300, generator=g)[:7] for _ in range(5)])
    lp = torch.log_softmax(torch.randn(5, 300, generator=g), -1).gather(1, ids)
    calls = {
        "solver_step": lambda b: ops.solver_step(x, m, coefs, cond=y, guidance_scale=3.0, backend=b).sample,
        "threshold_scale": lambda b: ops.threshold_scale(x, m, 1.2, -0.4, ratio=0.9, max_value=1.5, backend=b),
        "kd_divergence": lambda b: ops.kd_divergence(s, t, kind="jsd", backend=b),
        "kd_topk": lambda b: ops.kd_topk(s, ids, lp, backend=b),
        "pseudo_huber": lambda b: ops.pseudo_huber(x, m, c=0.03, backend=b),
        "dmd": lambda b: ops.dmd(x, m, y, backend=b),
        "pd_target": lambda b: ops.pd_target(x, m, 0.8, 0.6, 0.9, 0.4, backend=b),
        "group_norm_act": lambda b: ops.group_norm_act(x, 2, backend=b),
        "grid_combination": lambda b: ops.grid_combination(sample, outputs, torch.tensor([0.5, 0.2, 0.0, -0.7]),
                                                           backend=b),
    }
    for name, call in calls.items():
        torch.testing.assert_close(call("cuda"), call("cpu"), rtol=1e-5, atol=1e-6, msg=name)


ASAN = cuda_emulator.HERE / "asan.py"


def _asan_run(*pytest_args):
    from cuda_emulator import asan

    if not asan.runtime_library():
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")
    return subprocess.run([sys.executable, str(ASAN), *pytest_args], capture_output=True, text=True,
                          env=dict(os.environ, KDFAST_ASAN_PROBE="1"))


@pytest.mark.skipif(os.environ.get("KDFAST_ASAN_PROBE") != "1", reason="run by test_asan_reports_a_read_past_the_end")
def test_probe_read_past_the_end(selftest):
    """Under AddressSanitizer the read stops the process; reaching the next line means it went
    unreported."""
    selftest.read_past_the_end()
    pytest.fail("a kernel read past the end of its input and AddressSanitizer did not report it")


def test_asan_reports_a_read_past_the_end():
    done = _asan_run("tests/test_cuda_emulator.py", "-k", "probe_read_past_the_end")
    report = done.stdout + done.stderr
    assert done.returncode != 0, report
    assert re.search(r"heap-buffer-overflow.*\n.*READ of size 4", report), report
    assert re.search(r"in sum_pairs .*selftest\.cu:\d+", report), report


def test_kernels_read_and_write_only_their_tensors():
    """Every op test of the cuda backend under AddressSanitizer: no kernel touches memory
    outside its tensors and buffers."""
    done = _asan_run("tests/ops", "-k", "cuda")
    report = done.stdout[-3000:] + done.stderr[-20000:]
    assert done.returncode == 0 and "asan.py: 0 AddressSanitizer report(s)" in done.stderr, report


@pytest.mark.parametrize("case", ["solver_step_elements", "solver_step_samples", "grid_combination"])
def test_grid_stride_loops_past_the_launch_caps(case):
    """Launchers cap their grids (4096 blocks of a sample's elements and 65535 rows of samples
    in the solver step, 65536 blocks in the grid combination) and the threads stride over the
    rest: shapes past the caps, against the cpu backend."""
    from kdfast import ops

    g = torch.Generator().manual_seed(1)
    if case == "grid_combination":
        rows = 65536 * 256 // 4 + 5  # 4 channels, 2 grid points: 20 elements past 65536 blocks of 256
        sample, outputs = torch.randn(rows, 4, generator=g), torch.randn(rows, 8, generator=g)
        call = lambda b: ops.grid_combination(sample, outputs, torch.tensor([0.5, 0.25, -1.0]), backend=b)  # noqa: E731
    else:
        shape = (2, 4096 * 256 + 77) if case == "solver_step_elements" else (65535 * 8 + 3, 1)
        x, m = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        coefs = torch.tensor(ops.coefficients(1.2, -0.4, sample={"x": 0.7, "x0": 0.3}), dtype=torch.float64)
        call = lambda b: ops.solver_step(x, m, coefs, backend=b).sample  # noqa: E731
    torch.testing.assert_close(call("cuda"), call("cpu"), rtol=1e-6, atol=1e-6)


def test_cuda_launchers_refuse_unknown_dtype_codes_as_the_cpu_ones_do():
    """The bindings take dtype codes on trust from Python: an unknown one made three CUDA
    launchers read the buffers as float32 (their CPU twins returned kBadDType)."""
    from kdfast import _ext

    cpu, cuda = _ext.cpu()[0], _ext.cuda()[0]
    x, y, out = torch.arange(8, dtype=torch.float32) + 1, torch.ones(16), torch.zeros(8)
    coefs, scale = torch.tensor([1.0, 0.5, 0.25]), torch.zeros(1)
    step_coefs = torch.zeros(29)
    calls = {
        "solver_step": lambda module, last: module.solver_step(
            4, 2, [x.data_ptr(), x.data_ptr(), 0, 0, 0, 0, 0, 0], [2] * 8, [5, 0, 0, 0, 0, 0, 0, 0],
            [out.data_ptr(), 0, 0], [2, 0, 0], [0, 0, 0], step_coefs.data_ptr(), 0, 1.0, 0, 1.0, 0, last),
        "grid_combination": lambda module, last: module.grid_combination(
            8, 1, 2, x.data_ptr(), 1, 7, [y.data_ptr(), 0], [2, 0], [0, 0], out.data_ptr(), 0, coefs.data_ptr(),
            3, last),
        "threshold_scale": lambda module, last: module.threshold_scale(
            1, 8, [x.data_ptr(), x.data_ptr(), 0], [8, 8, 0], [9, 0, 0], 1.0, 0.0, 1.0, 0.5, 100.0,
            scale.data_ptr(), last),
    }
    for name, call in calls.items():
        for module, last in ((cpu, 1), (cuda, 0)):
            with pytest.raises(RuntimeError, match="unsupported dtype code"):
                call(module, last)
