import pytest
import torch
import torch.nn.functional as F

from kdfast.losses import FusedLinearKDLoss, default_chunk_size, fused_linear_kd, kd_loss
from kdfast.losses import fused_linear as fused_linear_module
from kdfast.reference import kd_divergence as ref


def make(tokens=29, hidden=12, vocab=53, teacher_hidden=20, teacher_vocab=53, dtype=torch.float32, seed=0,
         bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    case = dict(
        student_hidden=r(tokens, hidden), student_weight=r(vocab, hidden, scale=0.5),
        teacher_hidden=r(tokens, teacher_hidden), teacher_weight=r(teacher_vocab, teacher_hidden, scale=0.5),
        student_bias=r(vocab) if bias else None, teacher_bias=r(teacher_vocab) if bias else None,
    )
    labels = torch.randint(0, min(vocab, teacher_vocab), (tokens,), generator=g)
    labels[::5] = -100
    return case, labels


def unfused(case, labels, kind="jsd", beta=0.5, temperature=1.0, weight_hard=0.0, weight_soft=1.0,
            vocab=None, reduction="batchmean", loss_scale=1.0, dtype=torch.float64):
    """The materialised-logits computation the fused loss replaces, in ``dtype``."""
    c = {k: None if v is None else v.to(dtype) for k, v in case.items()}
    s = c["student_hidden"] @ c["student_weight"].t()
    if c["student_bias"] is not None:
        s = s + c["student_bias"]
    t = c["teacher_hidden"] @ c["teacher_weight"].t()
    if c["teacher_bias"] is not None:
        t = t + c["teacher_bias"]
    vocab = vocab or min(s.shape[1], t.shape[1])
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    rows = weight_soft * ref.kd_divergence(s, t, kind, beta, temperature, labels, vocab=vocab, loss_scale=loss_scale,
                                           dtype=dtype)
    if weight_hard:
        ce = F.cross_entropy(s[:, :vocab], labels, ignore_index=-100, reduction="none")
        rows = rows + weight_hard * ce
    count = s.shape[0] if labels is None else max(int((labels != -100).sum()), 1)
    total = rows.sum()
    return {"sum": total, "batchmean": total / count, "mean": total / (count * vocab)}[reduction]


def run_both(case, labels, **kw):
    fused_in = {k: None if v is None else v.clone().requires_grad_(True) for k, v in case.items()}
    chunk = kw.pop("chunk_size", None)
    loss = fused_linear_kd(fused_in["student_hidden"], fused_in["student_weight"], fused_in["teacher_hidden"],
                           fused_in["teacher_weight"], labels, fused_in["student_bias"], fused_in["teacher_bias"],
                           chunk_size=chunk, **kw)
    loss.backward()
    ref_in = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in case.items()}
    loss_scale = kw.pop("scale_by_t2", False) and kw.get("temperature", 1.0) ** 2 or 1.0
    vocab = kw.pop("vocab_size", None)
    expected = unfused(ref_in, labels, vocab=vocab, loss_scale=loss_scale, **kw)
    expected.backward()
    return loss, fused_in, expected, ref_in


def assert_grads_close(fused_in, ref_in, rtol=1e-5, atol=1e-6):
    for name in ("student_hidden", "student_weight", "student_bias"):
        if fused_in[name] is None:
            continue
        got, want = fused_in[name].grad, ref_in[name].grad
        assert got.dtype == fused_in[name].dtype, name
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=name)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        if fused_in[name] is not None:
            assert fused_in[name].grad is None, f"{name} must get no gradient"


@pytest.mark.parametrize("chunk_size", [1, 7, 29, 64])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"])
def test_matches_materialised_logits(chunk_size, kind):
    case, labels = make()
    loss, fused_in, expected, ref_in = run_both(case, labels, kind=kind, beta=0.3, temperature=1.5,
                                                chunk_size=chunk_size)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert_grads_close(fused_in, ref_in)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_hard_and_soft_terms_and_reductions(reduction):
    case, labels = make(seed=1)
    loss, fused_in, expected, ref_in = run_both(case, labels, weight_hard=0.4, weight_soft=0.6, temperature=2.0,
                                                scale_by_t2=True, reduction=reduction, chunk_size=8)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert_grads_close(fused_in, ref_in)


