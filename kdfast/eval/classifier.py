"""A small CNN classifier of 16x16 digits: the feature extractor behind kdfast's digits metrics.

It plays the role Inception-v3 plays for FID on natural images: its penultimate features feed
the Frechet distance and its logits give the class accuracy of class-conditional samples. A
trained copy ships as ``kdfast/assets/digits_classifier.safetensors`` with a JSON beside it that
records the architecture and the measured metrics. ``python -m kdfast.eval --threads 1`` rebuilds it:
the rebuild is deterministic on a given machine and thread count, and byte-identical to the
shipped file only on the CPU model that built it (the weights depend on the CPU's kernels and the
thread count through float summation order). Elsewhere its metrics reproduce within the
tolerance of ``kdfast assets build`` (held-out accuracy within 0.01: e.g. 0.9944 against the
shipped 0.9972 on another x86-64 CPU).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_float, check_int, real_number
from ..datasets.digits import NUM_CLASSES, load_digits
from ..train.run import atomic_files, check_output_file, progress_bar

IMAGE_SIZE = 16
SHIPPED_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.safetensors"
DEFAULT_CONFIG = {"channels": (32, 64), "feature_dim": 128, "dropout": 0.2, "num_classes": NUM_CLASSES,
                  "image_size": IMAGE_SIZE}

PathLike = Union[str, Path]


class ClassifierAssetError(RuntimeError):
    """A classifier file is missing, unreadable, corrupt or does not match its architecture."""


class DigitsClassifier(nn.Module):
    """Two conv blocks, a pooled ``feature_dim`` feature layer and a linear head.

    Input ``[N, 1, 16, 16]`` in [-1, 1]. :meth:`features` returns the penultimate (post-ReLU)
    features used for Frechet distances; :meth:`forward` returns the ``num_classes`` logits.
    """

    def __init__(self, channels: Tuple[int, int] = (32, 64), feature_dim: int = 128, dropout: float = 0.2,
                 num_classes: int = NUM_CLASSES, image_size: int = IMAGE_SIZE):
        super().__init__()
        if image_size != IMAGE_SIZE:
            raise ValueError(f"image_size must be {IMAGE_SIZE}, got {image_size}")
        # (int() would take 8.5 as 8 and True as 1, and float() "0.1": each setting is checked by name)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, (tuple, list)) or len(channels) != 2:
            raise ValueError("channels must be a sequence of 2 positive integers (the widths of the two conv "
                             f"blocks), got {channels!r}")
        c1, c2 = (check_int(f"channels[{k}]", c, minimum=1) for k, c in enumerate(channels))
        feature_dim = check_int("feature_dim", feature_dim, minimum=1)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        dropout = check_float("dropout", real_number("dropout", dropout), 0.0, 1.0, high_open=True)
        self.config = {"channels": (c1, c2), "feature_dim": feature_dim, "dropout": dropout,
                       "num_classes": num_classes, "image_size": int(image_size)}
        self.body = nn.Sequential(
            _conv_block(1, c1), _conv_block(c1, c1), nn.MaxPool2d(2),    # 16 -> 8
            _conv_block(c1, c2), _conv_block(c2, c2), nn.MaxPool2d(2),   # 8 -> 4
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),                       # 4 -> 2: keeps coarse layout, few weights
        )
        self.feature = nn.Sequential(nn.Linear(c2 * 4, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]``."""
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.dropout(self.features(x)))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    # BatchNorm makes a few hundred Adam steps enough; in eval mode it is a fixed affine map.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own integer offset in ``[-max_shift, max_shift]`` on both axes.

    Pixels shifted in are background (-1), not wrapped around, so a digit never reappears on
    the opposite edge.
    """
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    rows = (torch.arange(h) + dy)[:, :, None]                  # [n, h, 1]
    cols = (torch.arange(w) + dx)[:, None, :]                  # [n, 1, w]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``images`` in eval mode, in batches (no input checks; see kdfast.eval.metrics)."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def train_classifier(epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                     weight_decay: float = 1e-4, max_shift: int = 2, progress: bool = True,
                     **config) -> Tuple[DigitsClassifier, Dict[str, float]]:
    """Train a :class:`DigitsClassifier` on the "train" split of :func:`kdfast.datasets.load_digits`.

    Light augmentation: every image is shifted by up to ``max_shift`` pixels per epoch. Adam
    with a one-cycle learning rate. Everything random is drawn from generators seeded by
    ``seed``, so a run is repeatable on a given machine and thread count; the caller's global
    RNG state is left as it was.

    Returns the model (in eval mode) and metrics: ``heldout_accuracy``, ``train_accuracy``,
    ``final_loss``, ``train_seconds``, ``epochs``, ``seed``.
    """
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=2)  # (BatchNorm needs 2 or more)
    seed = check_int("seed", seed, minimum=0)
    max_shift = check_int("max_shift", max_shift, minimum=0)
    lr = check_float("lr", lr, 0.0, math.inf)
    weight_decay = check_float("weight_decay", weight_decay, 0.0, math.inf)
    # weight init and dropout from a forked, seeded global RNG: the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)  # batch order and shifts
        model = DigitsClassifier(**{**DEFAULT_CONFIG, **config})
        x_train, y_train = load_digits("train", size=IMAGE_SIZE, seed=0)
        x_held, y_held = load_digits("heldout", size=IMAGE_SIZE, seed=0)
        steps_per_epoch = -(-len(x_train) // batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)

        bar = progress_bar(range(epochs), enabled=progress, desc="digits classifier")  # on a terminal only
        loss = torch.tensor(float("nan"))
        for _ in bar:
            model.train()
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) < 2:  # a batch of one breaks BatchNorm's statistics
                    continue
                x = random_shift(x_train[idx], max_shift, gen)
                loss = F.cross_entropy(model(x), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        model.eval()
        metrics = {
            "heldout_accuracy": _accuracy(model, x_held, y_held),
            "train_accuracy": _accuracy(model, x_train, y_train),
            "final_loss": float(loss.item()),
            "train_seconds": time.perf_counter() - start,
            "epochs": int(epochs),
            "seed": int(seed),
        }
        return model, metrics


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict_logits(model, images).argmax(1) == labels).double().mean().item())


# ---------------------------------------------------------------- files


def metadata_path(path: PathLike) -> Path:
    """The JSON that sits beside a classifier file (same name, ``.json``)."""
    return Path(path).with_suffix(".json")


def check_path(path, name: str = "path") -> Path:
    """``path`` as a Path, or a TypeError naming ``name`` when it is not a str or os.PathLike
    (``Path(123)`` fails with os.PathLike's own message, ``Path(None)`` likewise)."""
    if isinstance(path, (str, os.PathLike)):
        try:
            return Path(path)
        except TypeError:  # an os.PathLike of bytes
            pass
    raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device, or an error naming ``name``: a TypeError for what is not a str,
    torch.device or int (``model.to(True)`` would read True as a dtype), a ValueError for a string
    torch does not know as a device ("bogus", "cuda:x")."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{name} must be a str or torch.device (e.g. 'cpu' or 'cuda:0'), got "
                        f"{type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {device!r}") from None


