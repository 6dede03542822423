"""kdfast.inference: the inference form of kdfast's UNet and of diffusers UNets gives the
original's outputs and runs the fused group norm where it should (and only there)."""
import copy
import io

import pytest
import torch

from kdfast import inference
from kdfast.models import UNet

diffusers = pytest.importorskip("diffusers")


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():  # zero-initialised layers would hide a wrong block
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _unet2d():
    return _perturbed(diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")))


def _unet2d_condition():
    return _perturbed(diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))


def _count_calls(monkeypatch):
    calls = []
    real = inference.group_norm_act
    monkeypatch.setattr(inference, "group_norm_act", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def _resnets(model):
    return [m for m in model.modules() if type(m).__name__ == "ResnetBlock2D"]


@pytest.mark.parametrize("make", [_unet2d, _unet2d_condition])
def test_diffusers_unets_match_and_run_fused(make, monkeypatch):
    model = make()
    fast = inference.prepare_for_inference(model)
    torch.manual_seed(1)
    channels = model.config.in_channels
    x = torch.randn(3, channels, 16, 16)
    t = torch.tensor([10, 500, 990])
    kwargs = {"encoder_hidden_states": torch.randn(3, 5, 32)} if "Condition" in type(model).__name__ else {}
    calls = _count_calls(monkeypatch)
    with torch.inference_mode():
        expect = model(x, t, **kwargs).sample
        assert calls == []  # the original is untouched
        out = fast(x, t, **kwargs).sample
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=2e-5)
    # two fused norms per ResNet block, the second with the time embedding folded in, plus the
    # output norm (conv_norm_out + conv_act)
    resnets = _resnets(fast)
    assert len(calls) == 2 * len(resnets) + 1
    assert sum(k.get("shift") is not None for k in calls) == len(resnets)
    assert isinstance(fast.conv_norm_out, inference.GroupNormSiLU) and isinstance(fast.conv_act, inference.PairedSiLU)
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any("forward" in vars(m) for m in model.modules())


def test_diffusers_unet_under_autograd_runs_torch(monkeypatch):
    model = _unet2d()
    fast = inference.prepare_for_inference(model)
    x = torch.randn(2, 3, 16, 16)
    calls = _count_calls(monkeypatch)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(model(xa, 100).sample.square().sum(), [xa])
    (gb,) = torch.autograd.grad(fast(xb, 100).sample.square().sum(), [xb])
    assert calls == []
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def test_resnets_with_their_own_resampler_are_left_alone():
    model = _perturbed(diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D")))
    fast = inference.prepare_for_inference(model)
    resamplers = [m for m in _resnets(fast) if m.upsample is not None or m.downsample is not None]
    assert resamplers and not any("forward" in vars(m) for m in resamplers)
    assert all("forward" in vars(m) for m in _resnets(fast) if m not in resamplers)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, 7).sample, model(x, 7).sample, rtol=1e-4, atol=2e-5)


def test_resnet_time_embeddings_of_every_shape_diffusers_takes(monkeypatch):
    # The fused block adds the embedding as a per-(sample, channel) shift: a batch-1 projection is
    # broadcast over the batch; an unprojected embedding that varies over positions (diffusers
    # adds it as given, broadcasting a 2-D one over the last two dimensions) runs the original
    # forward instead of being read as per-channel values.
    from diffusers.models.resnet import ResnetBlock2D
    x = torch.randn(3, 8, 6, 6)
    cases = [(dict(temb_channels=16), torch.randn(1, 16), True),
             (dict(temb_channels=16), torch.randn(3, 16), True),
             (dict(temb_channels=None), torch.randn(3, 8, 1, 1), True),
             (dict(temb_channels=None), torch.randn(1, 8, 1, 1), True),
             (dict(temb_channels=None), torch.randn(3, 8, 6, 6), False),
             (dict(temb_channels=None), torch.randn(6, 6), False)]
    for kwargs, temb, fused in cases:
        block = _perturbed(ResnetBlock2D(in_channels=8, groups=2, **kwargs))
        fast = inference.prepare_for_inference(block)
        calls = _count_calls(monkeypatch)
        with torch.no_grad():
            torch.testing.assert_close(fast(x, temb), block(x, temb), rtol=1e-5, atol=1e-5)
        assert bool(calls) == fused, (kwargs, tuple(temb.shape))


