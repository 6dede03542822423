"""kdfast's CUDA kernels run on the host: an emulated ``kdfast._C_cuda`` for machines without a GPU.

:func:`build` compiles ``csrc/bind_cuda.cpp`` and every ``csrc/*/*_cuda.cu`` with the host
C++ compiler against ``cuda_emu.h`` (CUDA's thread model as fibers: see there), after turning
each ``kernel<<<grid, block, smem, stream>>>(args)`` launch into a call of the emulator.
:func:`install` makes kdfast's ``cuda`` backend use that module for CPU tensors, so the op
tests that run every usable backend (``tests/conftest.py: usable_backends``) run the CUDA
kernels too. ``tests/conftest.py`` installs it on machines without a GPU
(``KDFAST_TEST_CUDA_EMU=0`` leaves it out, ``=all`` makes it the backend of every CPU op,
``=asan`` builds it under AddressSanitizer, whose runtime ``asan.py`` preloads).

What it checks: the kernels' indexing, launch shapes, reductions across threads, warps and
blocks, dtype handling and their results against the other backends; barriers that some
threads never reach or reach from different places; shared memory read before a barrier
orders it after its write (between barriers, threads run in index order or reversed,
alternately) or before anything wrote it (it starts as 0xff bytes in every block).
Under AddressSanitizer (``asan.py``): reads and writes outside the kernels' tensors. What it
cannot: timing, races between blocks (blocks run one after another), and the GPU's own libm
(the emulated device math is the host's, so results match a GPU's within ulps, not bits).
A CUDA feature kdfast's kernels do not use yet (other shuffles, ballots, other atomics,
dynamic shared memory) fails to compile or to launch here until cuda_emu.h emulates it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CSRC = REPO / "csrc"

# `name<<<config>>>(` with name an identifier, optionally qualified and with template arguments.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)(\s*)<<<(.*?)>>>(\s*)\(", re.S)

_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off",
          "-D__CUDA_ARCH__=900", "-DKDFAST_WITH_CUDA", '-DKDFAST_CUDA_ARCHS_STR="emulated"',
          # (kd_cuda.h: at most 3 blocks along a grid axis, so that small batches run the
          # kernels' loops over what lies beyond the grid)
          "-DKDFAST_GRID_CAP=3"]
# AddressSanitizer (asan.py): its runtime is preloaded into the test process, so the module is
# linked without it.
_SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]


# `__global__ void __launch_bounds__(N) name(`: the most threads a block of `name` may have.
_BOUNDS = re.compile(r"__global__\s+void\s+__launch_bounds__\(([^()]*)\)\s*(\w+)\s*\(")


def rewrite_launches(source: str) -> str:
    """``k<<<g, b, s, st>>>(args)`` -> ``::cuda_emu::launch(k, g, b, s, st)(args)``, with
    ``.bounded(N)`` before ``(args)`` where ``k`` is declared with ``__launch_bounds__(N)`` in
    ``source`` (line breaks kept, so that the line numbers stay those of the source)."""
    bounds = {name: bound.split(",")[0].strip() for bound, name in _BOUNDS.findall(source)}

    def launch(m: re.Match) -> str:
        bound = bounds.get(m.group(1).split("<")[0].split("::")[-1])
        check = f".bounded({bound})" if bound else ""
        return f"::cuda_emu::launch({m.group(1)}, {m.group(3)}){check}{m.group(2)}{m.group(4)}("

    out = _LAUNCH.sub(launch, source)
    if "<<<" in out:
        raise ValueError("a kernel launch the emulator's rewrite does not recognise is left: "
                         + out[out.index("<<<") - 60: out.index("<<<") + 40])
    return out


# `__shared__ type name[dims];` (one variable per declaration, as kdfast's kernels declare them).
_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]\[;]*\])*)\s*;")


def register_shared(source: str) -> str:
    """Each ``__shared__`` variable registered with the emulator where it is declared, which
    fills it with 0xff bytes before every block (on the same line: the line numbers stay the
    source's). A static of a template kernel cannot be put in a section of its own, which GCC
    drops for template instantiations: a registry finds every one."""
    out, count = _SHARED.subn(lambda m: f"{m.group(0)} static ::cuda_emu::SharedRegion cuda_emu_region_{m.group(2)}"
                                        f"(&{m.group(2)}, sizeof({m.group(2)}));", source)
    if out.count("__shared__") != count:
        raise ValueError("a __shared__ declaration the emulator's rewrite does not recognise is left (declare "
                         "one variable per statement: __shared__ type name[dims];)")
    return out


def cuda_sources() -> List[Path]:
    return sorted(CSRC.glob("*/*_cuda.cu"))


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _includes() -> List[str]:
    import pybind11

    return ["-include", str(HERE / "cuda_emu.h"), f"-I{HERE / 'include'}", f"-I{CSRC}",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


def _key(cxx: str, sources: List[Path], flags: List[str]) -> str:
    import pybind11

    h = hashlib.sha256()
    for path in sorted(sources) + sorted(CSRC.rglob("*.h")) + sorted(HERE.rglob("*.h")) + [Path(__file__)]:
        h.update(str(path.resolve()).encode())
        h.update(path.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update((version + sys.version + pybind11.__version__ + " ".join(flags)).encode())
    return h.hexdigest()[:20]


def _cache_root() -> Path:
    """Where builds are kept: ``$KDFAST_CUDA_EMU_DIR``, else a folder of this user's in the
    temporary folder (only they can write the modules it loads)."""
    configured = os.environ.get("KDFAST_CUDA_EMU_DIR")
    if configured:
        return _made(Path(configured))
    root = Path(tempfile.gettempdir()) / f"kdfast-cuda-emu-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    if root.stat().st_uid != os.getuid() or root.stat().st_mode & 0o022:
        raise RuntimeError(f"{root} is not a private folder of this user's: set KDFAST_CUDA_EMU_DIR")
    return root


def _prune(root: Path, name: str, keep: Path, days: float = 7.0) -> None:
    """Removes builds of ``name`` other than ``keep`` that were last used over ``days`` ago."""
    cutoff = time.time() - days * 86400
    for old in root.glob(f"{name}-*"):
        if old != keep and old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def build(name: str = "_C_cuda", sources: Optional[List[Path]] = None, sanitize: bool = False,
          verbose: bool = False) -> Path:
    """Compile an extension module ``name`` from CUDA and C++ ``sources`` for the emulator
    (default: kdfast's ``_C_cuda``, from ``csrc/bind_cuda.cpp`` and every ``csrc/*/*_cuda.cu``)
    and return its path; ``sanitize``: instrumented by AddressSanitizer. Cached by the
    sources' hash (also kdfast's headers and the emulator's), in ``$KDFAST_CUDA_EMU_DIR`` or
    a private folder in the temporary folder; builds unused for a week are removed."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX) to build the CUDA emulator")
    sources = [CSRC / "bind_cuda.cpp", *cuda_sources()] if sources is None else list(sources)
    flags = _FLAGS + (_SANITIZE if sanitize else [])
    root = _cache_root()
    target = root / f"{name}-{_key(cxx, sources, flags)}" / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.exists():
        os.utime(target.parent)  # (in use: kept by _prune)
        return target
    work = Path(tempfile.mkdtemp(prefix="build-", dir=_made(target.parent)))
    units = []  # (translation unit, the folder of its quoted includes)
    for source in sources:
        if source.suffix == ".cu":
            unit = work / (source.stem + ".cpp")
            # #line keeps compiler messages and the emulator's barrier sites naming the .cu file
            unit.write_text(f'#line 1 "{source}"\n' + rewrite_launches(register_shared(source.read_text())))
            units.append((unit, source.parent))
        else:
            units.append((source, source.parent))

    def compile_unit(unit_and_folder) -> Path:
        unit, folder = unit_and_folder
        obj = work / (unit.stem + ".o")
        cmd = [cxx, *flags, "-iquote", str(folder), *_includes(), "-c", str(unit), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the CUDA emulator failed to compile {unit.name}:\n{' '.join(cmd)}\n{done.stderr}")
        if verbose:
            print(f"compiled {unit.name}", file=sys.stderr)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(units), os.cpu_count() or 1))) as pool:
        objects = list(pool.map(compile_unit, units))
    linked = work / target.name
    done = subprocess.run([cxx, "-shared", *map(str, objects), "-o", str(linked)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the CUDA emulator failed to link:\n{done.stderr}")
    os.replace(linked, target)  # atomic: concurrent builds (pytest-xdist workers) agree
    shutil.rmtree(work, ignore_errors=True)
    _prune(root, name, target.parent)
    return target


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_extension(path: Path, name: str) -> ModuleType:
    """Import the extension module at ``path`` whose init function is ``PyInit_<name>``,
    without entering it in ``sys.modules``."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load(sanitize: bool = False) -> ModuleType:
    """The emulated ``kdfast._C_cuda`` (built on first use)."""
    return load_extension(build(sanitize=sanitize), "_C_cuda")


def sanitizer_loaded() -> bool:
    """Whether AddressSanitizer's runtime is in this process (preloaded: asan.py)."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


_ORIGINAL: dict = {}  # kdfast's own registry hooks while the emulator is installed


def install(module: Optional[ModuleType] = None, prefer: bool = False, sanitize: bool = False) -> ModuleType:
    """Route kdfast's ``cuda`` backend to the emulated module for CPU tensors: ``_ext.cuda()``
    returns it and the registry lets the ``cuda`` backend serve the CPU device, so that it runs
    where a call or a test names it (``usable_backends`` lists it). With ``prefer`` it is also
    the one chosen for CPU tensors where a call names none (float64 still takes the
    reference). ``sanitize``: the AddressSanitizer build (asan.py). Returns the module."""
    from kdfast import _ext, backends

    module = module or load(sanitize)
    if not _ORIGINAL:
        _ORIGINAL.update(cuda=_ext.cuda, backend_reason=backends.backend_reason,
                         preference=backends._PREFERENCE["cpu"])
    kdfast_reason = _ORIGINAL["backend_reason"]

    def backend_reason(backend: str, device_type: str) -> Optional[str]:
        if backend == "cuda" and device_type == "cpu":
            return None
        return kdfast_reason(backend, device_type)

    _ext.cuda = lambda: (module, None)
    backends.backend_reason = backend_reason
    cpu_order = tuple(b for b in _ORIGINAL["preference"] if b != "cuda")
    backends._PREFERENCE["cpu"] = ("cuda",) + cpu_order if prefer else cpu_order
    _forget_choices()
    return module


def suspend(monkeypatch) -> None:
    """kdfast's own backend registry until ``monkeypatch`` is undone (for the checks that the
    cuda backend refuses CPU tensors). Every hook, the registry's cached choices included, is
    swapped through ``monkeypatch``, so that its undo restores them in order with the test's
    own patches."""
    from kdfast import _ext, backends

    if not _ORIGINAL:
        return
    monkeypatch.setattr(_ext, "cuda", _ORIGINAL["cuda"])
    monkeypatch.setattr(backends, "backend_reason", _ORIGINAL["backend_reason"])
    monkeypatch.setitem(backends._PREFERENCE, "cpu", _ORIGINAL["preference"])
    for entry in backends.OPS.values():
        monkeypatch.setattr(entry, "_cache", {})


def _forget_choices() -> None:
    from kdfast import backends

    for entry in backends.OPS.values():
        entry._cache.clear()
