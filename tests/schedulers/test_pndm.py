import copy

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.pndm import PNDMScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.PNDMScheduler
SD1 = dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, beta_schedule="scaled_linear",
           beta_start=0.00085, beta_end=0.012)  # Stable Diffusion 1.x


def without_generator(cls):
    """``cls`` whose step takes (and drops) the generator parity.run_loop passes: PNDM draws no noise."""
    return type(cls.__name__, (cls,), {"step": lambda self, m, t, x, generator=None, **k: cls.step(self, m, t, x, **k)})


KD, DFG = PNDMScheduler, without_generator(DF)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 50])
@pytest.mark.parametrize("config", [SD1, dict(SD1, prediction_type="v_prediction"), dict(skip_prk_steps=True),
                                    dict(SD1, timestep_spacing="linspace"),
                                    dict(SD1, timestep_spacing="trailing", set_alpha_to_one=True)])
def test_plms_parity(config, steps):
    assert_parity(KD, DFG, config, steps=steps)


@pytest.mark.parametrize("steps", [4, 5, 7, 50])
@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction"), dict(timestep_spacing="trailing"),
                                    dict(timestep_spacing="linspace", steps_offset=1),
                                    dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True),
                                    dict(trained_betas=[0.001 + 0.0002 * k for k in range(100)],
                                         num_train_timesteps=100)])
def test_runge_kutta_warm_up_parity(config, steps):
    assert_parity(KD, DFG, config, steps=steps)


def _state(s):
    return dict(counter=s.counter, n_ets=len(s.ets), cur_sample=s.cur_sample,
                cur_model_output=s.cur_model_output)


@pytest.mark.parametrize("config", [SD1, dict()])
def test_same_state_machine_as_diffusers(config):
    kd, df = PNDMScheduler(**config), DF(**config)
    for s in (kd, df):
        s.set_timesteps(6)
    assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype
    assert np.array_equal(kd.prk_timesteps, df.prk_timesteps)
    assert np.array_equal(kd.plms_timesteps, df.plms_timesteps)
    assert kd.pndm_order == df.pndm_order == 4 and kd.init_noise_sigma == df.init_noise_sigma
    x_kd = x_df = initial_sample()
    for i, t in enumerate(df.timesteps):
        m_kd, m_df = dummy_model(x_kd, t), dummy_model(x_df, t)
        n_before = len(kd.ets)
        new_kd = kd.step(m_kd, kd.timesteps[i], x_kd).prev_sample
        new_df = df.step(m_df, t, x_df).prev_sample
        a, b = _state(kd), _state(df)
        assert a["counter"] == b["counter"] == i + 1 and a["n_ets"] == b["n_ets"]
        assert (a["cur_sample"] is None) == (b["cur_sample"] is None)
        if a["cur_sample"] is not None:  # the sample itself, by reference
            assert (a["cur_sample"] is x_kd) == (b["cur_sample"] is x_df)
            assert parity_error(a["cur_sample"], b["cur_sample"]) < 1e-5
        if isinstance(b["cur_model_output"], torch.Tensor):
            assert parity_error(a["cur_model_output"], b["cur_model_output"]) < 1e-5
        else:
            assert a["cur_model_output"] == b["cur_model_output"] == 0
        for e_kd, e_df in zip(kd.ets, df.ets):
            assert parity_error(e_kd, e_df) < 1e-5
        if len(kd.ets) > n_before or (n_before == 4 and i != 1):  # the model output joins ets as it is
            assert kd.ets[-1] is m_kd
        assert parity_error(new_kd, new_df) < 1e-5
        x_kd, x_df = new_kd, new_df
    # set_timesteps starts a new loop: the same results again
    kd.set_timesteps(6)
    assert kd.counter == 0 and kd.ets == [] and kd.cur_model_output == 0
    assert parity_error(run_loop(KD(**config), 6, initial_sample()), run_loop(DFG(**config), 6, initial_sample())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [SD1, dict(), dict(SD1, prediction_type="v_prediction")])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(KD, DFG, config, steps=20, dtype=dtype)
    kd = PNDMScheduler(**config)
    kd.set_timesteps(6)
    x = initial_sample(dtype=dtype)
    for t in kd.timesteps[:5]:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
        assert x.dtype == dtype and all(e.dtype == dtype for e in kd.ets)
    if not config.get("skip_prk_steps"):
        assert kd.cur_model_output.dtype == dtype


@pytest.mark.parametrize("config", [SD1, dict(), dict(prediction_type="v_prediction")])
def test_fused_guidance_matches_diffusers_guidance(config):
    assert_parity(KD, DFG, config, steps=20, guidance_scale=2.0)


