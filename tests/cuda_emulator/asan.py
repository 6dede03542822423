"""pytest with kdfast's CUDA kernels compiled for the host under AddressSanitizer: a kernel that
reads or writes outside its tensors stops the run with the kernel's file and line.

    python tests/cuda_emulator/asan.py [--all] [pytest arguments]   (default: tests/ops -k cuda)

``--all``: the emulated kernels are also the backend chosen for CPU tensors where a test names
none (KDFAST_TEST_CUDA_EMU=all), for ``python tests/cuda_emulator/asan.py --all tests``.

Only the emulated kernels are instrumented (Python, torch and kdfast's CPU kernels are not).
torch allocates tensors through malloc, which the sanitizer's runtime, preloaded here, takes
over and surrounds with poisoned bytes. Exits non-zero when pytest fails or a report was made;
the reports are printed at the end.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# No leak checks (Python keeps its objects at exit), no checks of torch's own operator
# new/free pairs (it is not instrumented), stop at the first error.
OPTIONS = "detect_leaks=0:alloc_dealloc_mismatch=0:detect_stack_use_after_return=0:halt_on_error=1"


def runtime_library() -> str:
    """The path of the compiler's AddressSanitizer runtime, or "" when it has none."""
    sys.path.insert(0, str(HERE.parent))
    import cuda_emulator

    cxx = cuda_emulator._compiler()
    if cxx is None:
        return ""
    found = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else ""


def _pytest() -> List[str]:
    """This Python's pytest, importing the installed kdfast: `python -m pytest` from the
    repository would put the source tree, without the built extensions, first."""
    script = Path(sys.executable).with_name("pytest")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-P", "-m", "pytest"] if sys.version_info >= (3, 11) else [sys.executable, "-m", "pytest"]


def main(argv: List[str]) -> int:
    everywhere = "--all" in argv
    argv = [a for a in argv if a != "--all"]
    library = runtime_library()
    if not library:
        print("asan.py: the C++ compiler has no AddressSanitizer runtime (libasan.so)", file=sys.stderr)
        return 2
    logs = Path(tempfile.mkdtemp(prefix="kdfast-asan-"))
    # libstdc++ from the start too: the runtime looks up the C++ runtime it intercepts (exceptions
    # thrown inside torch) when it starts, before Python loads any C++ library.
    preload = " ".join(p for p in (library, "libstdc++.so.6", os.environ.get("LD_PRELOAD", "")) if p)
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS=f"{OPTIONS}:log_path={logs / 'asan'}",
               KDFAST_TEST_CUDA_EMU="asan-all" if everywhere else "asan")
    args = argv or ["tests/ops", "-k", "cuda"]
    status = subprocess.run([*_pytest(), "-q", "-p", "no:cacheprovider", *args], cwd=REPO, env=env).returncode
    # The runtime writes notes (warnings) to the same files; an error report names itself.
    reports = [p.read_text() for p in sorted(logs.glob("asan.*"))]
    errors = [r for r in reports if "ERROR: AddressSanitizer" in r]
    for report in errors:
        print(report, file=sys.stderr)
    print(f"asan.py: {len(errors)} AddressSanitizer report(s); logs in {logs}", file=sys.stderr)
    return 1 if errors and status == 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