def test_diffusers_inference_form_saves_loads_and_copies_whole(monkeypatch, tmp_path):
    # torch.save of the whole prepared model, then torch.load: the fused blocks come back fused
    # (their forward was a bound method, which pickle restores by a name the class lacks)
    import copy
    model = _unet2d()
    fast = inference.prepare_for_inference(model)
    torch.save(fast, tmp_path / "fast.pt")
    loaded = torch.load(tmp_path / "fast.pt", weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        expected = fast(x, 7).sample
        for other in (loaded, copy.deepcopy(fast)):
            calls = _count_calls(monkeypatch)
            torch.testing.assert_close(other(x, 7).sample, expected, rtol=0, atol=0)
            assert calls and all("forward" in vars(m) for m in _resnets(other))


def test_kdfast_unet_and_options():
    torch.manual_seed(0)
    model = _perturbed(UNet())
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        expect = model(x, 300, torch.tensor([1, 10]))
        for kwargs in ({}, {"channels_last": False}, {"fuse_norms": False}):
            fast = inference.prepare_for_inference(model, **kwargs)
            assert fast.channels_last == kwargs.get("channels_last", True)
            assert fast.fused == kwargs.get("fuse_norms", True)
            torch.testing.assert_close(fast(x, 300, torch.tensor([1, 10])), expect, rtol=1e-4, atol=1e-5)
    # fusing twice changes nothing more; inplace prepares the model itself
    original = _unet2d()
    fast = inference.prepare_for_inference(original, inplace=True)
    assert fast is original and isinstance(original.conv_norm_out, inference.GroupNormSiLU)
    assert inference.fuse_group_norms(fast) == 0


def test_state_dict_keeps_the_original_keys():
    # the fused output norm wrapped the original as .norm: conv_norm_out.weight became
    # conv_norm_out.norm.weight, and weights no longer loaded in either direction
    model = _perturbed(_unet2d())
    fast = inference.prepare_for_inference(model)
    original, prepared = model.state_dict(), fast.state_dict()
    assert list(prepared) == list(original)
    assert all(torch.equal(prepared[k], original[k]) for k in original)
    fast.load_state_dict(original)
    _unet2d().load_state_dict(prepared)


def test_video_models_go_channels_last_3d():
    # Module.to(memory_format=channels_last) refuses 5-d weights: the default call crashed on
    # any model with a Conv3d
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                              torch.nn.Conv3d(8, 4, 1)).eval()
    fast = inference.prepare_for_inference(seq)
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert isinstance(fast[1], inference.GroupNormSiLU)
    x = torch.randn(2, 3, 4, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), seq(x), rtol=1e-4, atol=1e-5)


