"""kdfast.sampling_adaptive.sample_dpm_adaptive: k-diffusion's adaptive DPM-Solver, one fused
kernel pass per model evaluation and one host read (the error norm) per step attempt.

Ground truths: k-diffusion's own ``sample_dpm_adaptive`` where it is installed (the ``kds``
fixture of conftest.py, which loads its sampling module alone), and everywhere a pure-torch,
unfused transcription of ``DPMSolver.dpm_solver_adaptive`` (``ref_dpm_adaptive`` below, its
times in float64 Python floats as kdfast's), itself checked against k-diffusion here.
k-diffusion keeps its times in tensors of torch's default dtype: its float64 runs are made
under ``torch.set_default_dtype(torch.float64)``, so that the whole run is float64.
"""
import contextlib
import math

import pytest
import torch

import kdfast
from kdfast import sampling as S
from kdfast.sampling_adaptive import sample_dpm_adaptive
from helpers import assert_close_by_rule
from test_sampling import denoiser, initial, rel_err

SIGMA_MIN, SIGMA_MAX = 0.0292, 14.61
SHAPE = (2, 4, 6, 6)
INFO_KEYS = {'steps', 'nfe', 'n_accept', 'n_reject'}
CALLBACK_KEYS = {'sigma', 'sigma_hat', 'x', 'i', 't', 't_up', 'denoised', 'error', 'h'} | INFO_KEYS


class SharedNoise:
    """The same draw for (nearly) the same ``(sigma, sigma_next)``, whichever sampler asks and
    in whatever order: kdfast also asks for rejected attempts, and k-diffusion's float32 times
    give sigmas that differ from kdfast's float64 ones in the 7th digit."""

    def __init__(self, dtype):
        self.dtype, self.keys, self.draws = dtype, [], []

    def __call__(self, sigma, sigma_next):
        a, b = float(sigma), float(sigma_next)
        for (ka, kb), n in zip(self.keys, self.draws):
            if math.isclose(a, ka, rel_tol=1e-5) and math.isclose(b, kb, rel_tol=1e-5):
                return n
        g = torch.Generator().manual_seed(1000 + len(self.keys))
        self.keys.append((a, b))
        self.draws.append(torch.randn(SHAPE, generator=g, dtype=torch.float64).to(self.dtype))
        return self.draws[-1]


@contextlib.contextmanager
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------- transcription
# k-diffusion's DPMSolver.dpm_solver_adaptive and PIDStepSizeController, unfused, with its eps
# cache unrolled and its times as Python floats.


