"""The schedulers call the op through its positional entry (``ops.solver_step.fused_step``),
which skips the coefficient-row check the public ``ops.solver_step`` makes. These tests run
whole loops both ways and require bit-identical results, and check that the schedulers'
entry still rejects bad user tensors."""
import inspect

import pytest
import torch

import kdfast.schedulers.base as base
from kdfast import ops
from kdfast import schedulers as kd
from parity import dummy_cfg, dummy_model, initial_sample

CASES = [
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "thresholding": True}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    ("DEISMultistepScheduler", {}),
    ("DDIMScheduler", {"clip_sample": True}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("LCMScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    ("TCDScheduler", {}),
    ("EDMEulerScheduler", {"prediction_type": "v_prediction"}),
    ("EDMDPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}),
    ("EDMDPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
    ("DDPMScheduler", {"variance_type": "fixed_large"}),
    ("PNDMScheduler", {"skip_prk_steps": True}),
    ("PNDMScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}),
    ("FlowMatchLCMScheduler", {"shift": 3.0}),
    ("CMStochasticIterativeScheduler", {}),
    ("IPNDMScheduler", {}),
    ("FlowMapEulerDiscreteScheduler", {"shift": 3.0}),
    ("DDIMInverseScheduler", {"prediction_type": "v_prediction"}),
    ("DPMSolverMultistepInverseScheduler", {"solver_order": 3, "thresholding": True}),
    ("CogVideoXDDIMScheduler", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                "timestep_spacing": "trailing"}),
    ("SASolverScheduler", {"predictor_order": 3, "corrector_order": 2}),
    ("LTXEulerAncestralRFScheduler", {"eta": 0.5}),
    ("DDIMParallelScheduler", {"clip_sample": True}),
    ("DDPMParallelScheduler", {"variance_type": "fixed_small_log"}),
]


def public_solver_step(sample, model_output, coefs, cond, guidance_scale, history, aux, noise, clip_value,
                       dynamic_scale, write_history, write_aux, history_dtype, backend=None):
    return ops.solver_step(sample, model_output, coefs, cond=cond, guidance_scale=guidance_scale, history=history,
                           aux=aux, noise=noise, clip_value=clip_value, dynamic_scale=dynamic_scale,
                           write_history=write_history, write_aux=write_aux, history_dtype=history_dtype,
                           backend=backend)


def loop(name, config, guided, dtype=torch.float32):
    sched = getattr(kd, name)(**config)
    sched.set_timesteps(8)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(
        sched.step).parameters else {}  # (not DDIM inversion's step)
    x = initial_sample(dtype=dtype) * getattr(sched, "init_noise_sigma", 1.0)
    history = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        if guided:
            u, c = dummy_cfg(inp, t)
            x = sched.step_cfg(u, c, 3.0, t, x, **kwargs).prev_sample
        else:
            x = sched.step(dummy_model(inp, t), t, x, **kwargs).prev_sample
        history.append(x)
    return history


@pytest.mark.parametrize("name,config", CASES)
@pytest.mark.parametrize("guided", [False, True])
def test_schedulers_entry_is_the_public_op(monkeypatch, name, config, guided):
    fast = loop(name, config, guided)
    calls = []

    def counted(*args):
        calls.append(1)
        return public_solver_step(*args)

    monkeypatch.setattr(base, "fused_step", counted)
    public = loop(name, config, guided)
    assert calls, "the loop did not go through the op"
    for a, b in zip(fast, public):
        assert torch.equal(a, b)


def test_half_latents_with_float32_history(monkeypatch):
    fast = loop("UniPCMultistepScheduler", {}, False, torch.float16)
    monkeypatch.setattr(base, "fused_step", public_solver_step)
    assert all(torch.equal(a, b) for a, b in zip(fast, loop("UniPCMultistepScheduler", {}, False, torch.float16)))


def test_schedulers_entry_rejects_bad_user_tensors():
    sched = kd.UniPCMultistepScheduler()
    sched.set_timesteps(5)
    x = initial_sample()
    t = sched.timesteps[0]
    sched.step(dummy_model(x, t), t, x)
    t = sched.timesteps[1]
    with pytest.raises(ValueError, match="does not match sample shape"):
        sched.step(dummy_model(x, t)[:1], t, x)
    with pytest.raises(TypeError, match="model_output must be a floating-point tensor"):
        sched.step(dummy_model(x, t).int(), t, x)
    # (a float64 model output is stepped in float64 and returned in the sample's dtype, as diffusers' UniPC)
    with pytest.raises(ValueError, match="must be on cpu"):
        sched.step(torch.empty_like(x, device="meta"), t, x)
    injected = list(sched.model_outputs)
    sched.model_outputs[-1] = torch.randn(1, 4, 8, 8)  # history set from outside, wrong shape
    with pytest.raises(ValueError, match=r"history\[0\] must have the shape"):
        sched.step(dummy_model(x, t), t, x)
    sched.model_outputs[-1] = injected[-1].transpose(2, 3).contiguous().transpose(2, 3)  # not in the sample's layout
    got = sched.step(dummy_model(x, t), t, x).prev_sample
    ref = kd.UniPCMultistepScheduler()
    ref.set_timesteps(5)
    ref.step(dummy_model(x, ref.timesteps[0]), ref.timesteps[0], x)
    assert torch.equal(got, ref.step(dummy_model(x, ref.timesteps[1]), ref.timesteps[1], x).prev_sample)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        sched.step_cfg(dummy_model(x, t), dummy_model(x, t), float("nan"), sched.timesteps[2], x)
