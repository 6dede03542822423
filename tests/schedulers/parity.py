"""Parity harness: run the same sampling loop through a diffusers scheduler and a kdfast one."""
import contextlib

import torch

diffusers = __import__("pytest").importorskip("diffusers")


def dummy_model(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic and input-dependent, like a network: any mistake in x or t shows up."""
    tf = float(t) / 1000.0
    xf = x.float()
    return (torch.sin(1.3 * xf + tf) * 0.6 + 0.1 * xf * (1.0 - tf) + 0.05 * tf).to(x.dtype)


def dummy_cfg(x: torch.Tensor, t):
    """(uncond, cond) outputs of a guided model."""
    return dummy_model(x, t), dummy_model(0.97 * x + 0.02, t)


def initial_sample(shape=(2, 4, 8, 8), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_loop(scheduler, steps, sample, guidance_scale=None, seed=0, fused_cfg=False, begin_index=None,
             **set_kwargs):
    """Sample with ``scheduler``; CFG combined outside (diffusers style) or fused (step_cfg)."""
    scheduler.set_timesteps(steps, **set_kwargs)
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
    gen = torch.Generator().manual_seed(seed)
    # (diffusers' flow-matching schedulers have neither: their pipelines start at unit noise)
    x = sample * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        if guidance_scale is None:
            x = scheduler.step(dummy_model(inp, t), t, x, generator=gen).prev_sample
        else:
            u, c = dummy_cfg(inp, t)
            if fused_cfg:
                x = scheduler.step_cfg(u, c, guidance_scale, t, x, generator=gen).prev_sample
            else:
                x = scheduler.step(u + guidance_scale * (c - u), t, x, generator=gen).prev_sample
    return x


def parity_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max(1, max |expected|) (the issue's metric)."""
    got, expected = got.double(), expected.double()
    return ((got - expected).abs().max() / max(1.0, expected.abs().max().item())).item()


def assert_parity(kd_cls, df_cls, config, steps=20, dtype=torch.float32, tol=1e-5, guidance_scale=None,
                  shape=(2, 4, 8, 8), **set_kwargs):
    """kdfast and diffusers give the same loop result; returns both for further checks.

    fp32: parity error <= ``tol`` (1e-5). fp16/bf16: the tolerance rule of DESIGN.md, with the
    fp32 diffusers loop as the truth: kdfast's error is at most 2x diffusers' own error in that
    dtype (kdfast keeps the current step's x0 in fp32 where diffusers rounds it).
    """
    df = df_cls(**config)
    kd = kd_cls.from_config(df.config)
    x = initial_sample(shape, dtype)
    expected = run_loop(df, steps, x, guidance_scale, **set_kwargs)
    got = run_loop(kd, steps, x, guidance_scale, fused_cfg=guidance_scale is not None, **set_kwargs)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(kd.timesteps.cpu().to(torch.float64), df.timesteps.cpu().to(torch.float64)), \
        (kd.timesteps, df.timesteps)
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        err = parity_error(got, expected)
        assert err <= tol, f"{kd_cls.__name__} {config} steps={steps}: parity error {err:.3e} > {tol:.1e}"
    else:
        truth = run_loop(df_cls(**config), steps, x.float(), guidance_scale, **set_kwargs)
        err, base = parity_error(got, truth), parity_error(expected, truth)
        assert err <= 2 * base + 1e-4, f"{kd_cls.__name__} {config} {dtype}: error {err:.3e} vs diffusers' {base:.3e}"
    return got, expected


def settings(config) -> dict:
    """A scheduler config without its private entries: ``_use_default_values`` (what the
    constructor was not given) is not saved, so a reloaded config has none, as in diffusers."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# Every way a tensor's value reaches Python: each one is a host sync on a GPU
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads(*more: str):
    """Inside, reading a tensor's value on the host (``HOST_READS``, and ``more`` such as
    ``"cpu"`` or ``"numpy"``) raises AssertionError: wrap a step to prove its path makes none.
    Only these attributes are patched and restored (a test's other monkeypatches stay)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("host read on the step path")

    names = HOST_READS + tuple(more)
    own = {n: torch.Tensor.__dict__[n] for n in names if n in torch.Tensor.__dict__}
    try:
        for n in names:
            setattr(torch.Tensor, n, forbidden)
        yield
    finally:
        for n in names:
            if n in own:
                setattr(torch.Tensor, n, own[n])
            else:
                delattr(torch.Tensor, n)
