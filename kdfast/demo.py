"""``kdfast demo``: the main job on the embedded default.

Samples the shipped digits teacher with each kdfast solver at several step counts (guided),
runs the same loop with the diffusers scheduler of the same config as the anchor, and scores
both with the shipped digits classifier: Frechet distance in its feature space and class
accuracy, next to milliseconds per image. Writes PNG grids, ``metrics.json`` and
``report.md`` to the output folder.
"""
from __future__ import annotations

import collections.abc
import importlib
import inspect
import json
import math
import numbers
import platform
import re
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import check_flag, check_float, check_int
# MAX_SEED: the step generator takes seed + 1
from .train.run import MAX_SEED, OutputDirError, atomic_files, prepare_output_dir, progress_bar

# Demo solver name -> the teacher's scheduler key (kdfast.train.teacher.SCHEDULERS).
SOLVERS = {
    "dpmpp_2m": "dpmsolver++",
    "unipc": "unipc",
    "deis": "deis",
    "ddim": "ddim",
    "euler": "euler",
    "heun": "heun",  # selectable, but gives noise on the shipped teacher: see SOLVER_NOTES
    "euler_a": "euler_ancestral",
    "sde_dpmpp_2m": "sde-dpmsolver++",
}
DEFAULT_SOLVERS = ("dpmpp_2m", "unipc", "deis", "ddim", "euler")
DEFAULT_STEPS = (50, 20, 10, 5)
# Measured on the shipped teacher (500 samples, 50 DPM-Solver++ steps): guidance 1.0 gives
# Frechet 3.07 / accuracy 98.4%, 1.2 gives 3.61 / 99.4%, 1.5 gives 6.03 / 99.8%, against a
# real-vs-real floor of 2.43 for 500 real digits. 1.2 keeps the distance within 1.5x of the
# floor and accuracy > 99%.
DEFAULT_GUIDANCE = 1.2
DEFAULT_N_PER_CLASS = 10  # 100 images per row: the whole default run stays within ~3 minutes on 2 cores
QUICK = dict(solvers=("dpmpp_2m", "ddim"), steps=(10, 5), n_per_class=2)
# Images per class at most: 100,000 images per configuration, far past what the Frechet distance
# of 10 classes needs (a billion failed allocating 80 GB after the output folder was made).
MAX_N_PER_CLASS = 10_000
# Solvers whose samples of the shipped teacher are not meaningful, and why: warned about when
# selected and recorded in the rows, metrics.json and report.md.
SOLVER_NOTES = {
    "heun": "heun gives noise on this teacher from 2 steps on (Frechet in the hundreds, accuracy ~0.2), in "
            "diffusers' Heun too: the teacher's schedule (squaredcos_cap_v2, trailing spacing) starts at sigma "
            "~2e4 and falls to single digits in the first step, where Heun's averaged second-order step "
            "amplifies the model's error ~1e4-fold; kdfast's Heun matches diffusers' statistically (same Frechet "
            "and accuracy), but single samples differ because each side's float32 rounding is amplified the "
            "same way, so its rows only compare the two loops' speed and statistics",
}


class DemoWarning(UserWarning):
    """A selected solver's results are not meaningful on the shipped teacher (see SOLVER_NOTES)."""


class DemoError(ValueError):
    """Bad demo arguments; the message names the argument."""


