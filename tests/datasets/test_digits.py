import pytest
import torch

pytest.importorskip("sklearn")

from kdfast.datasets import NUM_CLASSES, load_digits  # noqa: E402


def test_splits_are_disjoint_stratified_and_deterministic():
    xa, ya = load_digits("all", size=8)
    xt, yt = load_digits("train")
    xh, yh = load_digits("heldout")
    assert xa.shape == (1797, 1, 8, 8) and len(yt) + len(yh) == 1797
    assert xt.shape[1:] == (1, 16, 16) and xt.dtype == torch.float32
    assert xt.min() >= -1 and xt.max() <= 1
    assert set(yh.tolist()) == set(range(NUM_CLASSES))
    assert 0.18 < len(yh) / 1797 < 0.22
    # no image of the held-out set appears in the training set
    flat_t = {tuple(v) for v in load_digits("train", size=8)[0].flatten(1).tolist()}
    overlap = sum(tuple(v) in flat_t for v in load_digits("heldout", size=8)[0].flatten(1).tolist())
    assert overlap < 5  # (the raw data itself holds a few duplicate images)
    x2, y2 = load_digits("train")
    assert torch.equal(x2, xt) and torch.equal(y2, yt)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_digits("test")
    with pytest.raises(ValueError, match="size"):
        load_digits(size=12)
    with pytest.raises(ValueError, match="heldout_fraction"):
        load_digits(heldout_fraction=1.5)
    with pytest.raises(ValueError, match="size must be 8, 16 or 32, got True"):
        load_digits(size=True)
    # fractions that round a class's share to none of it, or all of it
    with pytest.raises(ValueError, match="leaves the held-out split without digits of class 0"):
        load_digits("train", heldout_fraction=0.001)
    with pytest.raises(ValueError, match="leaves the training split without digits of class 0"):
        load_digits("heldout", heldout_fraction=0.999)
    for seed in (2**64, -1, 1.5, "0"):
        with pytest.raises(ValueError, match="seed must"):
            load_digits(seed=seed)


def test_integral_float_size_and_seed_are_taken():
    x, y = load_digits("heldout", size=16.0, seed=3.0)
    x3, y3 = load_digits("heldout", size=16, seed=3)
    assert torch.equal(x, x3) and torch.equal(y, y3)


@pytest.mark.parametrize("fraction, message", [
    # these failed in the comparison ("'<' not supported", "Boolean value of Tensor ... is ambiguous")
    (None, "heldout_fraction must be a real number, got None"),
    ("0.2", "heldout_fraction must be a real number, got '0.2'"),
    ([0.2], "heldout_fraction must be a real number, got [0.2]"),
    (torch.tensor([0.2, 0.3]), "heldout_fraction must be a real number"),
    (True, "heldout_fraction must be a real number, got True"),
    (float("nan"), "heldout_fraction must be in (0, 1), got nan"),
    (0.0, "heldout_fraction must be in (0, 1), got 0.0"),
    (1, "heldout_fraction must be in (0, 1), got 1.0"),
])
def test_heldout_fraction_must_be_a_fraction(fraction, message):
    with pytest.raises(ValueError) as exc:
        load_digits("heldout", heldout_fraction=fraction)
    assert message in str(exc.value)


def test_heldout_fraction_takes_numpy_and_0d_tensors():
    import numpy as np

    x, y = load_digits("heldout", heldout_fraction=0.3)
    for fraction in (np.float64(0.3), torch.tensor(0.3, dtype=torch.float64)):
        x2, y2 = load_digits("heldout", heldout_fraction=fraction)
        assert torch.equal(x2, x) and torch.equal(y2, y)


def test_the_split_follows_the_seed():
    # (a seed that was ignored gave every seed the split of seed 0)
    a, b = load_digits("heldout", seed=0), load_digits("heldout", seed=1)
    assert a[0].shape == b[0].shape and not torch.equal(a[0], b[0])
    assert torch.equal(torch.bincount(a[1]), torch.bincount(b[1]))  # stratified either way