def test_what_a_fused_pass_would_change_is_left_alone():
    class FramewiseGroupNorm(torch.nn.GroupNorm):  # a subclass computing something else
        def forward(self, x):
            return super().forward(x.flip(-1)).flip(-1) * 0.5

    calls = []
    hooked = torch.nn.GroupNorm(2, 8)
    hooked.register_forward_hook(lambda module, args, out: calls.append(1) or out * 2)
    for norm in (FramewiseGroupNorm(2, 8), hooked):
        seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), norm, torch.nn.SiLU())
        fast = inference.prepare_for_inference(seq)
        assert type(fast[1]) is type(norm) and isinstance(fast[2], torch.nn.SiLU)
        x = torch.randn(2, 3, 9, 9)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), seq(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # the hook ran in the prepared copy too


def test_hooks_and_subclasses_on_kdfast_unet_norms_are_kept():
    # kdfast's UNet fused every norm regardless: a hooked norm's hook never ran in the
    # prepared copy, and a GroupNorm subclass's forward was replaced by the plain one
    class DoubledGroupNorm(torch.nn.GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = _perturbed(UNet())
    block = next(m for m in model.modules() if hasattr(m, "norm1"))
    block.norm1 = DoubledGroupNorm(block.norm1.num_groups, block.norm1.num_channels).eval()
    calls = []
    model.norm_out.register_forward_hook(lambda module, args, out: calls.append("norm_out") or out * 0)
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([5, 900]), torch.tensor([1, 10])
    fast = inference.prepare_for_inference(model)
    with torch.no_grad():
        expect = model(x, t, labels)
        got = fast(x, t, labels)
    assert calls == ["norm_out", "norm_out"]
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    # a hook added to the prepared copy turns its norm's fused pass off as well
    fast = inference.prepare_for_inference(_perturbed(UNet()))
    seen = []
    next(m for m in fast.modules() if hasattr(m, "norm1")).norm1.register_forward_hook(
        lambda module, args, out: seen.append(1))
    with torch.no_grad():
        fast(x, t, labels)
    assert seen == [1]


def test_hooks_added_to_a_prepared_diffusers_resnet_norm_run():
    fast = inference.prepare_for_inference(_unet2d())
    seen = []
    _resnets(fast)[0].norm2.register_forward_hook(lambda module, args, out: seen.append(1))
    with torch.no_grad():
        fast(torch.randn(1, 3, 16, 16), 10)
    assert seen == [1]


@pytest.mark.parametrize("hooked", ["conv_norm_out", "conv_act"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_hooks_added_to_a_prepared_norm_silu_pair_see_what_they_would_in_the_original(hooked, kind):
    # conv_norm_out + conv_act run as one fused module: a hook on conv_norm_out saw (and changed)
    # silu(norm(x)) instead of norm(x). A hook on either now splits the pair into two steps again.
    model = _unet2d()
    fast = inference.prepare_for_inference(model)
    seen = {}
    for name, m in (("original", model), ("prepared", fast)):
        module = getattr(m, hooked)
        if kind == "forward":
            module.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, out) * 2 - 1)
        else:
            module.register_forward_pre_hook(lambda mod, args, name=name: (seen.setdefault(name, args[0]) * 2 - 1,))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected, got = model.eval()(x, 10).sample, fast(x, 10).sample
    torch.testing.assert_close(seen["prepared"], seen["original"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_fused_pair_survives_copies_and_saving():
    fast = inference.prepare_for_inference(_unet2d())
    x = torch.randn(1, 3, 16, 16)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    for copied in (copy.deepcopy(fast), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert copied.conv_act.norm is copied.conv_norm_out and copied.conv_norm_out.partner is copied.conv_act
        assert copied.state_dict().keys() == fast.state_dict().keys()
        with torch.no_grad():
            torch.testing.assert_close(copied(x, 10).sample, fast(x, 10).sample)


def test_norms_whose_forward_is_wrapped_on_the_instance_are_left_alone():
    # accelerate's hooks (diffusers' CPU offload, device maps) wrap the instance's forward and
    # register nothing: the wrapped norms were fused or replaced, their wrappers never ran
    # (outputs off by 1.9 in 3.5; offloaded weights on the meta device failed)
    model = _unet2d()
    calls = []

    def wrap(module, scale):
        inner = module.forward
        module.forward = lambda *a, **k: calls.append(1) or inner(*a, **k) * scale
        module._hf_hook = object()

    wrap(model.conv_norm_out, 2.0)
    for block in _resnets(model):
        wrap(block.norm2, 1.0)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    with torch.no_grad():
        expected = model(x, t).sample
        n_calls, _ = len(calls), calls.clear()
        got = inference.prepare_for_inference(model)(x, t).sample
    assert len(calls) == n_calls > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # removing such a hook puts the class's own forward back on the instance: fused again
    plain = _unet2d()
    fused = inference.fuse_group_norms(copy.deepcopy(plain))
    for module in plain.modules():
        module.forward = module.forward
    assert inference.fuse_group_norms(plain) == fused > 0


def test_replaced_norms_keep_eval_mode_and_hooked_ones_are_not_replaced():
    # GroupNormSiLU and its Identity came out in training mode, and a norm's backward and
    # state-dict hooks were dropped with the module it replaced
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU()).eval()
    fast = inference.prepare_for_inference(seq)
    assert isinstance(fast[1], inference.GroupNormSiLU)
    assert not any(m.training for m in fast.modules())
    fired = []
    for register in (lambda m: m.register_full_backward_hook(lambda *a: fired.append("backward")),
                     lambda m: m.register_state_dict_pre_hook(lambda *a: fired.append("state_dict"))):
        seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU()).eval()
        register(seq[1])
        fast = inference.prepare_for_inference(seq)
        assert type(fast[1]) is torch.nn.GroupNorm
    fired.clear()
    fast(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    fast.state_dict()
    assert fired == ["state_dict"]  # the copy kept the hook (of the last kind registered)


def test_sequential_pairs_and_can_fuse():
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))
    fast = inference.prepare_for_inference(seq)
    assert isinstance(fast[1], inference.GroupNormSiLU) and isinstance(fast[2], inference.PairedSiLU)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), seq(x), rtol=1e-4, atol=1e-5)
    assert not inference.can_fuse(x.double())
    assert inference.can_fuse(x) and not inference.can_fuse(x.requires_grad_())


