"""``kdfast.sample`` runs every exported scheduler's loop as a pipeline would: the same result
as the loop written out by hand, with and without fused guidance."""
import inspect

import pytest
import torch

import kdfast
import kdfast.schedulers as K
from parity import dummy_model, initial_sample, parity_error

# settings a pipeline would use where the defaults are not a sampling loop
CONFIGS = {"FlowMatchLCMScheduler": {"shift": 3.0}, "DPMSolverSDEScheduler": {"noise_sampler_seed": 0},
           # (one stage: a pyramid's stages are separate loops, each set with its stage_index)
           "HeliosScheduler": {"stages": 1}, "HeliosDMDScheduler": {"stages": 1}}
STEPS = {"SCMScheduler": 2}  # (SCM's default intermediate timestep needs two steps)


def model(x, t, cond=None):
    m = dummy_model(x, t)
    return m if cond is None else m + 0.1 * cond


def widened(n_grid):
    """A PiFlow model: ``n_grid`` predictions per channel, side by side in the last dimension."""
    def predict(x, t, cond=None):
        m = model(x, t, cond)
        return torch.cat([m + 0.1 * g for g in range(n_grid)], dim=-1)
    return predict


def by_hand(s, x, generator, guidance_scale=None, cond=None, uncond=None, model=model):
    """The diffusers pipeline loop: scale the input, call the model, guide, step."""
    previous_x0 = start = None
    # (SANA-Sprint steps from every sCM timestep but the last, where the loop ends; Stable
    # Cascade from every Wuerstchen timestep but the final 0)
    last_is_the_end = isinstance(s, (K.SCMScheduler, K.DDPMWuerstchenScheduler))
    for i, t in enumerate(s.timesteps[:-1] if last_is_the_end else s.timesteps):
        inp = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        if guidance_scale is None:
            m = model(inp, t)
        else:
            u, c = model(inp, t, cond=uncond), model(inp, t, cond=cond)
            m = u + guidance_scale * (c - u)
        kwargs = {} if generator is None else {"generator": generator}
        if isinstance(s, K.CogVideoXDPMScheduler):  # (its pipelines pass the previous x0 and timestep)
            x, previous_x0 = s.step(m, previous_x0, t, s.timesteps[i - 1] if i else None, x, **kwargs)
        elif isinstance(s, K.HeliosDMDScheduler):  # (Helios' pipeline renoises with the stage's start latent)
            start = x if i == 0 else start
            x = s.step(m, t, x, cur_sampling_step=i, dmd_noisy_tensor=start, dmd_sigmas=s.sigmas,
                       dmd_timesteps=s.timesteps, all_timesteps=s.timesteps, **kwargs).prev_sample
        else:
            x = s.step(m, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", [n for n in K.supported()])
@pytest.mark.parametrize("guided", [False, True])
def test_sample_equals_the_loop_by_hand(name, guided):
    cls = getattr(K, name)
    x = initial_sample() * 0.5
    kwargs = dict(guidance_scale=3.0, cond=torch.full_like(x, 0.5), uncond=torch.zeros_like(x)) if guided else {}
    outs = []
    draws = "generator" in inspect.signature(cls.step).parameters
    for run in ("sample", "by_hand"):
        s = cls(**CONFIGS.get(name, {}))
        s.set_timesteps(STEPS.get(name, 4))
        x_init = x * getattr(s, "init_noise_sigma", 1.0)
        gen = torch.Generator().manual_seed(7) if draws else None
        denoiser = widened(s.n_grid) if name == "PiflowScheduler" else model
        if run == "sample":
            outs.append(kdfast.sample(denoiser, x_init, s, generator=gen, disable=True, **kwargs))
        else:
            outs.append(by_hand(s, x_init, gen, model=denoiser, **kwargs))
    assert torch.isfinite(outs[0]).all()
    assert parity_error(outs[0], outs[1]) <= 1e-6


def test_a_generator_for_a_scheduler_whose_step_takes_none_is_refused_with_the_reason():
    s = K.DDIMInverseScheduler()
    s.set_timesteps(4)
    with pytest.raises(TypeError, match=r"generator: DDIMInverseScheduler.step takes no generator, as diffusers' "
                                        r"does not \(its steps draw no noise\)"):
        kdfast.sample(model, initial_sample(), s, generator=torch.Generator(), disable=True)
    s = K.DPMSolverSDEScheduler(noise_sampler_seed=0)
    s.set_timesteps(4)
    with pytest.raises(TypeError, match=r"DPMSolverSDEScheduler.step takes no generator.*\(its noise comes from a "
                                        r"Brownian tree seeded with config.noise_sampler_seed\)"):
        kdfast.sample(model, initial_sample(), s, generator=torch.Generator(), disable=True)


def test_a_wrapped_step_taking_kwargs_gets_the_generator():
    # (a step wrapped to count or log calls: (*args, **kwargs) passes the generator on)
    s = K.DDIMScheduler()
    s.set_timesteps(4)
    step, calls = s.step, []
    s.step = lambda *args, **kwargs: calls.append(kwargs) or step(*args, **kwargs)
    kdfast.sample(model, initial_sample(), s, generator=torch.Generator().manual_seed(0), disable=True)
    assert len(calls) == 4 and all(isinstance(c["generator"], torch.Generator) for c in calls)


@pytest.mark.parametrize("name, timesteps", [("DDPMScheduler", [999, 700, 400, 100, 0]),
                                             ("DDPMParallelScheduler", [999, 500, 20]),
                                             ("CMStochasticIterativeScheduler", [39, 20, 5])])
def test_sample_takes_custom_timesteps(name, timesteps):
    # custom timesteps leave num_inference_steps None (as in diffusers): kdfast.sample took that
    # for a scheduler whose set_timesteps was never called
    s = getattr(K, name)()
    s.set_timesteps(timesteps=timesteps)
    x = initial_sample() * s.init_noise_sigma
    want = by_hand(s, x, torch.Generator().manual_seed(1))
    s.set_timesteps(timesteps=timesteps)
    got = kdfast.sample(model, x, s, generator=torch.Generator().manual_seed(1), disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
