"""Sample-quality metrics on the digits set: a Frechet distance in classifier features and class accuracy.

The Frechet distance is FID's formula with the shipped :class:`~kdfast.eval.classifier.DigitsClassifier`
in place of Inception-v3. Like FID it is biased upward for small sets, so only compare numbers
computed from the same number of images; :meth:`DigitsEvaluator.floor` gives the value two
independent sets of real digits reach, the best any sampler can hope for, and
:meth:`DigitsEvaluator.floor_at` the same at a given sample size.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._checks import check_count, check_int
from ..datasets.digits import NUM_CLASSES, load_digits
from .classifier import IMAGE_SIZE, PathLike, check_device, load_classifier

_INTEGER_DTYPES = {getattr(torch, name) for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
                                                    "uint64") if hasattr(torch, name)}
RANGE_TOLERANCE = 1e-3  # samplers that clip still land a hair outside [-1, 1] after float rounding
FLOOR_DRAWS = 20  # random real sets averaged for a same-size floor (from seed to seed it moves about +-7%)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``.

    ``||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr(sqrt(C_a C_b))``, all in float64. The trace
    of the square root is taken from the centred features themselves, not the covariances: with
    ``C_a = X_a^T X_a / (N - 1)``, it is the sum of the singular values of ``X_a X_b^T`` (through
    the R factors of ``X_a`` and ``X_b``) over ``sqrt((N - 1)(M - 1))``. That stays accurate to
    rounding for the singular covariances of small sets or of features that are always 0, where
    an eigendecomposition of ``sqrt(C_a) C_b sqrt(C_a)`` turns its many zero eigenvalues into
    round-off whose square roots add up (a distance too low by up to ~1e-6 relative). The
    result is clipped at 0 for rounding.

    Features may have any real dtype: floating point or integer, of any width (bool and
    complex are refused). Each set needs at least 2 samples and 1 feature.
    """
    a = _as_features("feats_a", feats_a)
    b = _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    # Features scaled by a power of two near their largest magnitude, which is exact: every
    # intermediate is the unscaled one times a power of 4, but no covariance overflows (features
    # beyond ~1e154) or underflows (below ~1e-162) to a wrong distance.
    _, exponent = math.frexp(max(a.abs().max().item(), b.abs().max().item()))
    a, b = torch.ldexp(a, torch.tensor(-exponent)), torch.ldexp(b, torch.tensor(-exponent))
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mu_a, b - mu_b
    # X_a X_b^T = Q_a (R_a R_b^T) Q_b^T: the same singular values from a min(N, D) x min(M, D) matrix
    r_a = torch.linalg.qr(centred_a, mode="r").R
    r_b = torch.linalg.qr(centred_b, mode="r").R
    trace_sqrt = torch.linalg.svdvals(r_a @ r_b.T).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    trace_a = centred_a.square().sum() / (len(a) - 1)  # unbiased covariances, like numpy.cov and FID
    trace_b = centred_b.square().sum() / (len(b) - 1)
    value = (mu_a - mu_b).square().sum() + trace_a + trace_b - 2 * trace_sqrt
    if not value > 0:
        return 0.0
    try:
        return math.ldexp(float(value), 2 * exponent)
    except OverflowError:  # a distance beyond float64's range
        return math.inf


def _as_features(name: str, feats) -> torch.Tensor:
    if isinstance(feats, np.ndarray):
        # Every real numpy dtype is taken (as float64, which the distance is computed in anyway):
        # torch.from_numpy does not know all of them.
        if feats.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers (an integer or floating-point dtype), "
                            f"got dtype {feats.dtype}")
        feats = torch.from_numpy(feats.astype(np.float64))
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(feats).__name__}")
    if feats.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_samples, feature_dim], got shape {tuple(feats.shape)}")
    # All integer widths, not just int32 / int64: uint8 or int16 features are as real as those.
    if not (feats.dtype.is_floating_point or feats.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must hold real numbers (an integer or floating-point dtype), got dtype {feats.dtype}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {feats.shape[0]}")
    if feats.shape[1] < 1:  # the distance of zero-dimensional features would be a meaningless 0.0
        raise ValueError(f"{name} needs at least 1 feature, got shape {tuple(feats.shape)}")
    feats = feats.detach().to("cpu", torch.float64)
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return feats


# ---------------------------------------------------------------- input checks


def check_images(images, name: str = "images") -> torch.Tensor:
    """``images`` as float32 ``[N, 1, 16, 16]`` in [-1, 1], or a ValueError/TypeError naming ``name``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor with values in [-1, 1], got dtype {images.dtype} "
                        "(convert integer pixels first, e.g. x / 127.5 - 1 for 0..255)")
    expected = (1, IMAGE_SIZE, IMAGE_SIZE)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"{name} must have shape [N, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    images = images.detach().cpu()  # (checked in their own dtype: float64 past float32's range is out of range)
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(clamp samples with .clamp(-1, 1) or rescale them)")
    return images.to(torch.float32).clamp(-1, 1)


def check_labels(labels, num_images: int, name: str = "labels") -> torch.Tensor:
    """``labels`` as int64 ``[num_images]`` in ``[0, 10)``, or a ValueError/TypeError naming ``name``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(labels.shape)}")
    if len(labels) != num_images:
        raise ValueError(f"{name} has {len(labels)} entries but there are {num_images} images")
    labels = labels.detach().cpu()
    # (the range in the labels' own dtype, through numpy: torch has no min of uint64, whose values
    # past 2**63 int64 would wrap to negative ones)
    values = labels.numpy()
    if len(values) and (int(values.min()) < 0 or int(values.max()) >= NUM_CLASSES):
        raise ValueError(f"{name} must be class indices in [0, {NUM_CLASSES}), "
                         f"got values in [{int(values.min())}, {int(values.max())}]")
    return labels.to(torch.int64)


