import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from kdfast.eval import DigitsEvaluator, class_accuracy, frechet_distance  # noqa: E402


def _correlated(n, d, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + shift


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


# ---------------------------------------------------------------- frechet_distance


def test_frechet_matches_direct_scipy_formula():
    linalg = pytest.importorskip("scipy.linalg")
    a, b = _correlated(300, 12, seed=1), _correlated(250, 12, seed=2, shift=0.5)
    an, bn = a.numpy(), b.numpy()
    mu_a, mu_b = an.mean(0), bn.mean(0)
    cov_a, cov_b = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    got = frechet_distance(a, b)
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(an, bn) == pytest.approx(got, rel=1e-12)       # numpy input too
    assert frechet_distance(b, a) == pytest.approx(got, rel=1e-8)          # symmetric
    assert frechet_distance(a.float(), b.float()) == pytest.approx(got, rel=1e-5)  # float32 in, float64 inside


def test_frechet_of_singular_covariances_matches_the_closed_form():
    """Two samples per set give rank-1 covariances u u^T and v v^T (u, v half the samples'
    difference, times sqrt(2)), whose distance is ||d mu||^2 + ||u||^2 + ||v||^2 - 2 |u.v|. An
    eigendecomposition of sqrt(C_a) C_b sqrt(C_a) turned its 511 zero eigenvalues into round-off
    whose square roots added up: the distance came out ~5e-8 relative too low."""
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(2, 512, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 512, generator=gen, dtype=torch.float64) + 0.25
    u, v = (a[0] - a[1]) / math.sqrt(2), (b[0] - b[1]) / math.sqrt(2)
    d_mu = a.mean(0) - b.mean(0)
    expected = (d_mu @ d_mu + u @ u + v @ v - 2 * (u @ v).abs()).item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-9)  # of terms ~1e3


def test_frechet_identical_sets_is_zero():
    a = _correlated(200, 16, seed=3)
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: singular covariances stay real and ~0
    small = _correlated(10, 64, seed=4)
    assert frechet_distance(small, small) == pytest.approx(0.0, abs=1e-6)


def test_frechet_of_shifted_gaussians_is_squared_mean_distance():
    a = _correlated(500, 8, seed=5)
    delta = torch.linspace(-1.0, 2.0, 8, dtype=torch.float64)
    # the same samples shifted: equal covariances exactly, so the trace terms cancel
    assert frechet_distance(a, a + delta) == pytest.approx(delta.square().sum().item(), rel=1e-9)
    # independent draws: the analytic value up to sampling error
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(20000, 4, generator=gen, dtype=torch.float64) + 3.0
    assert frechet_distance(x, y) == pytest.approx(36.0, rel=0.02)


@pytest.mark.parametrize("scale", [2.0**-500, 1e-150, 1e150, 2.0**500])
def test_frechet_of_huge_or_tiny_features_scales_with_them(scale):
    # the covariances of such features overflow (or underflow) float64 unless scaled first
    a, b = _correlated(50, 6, seed=7), _correlated(40, 6, seed=8) + 0.5
    expected = frechet_distance(a, b)
    assert frechet_distance(a * scale, b * scale) == pytest.approx(expected * scale**2, rel=1e-9)
    assert frechet_distance(a * 1e200, b * 1e200) == float("inf")  # ~1e400: beyond float64, as it is


def test_frechet_bad_inputs_name_the_argument():
    good = torch.randn(10, 4)
    with pytest.raises(ValueError, match="feats_a.*2-D"):
        frechet_distance(torch.randn(10), good)
    with pytest.raises(ValueError, match="feats_b.*2-D"):
        frechet_distance(good, torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="feature dimension"):
        frechet_distance(good, torch.randn(10, 5))
    with pytest.raises(ValueError, match="feats_b.*at least 2"):
        frechet_distance(good, torch.randn(1, 4))
    bad = good.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="feats_a.*NaN"):
        frechet_distance(bad, good)
    with pytest.raises(TypeError, match="feats_a"):
        frechet_distance([[1.0, 2.0]], good)
    with pytest.raises(TypeError, match="feats_b"):
        frechet_distance(good, torch.ones(10, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="feats_b must hold real numbers"):
        frechet_distance(good.numpy(), np.ones((10, 4), np.complex64))
    with pytest.raises(ValueError, match=r"feats_a needs at least 1 feature, got shape \(10, 0\)"):
        frechet_distance(torch.randn(10, 0), torch.randn(10, 0))  # not a silent 0.0


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.uint64,
                                   np.float16, np.float32])