def _json_metrics(metrics) -> Dict:
    """``metrics`` as a JSON-ready dict: 0-d tensors and numpy scalars become Python numbers (a
    measured accuracy is often one), anything JSON cannot hold is a TypeError naming its key."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict (or None), got {type(metrics).__name__}")
    return _json_value("metrics", metrics)


def _json_value(where: str, value):
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{where} must be a number, string, bool, None, list or dict; got a tensor of shape "
                            f"{tuple(value.shape)} (pass a 0-d tensor or .tolist())")
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} keys must be strings (JSON object keys), got {key!r}")
            out[key] = _json_value(f"{where}[{key!r}]", item)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(f"{where}[{k}]", item) for k, item in enumerate(value)]
    raise TypeError(f"{where} must be a number, string, bool, None, list or dict (what JSON holds), "
                    f"got {type(value).__name__}: {value!r}")


def _refuse_json_suffix(path: PathLike) -> Path:
    path = check_path(path)
    if path.suffix.lower() == ".json":  # metadata_path(path) would be path: the JSON would overwrite the weights
        raise ValueError(f"classifier weights path {str(path)!r} must not end in .json: its metadata is written "
                         "beside it as <name>.json (use e.g. .safetensors)")
    return path


def check_weights_path(path: PathLike) -> Path:
    """Refuse, before any training, a weights path that cannot be saved to: one ending in
    ``.json``, or one where the weights or their JSON cannot be written. Raises ValueError or
    :class:`~kdfast.train.run.OutputDirError` (an OSError) naming the path and the reason."""
    path = check_output_file(_refuse_json_suffix(path), "classifier weights file")
    # save_classifier writes both: a JSON path that is a folder must not be found after the training
    check_output_file(metadata_path(path), "classifier metadata file")
    return path


def save_classifier(model: DigitsClassifier, path: PathLike, metrics: Optional[Dict] = None) -> Path:
    """Write the weights to ``path`` (safetensors) and a JSON beside it.

    The architecture config is stored twice: in the safetensors metadata, so the weights file
    alone is enough to load, and in the JSON, with ``metrics`` and the file's SHA-256 for
    people and for :func:`load_classifier`'s integrity check.

    Both files are written under temporary names in the same folder and renamed over the old
    ones (:func:`~kdfast.train.run.atomic_files`), the weights first and the JSON last: an
    interruption leaves the previous pair, whole. Only between the two renames (an instant)
    would a crash leave new weights beside the old JSON, which :func:`load_classifier`
    reports as a SHA-256 mismatch.
    """
    from safetensors.torch import save_file

    if not isinstance(model, DigitsClassifier):
        raise TypeError(f"model must be a DigitsClassifier, got {type(model).__name__}")
    path = _refuse_json_suffix(path)
    metrics = _json_metrics(metrics)  # (before anything is written)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_files(path, metadata_path(path)) as (weights_tmp, json_tmp):
        # one metadata key only: safetensors writes several in random order, and the bytes must be reproducible
        save_file(state, str(weights_tmp), metadata={"config": json.dumps(model.config, sort_keys=True)})
        info = {"config": model.config, "metrics": metrics, "weights_file": path.name,
                "sha256": _sha256(weights_tmp), "bytes": weights_tmp.stat().st_size}
        json_tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def load_classifier(path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu") -> DigitsClassifier:
    """Load a classifier written by :func:`save_classifier` (default: the shipped one), in eval mode.

    Raises :class:`ClassifierAssetError` when the file is missing, not a safetensors file,
    differs from the SHA-256 its JSON records, or does not fit the stored architecture.
    """
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover
        raise ImportError("loading the digits classifier needs safetensors: pip install safetensors") from exc
    path = check_path(path) if path is not None else SHIPPED_PATH
    device = check_device(device)  # (before the file is read)
    if not path.is_file():
        hint = " (rebuild it with: python -m kdfast.eval --threads 1)" if path == SHIPPED_PATH else ""
        raise ClassifierAssetError(f"classifier file {path} does not exist{hint}")
    meta_file = metadata_path(path)
    if meta_file.is_file():
        try:
            expected = json.loads(meta_file.read_text()).get("sha256")
        except (ValueError, AttributeError) as exc:
            raise ClassifierAssetError(f"classifier metadata {meta_file} is not valid JSON: {exc}") from exc
        if expected is not None and expected != _sha256(path):
            raise ClassifierAssetError(f"classifier file {path} is corrupt or was changed: its SHA-256 differs "
                                       f"from the one recorded in {meta_file.name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {})["config"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except KeyError as exc:
        raise ClassifierAssetError(f"classifier file {path} has no architecture config in its metadata") from exc
    except Exception as exc:  # safetensors raises its own error types (and OSError) on bad bytes
        raise ClassifierAssetError(f"classifier file {path} is not a readable safetensors file: {exc}") from exc
    try:
        model = DigitsClassifier(**config)
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ClassifierAssetError(f"classifier file {path} does not match its architecture config: {exc}") from exc
    return model.to(device).eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_shipped_asset(path: PathLike = SHIPPED_PATH, epochs: int = 30, seed: int = 0,
                        progress: bool = True) -> Dict:
    """Train with ``seed``, measure held-out accuracy and the real-vs-real Frechet floor, save both.

    This is how ``kdfast/assets/digits_classifier.safetensors`` and its JSON are produced
    (with one torch thread, recorded in the JSON with the torch version). ``path`` is checked
    (see :func:`check_weights_path`) before the training.
    """
    from .metrics import DigitsEvaluator

    check_weights_path(path)
    model, metrics = train_classifier(epochs=epochs, seed=seed, progress=progress)
    evaluator = DigitsEvaluator(classifier=model)
    metrics["real_vs_real_frechet_floor"] = evaluator.floor()
    metrics["heldout_accuracy_via_evaluator"] = evaluator.evaluate(*evaluator.real("heldout"))["accuracy"]
    metrics["torch_version"] = torch.__version__
    metrics["torch_threads"] = torch.get_num_threads()
    save_classifier(model, path, metrics)
    return metrics