def test_containers_that_read_the_norm_elsewhere_keep_their_pairs():
    # Only a plain Sequential (and diffusers' own conv_norm_out / conv_act) feeds the norm's
    # output to the SiLU alone: a subclass returning every layer's output was fused, its norm
    # feature silu(norm(x)).
    class Features(torch.nn.Sequential):
        def forward(self, x):
            out = []
            for layer in self:
                x = layer(x)
                out.append(x)
            return out

    class NamedLikeDiffusers(torch.nn.Module):  # the attribute names, another forward
        def __init__(self):
            super().__init__()
            self.conv_norm_out, self.conv_act = torch.nn.GroupNorm(2, 8), torch.nn.SiLU()

        def forward(self, x):
            return self.conv_norm_out(x) + self.conv_act(x)

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    for model in (Features(torch.nn.GroupNorm(2, 8), torch.nn.SiLU()), NamedLikeDiffusers()):
        fast = inference.prepare_for_inference(model)
        assert not any(isinstance(m, inference.GroupNormSiLU) for m in fast.modules())
        with torch.no_grad():
            for got, want in zip(*(torch.utils._pytree.tree_leaves(m(x)) for m in (fast, model))):
                torch.testing.assert_close(got, want)


def test_hooks_registered_for_every_module_turn_the_fused_passes_off():
    # A fused pass calls no norm module: hooks registered for every module
    # (register_module_forward_hook) saw none of them, and one changing a norm's output changed nothing.
    from torch.nn.modules.module import register_module_forward_hook

    def clamp_norms(module, args, out):
        return out.clamp(-0.5, 0.5) if isinstance(module, torch.nn.GroupNorm) else None

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU()).eval(),
              _perturbed(UNet(base_channels=8, channel_mults=(1, 2), time_embed_dim=16, norm_groups=4,
                              attention_heads=2, sample_size=8)), _unet2d()]
    inputs = [(torch.randn(2, 4, 6, 6),), (torch.randn(1, 1, 8, 8), 5), (torch.randn(1, 3, 16, 16), 5)]
    for model, args in zip(models, inputs):
        fast = inference.prepare_for_inference(model)
        handle = register_module_forward_hook(clamp_norms)
        try:
            with torch.no_grad():
                want, got = (torch.utils._pytree.tree_leaves(m(*args))[0] for m in (model, fast))
        finally:
            handle.remove()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # and without the hook, the fused passes again
            assert (torch.utils._pytree.tree_leaves(fast(*args))[0] - want).abs().max() > 1e-3