def check_classifier(classifier, method: str = "forward") -> nn.Module:
    """``classifier``, or a TypeError naming it when it is not a torch.nn.Module with ``method``
    (its logits, or the evaluator's ``features``)."""
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be a torch.nn.Module (e.g. a DigitsClassifier), got "
                        f"{type(classifier).__name__}")
    if not callable(getattr(classifier, method, None)):
        raise TypeError(f"classifier must have a {method}() method (as DigitsClassifier has), got "
                        f"{type(classifier).__name__}")
    return classifier


def _check_split(name: str, split) -> str:
    # (isinstance first: a numpy array compared with a string is no truth value)
    if not isinstance(split, str) or split not in ("train", "heldout"):
        raise ValueError(f"{name} must be 'train' or 'heldout', got {split!r}")
    return split


# ---------------------------------------------------------------- metrics


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """A float64 sum of ``t``'s values weighted by their position (1 to 251, repeating)."""
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(251).add_(1)
    return flat @ weights


@torch.no_grad()
def _run(classifier: nn.Module, images: torch.Tensor, method: str, batch_size: int) -> torch.Tensor:
    """Apply ``classifier.<method>`` in eval mode, batched, on the classifier's device; CPU result."""
    was_training = classifier.training
    classifier.eval()
    try:
        # (a classifier without parameters or buffers runs on the CPU)
        first = next(itertools.chain(classifier.parameters(), classifier.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        # (a float64 or 16-bit classifier takes its own dtype; the checked images are float32)
        dtype = first.dtype if first is not None and first.is_floating_point() else images.dtype
        fn = getattr(classifier, method)
        return torch.cat([fn(images[i:i + batch_size].to(device, dtype)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        classifier.train(was_training)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module,
                   batch_size: int = 512) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to ``labels`` (the class each was sampled for)."""
    batch_size = check_count("batch_size", batch_size, 1)  # 0 or -1 would fail deep in range() or torch.cat
    classifier = check_classifier(classifier)
    images = check_images(images)
    labels = check_labels(labels, len(images))
    predicted = _run(classifier, images, "forward", batch_size).argmax(1)
    return float((predicted == labels).double().mean().item())


class DigitsEvaluator:
    """Frechet distance and class accuracy of 16x16 digit samples, against real held-out digits.

    Loads the shipped classifier onto ``device`` (or takes ``classifier``, which stays on its own
    device and keeps its train/eval mode between calls), and computes the real features of
    the "train" and "heldout" splits (``split_seed`` as in :func:`kdfast.datasets.load_digits`)
    once, on first use. Evaluation has no randomness: the same images give the same numbers.
    Keep ``split_seed=0`` with the shipped classifier: it was trained on that split, and
    another split would put its training images in the reference set.
    """

    def __init__(self, classifier: Optional[nn.Module] = None, path: Optional[PathLike] = None,
                 device: Union[str, torch.device] = "cpu", split_seed: int = 0, batch_size: int = 512):
        if classifier is not None and path is not None:
            raise ValueError("pass classifier or path, not both")
        if classifier is not None:  # (refused now, not at the first evaluation)
            check_classifier(classifier, "features")
        device = check_device(device)  # (checked with a classifier passed in too, which it does not move)
        batch_size = check_count("batch_size", batch_size, 1)  # int(1.5) would silently be 1
        # A classifier passed in stays where it is and as it is (a training loop may evaluate
        # its own model): each evaluation runs it in eval mode and restores its mode.
        self.classifier = classifier if classifier is not None else load_classifier(path, device)
        self.split_seed = check_int("split_seed", split_seed, minimum=0)  # (int() would read 1.5 as 1)
        self.batch_size = int(batch_size)
        self._real: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._real_features: Dict[str, Tuple[Tuple[Tuple[int, int], ...], torch.Tensor]] = {}

    def real(self, split: str = "heldout") -> Tuple[torch.Tensor, torch.Tensor]:
        """The real 16x16 images and labels of ``split`` ("train" or "heldout")."""
        split = _check_split("split", split)
        if split not in self._real:
            self._real[split] = load_digits(split, size=IMAGE_SIZE, seed=self.split_seed)
        return self._real[split]

    def real_features(self, split: str = "heldout") -> torch.Tensor:
        """Classifier features of the real ``split`` images, cached while the classifier's
        weights stay as they are (a training loop evaluating its own classifier changes them)."""
        split = _check_split("split", split)
        state = self._weights_state()
        cached = self._real_features.get(split)
        if cached is None or cached[0] != state:
            cached = self._real_features[split] = (state, self.features(self.real(split)[0]))
        return cached[1]

    def _weights_state(self) -> Tuple:
        # Each tensor's storage and version counter: an in-place update (an optimizer step,
        # load_state_dict, mul_) bumps the version, a replaced tensor has a new address.
        # (Inference tensors have no version counter; they cannot be updated outside inference mode.)
        # An update through .data (an EMA's p.data.mul_) bumps no version: a checksum of the
        # values, position-weighted (a swap of two values changes it too), sees those.
        tensors = list(itertools.chain(self.classifier.parameters(), self.classifier.buffers()))
        with torch.no_grad():
            checksum = sum(float(_checksum(t)) for t in tensors if t.numel())
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors), checksum

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier features ``[N, feature_dim]`` (float32, CPU) of checked ``images``."""
        return _run(self.classifier, check_images(images), "features", self.batch_size)

    def evaluate(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 reference: str = "heldout") -> Dict[str, Optional[float]]:
        """``{"frechet": ..., "accuracy": ..., "num_images": N}`` for samples ``[N, 1, 16, 16]`` in [-1, 1].

        ``frechet`` compares the samples' features with the real ``reference`` split's;
        ``accuracy`` is the share classified as ``labels`` (None without labels). At least 2
        images are needed; hundreds are needed for a meaningful Frechet distance.
        """
        reference = _check_split("reference", reference)  # (before the features are computed)
        images = check_images(images)
        if len(images) < 2:
            raise ValueError(f"images needs at least 2 images for a Frechet distance, got {len(images)}")
        if labels is not None:
            labels = check_labels(labels, len(images))
        feats = self.features(images)
        result: Dict[str, Optional[float]] = {
            "frechet": frechet_distance(feats, self.real_features(reference)),
            "accuracy": None,
            "num_images": len(images),
        }
        if labels is not None:
            logits = _run(self.classifier, images, "forward", self.batch_size)
            result["accuracy"] = float((logits.argmax(1) == labels).double().mean().item())
        return result

    def floor(self) -> float:
        """Frechet distance between the real "train" and "heldout" splits: the real-vs-real floor."""
        return frechet_distance(self.real_features("train"), self.real_features("heldout"))

    def floor_draws(self, n_per_class: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> List[float]:
        """Frechet distances to the held-out split of ``draws`` random class-balanced sets of real
        training digits, ``n_per_class`` per class: the real-vs-real floor at the sample size of
        ``n_per_class`` samples per class, with its spread.

        The sets are drawn with a generator seeded by ``seed`` (the same numbers every call).
        One fixed subset would not do: which images it holds moves the distance by 3x at 10
        per class (the first 10 of each class in the file give 13.7, the last 10 give 19.8,
        random sets 4.9 to 8.8).
        """
        n_per_class = check_int("n_per_class", n_per_class, minimum=2)
        draws = check_count("draws", draws, 1)
        # (int() would read "1", True and 1.5 as 1; the generator takes any int64 >= 0, as split_seed)
        seed = check_int("seed", seed, minimum=0)
        labels = self.real("train")[1]
        by_class = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
        smallest = min(len(idx) for idx in by_class)
        if n_per_class > smallest:
            raise ValueError(f"n_per_class must be at most {smallest} (the smallest class of the {len(labels)} "
                             f"real training digits), got {n_per_class}: no real set of that size exists")
        feats, reference = self.real_features("train"), self.real_features("heldout")
        gen = torch.Generator().manual_seed(seed)
        distances = []
        for _ in range(int(draws)):
            pick = torch.cat([idx[torch.randperm(len(idx), generator=gen)[:int(n_per_class)]] for idx in by_class])
            distances.append(frechet_distance(feats[pick], reference))
        return distances

    def floor_at(self, n_per_class: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> float:
        """The mean of :meth:`floor_draws`: what real digits score at this sample size, to compare
        ``10 * n_per_class`` class-balanced samples with."""
        return float(np.mean(self.floor_draws(n_per_class, draws, seed)))
