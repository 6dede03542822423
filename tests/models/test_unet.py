import pytest
import torch

from kdfast.models import UNet, UNetConfig


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet()
    # The output layers start at zero (identity residual blocks); perturb every weight so the
    # tests see a generic network rather than one whose output is identically zero.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_default_parameter_count_in_range(unet):
    assert 300_000 <= unet.num_parameters <= 1_500_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_and_dtype(unet, dtype):
    model = unet.to(dtype)
    x = torch.randn(3, 1, 16, 16, dtype=dtype)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 5, 9]))
    model.float()
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


def test_timestep_forms_agree(unet):
    x = torch.randn(2, 1, 16, 16)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        a = unet(x, 250, y)
        b = unet(x, torch.tensor(250), y)
        c = unet(x, torch.tensor([250.0, 250.0]), y)
        d = unet(x, torch.tensor([249.5, 249.5]), y)  # fractional timesteps (Karras-style schedulers)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert torch.isfinite(d).all() and not torch.equal(a, d)


def test_null_class_path(unet):
    x = torch.randn(2, 1, 16, 16)
    null = torch.full((2,), unet.config.null_class)
    assert unet.config.null_class == 10
    with torch.no_grad():
        uncond = unet(x, 100, null)
        implicit = unet(x, 100, None)
        cond = unet(x, 100, torch.tensor([3, 3]))
    torch.testing.assert_close(uncond, implicit)
    assert not torch.allclose(uncond, cond)  # the class label reaches the output


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet(base_channels=16, channel_mults=(1, 2), attention_heads=2)
    x = torch.randn(2, 1, 16, 16)
    (model(x, torch.tensor([10, 900]), torch.tensor([0, 10])) - x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # the zero-initialised output layer (the model starts out predicting 0) learns from step one
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_config_round_trip_and_overrides():
    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2), attention=False, prediction_type="v_prediction")
    again = UNetConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.channel_mults == (1, 2)
    model = UNet(cfg.to_dict())
    assert model.config == cfg
    assert UNet(cfg, base_channels=24).config.base_channels == 24
    out = model(torch.randn(1, 1, 16, 16), 3, torch.tensor([4]))
    assert out.shape == (1, 1, 16, 16)


def test_bad_config_and_inputs(unet):
    with pytest.raises(ValueError, match="prediction_type"):
        UNetConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=12)
    with pytest.raises(ValueError, match="sample_size"):
        UNetConfig(sample_size=18, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        UNetConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="x must be"):
        unet(torch.randn(2, 3, 16, 16), 1, None)
    with pytest.raises(ValueError, match="t must be"):
        unet(torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]), None)
    with pytest.raises(ValueError, match="class_labels"):
        unet(torch.randn(2, 1, 16, 16), 1, torch.tensor([1]))
    with pytest.raises(TypeError, match="class_labels"):
        unet(torch.randn(2, 1, 16, 16), 1, torch.tensor([1.0, 2.0]))
    # sizes that cannot halve at every level fail up front, naming x (15 used to fail in torch.cat)
    for size in (15, 10, 17):
        with pytest.raises(ValueError, match="x must have H and W divisible by 4"):
            unet(torch.randn(1, 1, size, 16), 1, None)
    assert unet(torch.randn(1, 1, 8, 12), 1, None).shape == (1, 1, 8, 12)  # divisible sizes run
    for bad in ([0, 11], [-1, 3]):  # 10 is the unconditional label; 11 and -1 are no label
        with pytest.raises(ValueError, match=r"class_labels must be in \[0, 11\) \(10 is the unconditional label\)"):
            unet(torch.randn(2, 1, 16, 16), 1, torch.tensor(bad))
    assert unet(torch.randn(2, 1, 16, 16), 1, torch.tensor([0, 10])).shape == (2, 1, 16, 16)


def _plain_and_fast(unet):
    fast = unet.for_inference()
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([0.0, 250.0, 600.0, 999.0])
    y = torch.tensor([0, 3, 9, 10])
    return fast, x, t, y


def test_inference_form_matches_the_network(unet):
    fast, x, t, y = _plain_and_fast(unet)
    with torch.no_grad():
        expect = unet(x, t, y)
        out = fast(x, t, y)
        torch_only = unet.for_inference(fused_norms=False)(x, t, y)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch_only, expect, rtol=1e-4, atol=1e-5)
    # a frozen copy in channels-last with the fused norms; the original is left as it was
    assert fast.channels_last and fast.fused and all(b.fused for b in fast.modules() if hasattr(b, "fused"))
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and not fast.training
    assert not any(p.requires_grad for p in fast.parameters())
    assert not unet.channels_last and not any(getattr(m, "fused", False) for m in unet.modules())
    assert unet.mid[0].conv1.weight.is_contiguous()