@pytest.mark.parametrize("student_vocab, teacher_vocab", [(53, 64), (64, 53)])
def test_different_vocabularies(student_vocab, teacher_vocab):
    # Padded heads: the shared vocabulary is the smaller one, the extra columns have
    # probability 0 (not logit 0) and the student's padding rows get no gradient.
    case, labels = make(vocab=student_vocab, teacher_vocab=teacher_vocab, seed=2)
    loss, fused_in, expected, ref_in = run_both(case, labels, weight_hard=0.5, chunk_size=10)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert_grads_close(fused_in, ref_in)
    assert (fused_in["student_weight"].grad[53:] == 0).all()


def test_no_labels_no_bias_and_grad_output_scaling():
    case, _ = make(bias=False, seed=3)
    inputs = {k: None if v is None else v.clone().requires_grad_(True) for k, v in case.items()}
    loss = fused_linear_kd(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                           inputs["teacher_weight"], kind="reverse_kl", chunk_size=5)
    (3.0 * loss).backward()
    ref_in = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in case.items()}
    expected = unfused(ref_in, None, kind="reverse_kl")
    (3.0 * expected).backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert_grads_close(inputs, ref_in)


def test_no_grad_computes_the_loss_only(monkeypatch):
    # Evaluation under torch.no_grad(): same loss, and no gradient pass even though the
    # student's parameters require grad.
    case, labels = make(seed=5)
    h, w = case["student_hidden"].requires_grad_(True), case["student_weight"].requires_grad_(True)
    args = (h, w, case["teacher_hidden"], case["teacher_weight"], labels)
    expected = fused_linear_kd(*args, weight_hard=0.3, chunk_size=7)

    def no_gradients(*a, **k):
        raise AssertionError("a gradient was computed under no_grad")

    monkeypatch.setattr(fused_linear_module, "kd_divergence_with_grad", no_gradients)
    monkeypatch.setattr(fused_linear_module, "_cross_entropy_chunk", no_gradients)  # (the hard term's)
    with torch.no_grad():
        loss = fused_linear_kd(*args, weight_hard=0.3, chunk_size=7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach())


def test_all_tokens_ignored():
    case, labels = make(seed=4)
    labels[:] = -100
    h = case["student_hidden"].requires_grad_(True)
    loss = fused_linear_kd(h, case["student_weight"], case["teacher_hidden"], case["teacher_weight"], labels,
                           weight_hard=1.0)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    case, labels = make(dtype=dtype, seed=5, tokens=40, vocab=300, teacher_vocab=300)
    loss, fused_in, expected, ref_in = run_both(case, labels, weight_hard=0.5, chunk_size=16)
    # fp32 logits and math from the rounded inputs: only the gradients' final rounding differs.
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-4)
    assert_grads_close(fused_in, ref_in, **tol)


def test_fp16_hidden_gradient_is_scaled_before_it_is_rounded():
    # The per-token sums of a large head overflow fp16 before the 1 / tokens of batchmean: the
    # gradient of the hidden states is kept in fp32 until the backward has scaled it.
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, vocab = 64, 8, 32
    sh = (torch.randn(tokens, hidden, generator=gen) * 1e-4).half().requires_grad_(True)
    sw = (torch.randn(vocab, hidden, generator=gen).clamp(-3, 3) * 2e4).half()
    th, tw = torch.randn(tokens, hidden, generator=gen).half(), torch.randn(vocab, hidden, generator=gen).half()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    fused_linear_kd(sh, sw, th, tw, labels, kind="forward_kl", weight_hard=1.0, chunk_size=16).backward()
    h = sh.detach().double().requires_grad_(True)
    s, t = h @ sw.double().t(), th.double() @ tw.double().t()
    ((F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
      + F.cross_entropy(s, labels, reduction="sum")) / tokens).backward()
    assert h.grad.abs().max() < 65504 / 16  # the scaled gradient fits fp16 with room
    torch.testing.assert_close(sh.grad.double(), h.grad, rtol=2e-3, atol=2e-3 * h.grad.abs().max().item())


