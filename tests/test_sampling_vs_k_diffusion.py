"""kdfast.sampling against k-diffusion's own sampler code, where k-diffusion is installed.

The CI environment does not install it (its package pulls torchvision, CLIP, wandb; only
``pip install --no-deps k-diffusion torchsde trampoline torchdiffeq`` works next to the CPU
torch), so these run on developer machines; tests/test_sampling.py checks the same samplers
against transcriptions of k-diffusion's update rules everywhere.
"""
import pytest
import torch

from kdfast import sampling as S


def denoiser(x, sigma, cond=None):
    s = sigma.reshape(-1, 1, 1, 1)
    return x / (1 + s * s) + 0.5 * s / torch.sqrt(1 + s * s) * torch.sin(1.3 * x / torch.sqrt(1 + s * s))


class KeyedNoise:
    """The same draw for the same (sigma, sigma_next), in whatever order either sampler asks.
    Keyed on 4 decimals: DPM-Solver++ SDE passes sigmas it recomputes as exp(-(-log sigma)), in
    float32 in k-diffusion and in float64 in kdfast, which may differ in the 7th digit."""

    def __init__(self, shape):
        self.shape = shape

    def __call__(self, sigma, sigma_next):
        seed = round(float(sigma) * 1e4) * 1000003 + round(float(sigma_next) * 1e4)
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, options", [
    ("euler", {}), ("heun", {}), ("dpm_2", {}), ("dpmpp_2m", {}), ("lms", {}), ("lms", {"order": 3}),
    ("euler_ancestral", {"eta": 0.7, "noise": True}),
    ("dpm_2_ancestral", {"eta": 1.0, "noise": True}),
    ("dpmpp_2s_ancestral", {"eta": 0.8, "noise": True}),
    ("dpmpp_sde", {"eta": 1.0, "noise": True}),
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3, "noise": True}),
    ("dpmpp_2m_sde", {"eta": 1.0, "noise": True}),
    ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun", "noise": True}),
    ("dpmpp_3m_sde", {"eta": 1.0, "noise": True}),
])
def test_matches_k_diffusion(kds, name, options):
    shape = (2, 3, 8, 8)
    sigmas = S.get_sigmas_karras(12, 0.03, 14.6)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    options = dict(options)
    if options.pop("noise", False):
        options["noise_sampler"] = KeyedNoise(shape)
    # (Churn is left to test_sampling.py: k-diffusion draws its churn noise with randn_like at
    # every step, even when gamma is 0, so the two cannot share draws.)
    want = getattr(kds, f"sample_{name}")(denoiser, x, sigmas, disable=True, **options)
    got = getattr(S, f"sample_{name}")(denoiser, x, sigmas, disable=True, **options)
    err = (got - want).abs().max() / max(1.0, want.abs().max())
    assert err <= 1e-5, f"{name} {options}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2", "lms"])
def test_half_precision_x_with_a_float32_denoiser_matches_k_diffusion(kds, name):
    # k-diffusion's arithmetic promotes x to the denoiser's float32 after the first step
    sigmas = S.get_sigmas_karras(8, 0.03, 14.6)
    x = (torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2)) * sigmas[0]).half()

    def wide(x, sigma):
        return denoiser(x.float(), sigma.float())

    want = getattr(kds, f"sample_{name}")(wide, x, sigmas, disable=True)
    got = getattr(S, f"sample_{name}")(wide, x, sigmas, disable=True)
    assert got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max() / max(1.0, want.abs().max()) <= 1e-5


@pytest.mark.parametrize("sigmas", [S.get_sigmas_karras(3, 0.1, 5.0), S.get_sigmas_karras(10, 0.03, 80.0)])
def test_dpmpp_sde_with_brownian_trees_of_one_seed_matches_k_diffusion(kds, sigmas):
    # the tree is queried at k-diffusion's float32 sigma_fn(t) values: at the float64 ones (an ulp
    # away) it drew other increments, 1e-4 off
    pytest.importorskip("torchsde")
    x = torch.randn((2, 3, 5, 7), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    want = kds.sample_dpmpp_sde(denoiser, x, sigmas, disable=True,
                                noise_sampler=kds.BrownianTreeNoiseSampler(x, lo, hi, seed=42))
    for tree in (kds.BrownianTreeNoiseSampler(x, lo, hi, seed=42),
                 S.BrownianTreeNoiseSampler(x, float(lo), float(hi), seed=42)):
        got = S.sample_dpmpp_sde(denoiser, x, sigmas, disable=True, noise_sampler=tree)
        assert (got - want).abs().max() / max(1.0, want.abs().max()) <= 1e-5


@pytest.mark.parametrize("name, options, sigmas", [
    # float32 sigma_down 0 (Euler step) where float64's is 5e-8
    ("dpm_2_ancestral", {"eta": 1.0}, S.get_sigmas_karras(2, 0.002, 80.0)),
    ("dpmpp_2s_ancestral", {"eta": 1.0}, S.get_sigmas_karras(2, 0.002, 80.0)),
    # churn windows whose bounds are float32 sigmas of the schedule (s_noise 0: no draws)
    ("euler", {"s_churn": 1.0, "s_noise": 0.0, "s_tmax": 14.6}, torch.tensor([14.6, 7.0, 3.0, 0.7, 0.2, 0.0])),
    ("heun", {"s_churn": 1.0, "s_noise": 0.0, "s_tmin": 0.7}, torch.tensor([14.6, 7.0, 3.0, 0.7, 0.2, 0.0])),
    ("dpm_2", {"s_churn": 1.0, "s_noise": 0.0, "s_tmax": 14.6}, torch.tensor([14.6, 7.0, 3.0, 0.7, 0.2, 0.0])),
])
def test_branches_decided_in_the_sigmas_dtype_match_k_diffusion(kds, name, options, sigmas):
    shape = (1, 2, 4, 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    if "eta" in options:
        options = dict(options, noise_sampler=KeyedNoise(shape))
    want = getattr(kds, f"sample_{name}")(denoiser, x, sigmas, disable=True, **options)
    got = getattr(S, f"sample_{name}")(denoiser, x, sigmas, disable=True, **options)
    err = (got - want).abs().max() / max(1.0, want.abs().max())
    assert err <= 1e-5, f"{name} {options}: relative error {err:.2e}"
