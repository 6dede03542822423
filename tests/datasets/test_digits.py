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