def test_module_and_default_chunk_size():
    case, labels = make(seed=6)
    criterion = FusedLinearKDLoss(kind="tvd", weight_hard=0.2)
    value = criterion(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                      case["teacher_weight"], labels, case["student_bias"], case["teacher_bias"])
    direct = fused_linear_kd(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                             case["teacher_weight"], labels, case["student_bias"], case["teacher_bias"], kind="tvd",
                             weight_hard=0.2, chunk_size=3)
    torch.testing.assert_close(value, direct)
    assert default_chunk_size(2048, 32000, "cpu") == 256
    assert default_chunk_size(8192, 128256, "cuda") == 1024
    assert default_chunk_size(10, 32000, "cpu") == 10


def test_the_default_chunk_is_sized_by_the_wider_head(monkeypatch):
    # (by the student's alone, a teacher head 16x wider had its whole [tokens, vocab] logits
    # made in one chunk)
    import kdfast.losses.fused_linear as fl

    seen = []
    monkeypatch.setattr(fl, "default_chunk_size", lambda tokens, vocab, device: seen.append(vocab) or tokens)
    for vocab, teacher_vocab in ((53, 70), (70, 53)):
        case, labels = make(vocab=vocab, teacher_vocab=teacher_vocab, seed=13)
        fused_linear_kd(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                        case["teacher_weight"], labels)
    assert seen == [70, 70]