def ref_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, order=3, rtol=0.05,
                     atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81, eta=0.,
                     s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    sigma = lambda t: math.exp(-t)  # noqa: E731

    def eps_at(x, t):
        return (x - model(x, sigma(t) * x.new_ones([x.shape[0]]), **extra_args)) / sigma(t)

    def solver_2(x, s, t, eps, r1):
        h = t - s
        s1 = s + r1 * h
        eps_r1 = eps_at(x - sigma(s1) * math.expm1(r1 * h) * eps, s1)
        return x - sigma(t) * math.expm1(h) * eps - sigma(t) / (2 * r1) * math.expm1(h) * (eps_r1 - eps), eps_r1

    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    b = [(pcoeff + icoeff + dcoeff), -(pcoeff + 2 * dcoeff), dcoeff]
    b = [v / (1.5 if eta else order) for v in b]
    h_ctl, errs = abs(h_init), []
    s, x_prev = t_start, x
    info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}
    while s < t_end - 1e-5:
        t = min(t_end, s + h_ctl)
        if eta:
            sd, su = S.get_ancestral_step(sigma(s), sigma(t), eta)
            t_ = min(t_end, -math.log(sd)) if sd > 0 else t_end
            su = (sigma(t) ** 2 - sigma(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.
        eps = eps_at(x, s)
        denoised = x - sigma(s) * eps
        h = t_ - s
        if order == 2:
            x_low = x - sigma(t_) * math.expm1(h) * eps
            x_high, _ = solver_2(x, s, t_, eps, 1 / 2)
        else:
            r1, r2 = 1 / 3, 2 / 3
            x_low, eps_r1 = solver_2(x, s, t_, eps, r1)
            s2 = s + r2 * h
            u2 = (x - sigma(s2) * math.expm1(r2 * h) * eps
                  - sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
            eps_r2 = eps_at(u2, s2)
            x_high = x - sigma(t_) * math.expm1(h) * eps - sigma(t_) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inv = 1 / (float(error) + 1e-8)
        errs = errs or [inv, inv, inv]
        errs[0] = inv
        factor = 1 + math.atan(errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2] - 1)
        h_ctl *= factor
        if factor >= accept_safety:
            errs[2], errs[1] = errs[1], errs[0]
            x_prev = x_low
            x = x_high + su * s_noise * noise_sampler(sigma(s), sigma(t)) if eta else x_high
            s = t
            info['n_accept'] += 1
        else:
            info['n_reject'] += 1
        info['nfe'] += order
        info['steps'] += 1
        if callback is not None:
            sig, t_cb = torch.tensor(sigma(s), dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            callback({'sigma': sig, 'sigma_hat': sig, 'x': x, 'i': info['steps'] - 1, 't': t_cb, 't_up': t_cb,
                      'denoised': denoised, 'error': error, 'h': h_ctl, **info})
    return x, info


# --------------------------------------------------------------------------- parity

# With every PID coefficient 0 the step factor is 1: constant steps, six of them 0.005 short
# of sigma_min, then a 0.005 one (the loop runs while t < t_end - 1e-5).
H_CONST = (math.log(SIGMA_MAX / SIGMA_MIN) - 0.005) / 6

CASES = [  # (options, whether some attempt is rejected)
    (dict(order=3, icoeff=0.0, h_init=H_CONST), False),
    (dict(order=3), False),
    (dict(order=2), False),
    (dict(order=3, rtol=0.01, atol=0.001), False),
    (dict(order=2, h_init=2.0), True),
    (dict(order=3, h_init=2.0, extra_args={"shift": 0.1}), True),
    (dict(order=2, pcoeff=0.2, icoeff=0.6, dcoeff=0.1, h_init=1.0, accept_safety=0.9), True),
    (dict(order=3, pcoeff=0.2, icoeff=0.6, dcoeff=0.1, h_init=1.0, accept_safety=0.9, rtol=0.03, atol=0.02), True),
    (dict(order=2, eta=1.0, accept_safety=0.95), True),
    (dict(order=3, eta=0.7, s_noise=0.9, h_init=0.8, rtol=0.03), True),
]


def _options(options, dtype):
    options = dict(options)
    if options.get("eta"):
        options["noise_sampler"] = SharedNoise(dtype)
    return options


# Tolerances of the callbacks' values, relative (error_abs: absolute). In float32 the error
# estimate of a step is a small difference of float32 solutions (or of float32 eps values): it
# has a noise floor of ~1e-7 (k-diffusion's float32 run gives 0.0 for a 0.005 step, kdfast's
# 9e-9, its float64 run 1.4e-8) and is good to only ~1e-2 where it is ~1e-5 (k-diffusion's own
# float32 run is that far from its float64 one), so the step sizes and times of two float32
# runs drift apart by up to ~3e-5 before the last step lands on sigma_min in both.
CALLBACK_TOL = {torch.float32: dict(x=1e-5, sigma=1e-4, h=1e-3, error=3e-2, error_abs=1e-6, state=1e-4),
                torch.float64: dict(x=1e-12, sigma=1e-12, h=1e-10, error=1e-9, error_abs=1e-15, state=1e-12)}


def _run_pair(reference, options, dtype):
    """kdfast against ``reference(x, **options) -> (x, info)`` in ``dtype``: the same info and
    sequence of accepted / rejected attempts, the same callback sequence, the final x within
    CALLBACK_TOL[dtype]['x'] (relative to max(1, max |x|)). Returns the info."""
    tol = CALLBACK_TOL[dtype]
    x = initial(dtype, shape=SHAPE)
    want_cb, got_cb = [], []
    options = _options(options, dtype)  # one SharedNoise for both
    want, want_info = reference(x, callback=want_cb.append, **options)
    got, got_info = sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, callback=got_cb.append, disable=True,
                                        return_info=True, **options)
    assert got.dtype == dtype and set(got_info) == INFO_KEYS
    assert got_info == want_info, (options, dtype)
    assert rel_err(got, want) <= tol['x'], (options, dtype, rel_err(got, want))
    assert len(got_cb) == len(want_cb) == got_info['steps']
    for k, (g, w) in enumerate(zip(got_cb, want_cb)):
        assert set(g) == set(w) == CALLBACK_KEYS
        assert g['i'] == w['i'] == k
        assert all(g[key] == w[key] for key in INFO_KEYS)
        assert float(g['sigma']) == pytest.approx(float(w['sigma']), rel=tol['sigma'])
        assert float(g['sigma_hat']) == float(g['sigma']) and float(g['t']) == float(g['t_up'])
        assert float(g['t']) == pytest.approx(-math.log(float(g['sigma'])), rel=1e-12)
        assert g['h'] == pytest.approx(w['h'], rel=tol['h'])
        assert float(g['error']) == pytest.approx(float(w['error']), rel=tol['error'], abs=tol['error_abs'])
        assert rel_err(g['denoised'], w['denoised']) <= tol['state'] and rel_err(g['x'], w['x']) <= tol['state']
    assert got_cb[-1]['x'] is got and float(got_cb[-1]['sigma']) == pytest.approx(SIGMA_MIN, rel=1e-5)
    return got_info


@pytest.mark.parametrize("options, rejects", CASES)
def test_matches_transcription(options, rejects):
    def reference(x, **kw):
        return ref_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, **kw)

    info = _run_pair(reference, options, torch.float64)
    assert (info['n_reject'] > 0) == rejects  # the rejection path is exercised where meant
    _run_pair(reference, options, torch.float32)


@pytest.mark.parametrize("options, rejects", CASES)
def test_matches_k_diffusion(kds, options, rejects):
    def reference(x, **kw):
        return kds.sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True, return_info=True, **kw)

    info = _run_pair(reference, options, torch.float32)
    assert (info['n_reject'] > 0) == rejects
    with float64_default():  # k-diffusion's times in float64 too
        _run_pair(reference, options, torch.float64)


