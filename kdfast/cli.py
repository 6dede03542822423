"""The ``kdfast`` command (also ``python -m kdfast``)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional

from .train.run import interruption_status, seed_arg, sigterm_raises


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
    except Exception as exc:  # a broken install: reported, as the triton backend's reason below
        lines.append(f"triton: failed to import ({type(exc).__name__}: {exc})")
    cpu, cpu_reason = _ext.cpu()
    lines.append(f"kdfast._C (CPU kernels): {'built, ' + str(cpu.build_info()) if cpu else cpu_reason}")
    cuda, cuda_reason = _ext.cuda()
    if cuda:
        error = cuda.device_error()
        lines.append(f"kdfast._C_cuda (CUDA kernels): built, {cuda.build_info()}, devices visible: "
                     f"{cuda.device_count()}{' (' + error + ')' if error else ''}")
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


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message} (see {prog} --help)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``kdfast demo: error: argument --seed: ...``)
    and :func:`main` returns 2, as for the commands' own checks, instead of a usage dump."""

    def error(self, message: str):
        raise _UsageError(self.prog, message)


def _folder(text: str) -> str:
    """The argparse ``type`` of ``--out``: a folder name, not an empty string (which wrote into the
    current folder while the closing message named files at the file system's root)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got ''")
    return text


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def demo(args) -> int:
    """Run the demo and print its table; returns the exit code."""
    from .backends import BackendUnavailableError
    from .demo import QUICK, DemoError, DemoWarning, format_table, run_demo
    from .train.run import one_line_warnings
    from .eval.classifier import ClassifierAssetError
    from .train.teacher import TeacherAssetError

    # "is None", not "or": an explicit empty or zero value must reach the checks, not fall back
    # to the defaults.
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()] if args.solvers is not None else None
    if solvers is None and args.quick:
        solvers = QUICK["solvers"]
    steps = QUICK["steps"] if args.steps is None and args.quick else args.steps
    n_per_class = QUICK["n_per_class"] if args.n_per_class is None and args.quick else args.n_per_class
    kwargs = {k: v for k, v in dict(solvers=solvers, steps=steps, n_per_class=n_per_class,
                                    guidance_scale=args.guidance).items() if v is not None}

    try:
        with one_line_warnings("kdfast demo", DemoWarning):  # as the errors below, not Python's format
            rows = run_demo(out=args.out, seed=args.seed,
                            anchor=not args.no_anchor, device=args.device, progress=not args.no_progress,
                            cuda_graph=args.cuda_graph, **kwargs)
    except (DemoError, TeacherAssetError, ClassifierAssetError, BackendUnavailableError) as exc:
        print(f"kdfast demo: error: {exc}", file=sys.stderr)  # (a KDFAST_BACKEND that cannot run here too)
        return 2
    print(format_table(rows))
    print(f"\nwrote {args.out}/metrics.json, {args.out}/report.md and {args.out}/grids/")
    return 0


def assets(args) -> int:
    """``kdfast assets build``: retrain the shipped models and compare with the shipped metrics."""
    from .assets_build import TOLERANCE, build_assets
    from .backends import BackendUnavailableError
    from .train.run import OutputDirError

    try:
        result = build_assets(out=args.out, quick=args.quick, seed=args.seed, threads=args.threads,
                              progress=not args.no_progress)
    except (ValueError, OutputDirError, BackendUnavailableError) as exc:  # bad arguments, unwritable outputs
        print(f"kdfast assets build: error: {exc}", file=sys.stderr)
        return 2
    print(f"classifier: held-out accuracy {result['classifier']['heldout_accuracy']:.4f}, "
          f"real-vs-real floor {result['classifier']['real_vs_real_frechet_floor']:.3f}")
    for row in result["teacher"]["results"]:
        print(f"teacher: guidance {row['guidance_scale']}, {row['steps']} steps: Frechet {row.get('frechet')}, "
              f"accuracy {row.get('class_accuracy')}")
    ok = True
    for name, cmp in result["comparison"].items():
        ok &= cmp["ok"]
        print(f"{name}: rebuilt {cmp['rebuilt']:.4f} vs shipped {cmp['shipped']:.4f} "
              f"{'(within tolerance)' if cmp['ok'] else '(OUTSIDE tolerance)'}")
    if result["comparison"]:
        print(f"tolerance: {TOLERANCE}")
    print(f"wrote {args.out}/digits_classifier.safetensors and {args.out}/digits_teacher.safetensors (+ JSON)")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="kdfast", description="Fused kernels for diffusion distillation and sampling")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, what was built and which backends are usable here")
    p = sub.add_parser("demo", help="sample the digits teacher with five solvers (more with --solvers), score it, compare with diffusers")
    p.add_argument("--out", type=_folder, default="kdfast-demo", help="output folder (default: ./kdfast-demo)")
    p.add_argument("--quick", action="store_true", help="2 solvers, 10 and 5 steps, 2 images per class (< 1 minute)")
    p.add_argument("--solvers", help="comma-separated: dpmpp_2m,unipc,deis,ddim,euler,heun,euler_a,sde_dpmpp_2m "
                                     "(default dpmpp_2m,unipc,deis,ddim,euler; heun gives noise on this teacher, "
                                     "as diffusers' Heun does: its sigma ~2e4 start breaks Heun's second-order step)")
    p.add_argument("--steps", type=_int_list, help="comma-separated step counts (default 50,20,10,5)")
    p.add_argument("--n-per-class", type=int, help="samples per class per row, 2 to 10000 (default 10)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 1.2)")
    p.add_argument("--seed", type=seed_arg, default=0, help="an integer in [0, 2**63 - 1] (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-anchor", action="store_true", help="skip the diffusers comparison")
    p.add_argument("--cuda-graph", action="store_true",
                   help="GPU only: capture each kdfast loop (UNet included) once as a CUDA graph and "
                        "time its replay (the capture time goes to capture_ms in metrics.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = sub.add_parser("assets", help="rebuild the embedded default's models")
    a_sub = a.add_subparsers(dest="assets_command", required=True)
    b = a_sub.add_parser("build", help="retrain the digits classifier and teacher from scratch (seeded)")
    b.add_argument("--out", type=_folder, default="kdfast-assets", help="output folder (default: ./kdfast-assets)")
    b.add_argument("--quick", action="store_true", help="a tiny budget (seconds), for testing the pipeline")
    b.add_argument("--seed", type=seed_arg, default=0, help="an integer in [0, 2**63 - 1] (default 0)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (the shipped assets used 1)")
    b.add_argument("--no-progress", action="store_true")
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        with sigterm_raises():
            if args.command == "info":
                print(info(), flush=True)  # (flushed here: a closed pipe is then caught below, not at exit)
            elif args.command == "demo":
                return demo(args)
            elif args.command == "assets":
                return assets(args)
    except ImportError as exc:  # an optional dependency of this command (the message says what to install)
        print(f"kdfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Ctrl-C (or SIGTERM) is the user's choice, not a crash: one line and the shell's status,
        # no traceback. Partial outputs stay incomplete-looking: the demo writes metrics.json and
        # report.md last, and the assets are renamed into place only once whole.
        return interruption_status(f"kdfast {args.command}", exc)
    except BrokenPipeError:
        # The reader went away (`kdfast info | head -1`): stop quietly with the shell's 128 +
        # SIGPIPE; stdout goes to devnull so that Python's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # writing the output failed another way (`> /dev/full`): one line, not a traceback
        print(f"kdfast {args.command}: error: {exc}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (as above)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
