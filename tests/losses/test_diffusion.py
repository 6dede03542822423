import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.losses import diffusion as dl


def randn(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------- pseudo-Huber


def test_pseudo_huber_matches_lcm_training_formula():
    # diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py, loss_type="huber":
    #   loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + args.huber_c**2) - args.huber_c)
    model_pred = randn((4, 4, 8, 8), 0, torch.bfloat16).requires_grad_(True)
    target = randn((4, 4, 8, 8), 1, torch.bfloat16)
    huber_c = 0.001
    expected = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + huber_c**2) - huber_c)
    (expected_grad,) = torch.autograd.grad(expected, model_pred)
    loss = dl.pseudo_huber_loss(model_pred, target, elementwise=True)  # default c: LCM's 0.001
    (grad,) = torch.autograd.grad(loss, model_pred)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-6)  # bf16 gradient


def test_pseudo_huber_matches_ict_formula():
    # Improved consistency training: d(x, y) = sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(d),
    # weighted by lambda(sigma) and averaged over the batch.
    x = randn((6, 3, 8, 8), 2).requires_grad_(True)
    y = randn((6, 3, 8, 8), 3)
    lam = torch.linspace(0.5, 3.0, 6)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    expected = (lam * (torch.sqrt(((x - y) ** 2).sum(dim=(1, 2, 3)) + c**2) - c)).mean()
    (expected_grad,) = torch.autograd.grad(expected, x)
    loss = dl.pseudo_huber_loss(x, y, weights=lam)  # default c: iCT's
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)
    per_sample = dl.pseudo_huber_loss(x, y, c=c, weights=lam, reduction="none")
    assert per_sample.shape == (6,)
    torch.testing.assert_close(dl.pseudo_huber_loss(x, y, c=c, weights=lam, reduction="sum"), per_sample.sum())


def test_pseudo_huber_per_sample_c_schedule():
    x, y = randn((4, 16), 4), randn((4, 16), 5)
    c = torch.tensor([0.0, 0.1, 1.0, 10.0])
    per_sample = dl.pseudo_huber_loss(x, y, c=c, reduction="none")
    for b in range(4):
        single = dl.pseudo_huber_loss(x[b:b + 1], y[b:b + 1], c=float(c[b]), reduction="none")
        torch.testing.assert_close(per_sample[b:b + 1], single)


# --------------------------------------------------------------------------- DMD


def dmd2_loss(latents, pred_real_image, pred_fake_image, weights=None):
    """DMD2's compute_distribution_matching_loss (tianweiy/DMD2, main/sd_guidance.py), transcribed."""
    original_latents = latents
    with torch.no_grad():
        p_real = latents - pred_real_image
        p_fake = latents - pred_fake_image
        grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
        grad = torch.nan_to_num(grad)
    if weights is None:
        return 0.5 * F.mse_loss(original_latents.float(), (original_latents - grad).detach().float(), reduction="mean")
    diff = original_latents.float() - (original_latents - grad).detach().float()
    per_sample = 0.5 * (diff**2).mean(dim=[1, 2, 3])
    return (weights * per_sample).mean()


@pytest.mark.parametrize("weighted", [False, True])
def test_dmd_matches_dmd2(weighted):
    x = randn((4, 4, 8, 8), 6).requires_grad_(True)
    real = x.detach() + 0.3 * randn((4, 4, 8, 8), 7)
    fake = x.detach() + 0.3 * randn((4, 4, 8, 8), 8)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0]) if weighted else None
    expected = dmd2_loss(x, real, fake, w)
    (expected_grad,) = torch.autograd.grad(expected, x)
    loss = dl.dmd_loss(x, real, fake, weights=w)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)


def test_dmd_noised_normaliser():
    x = randn((3, 2, 4, 4), 9).requires_grad_(True)
    real, fake, x_t = randn((3, 2, 4, 4), 10), randn((3, 2, 4, 4), 11), randn((3, 2, 4, 4), 12)
    loss = dl.dmd_loss(x, real, fake, x_t=x_t, reduction="none")
    g = (fake - real) / (x_t - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-8)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(grad, g / g[0].numel(), rtol=1e-5, atol=1e-9)