def test_transcription_matches_k_diffusion(kds):
    for options, _ in CASES[:1] + CASES[4:6] + CASES[-1:]:
        x = initial(torch.float64, shape=SHAPE)
        options = _options(options, torch.float64)
        with float64_default():
            want, want_info = kds.sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True,
                                                      return_info=True, **options)
        got, got_info = ref_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, **options)
        assert got_info == want_info and rel_err(got, want) <= 1e-12, options


def test_default_noise_is_the_global_rng_like_k_diffusion(kds):
    """Without a rejected attempt, the default Gaussian noise (global RNG) is drawn as
    k-diffusion's randn_like (the last step's noise, scaled by 0, is not drawn at all)."""
    x = initial(shape=SHAPE)
    torch.manual_seed(7)
    want, info = kds.sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, eta=0.5, disable=True, return_info=True)
    torch.manual_seed(7)
    got = sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, eta=0.5, disable=True)
    assert info['n_reject'] == 0 and rel_err(got, want) <= 1e-5


def test_generator_draws_the_noise():
    x = initial(shape=SHAPE)
    run = lambda seed: sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, eta=1.0, h_init=1.0,  # noqa: E731
                                           disable=True, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(3), run(3), run(4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    eta0 = sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True)
    assert isinstance(eta0, torch.Tensor) and (a - eta0).abs().max() > 1e-3


def test_a_list_of_generators_draws_each_samples_noise():
    # kdfast's convention for SDE samplers (diffusers' randn_tensor): sample i's noise is what
    # generator i draws for a batch of one (the list was refused)
    x = initial(shape=SHAPE)
    gens = [torch.Generator().manual_seed(i) for i in range(x.shape[0])]
    noise = S.default_noise_sampler(x, [torch.Generator().manual_seed(i) for i in range(x.shape[0])])
    run = lambda **kw: sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, eta=1.0, h_init=1.0,  # noqa: E731
                                           disable=True, **kw)
    torch.testing.assert_close(run(generator=gens), run(noise_sampler=noise), rtol=0, atol=0)


