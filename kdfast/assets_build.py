"""``kdfast assets build``: retrain the embedded default's models from scratch.

Trains the digits evaluation classifier and then the digits teacher (both seeded), measures
the teacher with the freshly trained classifier, writes both assets with their JSON, and
compares the results with the shipped ones. The shipped files were built by this command with
its defaults and one torch thread. A rebuild is deterministic on a given machine and thread
count, but byte-identical to the shipped files only on the CPU model that built them: other
CPUs (their kernels) and thread counts change the floating point order, so the comparison
checks the metrics within :data:`TOLERANCE` rather than the bytes (on another x86-64 CPU with
one thread: classifier held-out accuracy 0.9944 vs 0.9972 shipped, teacher Frechet 3.008 vs
3.070 and accuracy 0.982 vs 0.984).

``out`` may be the package's own assets folder (a rebuild in place): the shipped metrics are
read before anything is trained or written, so the rebuilt files are compared with the ones
they replace, not with themselves. Both output paths are checked before the training.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

# Reproduction tolerance against the shipped metrics (different thread counts or CPUs
# change float rounding during training).
TOLERANCE = {"classifier_accuracy": 0.01, "teacher_accuracy": 0.03, "frechet_relative": 0.25}
FULL = dict(classifier_epochs=30, teacher_steps=1200, teacher_batch=128, n_per_class=50, steps=(5, 10, 20, 50),
            guidance_scales=(1.0, 1.5, 2.0))
QUICK = dict(classifier_epochs=1, teacher_steps=5, teacher_batch=16, n_per_class=2, steps=(5,), guidance_scales=(1.0,))


SHIPPED_DIR = Path(__file__).resolve().parent / "assets"
ASSETS = ("digits_classifier", "digits_teacher")


def _shipped(name: str) -> Optional[Dict]:
    path = SHIPPED_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_records() -> Dict[str, Optional[Dict]]:
    """The shipped assets' JSON records (None where one is missing), read now."""
    return {name: _shipped(name) for name in ASSETS}


def _teacher_row(metrics: Dict, guidance: float, steps: int) -> Optional[Dict]:
    for row in metrics.get("results", []):
        if row["guidance_scale"] == guidance and row["steps"] == steps:
            return row
    return None


def compare_with_shipped(classifier_metrics: Dict, teacher_metrics: Dict,
                         shipped: Optional[Dict[str, Optional[Dict]]] = None) -> Dict[str, Dict]:
    """Rebuilt vs shipped figures and whether each is within :data:`TOLERANCE`. ``shipped``:
    the records of :func:`shipped_records`, read before the rebuild (default: read now)."""
    report: Dict[str, Dict] = {}
    shipped = shipped_records() if shipped is None else shipped
    shipped_cls = shipped.get("digits_classifier")
    if shipped_cls:
        a, b = classifier_metrics["heldout_accuracy"], shipped_cls["metrics"]["heldout_accuracy"]
        report["classifier held-out accuracy"] = {"rebuilt": a, "shipped": b,
                                                  "ok": abs(a - b) <= TOLERANCE["classifier_accuracy"]}
    shipped_teacher = shipped.get("digits_teacher")
    if shipped_teacher:
        new, old = _teacher_row(teacher_metrics, 1.0, 50), _teacher_row(shipped_teacher["metrics"], 1.0, 50)
        if new and old and "frechet" in new:
            report["teacher 50-step Frechet (guidance 1)"] = {
                "rebuilt": new["frechet"], "shipped": old["frechet"],
                "ok": abs(new["frechet"] - old["frechet"]) <= TOLERANCE["frechet_relative"] * old["frechet"]}
            report["teacher 50-step accuracy (guidance 1)"] = {
                "rebuilt": new["class_accuracy"], "shipped": old["class_accuracy"],
                "ok": abs(new["class_accuracy"] - old["class_accuracy"]) <= TOLERANCE["teacher_accuracy"]}
    return report


def build_assets(out: str = "kdfast-assets", quick: bool = False, seed: int = 0, threads: Optional[int] = 1,
                 progress: bool = True) -> Dict:
    """Train both models into ``out``; returns their metrics and the comparison with the shipped ones.

    Raises ValueError for a bad argument and :class:`~kdfast.train.run.OutputDirError` for an
    output path that cannot be written, before anything is trained.
    """
    from .eval.classifier import check_weights_path as check_classifier_path
    from .train.teacher import check_weights_path as check_teacher_path

    budget = QUICK if quick else FULL
    # checked before anything is created (torch.set_num_threads(0) raises a RuntimeError)
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or int(threads) < 1):
        raise ValueError(f"threads must be an integer >= 1 (or None for torch's choice), got {threads!r}")
    out_dir = Path(out)
    # Both outputs are checked now, not found unwritable after the training.
    check_classifier_path(out_dir / "digits_classifier.safetensors")
    check_teacher_path(out_dir / "digits_teacher.safetensors")
    # Read before anything is written: ``out`` may be the shipped assets' own folder.
    shipped = shipped_records()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _build(out_dir, budget, seed, threads, progress, quick, shipped)
    finally:
        torch.set_num_threads(previous_threads)


def _build(out_dir: Path, budget: Dict, seed: int, threads: Optional[int], progress: bool, quick: bool,
           shipped: Dict[str, Optional[Dict]]) -> Dict:
    from .eval import DigitsEvaluator
    from .eval.classifier import build_shipped_asset
    from .train.run import atomic_files
    from .train.teacher import measure_samples, save_teacher, train_teacher

    # Built in a staging folder beside the outputs, and moved into place together at the end: an
    # interruption or an error midway leaves the previous set whole (a new classifier beside the
    # old teacher, whose metrics were measured with the old one, would pass both hash checks).
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assets-build-", dir=out_dir))
    try:
        classifier_path = staging / "digits_classifier.safetensors"
        classifier_metrics = build_shipped_asset(classifier_path, epochs=budget["classifier_epochs"], seed=seed,
                                                 progress=progress)
        teacher = train_teacher(steps=budget["teacher_steps"], batch_size=budget["teacher_batch"], seed=seed,
                                progress=progress, num_threads=threads)
        teacher.config["metrics"] = measure_samples(
            teacher, n_per_class=budget["n_per_class"], steps=budget["steps"],
            guidance_scales=budget["guidance_scales"], progress=progress,
            evaluator=DigitsEvaluator(path=classifier_path))
        save_teacher(teacher.model, teacher.config, staging / "digits_teacher.safetensors")
        # the teacher's JSON, which holds the metrics measured with this classifier, last
        files = [f"{name}{suffix}" for name in ASSETS for suffix in (".safetensors", ".json")]
        with atomic_files(*(out_dir / f for f in files)) as temps:
            for f, tmp in zip(files, temps):
                shutil.copyfile(staging / f, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    comparison = {} if quick else compare_with_shipped(classifier_metrics, teacher.config["metrics"], shipped)
    return {"classifier": classifier_metrics, "teacher": teacher.config["metrics"], "comparison": comparison}