def _check_args(solvers: Sequence[str], steps: Sequence[int], n_per_class: int, guidance_scale: float,
                seed: int) -> Tuple[List[int], int, float]:
    """The checked arguments: ``steps`` and ``n_per_class`` as ints, ``guidance_scale`` as a float."""
    steps_given, guidance_scale_given = list(steps), guidance_scale
    if not solvers:
        raise DemoError(f"solvers must name at least one solver; expected some of {', '.join(SOLVERS)}")
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown:
        raise DemoError(f"unknown solver(s) {unknown}; expected some of {', '.join(SOLVERS)}")
    try:
        steps = [check_int("steps", s, minimum=1) for s in steps]
    except ValueError:
        steps = None
    if not steps:
        raise DemoError(f"steps must be integers >= 1, got {list(steps_given)}")
    # A repeated value would run the same configuration again and write duplicate rows.
    for name, values in (("solvers", list(solvers)), ("steps", steps)):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if repeated:
            raise DemoError(f"{name} must not repeat a value, got {', '.join(map(str, repeated))} more than once")
    try:
        n_per_class = check_int("n_per_class", n_per_class, minimum=2)
        if n_per_class > MAX_N_PER_CLASS:
            raise ValueError
    except ValueError:
        raise DemoError(f"n_per_class must be an integer in [2, {MAX_N_PER_CLASS}] (a Frechet distance needs several "
                        f"images), got {n_per_class!r}") from None
    try:
        guidance_scale = check_float("guidance_scale", guidance_scale, -math.inf, math.inf)
    except ValueError:
        raise DemoError(f"guidance_scale must be a finite number, got {guidance_scale_given!r}") from None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise DemoError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    return steps, n_per_class, guidance_scale


def _check_steps_fit(steps: Sequence[int], teacher) -> None:
    """A loop samples distinct training timesteps: more steps than the teacher was trained with
    are refused by DDIM and repeat timesteps in the other solvers."""
    limit = int(teacher.config["noise_schedule"]["num_train_timesteps"])
    too_many = [n for n in steps if n > limit]
    if too_many:
        raise DemoError(f"steps must be <= {limit} (the teacher's training timesteps), got {too_many}")