def test_double_backward_is_refused():
    # The gradients come from the forward pass and have no graph: a gradient penalty built on
    # them would silently get zero from the loss, so create_graph=True is an error.
    case, labels = make(seed=9, bias=False)
    h = case["student_hidden"].requires_grad_(True)
    loss = fused_linear_kd(h, case["student_weight"].requires_grad_(True), case["teacher_hidden"],
                           case["teacher_weight"], labels)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    (g,) = torch.autograd.grad(loss, h)  # a first-order gradient still works
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("mutate, error, match", [
    (lambda c, l: c.update(student_hidden=c["student_hidden"][0]), ValueError, "student_hidden must be 2-D"),
    (lambda c, l: c.update(student_weight=c["student_weight"][:, :5]), ValueError, "student_weight must be"),
    (lambda c, l: c.update(teacher_hidden=c["teacher_hidden"][:5]), ValueError, "same number of tokens"),
    (lambda c, l: c.update(student_bias=c["student_bias"][:3]), ValueError, "student_bias must be"),
    (lambda c, l: c.update(teacher_weight=c["teacher_weight"].half()), ValueError, "teacher_weight .* must match"),
    (lambda c, l: c.update(student_hidden=c["student_hidden"].long()), TypeError, "student_hidden must be float"),
    (lambda c, l: l.__setitem__(0, 10_000), ValueError, "labels must be in"),
    (lambda c, l: c.update(student_weight=c["student_weight"][:0], student_bias=None), ValueError,
     r"student_weight must have at least one row .* got shape \(0, 12\)"),
    (lambda c, l: c.update(teacher_weight=c["teacher_weight"][:0], teacher_bias=None), ValueError,
     "teacher_weight must have at least one row"),
])
def test_bad_input(mutate, error, match):
    case, labels = make(seed=7)
    mutate(case, labels)
    with pytest.raises(error, match=match):
        fused_linear_kd(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                        case["teacher_weight"], labels, case["student_bias"], case["teacher_bias"], weight_hard=1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_hard=1.0, labels=None), "needs labels"),
    (dict(reduction="none"), "reduction must be"),
    (dict(chunk_size=0), "chunk_size must be"),
    (dict(vocab_size=54), "vocab_size must be in"),
    (dict(kind="kl"), "kind must be one of"),
    (dict(weight_soft=-1.0), "weight_hard and weight_soft"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(weight_soft=None), "weight_soft must be a real number"),
    (dict(beta=None), "beta must be a real number"),
    # past float32's range (the kernels compute in float32): inf * 0 at ignored tokens made NaN
    (dict(weight_hard=1e39), "weight_hard and weight_soft must be at most float32's largest"),
    (dict(weight_soft=1e39), "weight_hard and weight_soft must be at most float32's largest"),
    (dict(temperature=1e20, scale_by_t2=True), r"weight_soft \* temperature\*\*2 must be at most"),
    (dict(temperature=1e-40), "temperature must be at least"),
])
def test_bad_options(kwargs, match):
    case, labels = make(seed=8)
    labels = kwargs.pop("labels", labels)
    with pytest.raises(ValueError, match=match):
        fused_linear_kd(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                        case["teacher_weight"], labels, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(weight_hard=float("nan")), "weight_hard and weight_soft"),
    (dict(chunk_size=True), "chunk_size must be"),
    (dict(beta=1.5), "beta must be in"),
    (dict(kind="kl"), "kind must be one of"),
    (dict(reduction="none"), "reduction must be"),
    (dict(temperature=1e20, scale_by_t2=True), r"weight_soft \* temperature\*\*2 must be at most"),
    (dict(temperature=1e-40), "temperature must be at least"),
    (dict(weight_hard=1e39), "weight_hard and weight_soft must be at most"),
])
def test_module_refuses_bad_options_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearKDLoss(**kwargs)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    case, labels = make(tokens=300, vocab=1000, teacher_vocab=1000, dtype=torch.bfloat16, seed=9)
    cpu = fused_linear_kd(*(case[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                               "teacher_weight")), labels, weight_hard=0.5)
    gpu = fused_linear_kd(*(case[k].cuda() for k in ("student_hidden", "student_weight", "teacher_hidden",
                                                      "teacher_weight")), labels.cuda(), weight_hard=0.5)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_gpu_forward_and_backward_do_not_sync():
    case, labels = make(tokens=256, vocab=2048, teacher_vocab=2112, dtype=torch.bfloat16, seed=10)
    inputs = {k: None if v is None else v.cuda() for k, v in case.items()}
    h = inputs["student_hidden"].requires_grad_(True)
    w = inputs["student_weight"].requires_grad_(True)
    labels = labels.cuda()
    fused_linear_kd(h, w, inputs["teacher_hidden"], inputs["teacher_weight"], labels, weight_hard=0.5,
                    chunk_size=64)  # warm-up: kernel selection, capability probes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_kd(h, w, inputs["teacher_hidden"], inputs["teacher_weight"], labels, weight_hard=0.5,
                               chunk_size=64)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and torch.isfinite(h.grad).all().item()