@pytest.mark.parametrize("config", [SD1, dict()])
def test_fused_guidance_equals_unfused_step_and_keeps_the_guided_output(config):
    fused, plain = PNDMScheduler(**config), PNDMScheduler(**config)
    for s in (fused, plain):
        s.set_timesteps(8)
    x_f = x_p = initial_sample()
    for t in fused.timesteps[:16]:
        u, c = dummy_cfg(x_f, t)
        x_f = fused.step_cfg(u, c, 3.0, t, x_f).prev_sample
        u, c = dummy_cfg(x_p, t)
        x_p = plain.step(u + 3.0 * (c - u), t, x_p).prev_sample
        assert parity_error(x_f, x_p) < 1e-6
        assert len(fused.ets) == len(plain.ets)
        for a, b in zip(fused.ets, plain.ets):  # ets holds the guided outputs
            assert parity_error(a, b) < 1e-6
        if isinstance(plain.cur_model_output, torch.Tensor):
            assert parity_error(fused.cur_model_output, plain.cur_model_output) < 1e-6


def test_outputs_and_tuples_like_diffusers():
    kd, df = PNDMScheduler(**SD1), DF(**SD1)
    for s in (kd, df):
        s.set_timesteps(5)
    x = initial_sample()
    m = dummy_model(x, kd.timesteps[0])
    got, want = kd.step(m, kd.timesteps[0], x, return_dict=False), df.step(m, df.timesteps[0], x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) == 1 and parity_error(got[0], want[0]) < 1e-5
    out = kd.step(m, kd.timesteps[1], x)
    assert out.pred_original_sample is None and "pred_original_sample" not in out  # diffusers returns none
    assert out.keys() == ["prev_sample"] and out[0] is out.prev_sample


def test_step_prk_and_step_plms_called_directly():
    outs = []
    for cls in (DF, PNDMScheduler):
        s = cls()
        s.set_timesteps(6)
        x = initial_sample()
        for i, t in enumerate(s.timesteps):
            step = s.step_prk if i < len(s.prk_timesteps) else s.step_plms
            x = step(dummy_model(x, t), t, x).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) < 1e-5
    s = PNDMScheduler()
    s.set_timesteps(6)
    x = initial_sample()
    with pytest.raises(ValueError, match="can only be run AFTER scheduler has been run in 'prk' mode"):
        s.step_plms(x, s.timesteps[0], x)
    plms = PNDMScheduler(**SD1)
    plms.set_timesteps(6)
    with pytest.raises(IndexError, match="past the 0 Runge-Kutta steps"):
        plms.step_prk(x, plms.timesteps[0], x)
    assert s.counter == 0 and plms.counter == 0  # a refused step changes nothing


def test_img2img_style_partial_loop_matches():
    # diffusers' PNDM has no set_begin_index: pipelines loop over a slice of the timesteps
    x0, noise = initial_sample(), initial_sample(seed=3)
    for config in (SD1, dict()):
        outs = []
        for cls in (DF, PNDMScheduler):
            s = cls(**config)
            s.set_timesteps(10)
            start = s.timesteps[5:]
            x = s.add_noise(x0, noise, start[:1])
            for t in start:
                x = s.step(dummy_model(x, t), t, x).prev_sample
            outs.append(x)
        assert parity_error(outs[1], outs[0]) < 1e-5


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = PNDMScheduler(**SD1, prediction_type="v_prediction", timestep_spacing="trailing")
    kd.save_pretrained(tmp_path)
    again = PNDMScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.skip_prk_steps and df.config.prediction_type == "v_prediction"
    df.save_pretrained(tmp_path / "df")
    back = PNDMScheduler.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(kd.config)
    x = initial_sample()
    assert parity_error(run_loop(PNDMScheduler.from_config(df.config), 10, x),
                        run_loop(without_generator(DF).from_config(df.config), 10, x)) < 1e-5
    assert DF in kd.compatibles and diffusers.DDIMScheduler in kd.compatibles
    sd = PNDMScheduler.from_config(diffusers.DDIMScheduler(**{k: v for k, v in SD1.items()
                                                               if k != "skip_prk_steps"}).config)
    assert sd.config.beta_schedule == "scaled_linear" and sd.config.steps_offset == 1
    assert len(kd) == 1000 and kd.order == 1 and PNDMScheduler().timesteps is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_is_bit_identical(dtype):
    df, kd = DF(**SD1), PNDMScheduler(**SD1)
    x, n = initial_sample(dtype=dtype), initial_sample(dtype=dtype, seed=5)
    for t in (torch.tensor([3, 999]), torch.tensor([500]), torch.tensor(17)):
        assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    assert torch.equal(kd.alphas_cumprod, df.alphas_cumprod)
    assert torch.equal(kd.final_alpha_cumprod, df.final_alpha_cumprod)


