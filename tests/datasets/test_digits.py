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