@pytest.mark.gpu
def test_gpu_capability_probe_passes_sync_debug(monkeypatch):
    # The one-time check of mm(out_dtype=) reads its result on the host: under
    # set_sync_debug_mode("error") a first call raised there. It also runs on the tensors' GPU.
    from kdfast.losses import fused_linear
    case, labels = make(tokens=64, vocab=256, teacher_vocab=256, dtype=torch.bfloat16, seed=12)
    args = [case[k].cuda() for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    labels = labels.cuda()
    expected = fused_linear_kd(*args, labels)  # compiles the kernels, runs the probe once
    monkeypatch.setattr(fused_linear, "_FP32_OUT", None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_kd(*args, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert fused_linear._FP32_OUT is not None
    torch.testing.assert_close(loss, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_hard", [0.0, 0.5])
def test_gpu_bf16_gradients_match_reference(weight_hard):
    """The bf16 GPU path: chunk gradients stored in bf16 by the kernel (or fp32 with the hard
    term), the hidden-state gradient written in place, the weight's accumulated in fp32."""
    case, labels = make(tokens=300, hidden=64, vocab=1000, teacher_hidden=96, teacher_vocab=1032,
                        dtype=torch.bfloat16, seed=11)
    cuda_case = {k: None if v is None else v.cuda() for k, v in case.items()}
    loss, fused_in, expected, ref_in = run_both(cuda_case, labels.cuda(), kind="jsd", beta=0.5,
                                                weight_hard=weight_hard, chunk_size=128)
    torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=2e-2, atol=1e-3)
    for name in ("student_hidden", "student_weight", "student_bias"):
        got, want = fused_in[name].grad, ref_in[name].grad
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=3e-2, atol=2e-3, msg=name)
    assert fused_in["teacher_weight"].grad is None


@pytest.mark.parametrize("kwargs, name", [
    (dict(vocab_size=-5), "vocab_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size="abc"), "vocab_size"),
    (dict(vocab_size=4.7), "vocab_size"),
    (dict(ignore_index=1.5), "ignore_index"),
    (dict(ignore_index=True), "ignore_index"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(chunk_size="8"), "chunk_size"),
])
def test_integer_settings_are_checked_at_construction(kwargs, name):
    # vocab_size=-5 used to pass construction and fail (or 4.7 be truncated) at the first call
    with pytest.raises(ValueError, match=f"{name} must be"):
        FusedLinearKDLoss(**kwargs)


def test_integer_settings_are_checked_at_call():
    case, labels = make(seed=10)
    for kwargs in (dict(vocab_size=40.5), dict(ignore_index=0.5), dict(chunk_size=2.5)):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be"):
            fused_linear_kd(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                            case["teacher_weight"], labels, **kwargs)


def test_numpy_integer_settings_are_accepted_and_shown():
    # chunk_size=np.int64(4) used to be refused
    np = pytest.importorskip("numpy")
    case, labels = make(seed=11)
    labels = labels.masked_fill(labels >= 50, -100)  # (ids of the shared vocabulary)
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"], labels)
    criterion = FusedLinearKDLoss(chunk_size=np.int64(4), vocab_size=np.int64(50), ignore_index=np.int32(-100))
    torch.testing.assert_close(criterion(*args), fused_linear_kd(*args, chunk_size=4, vocab_size=50))
    text = repr(criterion)
    for setting in ("kind='jsd'", "beta=0.5", "temperature=1.0", "ignore_index=-100", "weight_hard=0.0",
                    "weight_soft=1.0", "chunk_size=4", "vocab_size=50", "scale_by_t2=False", "reduction='batchmean'"):
        assert setting in text, setting


def test_labels_out_of_range_are_refused_without_the_hard_term_too():
    # (they only masked the divergence there: padding with -1 counted as tokens)
    case, labels = make(seed=12)
    labels[0] = -1
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_kd(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                        case["teacher_weight"], labels)


def test_a_students_own_tokens_past_the_shared_vocabulary_are_tokens():
    # A student head with added tokens (ids 53, 54) past the teacher's 53: for the divergence they
    # only mask; the hard term's targets must lie in the shared vocabulary
    case, labels = make(vocab=55, teacher_vocab=53, seed=14, bias=False)
    labels[1], labels[2] = 53, 54
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"], labels)
    torch.testing.assert_close(fused_linear_kd(*args), torch.as_tensor(unfused(case, labels, vocab=53)).float(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 53\)"):
        fused_linear_kd(*args, weight_hard=0.5, weight_soft=0.5)
    labels[3] = 55
    with pytest.raises(ValueError, match=r"labels must be in \[0, 55\)"):
        fused_linear_kd(*args)


def test_symbolic_loss_weights_do_not_break_a_full_graph():
    # math.isfinite of a symbolic weight (dynamic=True, or a hard/soft mix changed over training)
    # broke the graph: "torch.* op returned non-Tensor"
    case, labels = make(tokens=8, bias=False)
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"], labels)

    def loss(w):
        return fused_linear_kd(*args, weight_hard=1.0 - w, weight_soft=w)

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for w in (0.9, 0.8, 0.7):
        torch.testing.assert_close(compiled(w), loss(w))
    with pytest.raises(RuntimeError, match="weight_(hard|soft) must be finite"):
        compiled(float("nan"))
    torch._dynamo.reset()
    dynamic = torch.compile(lambda h: fused_linear_kd(h, *args[1:]), backend="aot_eager", dynamic=True,
                            fullgraph=True)
    torch.testing.assert_close(dynamic(args[0]), fused_linear_kd(*args))


def test_hard_label_checks_do_not_break_a_full_graph():
    # With weight_hard > 0 the labels' range is checked; under torch.compile on the device, not
    # by a data-dependent branch (which fullgraph=True refuses).
    case, labels = make(tokens=8, bias=False)
    loss = FusedLinearKDLoss(weight_hard=0.3, weight_soft=0.7)
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"])
    torch._dynamo.reset()
    compiled = torch.compile(lambda labels: loss(*args, labels), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(labels), loss(*args, labels))
    with pytest.raises(RuntimeError, match="labels must be in"):
        compiled(torch.full_like(labels, 53))


def test_autocast_takes_the_heads_as_f_linear_does():
    # an autocast model's bf16 hidden states meet its fp32 lm_head.weight: both taken in bf16
    # (as F.linear takes them), the gradient reaching the fp32 parameter through the cast
    case, labels = make(tokens=16, bias=True)
    leaves = {k: case[k].clone().requires_grad_(True) for k in ("student_weight", "student_bias")}
    twins = {k: case[k].clone().requires_grad_(True) for k in ("student_weight", "student_bias")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = case["student_hidden"].bfloat16()  # (as an autocast layer returns it)
        got = fused_linear_kd(hidden, leaves["student_weight"], case["teacher_hidden"], case["teacher_weight"],
                              labels, leaves["student_bias"], case["teacher_bias"], weight_hard=0.5)
        s = F.linear(hidden, twins["student_weight"], twins["student_bias"])
        t = F.linear(case["teacher_hidden"], case["teacher_weight"], case["teacher_bias"])
    valid = labels != -100
    expected = (kd_loss(s, t, labels, kind="jsd") + 0.5 * F.cross_entropy(s[valid].float(), labels[valid]))
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-3)
    for k in leaves:
        assert leaves[k].grad.dtype == torch.float32
        torch.testing.assert_close(leaves[k].grad, twins[k].grad, rtol=2e-2, atol=2e-3)
    # float64 is left alone, as autocast leaves it: refused as outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="float64"):
        fused_linear_kd(case["student_hidden"].double(), case["student_weight"].double(), case["teacher_hidden"],
                        case["teacher_weight"])


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_casts_the_heads_but_keeps_the_products_in_fp32(bias):
    # CPU autocast lowers matmuls to bf16: left on around the chunk loop, it rounded the widened
    # heads' products to 16 bits (the cross-entropy then ran its softmax in bf16 without a bias)
    case, labels = make(tokens=32, bias=bias)
    args = [case[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    biases = (case["student_bias"], case["teacher_bias"]) if bias else (None, None)
    bf16 = [t.bfloat16() for t in args] + [None if b is None else b.bfloat16() for b in biases]
    expected = fused_linear_kd(*bf16[:4], labels, *bf16[4:], weight_hard=1.0, weight_soft=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_kd(*args, labels, *biases, weight_hard=1.0, weight_soft=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_the_one_time_cuda_check_restores_the_sync_debug_mode_under_threads(monkeypatch):
    # Two threads' first calls checked at once: the second saved the 0 the first had set and
    # restored it last, switching the user's torch.cuda.set_sync_debug_mode("error") off for good.
    # (The GPU work is stood in for by a pause; the check runs on the CPU here.)
    import contextlib
    import threading
    import time

    import kdfast.losses.fused_linear as fl

    state = {"mode": 2}

    def set_mode(mode):
        state["mode"] = mode
        time.sleep(0.05)

    monkeypatch.setattr(fl, "_FP32_OUT", None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    threads = [threading.Thread(target=fl._fp32_out_support, args=(torch.device("cpu"),)) for _ in range(2)]
    threads[0].start()
    while state["mode"] != 0:  # the second call comes while the first is checking
        time.sleep(0.001)
    threads[1].start()
    for t in threads:
        t.join()
    assert state["mode"] == 2


def test_a_second_backward_through_the_same_graph_is_refused():
    # the backward scales the forward's gradient buffers in place (a weight-sized copy cost as
    # much as a few-token call's products): a second one would scale them again
    case, labels = make(tokens=8, bias=True)
    weight = case["student_weight"].clone().requires_grad_(True)
    loss = fused_linear_kd(case["student_hidden"], weight, case["teacher_hidden"], case["teacher_weight"], labels,
                           case["student_bias"], case["teacher_bias"], chunk_size=3)
    (first,) = torch.autograd.grad(loss, weight, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, weight)
    s = F.linear(case["student_hidden"], weight, case["student_bias"])
    t = F.linear(case["teacher_hidden"], case["teacher_weight"], case["teacher_bias"])
    (expected,) = torch.autograd.grad(kd_loss(s, t, labels, kind="jsd"), weight)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-7)


def test_a_16_bit_cpu_teacher_head_is_widened_once_under_torch_func(monkeypatch):
    # (the transforms' unfused path made a second fp32 copy of the head next to the first)
    import kdfast.losses.fused_linear as fl

    widened = []
    original = fl._head_operand
    monkeypatch.setattr(fl, "_head_operand", lambda w: (widened.append(w.dtype), original(w))[1])
    sh, sw = torch.randn(4, 64), torch.randn(1000, 64)
    th, tw = torch.randn(4, 256).bfloat16(), torch.randn(1000, 256).bfloat16()
    torch.func.grad(lambda h: fl.fused_linear_kd(h, sw, th, tw))(sh)
    assert widened.count(torch.bfloat16) == 1


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_hard_term_at_a_large_common_offset(chunk_size):
    # Logits that share an offset of 1e4 (a bias), every one exact in float32: the hard term's
    # log-sum-exp is taken relative to the row's maximum, as F.cross_entropy does. Less the
    # target's logit after rounding at the logits' size, it was off by up to 5e-4 a token
    # (torch's float32: 3e-7), 4e-3 over these 64. Chunked, evaluation and torch.func paths.
    g = torch.Generator().manual_seed(0)
    tokens, hidden, vocab = 64, 16, 128
    h = torch.randint(-8, 9, (tokens, hidden), generator=g).float() / 16
    w = torch.randint(-16, 17, (vocab, hidden), generator=g).float() / 64
    b = torch.full((vocab,), 1e4)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    logits64 = h.double() @ w.double().t() + b.double()
    assert torch.equal((h @ w.t() + b).double(), logits64)
    x64 = h.double().requires_grad_(True)
    expect = F.cross_entropy(x64 @ w.double().t() + b.double(), labels, reduction="sum")
    expect.backward()

    def loss_of(x):
        return fused_linear_kd(x, w, h, w, labels, b, b, weight_hard=1.0, weight_soft=0.0, reduction="sum",
                               chunk_size=chunk_size)

    x = h.clone().requires_grad_(True)
    loss = loss_of(x)  # the chunked loss and its gradient
    loss.backward()
    with torch.no_grad():  # evaluation: the loss alone
        evaluated = loss_of(h)
    # under torch.func: the unfused loss, differentiated by torch
    func_grad, func_loss = torch.func.grad_and_value(loss_of)(h)
    for name, value, grad in (("chunked", loss, x.grad), ("no_grad", evaluated, None), ("func", func_loss, func_grad)):
        torch.testing.assert_close(value.detach().double(), expect.detach(), rtol=0, atol=1e-4, msg=name)
        if grad is not None:
            torch.testing.assert_close(grad.double(), x64.grad, rtol=1e-5, atol=1e-6, msg=name)