def test_frechet_takes_every_real_dtype(dtype):
    # one rule for all integer widths: uint8 / int16 features were refused while int32 / int64 passed
    gen = np.random.default_rng(0)
    a, b = gen.integers(0, 50, (12, 3)), gen.integers(0, 50, (12, 3))
    expected = frechet_distance(a.astype(np.float64), b.astype(np.float64))
    assert frechet_distance(a.astype(dtype), b.astype(dtype)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).to(torch.int16), torch.from_numpy(b).to(torch.uint8)) == \
        pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- DigitsEvaluator


def test_real_vs_real_floor_is_small_and_heldout_scores_high(evaluator):
    floor = evaluator.floor()
    assert 0.0 < floor < 10.0
    x_held, y_held = evaluator.real("heldout")
    x_train, y_train = evaluator.real("train")
    held = evaluator.evaluate(x_held, y_held)
    assert held["accuracy"] >= 0.97
    assert held["frechet"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself
    assert held["num_images"] == len(x_held)
    train = evaluator.evaluate(x_train, y_train)
    assert train["frechet"] == pytest.approx(floor, rel=1e-9)
    assert train["accuracy"] >= 0.97
    assert evaluator.evaluate(x_train)["accuracy"] is None
    assert class_accuracy(x_held, y_held, evaluator.classifier) == held["accuracy"]


def test_noise_scores_far_from_real_and_near_chance(evaluator):
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 1, 16, 16, generator=gen) * 2 - 1
    labels = torch.arange(500) % 10
    result = evaluator.evaluate(noise, labels)
    assert result["frechet"] > 20 * evaluator.floor()
    assert result["accuracy"] < 0.25
    # wrong labels on real images: chance accuracy, unchanged Frechet distance
    x_held, y_held = evaluator.real("heldout")
    assert evaluator.evaluate(x_held, (y_held + 1) % 10)["accuracy"] < 0.05


def test_same_size_floor_is_a_seeded_average_of_random_real_sets(evaluator):
    draws = evaluator.floor_draws(10, draws=8, seed=3)
    assert len(draws) == 8 and len(set(draws)) == 8  # different sets each draw
    assert draws == evaluator.floor_draws(10, draws=8, seed=3)  # the same sets for a seed
    assert evaluator.floor_at(10, draws=8, seed=3) == pytest.approx(np.mean(draws), rel=1e-12)
    # smaller sets sit higher above the full-set floor
    assert evaluator.floor() < evaluator.floor_at(50, draws=4) < min(draws)
    # the first 10 training digits of each class are an outlier (13.7) among random sets (~5-9):
    # a fixed subset is not a floor
    images, labels = evaluator.real("train")
    first = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(10)])
    assert evaluator.evaluate(images[first], labels[first])["frechet"] > max(draws)


def test_same_size_floor_refuses_sets_real_data_cannot_fill(evaluator):
    smallest = min(int((evaluator.real("train")[1] == c).sum()) for c in range(10))
    assert len(evaluator.floor_draws(smallest, draws=1)) == 1
    with pytest.raises(ValueError, match=f"n_per_class must be at most {smallest}"):
        evaluator.floor_draws(smallest + 1)
    for bad in (1, 2.5, True, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="n_per_class must be an integer >= 2"):
            evaluator.floor_draws(bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="draws must be an integer >= 1"):
            evaluator.floor_at(10, draws=bad)


def test_split_seed_must_be_a_whole_number():
    # int(1.5) would silently split with seed 1
    from kdfast.eval import DigitsEvaluator

    for bad in (1.5, -1, "1", True):
        with pytest.raises(ValueError, match="split_seed must be"):
            DigitsEvaluator(split_seed=bad)
    assert DigitsEvaluator(split_seed=2.0).split_seed == 2


def test_a_classifier_passed_in_keeps_its_mode():
    from kdfast.eval import DigitsClassifier

    model = DigitsClassifier().train()
    evaluator = DigitsEvaluator(classifier=model)
    assert model.training
    gen = torch.Generator().manual_seed(0)
    evaluator.evaluate(torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1, torch.arange(4))
    assert model.training  # evaluated in eval mode, then restored


