"""The FusedLinearKDLoss example (examples/distil_tiny_lm.py) runs and the loss falls, online and
from a cached top-k."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distil_tiny_lm.py"


def load_example():
    spec = importlib.util.spec_from_file_location("distil_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distillation_loss_falls():
    losses = load_example().distil(steps=25, vocab=256, seq_len=16, log_every=0)
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert all(l == l for l in losses)  # no NaN
    assert last < 0.85 * first, f"loss did not fall: first {first:.4f}, last {last:.4f}"


def test_offline_distillation_from_a_cached_top_k_loss_falls():
    losses = load_example().distil(steps=25, vocab=256, seq_len=16, log_every=0, offline_topk=16)
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert all(l == l for l in losses)  # no NaN
    assert last < 0.85 * first, f"loss did not fall: first {first:.4f}, last {last:.4f}"


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_non_positive_steps_are_an_argument_error(capsys, steps):
    example = load_example()
    with pytest.raises(SystemExit) as exc:
        example.main(["--steps", steps])
    assert exc.value.code == 2
    assert f"argument --steps: must be an integer >= 1, got {steps}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        example.distil(steps=int(steps), log_every=0)
