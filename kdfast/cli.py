"""The ``kdfast`` command (also ``python -m kdfast``)."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def info() -> str:
    """Versions, what was built, which backend can run each op here, and why not."""
    import torch

    from . import __version__, _ext, backends

    lines = [f"kdfast {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
             f"{'GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    cpu, cpu_reason = _ext.cpu()
    lines.append(f"kdfast._C (CPU kernels): {'built, ' + str(cpu.build_info()) if cpu else cpu_reason}")
    cuda, cuda_reason = _ext.cuda()
    if cuda:
        lines.append(f"kdfast._C_cuda (CUDA kernels): built, {cuda.build_info()}, devices visible: {cuda.device_count()}")
    else:
        lines.append(f"kdfast._C_cuda (CUDA kernels): {cuda_reason}")
    for device in ("cpu", "cuda"):
        lines.append(f"\nbackends for {device} tensors:")
        for name, op in sorted(backends.OPS.items()):
            lines.append(f"  {name}:")
            for backend, reason in op.report(device):
                lines.append(f"    {backend:<10} {'usable' if reason is None else 'no: ' + reason}")
            try:
                lines.append(f"    -> chosen: {op.select(device).backend}")
            except backends.BackendUnavailableError as exc:
                lines.append(f"    -> none: {exc}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fused kernels for diffusion distillation and sampling")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, what was built and which backends are usable here")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