def test_reference_features_follow_a_classifier_that_changes():
    # a training loop may evaluate its own classifier: its real features must not stay cached
    from kdfast.eval import load_classifier

    model = load_classifier()
    evaluator = DigitsEvaluator(classifier=model)
    images, labels = evaluator.real("heldout")
    assert evaluator.evaluate(images, labels)["frechet"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    assert evaluator.evaluate(images, labels)["frechet"] == pytest.approx(0.0, abs=1e-6)
    model.load_state_dict(load_classifier().state_dict())
    assert evaluator.evaluate(images, labels)["frechet"] == pytest.approx(0.0, abs=1e-6)
    # an update through .data (an EMA's p.data.mul_) bumps no version counter: the cached
    # features of the old weights were compared with the new weights' (Frechet 733, not 0)
    for p in model.parameters():
        p.data.mul_(0.5)
    assert evaluator.evaluate(images, labels)["frechet"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_classifier_of_another_dtype_takes_the_images_in_it(dtype):
    # (the checked images are float32: a float64 or bf16 classifier failed on a dtype mismatch)
    from kdfast.eval import load_classifier

    images, labels = DigitsEvaluator().real("heldout")
    images, labels = images[:200], labels[:200]
    expected = class_accuracy(images, labels, load_classifier())
    assert class_accuracy(images, labels, load_classifier().to(dtype)) == pytest.approx(expected, abs=0.02)
    scores = DigitsEvaluator(classifier=load_classifier().to(dtype)).evaluate(images, labels)
    assert scores["accuracy"] == pytest.approx(expected, abs=0.02)


def test_reference_features_under_inference_mode():
    # (inference tensors have no version counter for the cache's key)
    with torch.inference_mode():
        features = DigitsEvaluator().real_features()
    assert features.shape[0] == len(DigitsEvaluator().real("heldout")[1])


def test_evaluation_is_deterministic():
    a, b = DigitsEvaluator(), DigitsEvaluator()
    assert a.floor() == b.floor()
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (64,), generator=gen)
    assert a.evaluate(images, labels) == b.evaluate(images, labels) == a.evaluate(images, labels)


def test_bad_images_and_labels_name_the_argument(evaluator):
    x_held, y_held = evaluator.real("heldout")
    x, y = x_held[:20], y_held[:20]
    with pytest.raises(ValueError, match=r"images must have shape \[N, 1, 16, 16\]"):
        evaluator.evaluate(torch.zeros(20, 1, 8, 8))
    with pytest.raises(ValueError, match="images must have shape"):
        evaluator.evaluate(torch.zeros(20, 16, 16))
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        evaluator.evaluate((x + 1) * 127.5)
    with pytest.raises(TypeError, match="images must be a floating-point"):
        evaluator.evaluate(((x + 1) * 127.5).to(torch.uint8))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        evaluator.evaluate(x.numpy())
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images contains NaN"):
        evaluator.evaluate(nan)
    with pytest.raises(ValueError, match="at least 2"):
        evaluator.evaluate(x[:1])
    with pytest.raises(ValueError, match="labels has 19 entries but there are 20 images"):
        evaluator.evaluate(x, y[:19])
    with pytest.raises(TypeError, match="labels must be an integer"):
        evaluator.evaluate(x, y.float())
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
        evaluator.evaluate(x, y + 10)
    with pytest.raises(ValueError, match="labels has 19 entries"):
        class_accuracy(x, y[:19], evaluator.classifier)
    for batch_size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"batch_size must be an integer >= 1, got {batch_size!r}"):
            class_accuracy(x, y, evaluator.classifier, batch_size=batch_size)
        with pytest.raises(ValueError, match=rf"batch_size must be an integer >= 1, got {batch_size!r}"):
            DigitsEvaluator(classifier=evaluator.classifier, batch_size=batch_size)
    assert class_accuracy(x, y, evaluator.classifier, batch_size=3) == class_accuracy(x, y, evaluator.classifier)
    with pytest.raises(ValueError, match="split"):
        evaluator.real("test")
    # float64 input and a hair outside [-1, 1] (sampler round-off) are accepted
    assert evaluator.evaluate((x * 1.0005).double(), y)["accuracy"] >= 0.9
    # checked in their own dtype: a float64 1e39 is out of range (it read as float32's inf), and
    # a uint64 label past 2**63 is named as given (int64 wrapped it to a negative number)
    big = x.double()
    big[0, 0, 0, 0] = 1e39
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\], got values in \[.*, 1e\+39\]"):
        evaluator.evaluate(big)
    if hasattr(torch, "uint64"):
        huge = torch.from_numpy(np.array([2**63 + 5] + y[1:].tolist(), dtype=np.uint64))
        with pytest.raises(ValueError, match=rf"got values in \[\d+, {2**63 + 5}\]"):
            evaluator.evaluate(x, huge)
        assert evaluator.evaluate(x, y.to(torch.uint64))["accuracy"] == evaluator.evaluate(x, y)["accuracy"]


