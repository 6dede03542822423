import os

import pytest

# Triton kernels run on the CPU through the interpreter; it is chosen when the kernels are
# defined, so it must be set before kdfast.kernels is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_bf16_to_nearest_in_the_interpreter() -> None:
    """Make the Triton interpreter convert between float32 and bfloat16 as compiled Triton
    (cvt.rn.bf16.f32) and torch do: it truncated toward zero, which made the CPU runs of the
    Triton kernels' bf16 outputs twice as far off as the GPU's, and read subnormals as 0."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x0040  # stays a (quiet) NaN
            return interpreter.TensorHandle(rounded.reshape(np.shape(src.data)), dst_type.scalar)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:  # exact: the high half
            bits = np.ascontiguousarray(src.data, dtype=np.uint16).astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32).reshape(np.shape(src.data)), dst_type.scalar)
        return truncating(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_in_the_interpreter()

import kdfast  # noqa: E402

if kdfast._ext.cpu()[0] is None:  # pragma: no cover
    raise pytest.UsageError(
        "kdfast._C is not importable: install the package (pip install .) and run pytest "
        "from the repository root (not python -m pytest, which puts the source tree first)."
    )

_triton_reason = kdfast._ext.triton()[1]
if _triton_reason and "not installed" not in _triton_reason and "older than" not in _triton_reason:
    # an installed, recent triton whose kernels do not load is a bug to see, not a backend to skip
    raise pytest.UsageError(f"the Triton kernels do not load: {_triton_reason}")

# Without a GPU, kdfast's CUDA kernels compiled for the host (tests/cuda_emulator) serve CPU
# tensors as the cuda backend, so that every test over usable_backends() runs the CUDA code.
# KDFAST_TEST_CUDA_EMU=all also makes it the backend chosen where a test names none (the whole
# suite through the CUDA kernels); =asan and =asan-all build them under AddressSanitizer (set
# by tests/cuda_emulator/asan.py, which preloads its runtime); =0 leaves the emulator out.
_EMULATION = os.environ.get("KDFAST_TEST_CUDA_EMU", "1")
if _EMULATION not in ("0", "1", "all", "asan", "asan-all"):
    raise pytest.UsageError(f"KDFAST_TEST_CUDA_EMU must be 0, 1, all, asan or asan-all, got {_EMULATION!r}")
CUDA_EMULATED = not _HAS_CUDA and _EMULATION != "0"
if CUDA_EMULATED:
    import cuda_emulator

    if _EMULATION.startswith("asan") and not cuda_emulator.sanitizer_loaded():
        raise pytest.UsageError(f"KDFAST_TEST_CUDA_EMU={_EMULATION} needs AddressSanitizer's runtime preloaded: run "
                                "python tests/cuda_emulator/asan.py [--all] [pytest arguments]")
    try:
        cuda_emulator.install(prefer=_EMULATION in ("all", "asan-all"), sanitize=_EMULATION.startswith("asan"))
    except RuntimeError as exc:  # pragma: no cover
        raise pytest.UsageError(f"{exc}\n(KDFAST_TEST_CUDA_EMU=0 runs the tests without the CUDA emulator)")


@pytest.fixture
def unemulated_backends(monkeypatch):
    """kdfast's own backend registry, without the emulated cuda backend, for the checks that
    the cuda backend refuses CPU tensors."""
    if CUDA_EMULATED:
        cuda_emulator.suspend(monkeypatch)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _ReplayGraph:
    def __init__(self, run, out, reset):
        self.run, self.out, self.reset, self.replays = run, out, reset, 0

    def replay(self):
        self.reset()
        self.out.copy_(self.run())
        self.replays += 1


@pytest.fixture
def eager_capture(monkeypatch):
    """CPU stand-in for a CUDA graph in kdfast.sampling: the same warm-up / RNG / reset
    sequence as the real ``_capture``; a replay re-runs the closure over the captured buffers.
    Yields the list of "graphs" captured."""
    from kdfast import sampling

    graphs = []

    def capture(run, x, generator, reset):
        gen = sampling._rng_generator(generator, x.device)
        state = gen.get_state()
        run()
        gen.set_state(state)
        reset()
        out = run()
        gen.set_state(state)
        graphs.append(_ReplayGraph(run, out, reset))
        return graphs[-1], out

    monkeypatch.setattr(sampling, "_capture", capture)
    monkeypatch.setattr(sampling, "_check_graph_args", lambda x, generator, callback, who=None, loop=None: None)
    return graphs


@pytest.fixture(scope="session")
def gkd_trainer():
    """TRL's GKDTrainer (skips the test where TRL or its GKD trainer is not installed)."""
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return module.GKDTrainer


@pytest.fixture(scope="session")
def kds():
    """k-diffusion's sampling module (skips the test where k-diffusion is not installed, as in CI)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from _common import k_diffusion_sampling
    finally:
        sys.path.pop(0)
    module = k_diffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed")
    return module


def usable_backends(op_name, device_type="cpu"):
    """Every compiled/Triton backend that can run ``op_name`` here (not the reference)."""
    op = kdfast.backends.op(op_name)
    return [b for b in op.backends if b != "reference" and op.reason(b, device_type) is None]