# --------------------------------------------------------------------------- fusion and host reads

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")  # tests/schedulers/parity.py's


@contextlib.contextmanager
def counting_host_reads(counts):
    """Count every way a tensor's value reaches Python (each one a host sync on a GPU)."""
    own = {n: torch.Tensor.__dict__[n] for n in HOST_READS if n in torch.Tensor.__dict__}
    originals = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def counter(name):
        def read(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for n in HOST_READS:
            setattr(torch.Tensor, n, counter(n))
        yield counts
    finally:
        for n in HOST_READS:
            if n in own:
                setattr(torch.Tensor, n, own[n])
            else:
                delattr(torch.Tensor, n)


@pytest.mark.parametrize("options", [dict(order=2, h_init=2.0), dict(order=3, h_init=2.0),
                                     dict(order=3, eta=0.7, h_init=1.0, generator=True)])
def test_one_kernel_per_model_call_and_one_host_read_per_attempt(monkeypatch, options):
    calls = {"model": 0, "kernel": 0}
    real = kdfast.ops.solver_step

    def counting(*args, **kwargs):
        calls["kernel"] += 1
        return real(*args, **kwargs)

    def model(x, sigma, **kw):
        calls["model"] += 1
        return denoiser(x, sigma, **kw)

    monkeypatch.setattr(kdfast.ops, "solver_step", counting)
    options = dict(options)
    if options.pop("generator", False):
        options["generator"] = torch.Generator().manual_seed(0)
    x, infos, reads = initial(shape=SHAPE), [], {}
    with counting_host_reads(reads):
        _, info = sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, extra_args={"shift": 0.05},
                                      callback=infos.append, disable=True, return_info=True, **options)
    assert info['n_reject'] > 0 and len(infos) == info['steps']
    assert calls["model"] == calls["kernel"] == info['nfe'] == options["order"] * info['steps']
    assert reads == {"item": info['steps']}, reads