def _images(n=4):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("call, error, message", [
    # a non-Module classifier failed deep ('NoneType' object has no attribute 'training')
    (lambda ev: class_accuracy(_images(), torch.arange(4), None), TypeError,
     "classifier must be a torch.nn.Module (e.g. a DigitsClassifier), got NoneType"),
    (lambda ev: class_accuracy(_images(), torch.arange(4), "clf"), TypeError,
     "classifier must be a torch.nn.Module (e.g. a DigitsClassifier), got str"),
    # refused when the evaluator is made, not at its first evaluation
    (lambda ev: DigitsEvaluator(classifier=42), TypeError, "classifier must be a torch.nn.Module"),
    (lambda ev: DigitsEvaluator(classifier="clf"), TypeError, "classifier must be a torch.nn.Module"),
    (lambda ev: DigitsEvaluator(classifier=torch.nn.Linear(2, 2)), TypeError,
     "classifier must have a features() method"),
    # torch's raw device error did not name the argument
    (lambda ev: DigitsEvaluator(device="bogus"), ValueError, "device must be a device such as 'cpu' or 'cuda:0', "
                                                             "got 'bogus'"),
    (lambda ev: DigitsEvaluator(device=True), TypeError, "device must be a str or torch.device"),
    (lambda ev: DigitsEvaluator(classifier=ev.classifier, device="bogus"), ValueError, "device must be a device"),
    # reference was checked as "split", and only after the features were computed
    (lambda ev: ev.evaluate(_images(), reference="bogus"), ValueError,
     "reference must be 'train' or 'heldout', got 'bogus'"),
    (lambda ev: ev.evaluate(_images(1), reference="test"), ValueError, "reference must be 'train' or 'heldout'"),
    (lambda ev: ev.evaluate(_images(), reference=["heldout"]), ValueError, "reference must be 'train' or 'heldout'"),
    (lambda ev: ev.real_features(np.array(["train", "heldout"])), ValueError, "split must be 'train' or 'heldout'"),
    # int(seed) read "1", True and 1.5 as 1, took -1, and failed unclearly on None, nan and 2**70
    (lambda ev: ev.floor_draws(2, 1, "1"), ValueError, "seed must be an integer >= 0, got '1'"),
    (lambda ev: ev.floor_draws(2, 1, True), ValueError, "seed must be an integer >= 0, got True"),
    (lambda ev: ev.floor_draws(2, 1, 1.5), ValueError, "seed must be an integer >= 0, got 1.5"),
    (lambda ev: ev.floor_draws(2, 1, -1), ValueError, "seed must be an integer >= 0, got -1"),
    (lambda ev: ev.floor_draws(2, 1, None), ValueError, "seed must be an integer >= 0, got None"),
    (lambda ev: ev.floor_draws(2, 1, float("nan")), ValueError, "seed must be an integer >= 0, got nan"),
    (lambda ev: ev.floor_draws(2, 1, 2**70), ValueError, "seed must fit in int64"),
    (lambda ev: ev.floor_at(2, 1, "1"), ValueError, "seed must be an integer >= 0, got '1'"),
])
def test_bad_arguments_are_refused_by_name(evaluator, call, error, message):
    with pytest.raises(error) as exc:
        call(evaluator)
    assert message in str(exc.value)


def test_floor_seed_takes_whole_numbers(evaluator):
    draws = evaluator.floor_draws(2, 2, seed=3)
    assert evaluator.floor_draws(2, 2, seed=np.int64(3)) == draws == evaluator.floor_draws(2, 2, seed=3.0)
    assert len(evaluator.floor_draws(2, 1, seed=2**63 - 1)) == 1  # the largest seed the generator takes