def test_dmd_nan_safe():
    x = randn((3, 2, 4, 4), 13).requires_grad_(True)
    real, fake = randn((3, 2, 4, 4), 14), randn((3, 2, 4, 4), 15)
    real[0] = x[0].detach()  # normaliser 0: DMD2 would divide by zero
    fake[1, 0, 0, 0] = math.nan
    loss = dl.dmd_loss(x, real, fake)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[0] == 0).all() and grad[1, 0, 0, 0] == 0 and (grad[2] != 0).all()


# --------------------------------------------------------------------------- progressive distillation


def toy_model(prediction_type):
    """A deterministic 'network' prediction that depends on the latent and the timestep."""
    def model(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(x) * 0.7 + 0.001 * t * torch.sin(3 * x)
    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_progressive_target_student_step_lands_on_teacher(prediction_type):
    # Teacher: 2 DDIM steps (diffusers' DDIMScheduler, 10-step schedule) 600 -> 500 -> 400.
    # Student: one DDIM step 600 -> 400 (5-step schedule) from the target lands on the teacher's result.
    from diffusers import DDIMScheduler

    config = dict(clip_sample=False, prediction_type=prediction_type, set_alpha_to_one=True)
    teacher_sched = DDIMScheduler(**config)
    teacher_sched.set_timesteps(10)
    student_sched = DDIMScheduler(**config)
    student_sched.set_timesteps(5)
    model = toy_model(prediction_type)
    x_t = randn((2, 4, 8, 8), 16, torch.float64)
    x_mid = teacher_sched.step(model(x_t, 600), 600, x_t).prev_sample
    x_s = teacher_sched.step(model(x_mid, 500), 500, x_mid).prev_sample

    abar = teacher_sched.alphas_cumprod.double()
    alpha_t, sigma_t = abar[600].sqrt(), (1 - abar[600]).sqrt()
    alpha_s, sigma_s = abar[400].sqrt(), (1 - abar[400]).sqrt()
    target = dl.progressive_distillation_target(x_s.float(), x_t.float(), alpha_t, sigma_t, alpha_s, sigma_s,
                                                prediction_type)
    student = student_sched.step(target.double(), 600, x_t).prev_sample
    torch.testing.assert_close(student, x_s, rtol=0, atol=1e-5)
    # The same student step with kdfast's per-sample DDIM step.
    torch.testing.assert_close(dl.ddim_step(x_t.float(), target, alpha_t, sigma_t, alpha_s, sigma_s,
                                            prediction_type).double(), x_s, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_steps_at_per_sample_timesteps(prediction_type):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, set_alpha_to_one=True)
    model = toy_model(prediction_type)
    t = torch.tensor([999, 600, 201, 100])
    step = torch.tensor([100, 200, 100, 200])
    x_t = randn((4, 3, 5, 5), 17)
    x_s = dl.progressive_distillation_teacher(model, x_t, t, t - step // 2, t - step, sched.alphas_cumprod,
                                              prediction_type)
    for b in range(4):
        # diffusers runs one timestep per call: set num_inference_steps so that prev_t = t - step/2.
        sched.set_timesteps(1000 // (int(step[b]) // 2))
        xb = x_t[b:b + 1].double()
        tb = int(t[b])
        xb = sched.step(model(xb, tb), tb, xb).prev_sample
        tm = tb - int(step[b]) // 2
        xb = sched.step(model(xb, tm), tm, xb).prev_sample
        torch.testing.assert_close(x_s[b:b + 1].double(), xb, rtol=0, atol=2e-5)


def test_progressive_loss_and_gradient():
    alpha_t = torch.tensor([0.5, 0.9, 0.3])
    sigma_t = (1 - alpha_t**2).sqrt()
    alpha_s = torch.tensor([0.8, 0.95, 1.0])
    sigma_s = (1 - alpha_s**2).clamp(min=0).sqrt()
    x_s, x_t = randn((3, 2, 6, 6), 18), randn((3, 2, 6, 6), 19)
    pred = randn((3, 2, 6, 6), 20).requires_grad_(True)
    w = dl.truncated_snr_weights(alpha_t, sigma_t, "v_prediction").float()
    loss = dl.progressive_distillation_loss(pred, x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s, "v_prediction",
                                            weights=w)
    (grad,) = torch.autograd.grad(loss, pred)
    target = dl.progressive_distillation_target(x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s, "v_prediction")
    pred2 = pred.detach().requires_grad_(True)
    expected = (w * ((pred2 - target) ** 2).mean(dim=(1, 2, 3))).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, pred2.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_truncated_snr_weights_give_x0_space_weighting(prediction_type):
    # w * ||pred error||^2 == max(snr, 1) * ||x0 error||^2 when x0 is derived from the prediction.
    alpha = torch.tensor([0.2, 0.7, 0.99], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    x_t, pred, err = randn((3, 10), 21, torch.float64), randn((3, 10), 22, torch.float64), randn((3, 10), 23,
                                                                                                  torch.float64)
    from kdfast.reference.diffusion_losses import prediction_to_x0_eps

    p0, q0, _, _ = prediction_to_x0_eps(prediction_type, alpha[:, None], sigma[:, None])
    x0_err = (p0 * x_t + q0 * (pred + err)) - (p0 * x_t + q0 * pred)
    w = dl.truncated_snr_weights(alpha, sigma, prediction_type)
    snr = alpha**2 / sigma**2
    torch.testing.assert_close(w * (err**2).sum(1), snr.clamp(min=1) * (x0_err**2).sum(1))


def test_alpha_sigma():
    abar = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    alpha, sigma = dl.alpha_sigma(abar, torch.tensor([0, 500, -1]))
    torch.testing.assert_close(alpha, torch.stack([abar[0], abar[500], torch.tensor(1.0, dtype=torch.float64)]).sqrt())
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    # every integer dtype is an index (uint8 was taken as a mask, int8 / int16 refused by torch)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        got = dl.alpha_sigma(abar[:4], torch.tensor([1, 1, 1, 1], dtype=dtype))[0]
        torch.testing.assert_close(got, abar[1].sqrt().expand(4))


ABAR = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)


@pytest.mark.parametrize("call, error, match", [
    # IndexError, "tensors used as indices must be long", or silently alphas of 0 / bool indices
    (lambda: dl.alpha_sigma(ABAR, torch.tensor([10])), ValueError, r"timesteps must be below 10"),
    (lambda: dl.alpha_sigma(ABAR, torch.tensor([1.0])), TypeError, "timesteps must be integers"),
    (lambda: dl.alpha_sigma(ABAR, torch.tensor([True, False])), TypeError, "timesteps must be integers"),
    (lambda: dl.alpha_sigma(ABAR, None), TypeError, "timesteps must be a tensor"),
    (lambda: dl.alpha_sigma(ABAR, "1"), TypeError, "timesteps must be a tensor"),
    (lambda: dl.alpha_sigma(ABAR.long(), torch.tensor([1])), TypeError, "alphas_cumprod must be floating point"),
    (lambda: dl.alpha_sigma(ABAR[None], torch.tensor([1])), ValueError, "alphas_cumprod must be a 1-D table"),
    # NaN weights at sigma 0, bools taken as 1.0, torch's broadcast error
    (lambda: dl.truncated_snr_weights(torch.tensor([1.0, 0.6]), torch.tensor([0.0, 0.8])), ValueError,
     "sigma_t must be positive"),
    (lambda: dl.truncated_snr_weights(torch.tensor([True]), torch.tensor([0.8])), TypeError,
     "alpha_t must be floating point"),
    (lambda: dl.truncated_snr_weights(torch.ones(2), torch.ones(3)), ValueError, "broadcastable shapes"),
    (lambda: dl.truncated_snr_weights(None, torch.ones(3)), TypeError, "alpha_t must be a tensor"),
    (lambda: dl.progressive_distillation_teacher(None, torch.ones(1, 2), torch.tensor([5]), torch.tensor([3]),
                                                 torch.tensor([1]), ABAR), TypeError, "teacher must be callable"),
    (lambda: dl.progressive_distillation_teacher(lambda x, t: None, torch.ones(1, 2), torch.tensor([5]),
                                                 torch.tensor([3]), torch.tensor([1]), ABAR), TypeError,
     r"teacher\(x, timesteps\) must return a torch.Tensor"),
])
def test_schedule_helpers_name_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


T4 = torch.tensor([9, 8, 7, 6])


@pytest.mark.parametrize("timesteps, error, match", [
    # alpha_sigma's and ddim_step's errors named "timesteps" / "alpha_s" for whichever was wrong,
    # and a batch mismatch was found after the teacher had run
    ((T4, (T4 - 2).float(), T4 - 4), TypeError, "t_mid must be integers"),
    ((T4, T4 - 2, T4 + 2), ValueError, "t_s must be below 10"),
    ((T4, (T4 - 2)[:3], T4 - 4), ValueError, r"t_mid must hold one timestep or one per sample \(4\), got 3"),
    ((T4[:3], T4 - 2, T4 - 4), ValueError, r"t must hold one timestep or one per sample \(4\), got 3"),
])
def test_progressive_teacher_names_a_bad_timestep_before_the_teacher_runs(timesteps, error, match):
    calls = []

    def teacher(x, t):
        calls.append(t)
        return 0.1 * x

    with pytest.raises(error, match=match):
        dl.progressive_distillation_teacher(teacher, torch.randn(4, 2, 3), *timesteps, ABAR)
    assert calls == []
    # one timestep for the whole batch is taken
    assert dl.progressive_distillation_teacher(teacher, torch.randn(4, 2, 3), torch.tensor(9), T4 - 2, T4 - 4,
                                               ABAR).shape == (4, 2, 3)


def test_a_per_sample_c_tensor_below_zero_is_refused_on_the_cpu():
    # a negative c made 0/0 for a sample with x == y: NaN, where a negative number is refused
    x = randn((3, 4), 0)
    for c in (torch.tensor([0.1, -0.5, 0.2]), torch.tensor([0.1, math.nan, 0.2]), torch.tensor([-1.0]),
              torch.tensor([0.1, math.inf, 0.2])):  # (inf gave its sample loss 0, where the number is refused)
        for elementwise in (False, True):
            with pytest.raises(ValueError, match="c must be finite and >= 0"):
                dl.pseudo_huber_loss(x, x.clone(), c=c, elementwise=elementwise)
    assert dl.pseudo_huber_loss(x, x.clone(), c=torch.tensor([0.0, 0.5, 1.0])) == 0


@pytest.mark.parametrize("loss", [
    lambda x: dl.pseudo_huber_loss(x, x.detach() + 1),
    lambda x: dl.dmd_loss(x, x.detach(), x.detach() + 1),
    lambda x: dl.progressive_distillation_loss(x, x.detach(), x.detach(), 0.9, 0.4, 0.95, 0.3),
])
def test_the_mean_of_an_empty_batch_is_zero(loss):
    # (it was NaN, where the KD losses give 0)
    x = torch.randn(0, 3, 4, requires_grad=True)
    value = loss(x)
    assert value.item() == 0
    value.backward()
    assert x.grad.shape == x.shape


def test_pseudo_huber_names_a_non_tensor_x_alike_with_and_without_c():
    for c in (None, 0.1):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            dl.pseudo_huber_loss([[1.0, 2.0]], [[1.0, 2.0]], c=c)
        with pytest.raises(ValueError, match="x must have a batch dimension"):
            dl.pseudo_huber_loss(torch.tensor(1.0), torch.tensor(1.0), c=c)


@pytest.mark.parametrize("call", [
    lambda x: dl.pseudo_huber_loss(x, x, reduction="batchmean"),
    lambda x: dl.dmd_loss(x, x, x, reduction="avg"),
    lambda x: dl.progressive_distillation_loss(x, x, x, 0.5, 0.8, 0.7, 0.7, reduction=None),
])
def test_bad_reduction(call):
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(randn((2, 3), 0))


@pytest.mark.parametrize("schedule, match", [
    ((1.0, 0.0, 0.9, 0.1), "sigma_t must be nonzero"),
    ((0.6, 0.8, 0.6, 0.8), "different signal-to-noise ratios"),
    ((torch.tensor([0.6, 0.5]), torch.tensor([0.8, 0.5]), 0.9, torch.tensor([0.3, 0.9])),
     "different signal-to-noise ratios"),
])
def test_progressive_target_needs_a_defined_schedule(schedule, match):
    # Both divide by zero otherwise; on the host (and CPU tensors) that is refused, not NaN.
    x = randn((2, 3), 0)
    with pytest.raises(ValueError, match=match):
        dl.progressive_distillation_target(x, x, *schedule)
    with pytest.raises(ValueError, match=match):
        dl.progressive_distillation_loss(x, x, x, *schedule)


def test_module_docstring_example_runs():
    """The example in kdfast.losses.diffusion's docstring, run as written on tiny tensors."""
    import re
    import textwrap

    from kdfast.losses import diffusion as dl
    from kdfast.schedulers import DDIMScheduler

    code = textwrap.dedent(dl.__doc__.split("Example (progressive distillation")[1].split("::\n", 1)[1])
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    student = lambda x, t: net(x)  # noqa: E731
    batch = 3
    env = {"scheduler": DDIMScheduler(), "device": "cpu", "student_steps": 4, "batch": batch,
           "x0": torch.randn(batch, 2, 5, 5), "teacher": lambda x, t: 0.5 * x, "student": student,
           "student_ema": student, "x_t1": torch.randn(batch, 2, 5, 5), "x_t0": torch.randn(batch, 2, 5, 5),
           "t1": torch.tensor([3, 2, 1]), "t0": torch.tensor([2, 1, 0]), "lam": torch.rand(batch),
           "x": torch.randn(batch, 2, 5, 5, requires_grad=True), "x0_real": torch.randn(batch, 2, 5, 5),
           "x0_fake": torch.randn(batch, 2, 5, 5)}
    assert re.search(r"loss\.backward\(\)", code)
    exec(code, env)
    assert torch.isfinite(env["loss"]) and net.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_per_sample_weights_and_c_equal_float_ones(dtype):
    # Integer tensors are taken as per-sample values (converted to float32 before the kernel,
    # which reads float bits); they must give what the same float values give.
    x, y = randn((3, 2, 4, 4), 2, torch.float32), randn((3, 2, 4, 4), 3, torch.float32)
    weights, c = torch.tensor([1, 0, 2], dtype=dtype), torch.tensor([1, 2, 3], dtype=dtype)
    got = dl.pseudo_huber_loss(x, y, c=c, weights=weights, reduction="none")
    want = dl.pseudo_huber_loss(x, y, c=c.float(), weights=weights.float(), reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[1] == 0 and got[0] != 0


def test_default_c_on_dynamic_shapes_does_not_break_a_full_graph():
    # iCT's default c = 0.00054 sqrt(d) is symbolic once the sample size is (a second resolution
    # under automatic dynamic shapes): its finiteness check must trace.
    def loss(x, y):
        return dl.pseudo_huber_loss(x, y)

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for side in (4, 8, 16):
        g = torch.Generator().manual_seed(side)
        x, y = torch.randn(2, 3, side, side, generator=g), torch.randn(2, 3, side, side, generator=g)
        torch.testing.assert_close(compiled(x, y), loss(x, y))