@pytest.mark.parametrize("config", [SD1, dict(), dict(prediction_type="v_prediction")])
def test_one_kernel_call_per_step_reading_the_state_by_reference(monkeypatch, config):
    calls = []
    real = base.fused_step

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(base, "fused_step", counted)
    for guided in (False, True):
        s = PNDMScheduler(**config)
        s.set_timesteps(6)
        x = initial_sample()
        for i, t in enumerate(s.timesteps):
            calls.clear()
            saved, ets = s.cur_sample, list(s.ets)
            u, c = dummy_cfg(x, t)
            x = (s.step_cfg(u, c, 2.0, t, x) if guided else s.step(u, t, x)).prev_sample
            assert len(calls) == 1
            sample, model, coefs, cond, scale, history, aux = calls[0][:7]
            assert len(history) <= 3
            if aux is not None:  # cur_sample, as it was kept: not a copy
                assert aux is saved
            if config.get("skip_prk_steps") and history:
                assert all(h is e for h, e in zip(history, ets[::-1]))  # ets, newest first
        assert len(s.ets) == 4  # the 4th-order formula's three past outputs and the current one


@pytest.mark.parametrize("config", [SD1, dict()])
def test_step_path_needs_no_host_read(config):
    kd = PNDMScheduler(**config)
    kd.set_timesteps(6)
    x = initial_sample()

    for t in list(kd.timesteps):
        u, c = dummy_cfg(x, t)
        with no_host_reads():
            x = kd.step_cfg(u, c, 2.0, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_bad_config_values_are_named():
    for key, value in (("prediction_type", "sample"), ("timestep_spacing", "uniform"), ("beta_schedule", "sigmoid")):
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            PNDMScheduler(**{key: value})


def test_bad_schedules_and_steps_are_named():
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        PNDMScheduler().step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 4 with skip_prk_steps=False"):
        PNDMScheduler().set_timesteps(3)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        PNDMScheduler(**SD1).set_timesteps(0)
    with pytest.raises(ValueError, match="cannot be larger"):
        PNDMScheduler(**SD1).set_timesteps(1001)
    kd = PNDMScheduler(**SD1)
    kd.set_timesteps(3)
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    for bad in (float(t), torch.tensor(float(t))):  # diffusers indexes alphas_cumprod with it: IndexError
        df = DF(**SD1)
        df.set_timesteps(3)
        with pytest.raises(IndexError):
            df.step(x, bad, x)
        with pytest.raises(IndexError, match="timestep must be an integer"):
            kd.step(x, bad, x)
    with pytest.raises(IndexError, match="outside the training schedule"):
        kd.step(x, 1000, x)
    with pytest.raises(IndexError, match="timestep must be an integer"):
        kd.step(x, np.asarray(float(t)), x)
    with pytest.raises(TypeError, match="bogus"):
        kd.step(x, t, x, bogus=1)
    assert kd.counter == 0 and kd.ets == []  # refused steps change nothing
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="the loop is over"):
        kd.step(x, kd.timesteps[-1], x)
    plms = PNDMScheduler(**SD1)
    plms.set_timesteps(5)
    plms.step(x, plms.timesteps[0], x)
    plms.cur_sample = None
    with pytest.raises(ValueError, match="cur_sample is None"):
        plms.step(x, plms.timesteps[1], x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fourth_order_plms_weights_are_adams_bashforth(dtype):
    # A PLMS step is A x + B (55 e0 - 59 e1 + 37 e2 - 9 e3) / 24 with e0 the model output and
    # e1..e3 the stored ones, newest first: with x = 0, a unit impulse in each gives the weights'
    # ratios (loop parity let weight errors of ~5e-5 through)
    kd = PNDMScheduler(**SD1)
    kd.set_timesteps(10)
    x = torch.zeros(2, 4, 8, 8, dtype=dtype)
    for t in kd.timesteps[:5]:
        x = kd.step(torch.zeros_like(x), t, x).prev_sample
    assert len(kd.ets) >= 3
    t = kd.timesteps[5]

    def impulse(k):
        s = copy.deepcopy(kd)
        e = [torch.zeros_like(x) for _ in range(4)]
        e[k] = torch.ones_like(x)
        s.ets = s.ets[:-3] + [e[3], e[2], e[1]]
        return s.step(e[0], t, torch.zeros_like(x)).prev_sample.double().mean().item()

    r = [impulse(k) for k in range(4)]
    torch.testing.assert_close(torch.tensor([v / r[0] * 55 for v in r], dtype=torch.float64),
                               torch.tensor([55.0, -59.0, 37.0, -9.0], dtype=torch.float64), rtol=1e-6, atol=0)