def test_progress_bar_ticks_once_per_model_evaluation(monkeypatch):
    ticks = []

    class Bar:
        def __init__(self, total, disable):
            ticks.append((total, disable))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            ticks.append(n)

    monkeypatch.setattr(S, "_progress", Bar)
    _, info = sample_dpm_adaptive(denoiser, initial(shape=SHAPE), SIGMA_MIN, SIGMA_MAX, disable=True,
                                  return_info=True)
    assert ticks[0] == (None, True) and sum(ticks[1:]) == len(ticks) - 1 == info['nfe']


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", [2, 3])
def test_half_precision_within_2x_k_diffusion_error(kds, dtype, order):
    """float16/bfloat16 x is stepped in float32 math and returned in its dtype: at most twice
    as far from the float64 result as k-diffusion's own run in that dtype."""
    x = initial(shape=SHAPE)
    with float64_default():
        ref64 = kds.sample_dpm_adaptive(denoiser, x.double(), SIGMA_MIN, SIGMA_MAX, order=order, disable=True)
    lowp = kds.sample_dpm_adaptive(denoiser, x.to(dtype), SIGMA_MIN, SIGMA_MAX, order=order, disable=True)
    got = sample_dpm_adaptive(denoiser, x.to(dtype), SIGMA_MIN, SIGMA_MAX, order=order, disable=True)
    assert got.dtype == dtype
    assert_close_by_rule(got, ref64, lowp, name=f"{dtype} order {order}", slack=2.0, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_eps_and_the_error_in_float32(monkeypatch, dtype):
    """The documented contract (its effect on the result is below what the tests above can
    see): eps and x_low - x_high travel between passes in float32 (float16 would flush an
    error term below 6e-5 to subnormals), and the error norm is a float32 reduction."""
    outputs = []
    real = kdfast.ops.solver_step

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(kdfast.ops, "solver_step", recording)
    infos = []
    got = sample_dpm_adaptive(denoiser, initial(dtype, shape=SHAPE), SIGMA_MIN, SIGMA_MAX, callback=infos.append,
                              disable=True)
    assert got.dtype == dtype and outputs
    assert all(out.sample.dtype == dtype and out.history.dtype == torch.float32 for out in outputs)
    assert all(out.aux is None or out.aux.dtype == dtype for out in outputs)
    assert all(info['error'].dtype == torch.float32 for info in infos)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float64(dtype):
    """Without k-diffusion: within a few of the dtype's rounding units of the float64 result."""
    x = initial(shape=SHAPE)
    ref64 = sample_dpm_adaptive(denoiser, x.double(), SIGMA_MIN, SIGMA_MAX, disable=True)
    got = sample_dpm_adaptive(denoiser, x.to(dtype), SIGMA_MIN, SIGMA_MAX, disable=True)
    assert got.dtype == dtype
    assert rel_err(got, ref64) <= 8 * torch.finfo(dtype).eps


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sigma_min=14.61, sigma_max=0.0292), ValueError, "sigma_min must be below sigma_max"),
    (dict(sigma_min=1.0, sigma_max=1.0), ValueError, "sigma_min and sigma_max are equal"),
    (dict(sigma_min=0.0), ValueError, "sigma_min must be > 0"),
    (dict(sigma_min=-0.1), ValueError, "sigma_min must be > 0"),
    (dict(sigma_max=float("nan")), ValueError, "sigma_max must be finite"),
    (dict(sigma_max="big"), TypeError, "sigma_max must be a number"),
    (dict(order=1), ValueError, "order must be 2 or 3"),
    (dict(order=4), ValueError, "order must be 2 or 3"),
    (dict(order=2.5), ValueError, "order must be 2 or 3"),
    (dict(order=True), ValueError, "order must be 2 or 3"),
    (dict(rtol=-0.1), ValueError, "rtol must be >= 0"),
    (dict(atol=-1e-3), ValueError, "atol must be >= 0"),
    (dict(rtol=0.0, atol=0.0), ValueError, "rtol and atol"),
    (dict(h_init=0.0), ValueError, "h_init must not be 0"),
    (dict(h_init=float("inf")), ValueError, "h_init must be finite"),
    (dict(pcoeff=float("nan")), ValueError, "pcoeff must be finite"),
    (dict(accept_safety=3.0), ValueError, "accept_safety"),
    (dict(eta=-0.5), ValueError, "eta must be >= 0"),
    (dict(s_noise=None), TypeError, "s_noise must be a number"),
    (dict(noise_sampler=3), TypeError, "noise_sampler must be callable"),
    (dict(generator=7), TypeError, "generator must be a torch.Generator"),
    (dict(extra_args=[1]), TypeError, "extra_args must be a dict"),
    (dict(callback=5), TypeError, "callback must be callable"),
    (dict(x=torch.zeros(SHAPE, dtype=torch.int32)), TypeError, "x must be"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(model=denoiser, x=initial(shape=SHAPE), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, disable=True)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sample_dpm_adaptive(**args)


def test_an_entry_that_stays_zero_has_no_error_with_atol_zero():
    # the error of an entry 0 in the low- and high-order samples and the previous one was 0 / 0:
    # a false "non-finite values" error (k-diffusion loops forever there)
    x = initial(shape=SHAPE)
    x[:, 1] = 0
    shrink = lambda x, sigma: x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731  (keeps zeros zero)
    out = sample_dpm_adaptive(shrink, x, SIGMA_MIN, SIGMA_MAX, atol=0.0, rtol=0.05, disable=True)
    assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))


def test_nan_model_output_raises_instead_of_looping():
    calls = []

    def nan_model(x, sigma):
        calls.append(1)
        if len(calls) > 30:  # k-diffusion would loop forever here (its step size becomes NaN)
            raise AssertionError("still sampling after a NaN error estimate")
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="NaN"):
        sample_dpm_adaptive(nan_model, initial(shape=SHAPE), SIGMA_MIN, SIGMA_MAX, disable=True)