def _resolve_device(device: Optional[str]) -> torch.device:
    """The demo's device, checked before anything is written (the demo runs on cpu or cuda only)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DemoError(f"device must be cpu or cuda (or cuda:N), got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise DemoError(f"device must be cpu or cuda (or cuda:N), got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DemoError(f"device {device!r}: no CUDA GPU is visible here (use device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DemoError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return resolved


# What the demo writes into grids/: <solver>_<steps>.png.
_GRID_NAME = re.compile(r"^(%s)_\d+\.png$" % "|".join(re.escape(s) for s in SOLVERS))


def _clear_previous_outputs(out_dir, keep: Sequence = ()) -> None:
    """Remove the grids an earlier demo run wrote here, but those in ``keep`` (this run's), so
    that the folder never mixes grids of another run with this run's metrics. Other files are
    left alone."""
    grids, keep = out_dir / "grids", set(keep)
    stale = [p for p in grids.iterdir() if p.is_file() and _GRID_NAME.match(p.name) and p not in keep]
    for path in stale:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise DemoError(f"cannot remove the previous run's {path}: {exc}") from exc


def solver_notes(solvers: Sequence[str]) -> Dict[str, str]:
    """The notes of :data:`SOLVER_NOTES` for the selected solvers."""
    return {s: SOLVER_NOTES[s] for s in dict.fromkeys(solvers) if s in SOLVER_NOTES}


@torch.no_grad()
def _anchor_sample(teacher, scheduler_key: str, n_per_class: int, steps: int, guidance_scale: float, seed: int,
                   timer: Optional["_SolverTimer"] = None):
    """The same sampling loop with the diffusers scheduler and unfused guidance, drawing the
    same initial and per-step noise as ``Teacher.sample`` (so the two should agree: in its
    batches, as stochastic schedulers draw their noise batch by batch), on the network as saved
    (``teacher.model``: what a diffusers pipeline would run), where ``Teacher.sample`` runs its
    inference form."""
    import diffusers

    from .train.teacher import SAMPLE_BATCH, SCHEDULERS

    class_name, options = SCHEDULERS[scheduler_key]
    sched = getattr(diffusers, class_name).from_config(teacher.scheduler_config, **options)
    device = teacher.device
    labels = torch.arange(teacher.num_classes).repeat_interleave(n_per_class)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((len(labels), teacher.model.config.in_channels, teacher.sample_size, teacher.sample_size),
                        generator=gen)
    step_gen = torch.Generator(device=device).manual_seed(int(seed) + 1)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    out = []
    for start in range(0, len(labels), SAMPLE_BATCH):
        y = labels[start:start + SAMPLE_BATCH].to(device)
        y2 = torch.cat([torch.full_like(y, teacher.null_class), y])
        sched.set_timesteps(steps, device=device)
        x = noise[start:start + SAMPLE_BATCH].to(device) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            if guidance_scale == 1.0:
                pred = teacher.model(inp, t, y)
                solver_start = time.perf_counter()
            else:
                u, c = teacher.model(torch.cat([inp, inp]), t, y2).chunk(2)
                solver_start = time.perf_counter()  # guidance is part of the solver work kdfast fuses
                pred = u + guidance_scale * (c - u)
            kwargs = {"generator": step_gen} if takes_generator else {}
            x = sched.step(pred, t, x, **kwargs).prev_sample
            if timer is not None:
                timer.seconds += time.perf_counter() - solver_start
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out), labels


class _SolverTimer:
    """Host seconds spent in the solver: around a kdfast scheduler's step methods, or, in the
    anchor loop, around the guidance combine and diffusers' step. (On a GPU these are launch
    costs, which is what a CUDA-graph-free loop pays per step.)"""

    def __init__(self, scheduler=None):
        self.seconds = 0.0
        if scheduler is not None:
            for name in ("step", "step_cfg"):
                setattr(scheduler, name, self._wrap(getattr(scheduler, name)))

    def _wrap(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _real_floor(evaluator, n_per_class: int) -> Optional[Dict[str, float]]:
    """The real-vs-real Frechet floor at the demo's sample size: mean, min and max over random
    class-balanced sets of ``n_per_class`` real training digits per class (the distance grows as
    samples shrink). None when the training split has fewer digits in some class."""
    try:
        draws = evaluator.floor_draws(n_per_class)
    except ValueError:
        return None
    return {"mean": sum(draws) / len(draws), "min": min(draws), "max": max(draws), "draws": len(draws)}


def _floor_sentence(floor: Optional[Dict[str, float]], n_images: int) -> str:
    if floor is None:
        return (f"The training split has too few digits of some class for a real set of {n_images} "
                "(class-balanced), so there is no real-vs-real value at this sample size: compare rows with each other.")
    return (f"The distance grows as the sample shrinks: {floor['mean']:.2f} for {n_images} real training images "
            f"(mean of {floor['draws']} random class-balanced sets; {floor['min']:.2f} to {floor['max']:.2f}), so "
            "compare rows with each other and with that, not with the full-set floor.")


def _markdown(rows: List[Dict], settings: Dict, floor: Optional[Dict[str, float]], floor_full: float) -> str:
    lines = ["# kdfast demo: digits teacher, kdfast solvers vs diffusers", "",
             f"{settings['n_images']} guided samples per row (guidance {settings['guidance_scale']}), "
             f"seed {settings['seed']}, on {settings['device']}.",
             f"Real-vs-real Frechet distance: {floor_full:.2f} (all {settings['n_train']} training images vs "
             f"held-out). " + _floor_sentence(floor, settings["n_images"]), "",
             "| solver | steps | model evals | Frechet | accuracy | ms/image | solver ms/image | diffusers Frechet "
             "| diffusers ms/image | diffusers solver ms/image | max abs diff to diffusers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['model_evals']} | {_fmt(r['frechet'])} "
                     f"| {_fmt(r['accuracy'], '.3f')} "
                     f"| {r['ms_per_image']:.2f} | {_fmt(r['solver_ms_per_image'], '.3f')} | {_fmt(r['anchor_frechet'])} "
                     f"| {_fmt(r['anchor_ms_per_image'])} | {_fmt(r['anchor_solver_ms_per_image'], '.3f')} "
                     f"| {_fmt(r['max_abs_diff'], '.1e')} |")
    speedup = overall_speedup(rows)
    lines += ["", "ms/image is the whole loop (model forwards included); solver ms/image only the sampler's "
              "own work per image (kdfast's fused step; for diffusers, the guidance combine and `step`). "
              "kdfast's loop runs the teacher's inference form (`UNet.for_inference()`: channels-last, kdfast's "
              "fused group norm + SiLU); the diffusers loop runs the network as saved (contiguous, torch modules)."
              + ("" if speedup is None else f" Over all rows, the kdfast loop took {time_per_image(speedup)} time "
                 "per image than the diffusers loop (sums of the ms/image columns).")
              + (" kdfast's loops ran as CUDA graphs: ms/image times a replay, each configuration having been "
                 "captured once before (`capture_ms` in metrics.json)." if settings["cuda_graph"] else ""),
              "", "Grids: `grids/<solver>_<steps>.png` (one row per class, 0 to 9).", ""]
    for solver, note in settings["notes"].items():
        lines += [f"**Note on {solver}:** {note}.", ""]
    for note in _non_finite_notes(rows):
        lines += [f"**Not finite:** {note}.", ""]
    return "\n".join(lines)


def _fmt(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def run_demo(out: str = "kdfast-demo", solvers: Sequence[str] = DEFAULT_SOLVERS,
             steps: Sequence[int] = DEFAULT_STEPS, n_per_class: int = DEFAULT_N_PER_CLASS,
             guidance_scale: float = DEFAULT_GUIDANCE,
             seed: int = 0, anchor: bool = True, device: Optional[str] = None, progress: bool = True,
             cuda_graph: bool = False) -> List[Dict]:
    """Run the demo; returns the metric rows (also written to ``<out>/metrics.json``).

    ``cuda_graph=True`` (GPU only) runs each kdfast loop as one captured CUDA graph: each
    configuration is captured once (``capture_ms`` in its row) and ``ms_per_image`` times a
    replay; the solver's time is then inside the graph and not reported separately.

    A solver of :data:`SOLVER_NOTES` (heun) issues a :class:`DemoWarning`, and its note goes
    into its rows (``note``), ``settings["notes"]`` and the report. A sample set that holds
    NaN or inf is not scored: its Frechet distance and accuracy are None, and
    ``non_finite_images`` (``anchor_non_finite_images`` for diffusers') counts its images that
    are not finite. Earlier demo outputs in ``out`` (``grids/<solver>_<steps>.png``,
    ``metrics.json``, ``report.md``) are replaced once this run's are ready (a run that fails
    leaves them); other files there are left alone.
    """
    from .eval import DigitsEvaluator
    from .train.teacher import load_teacher, save_grid

    # (a string is a sequence: "ddim" would be the solvers d, d, i, m)
    for name, value in (("solvers", solvers), ("steps", steps)):
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Iterable):
            raise DemoError(f"{name} must be a list, got {value!r}")
    solvers, steps = list(solvers), list(steps)
    if not all(isinstance(s, str) for s in solvers):
        raise DemoError(f"solvers must be names of solvers, got {list(solvers)}")
    try:
        anchor, progress, cuda_graph = (check_flag(n, v) for n, v in
                                        (("anchor", anchor), ("progress", progress), ("cuda_graph", cuda_graph)))
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    steps, n_per_class, guidance_scale = _check_args(solvers, steps, n_per_class, guidance_scale, seed)
    # Every argument is checked before the output folder is created or cleared.
    device = _resolve_device(device)
    if cuda_graph and device.type != "cuda":
        raise DemoError(f"cuda_graph needs a CUDA device, got {device} (on a machine with a GPU: --device cuda, "
                        "or device='cuda' from Python)")
    if anchor:
        try:
            importlib.import_module("diffusers")
        except ImportError as exc:
            raise DemoError("the diffusers anchor needs diffusers (pip install diffusers), or pass anchor=False "
                            "(--no-anchor)") from exc
    teacher = load_teacher(device=device)
    _check_steps_fit(steps, teacher)
    notes = solver_notes(solvers)
    for note in notes.values():
        warnings.warn(note, DemoWarning, stacklevel=2)
    try:
        out_dir = prepare_output_dir(out, subdirs=("grids",))
    except OutputDirError as exc:
        raise DemoError(str(exc)) from exc
    # Every file the run writes is checked now, not found to be a folder after the sampling
    # (an earlier run's files are removed below, so only folders are in the way).
    for path in [out_dir / "grids" / f"{s}_{n}.png" for s in solvers for n in steps] + \
            [out_dir / "metrics.json", out_dir / "report.md"]:
        if path.is_dir():
            raise DemoError(f"output file {str(path)!r} is not writable: it is an existing folder")
    evaluator = DigitsEvaluator(device=device)
    floor, floor_full = _real_floor(evaluator, n_per_class), evaluator.floor()
    # One-time costs (kernel selection for these batch shapes, lazy imports) must not be
    # charged to whichever configuration happens to run first.
    first = SOLVERS[solvers[0]]
    teacher.sample(n_per_class, 3, guidance_scale, scheduler=first, seed=seed, cuda_graph=cuda_graph)
    if anchor:
        _anchor_sample(teacher, first, n_per_class, 3, guidance_scale, seed)

    rows, grids = [], {}
    # progress_bar: a bar on a terminal only, no carriage-return noise in logs
    bar = progress_bar(total=len(solvers) * len(steps), desc="kdfast demo", enabled=progress)
    for solver in solvers:
        key = SOLVERS[solver]
        for n in steps:
            sched = teacher.make_scheduler(key)
            timer = _SolverTimer(sched)
            run = lambda: teacher.sample(n_per_class, n, guidance_scale, scheduler=sched,  # noqa: E731
                                         seed=seed, cuda_graph=cuda_graph)
            # With CUDA graphs the first call captures the loop; the timed one replays it.
            capture_secs = _timed(run)[1] if cuda_graph else None
            (images, labels), secs = _timed(run)
            scores = _scores(evaluator, images, labels)
            row = {"solver": solver, "steps": n, "model_evals": _evals(teacher, key, n),
                   "frechet": scores["frechet"], "accuracy": scores["accuracy"],
                   "ms_per_image": secs * 1e3 / len(images),
                   "solver_ms_per_image": None if cuda_graph else timer.seconds * 1e3 / len(images),
                   "capture_ms": None if capture_secs is None else capture_secs * 1e3,
                   "anchor_ms_per_image": None, "anchor_solver_ms_per_image": None,
                   "anchor_frechet": None, "anchor_accuracy": None, "max_abs_diff": None,
                   "non_finite_images": scores["non_finite_images"], "anchor_non_finite_images": None,
                   "note": notes.get(solver)}
            if anchor:
                ref_timer = _SolverTimer()
                (ref, _), ref_secs = _timed(lambda: _anchor_sample(teacher, key, n_per_class, n, guidance_scale,
                                                                   seed, ref_timer))
                ref_scores = _scores(evaluator, ref, labels)
                finite = not (scores["non_finite_images"] or ref_scores["non_finite_images"])
                row.update(anchor_ms_per_image=ref_secs * 1e3 / len(ref),
                           anchor_solver_ms_per_image=ref_timer.seconds * 1e3 / len(ref),
                           anchor_frechet=ref_scores["frechet"], anchor_accuracy=ref_scores["accuracy"],
                           anchor_non_finite_images=ref_scores["non_finite_images"],
                           max_abs_diff=float((images - ref).abs().max()) if finite else None)
            grids[f"{solver}_{n}.png"] = images
            rows.append(row)
            bar.update(1)
    bar.close()

    settings = {"n_images": 10 * n_per_class, "n_per_class": n_per_class, "guidance_scale": guidance_scale,
                "cuda_graph": cuda_graph,
                "seed": seed, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                "cpu": platform.machine(), "torch_threads": torch.get_num_threads(),
                "n_train": len(evaluator.real("train")[1]), "frechet_floor": floor, "frechet_floor_all": floor_full,
                "notes": notes, "overall_speedup": overall_speedup(rows),
                "kdfast_teacher": "UNet.for_inference(): channels-last, fused group norm + SiLU",
                "anchor_teacher": "the network as saved: contiguous, torch modules"}
    # The earlier run's outputs are replaced only now, all at once (atomic_files: written whole
    # to temporaries, then renamed), and its other grids removed after: a run that fails or is
    # interrupted before leaves them as they were.
    grid_paths = [out_dir / "grids" / name for name in grids]
    with atomic_files(*grid_paths, out_dir / "metrics.json", out_dir / "report.md") as temps:
        for tmp, images in zip(temps, grids.values()):
            save_grid(images, tmp, nrow=n_per_class)
        temps[-2].write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
        temps[-1].write_text(_markdown(rows, settings, floor, floor_full))
    _clear_previous_outputs(out_dir, keep=grid_paths)
    return rows


def _scores(evaluator, images: torch.Tensor, labels: torch.Tensor) -> Dict:
    """The evaluator's Frechet distance and accuracy of a sample set, None for both when any
    image is not finite (a loop that diverged: diffusers' Euler-ancestral at 3 steps, whose
    float32 ``sigma_down`` is the square root of a negative round-off, say), with the count of
    such images."""
    bad = int((~torch.isfinite(images.flatten(1))).any(dim=1).sum())
    if bad:
        return {"frechet": None, "accuracy": None, "non_finite_images": bad}
    return {**evaluator.evaluate(images, labels), "non_finite_images": 0}


def _non_finite_notes(rows: List[Dict]) -> List[str]:
    """One line per row whose kdfast or diffusers samples were not all finite (and not scored)."""
    lines = []
    for r in rows:
        for side, key in (("kdfast", "non_finite_images"), ("diffusers", "anchor_non_finite_images")):
            if r.get(key):
                lines.append(f"{r['solver']} at {r['steps']} steps: {r[key]} {side} images hold NaN or inf "
                             f"(not scored)")
    return lines


def _evals(teacher, key: str, steps: int) -> int:
    """Model evaluations per image: scheduler steps (Heun's second-order steps count twice)."""
    sched = teacher.make_scheduler(key)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def overall_speedup(rows: List[Dict]) -> Optional[float]:
    """The diffusers loop's summed ms/image over kdfast's, over the rows that have both (one
    figure less noisy than any row's: each row is timed once) with finite samples on both sides
    (arithmetic on NaN can run at another speed: 13x slower through the teacher on a CPU)."""
    pairs = [(r["anchor_ms_per_image"], r["ms_per_image"]) for r in rows if r.get("anchor_ms_per_image") is not None
             and not r.get("non_finite_images") and not r.get("anchor_non_finite_images")]
    if not pairs:
        return None
    return sum(a for a, _ in pairs) / sum(k for _, k in pairs)


def time_per_image(speedup: float) -> str:
    """:func:`overall_speedup` in words: ``"1.14x less"`` or, where kdfast's loop was slower,
    ``"1.02x more"`` (time per image than the diffusers loop's)."""
    return f"{speedup:.2f}x less" if speedup >= 1 else f"{1 / speedup:.2f}x more"


def format_table(rows: List[Dict]) -> str:
    head = (f"{'solver':<13}{'steps':>6}{'evals':>6}{'Frechet':>9}{'acc':>7}{'ms/img':>9}{'step ms/img':>12}"
            f"{'df Frechet':>11}{'df ms/img':>10}{'df step':>9}{'max|diff|':>11}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['solver']:<13}{r['steps']:>6}{r['model_evals']:>6}{_fmt(r['frechet']):>9}"
                     f"{_fmt(r['accuracy'], '.3f'):>7}"
                     f"{r['ms_per_image']:>9.2f}{_fmt(r['solver_ms_per_image'], '.3f'):>12}{_fmt(r['anchor_frechet']):>11}"
                     f"{_fmt(r['anchor_ms_per_image']):>10}{_fmt(r['anchor_solver_ms_per_image'], '.3f'):>9}"
                     f"{_fmt(r['max_abs_diff'], '.1e'):>11}")
    speedup = overall_speedup(rows)
    if speedup is not None:
        lines.append(f"kdfast loop vs diffusers loop, all rows: {time_per_image(speedup)} time per image")
    for note in dict.fromkeys(r["note"] for r in rows if r.get("note")):
        lines.append(f"note: {note}")
    lines += [f"note: {note}" for note in _non_finite_notes(rows)]
    return "\n".join(lines)
