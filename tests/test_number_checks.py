"""Numbers given to the ops: an integer too large for a float is refused by the argument's name.

``float(10**400)`` raises OverflowError, which escaped the checks as a bare error naming no
argument; now it is read as +-inf, which each check refuses by name."""
import fractions

import pytest
import torch

from kdfast import losses, ops

HUGE = 10 ** 400
X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
COEFS = torch.tensor(ops.coefficients(1.0, -0.5, {"x": 0.9, "x0": 0.1}))


@pytest.mark.parametrize("call, name", [
    (lambda v: ops.kd_divergence(X, X, temperature=v), "temperature"),
    (lambda v: ops.kd_divergence(X, X, kind="skew_kl", beta=v), "beta"),
    (lambda v: ops.solver_step(X, X, COEFS, cond=X, guidance_scale=v), "guidance_scale"),
    (lambda v: ops.threshold_scale(X, X, 0.0, 1.0, ratio=v), "ratio"),
    (lambda v: ops.threshold_scale(X, X, 0.0, 1.0, max_value=v), "max_value"),
    (lambda v: ops.group_norm_act(X.reshape(2, 4, 2, 2), 2, eps=v), "eps"),
    (lambda v: ops.pseudo_huber(X, X, c=v), "c"),
    (lambda v: ops.pseudo_huber(X, X, c=-v), "c"),
    (lambda v: losses.kd_loss(X, X, temperature=v), "temperature"),
])
@pytest.mark.parametrize("value", [HUGE, fractions.Fraction(HUGE)])
def test_an_integer_beyond_floats_range_is_refused_by_name(call, name, value):
    with pytest.raises(ValueError, match=rf"^{name} "):
        call(value)