def test_a_model_prepared_while_a_hook_for_every_module_is_held_fuses_once_it_is_gone(monkeypatch):
    # Such hooks are checked at each call, not when preparing: one held a while (ModuleTracker)
    # left a diffusers UNet unfused for good.
    from torch.utils.module_tracker import ModuleTracker

    calls = _count_calls(monkeypatch)
    model, x = _unet2d(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        inference.prepare_for_inference(model)(x, 5)
        normal = len(calls)
        calls.clear()
        with ModuleTracker():
            fast = inference.prepare_for_inference(model)
            fast(x, 5)
            assert calls == []  # (held: torch's modules run)
        fast(x, 5)
    assert normal > 0 and len(calls) == normal


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference_form(dtype):
    # a 16-bit teacher: the fused norms read 16-bit maps and affine parameters, as torch's do
    torch.manual_seed(0)
    model = _perturbed(UNet())
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        expect = model(x, 300, torch.tensor([1, 10]))
        try:
            half = model.to(dtype)(x.to(dtype), 300, torch.tensor([1, 10]))
        except RuntimeError as exc:  # a torch build without 16-bit CPU convolutions
            pytest.skip(f"torch cannot run {dtype} convolutions here: {exc}")
        fast = inference.prepare_for_inference(model)(x.to(dtype), 300, torch.tensor([1, 10]))
    model.float()
    assert fast.dtype == dtype
    # the fused form is as close to the float32 result as torch's own 16-bit run is, within 2x
    err_fast = (fast.float() - expect).abs().max()
    err_torch = (half.float() - expect).abs().max()
    assert err_fast <= 2 * err_torch + 1e-3, (err_fast, err_torch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_inference_forms(dtype, monkeypatch):
    # cuDNN convolutions default to TF32 (10-bit mantissas): an ulp of difference from the fused
    # norm flips their rounding and grows through the network (~2e-3). Compared without it.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for make in (_unet2d, _unet2d_condition):
        model = make().cuda().to(dtype)
        fast = inference.prepare_for_inference(model)
        x = torch.randn(4, model.config.in_channels, 16, 16, device="cuda", dtype=dtype)
        t = torch.tensor([10, 300, 600, 990], device="cuda")
        kwargs = {"encoder_hidden_states": torch.randn(4, 5, 32, device="cuda", dtype=dtype)} \
            if "Condition" in type(model).__name__ else {}
        with torch.inference_mode():
            out, expect = fast(x, t, **kwargs).sample, model(x, t, **kwargs).sample
        tol = {"rtol": 1e-3, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(out, expect, **tol)
    teacher = _perturbed(UNet()).cuda()
    fast = teacher.for_inference()
    x = torch.randn(8, 1, 16, 16, device="cuda")
    y = torch.arange(8, device="cuda") % 11
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, 500, y), teacher(x, 500, y), rtol=1e-3, atol=1e-4)


@pytest.mark.filterwarnings("ignore:No complete tensor found")  # (torch's, on saving channels-last weights)
@pytest.mark.parametrize("make", [lambda: _perturbed(UNet()), _unet2d])
def test_inference_forms_export_with_torch_export(make, tmp_path):
    """A distilled student deployed with torch.export keeps the fused norms: the exported
    program calls kdfast's op (its fake implementation traces it) and gives the eager outputs
    before and after a save / load round trip."""
    fast = inference.prepare_for_inference(make())
    x = torch.randn(2, fast.config.in_channels if hasattr(fast, "config") else 1, 16, 16)
    args = (x, torch.tensor([300, 20]))
    with torch.no_grad():
        expect = fast(*args)
        expect = expect.sample if hasattr(expect, "sample") else expect
        program = torch.export.export(fast, args)
        assert any("kdfast.group_norm_act" in str(node.target) for node in program.graph.nodes)
        path = tmp_path / "student.pt2"
        torch.export.save(program, str(path))
        for module in (program.module(), torch.export.load(str(path)).module()):
            out = module(*args)
            out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)


def test_the_kdfast_unets_inference_form_compiles_as_one_graph():
    fast = inference.prepare_for_inference(_perturbed(UNet()))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([300, 20])
    with torch.no_grad():
        compiled = torch.compile(fast, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, t), fast(x, t))


def test_the_kdfast_unet_with_class_labels_exports_compiles_and_vmaps():
    # the labels' range was read on the CPU with int(): torch.export and fullgraph compile
    # failed on the data-dependent value, vmap on .item(); an out-of-range label still raises
    fast = inference.prepare_for_inference(_perturbed(UNet()))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([300, 20]), torch.tensor([1, 10])
    bad = torch.tensor([1, 11])
    with torch.no_grad():
        expect = fast(x, t, y)
        program = torch.export.export(fast, (x, t, y)).module()
        compiled = torch.compile(fast, backend="eager", fullgraph=True)
        for run in (program, compiled):
            torch.testing.assert_close(run(x, t, y), expect)
            with pytest.raises(RuntimeError, match=r"class_labels must be in \[0, 11\)"):
                run(x, t, bad)
        each = torch.func.vmap(lambda a, b, c: fast(a[None], b[None], c[None])[0])(x, t, y)
        torch.testing.assert_close(each, expect, rtol=1e-4, atol=1e-5)  # (per-sample convolutions)


def test_a_resnet_blocks_output_scale_factor_is_kept():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = _perturbed(ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4,
                                     output_scale_factor=2.0))
    x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 8)
    fast = inference.prepare_for_inference(block)
    torch.testing.assert_close(fast(x, temb), block(x, temb), rtol=1e-4, atol=1e-5)


def test_a_model_in_training_mode_comes_out_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Dropout(0.5), torch.nn.GroupNorm(2, 8),
                                torch.nn.SiLU())  # left in training mode
    fast = inference.prepare_for_inference(model)
    assert model.training and not any(m.training for m in fast.modules())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fast(x), model.eval()(x))