def test_inference_form_runs_the_fused_kernel(unet, monkeypatch):
    from kdfast.models import unet as unet_module

    calls = []
    real = unet_module.group_norm_act
    monkeypatch.setattr(unet_module, "group_norm_act", lambda *a, **k: calls.append(k) or real(*a, **k))
    fast, x, t, y = _plain_and_fast(unet)
    with torch.no_grad():
        fast(x, t, y)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
    assert len(calls) == norms  # every group norm, the ResBlocks' second ones with their embedding shift
    assert sum(k["shift"] is not None for k in calls) == sum(isinstance(m, unet_module.ResBlock) for m in unet.modules())
    assert sum(k["activation"] == "identity" for k in calls) == sum(
        isinstance(m, unet_module.SelfAttention) for m in unet.modules())
    calls.clear()
    with torch.no_grad():
        unet(x, t, y)
        fast.double()(x.double(), t, y)  # float64: torch's modules (the kernels are float32/16-bit)
    assert calls == []


def test_inference_form_under_autograd_uses_torch_and_matches(unet):
    fast, x, t, y = _plain_and_fast(unet)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(unet(xa, t, y).square().sum(), [xa])
    (gb,) = torch.autograd.grad(fast(xb, t, y).square().sum(), [xb])
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def _x(dtype=torch.float32):
    return torch.randn(2, 1, 16, 16).to(dtype)


@pytest.mark.parametrize("args, error, message", [
    # x of another dtype failed in the first matmul ("mat1 and mat2 must have the same dtype")
    ((_x(torch.float64), 3), TypeError, "x must have the model's dtype torch.float32, got dtype torch.float64"),
    ((_x(torch.float16), 3), TypeError, "x must have the model's dtype torch.float32, got dtype torch.float16"),
    ((_x(torch.int64), 3), TypeError, "x must be a floating-point tensor"),
    ((_x(torch.complex64), 3), TypeError, "x must be a floating-point tensor"),
    ((None, 3), TypeError, "x must be a torch.Tensor, got NoneType"),
    ((_x().numpy(), 3), TypeError, "x must be a torch.Tensor, got ndarray"),
    # t: "Could not infer dtype", True taken as 1, NaN giving a NaN output
    ((_x(), None), ValueError, "t must be a real number, got None"),
    ((_x(), "1"), ValueError, "t must be a real number, got '1'"),
    ((_x(), True), ValueError, "t must be a real number, got True"),
    ((_x(), float("nan")), ValueError, "t must be a finite number, got nan"),
    ((_x(), float("-inf")), ValueError, "t must be a finite number, got -inf"),
    ((_x(), [1.0, float("nan")]), ValueError, "t must be finite"),
    ((_x(), [True, False]), TypeError, "t must hold real timesteps"),
    ((_x(), torch.tensor([True, False])), TypeError, "t must hold real timesteps"),
    ((_x(), torch.tensor([1j, 2j])), TypeError, "t must hold real timesteps"),
    # class_labels of a complex dtype failed deep in the embedding
    ((_x(), 3, torch.tensor([1, 2], dtype=torch.complex64)), TypeError,
     "class_labels must be integer class indices, got torch.complex64"),
    ((_x(), 3, "ab"), TypeError, "class_labels must be a tensor of integer class indices, got str"),
])
def test_bad_forward_inputs_are_refused_by_name(unet, args, error, message):
    with pytest.raises(error) as exc:
        unet(*args)
    assert message in str(exc.value)


def test_forward_takes_timesteps_in_every_real_form(unet):
    import numpy as np

    x = _x()
    with torch.no_grad():
        expect = unet(x, 3, torch.tensor([1, 2]))
        for t in (3.0, np.int64(3), np.float32(3), [3, 3], (3.0, 3.0), np.array([3, 3]), torch.tensor(3),
                  torch.tensor([3.0, 3.0], dtype=torch.float64)):
            torch.testing.assert_close(unet(x, t, torch.tensor([1, 2])), expect)
        torch.testing.assert_close(unet(x, 3, [1, 2]), expect)
        # under autocast, x may have the autocast dtype while the weights stay float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert unet(x.bfloat16(), 3).dtype == torch.bfloat16
            # autocast casts no float64: refused as outside it (it failed in a matmul, after the
            # check had suggested autocast)
            with pytest.raises(TypeError, match=r"must have the model's dtype torch.float32, got dtype torch.float64 "
                                                r"\(convert x, or the model with .to\(torch.float64\)\)$"):
                unet(x.double(), 3)


def test_forward_checks_compile_without_graph_breaks():
    # (the checks read no tensor values: a number t is checked while compiling too)
    torch.manual_seed(0)
    model = UNet(base_channels=16, channel_mults=(1, 2), attention_heads=2).eval()
    x = _x()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for t in (3, 5.5, torch.tensor([3, 20])):
            torch.testing.assert_close(compiled(x, t), model(x, t))


def test_every_up_block_reads_its_skip_connection(unet):
    # each up block's input is [h, skip] with the skips taken in reverse order (conv_in's output
    # and each down block's); a skip dropped or zeroed left every other test passing
    skips, inputs = [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o))]
    for block in unet.down:
        last = block[-1] if isinstance(block, torch.nn.ModuleList) else block
        hooks.append(last.register_forward_hook(lambda m, i, o: skips.append(o)))
    for block in unet.up:
        if isinstance(block, torch.nn.ModuleList):
            hooks.append(block[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
    try:
        unet(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500]),
             torch.tensor([3, 10]))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(inputs) == len(skips) > 2
    for given, skip in zip(inputs, reversed(skips)):
        assert skip.abs().max() > 0
        assert torch.equal(given[:, -skip.shape[1]:], skip)