def test_an_accept_safety_no_attempt_passes_raises_instead_of_looping():
    # With accept_safety 1.2 the controller settles at error ~1, step factor ~1: every attempt
    # is rejected and h stays put (k-diffusion loops forever here)
    attempts = []

    def stop_runaway(info):
        attempts.append(1)
        if len(attempts) > 1100:
            raise AssertionError("still sampling after 1100 attempts")

    x = initial(torch.float64, shape=(2, 3, 5, 7)) / SIGMA_MAX
    with pytest.raises(RuntimeError, match="1000 attempts in a row were rejected.*accept_safety=1.2"):
        sample_dpm_adaptive(denoiser, x, 0.1, 1.0, order=2, rtol=0.0, h_init=0.001, accept_safety=1.2,
                            callback=stop_runaway, disable=True)
    assert len(attempts) < 1100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_float64_denoiser_output_gives_the_result_in_xs_dtype(dtype):
    # the module's promise: x's dtype whatever the denoiser returns (the kernel refused a float64
    # model output beside a narrower sample)
    x = initial(shape=SHAPE)
    wide = sample_dpm_adaptive(lambda x, sigma: denoiser(x.double(), sigma.double()), x.to(dtype), SIGMA_MIN,
                               SIGMA_MAX, disable=True)
    same = sample_dpm_adaptive(denoiser, x.to(dtype), SIGMA_MIN, SIGMA_MAX, disable=True)
    assert wide.dtype == dtype
    assert rel_err(wide, same) <= 4 * torch.finfo(dtype).eps


def test_an_empty_batch_is_returned_as_it_is():
    x = torch.zeros((0, *SHAPE[1:]))
    out, info = sample_dpm_adaptive(denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True, return_info=True)
    assert out.shape == x.shape and info['nfe'] == 0


@pytest.mark.parametrize("model, kwargs, match", [
    (lambda x, sigma: None, {}, "the denoiser must return a torch.Tensor, got NoneType"),
    (lambda x, sigma: x.to(torch.complex64), {}, "the denoiser must return a floating-point tensor"),
    (denoiser, dict(eta=1.0, noise_sampler=lambda sigma, sigma_next: None),
     "noise_sampler must return a torch.Tensor, got NoneType"),
])
def test_what_the_callables_return_is_checked(model, kwargs, match):
    with pytest.raises(TypeError, match=match):
        sample_dpm_adaptive(model, initial(shape=SHAPE), SIGMA_MIN, SIGMA_MAX, disable=True, **kwargs)


@pytest.mark.parametrize("sampler", ["fast", "adaptive"])
def test_sigmas_whose_coefficients_overflow_float32_are_refused_for_float32_samples(sampler):
    # Steps from 10 to 1e-300 have exp(h) beyond float32's range: a float32 sample gave NaN
    # silently (DPM-Fast) or blamed the model (adaptive); a float64 one is stepped in float64.
    gaussian = lambda x, sigma: x / (1 + sigma[:, None] ** 2)  # noqa: E731 (unit-variance data's denoiser)
    run = {"fast": lambda x: S.sample_dpm_fast(gaussian, x, 1e-300, 10.0, 6, disable=True),
           "adaptive": lambda x: sample_dpm_adaptive(gaussian, x, 1e-300, 10.0, disable=True)}[sampler]
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10
    with pytest.raises(ValueError, match="beyond float32's range.*sample in float64"):
        run(x)
    assert torch.isfinite(run(x.double())).all()
    if sampler == "fast":  # a float64 denoiser promotes a float32 sample to float64, as k-diffusion's arithmetic does
        promoted = S.sample_dpm_fast(lambda x, sigma: gaussian(x, sigma).double(), x, 1e-300, 10.0, 6, disable=True)
        assert promoted.dtype == torch.float64
        torch.testing.assert_close(promoted, run(x.double()), rtol=1e-6, atol=1e-7)
    # sigmas near float32's smallest values are fine: the coefficients are what overflows
    near = S.sample_dpm_fast(gaussian, x, 1e-40, 10.0, 6, disable=True)
    torch.testing.assert_close(near.double(), S.sample_dpm_fast(gaussian, x.double(), 1e-40, 10.0, 6, disable=True),
                               rtol=1e-4, atol=1e-5)
