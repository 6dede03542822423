"""Batched KD loss benchmark: time and peak memory of kdfast's fused losses against naive
torch (materialised logits) and, on a GPU when installed, Liger-Kernel, in the same run.

Cases (forward + backward; the first two a generalized JSD, beta 0.5, with labels, 5% of them
ignored; the others forward KL):
- ``kd_loss``: given logits ``[tokens, vocab]`` -> ``kdfast.losses.kd_loss`` vs the TRL-style
  torch formula (log_softmax, logsumexp mixture, kl_div).
- ``fused_linear_kd``: hidden states + LM heads -> ``kdfast.losses.fused_linear_kd`` vs
  materialising both logits then the same torch formula (and Liger's fused-linear JSD and
  chunked JSD on a GPU).
- ``topk_kd``: given student logits and a teacher's stored top-64 ids and log-probabilities
  (forward KL with the teacher's remaining mass as one outcome) -> ``kdfast.losses.topk_kd_loss``
  vs the same formula in plain torch (log_softmax, gather, the outside mass as 1 - inside).
- ``fused_linear_topk``: hidden states + the student's LM head against the stored top-64 ->
  ``kdfast.losses.fused_linear_topk_kd`` vs materialising the student's logits then the same
  plain torch formula.
- ``classifier_kd``: Hinton KD of classifier logits (``[batch, classes]`` from 128 x 10 to
  64 x 1000; forward KL at temperature 4, times T^2) -> ``kd_loss`` vs ``F.kl_div`` of two
  ``log_softmax``: shapes where a call's fixed cost, not the kernel, decides (200 repeats each).

CPU peak memory is measured per candidate in a fresh subprocess (peak RSS above the RSS with
the inputs allocated; for ``classifier_kd``, whose peak is below a page, torch's allocator
records instead); GPU peak memory with ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_kdloss.py                  # CPU shapes of the issue
    python benchmarks/bench_kdloss.py --device cuda    # GPU shapes (1024 and 8192 tokens, bf16)
    python benchmarks/bench_kdloss.py --quick          # small shapes, a smoke run

Rows: one per candidate (``candidate``: kdfast, torch, liger_...); kdfast's rows also name
the backend kdfast's registry ran (``backend``). A full run (every case, not ``--quick``), or
one given ``--out``, replaces the recorded rows of the same device, case, shape and dtype and
keeps all others.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from _common import (check_device, int_at_least, kdfast_backend, merge_rows, peak_memory_bytes, quartiles,
                     recorded_results)
from _common import device_name as _device_name

RESULTS = Path(recorded_results(__file__))
BETA, TEMPERATURE, IGNORE = 0.5, 1.0, -100
CASES = ("kd_loss", "fused_linear_kd", "topk_kd", "fused_linear_topk", "classifier_kd")
TOPK = 64  # stored teacher entries per token (topk_kd)
HINTON_T = 4.0
# Shapes of a case (the GPU's and CPU's of the issue for the two LM cases), and how many more
# repeats than --repeats a case runs (its calls take a fraction of a millisecond).
CLASSIFIER_SHAPES = [dict(tokens=128, vocab=10), dict(tokens=256, vocab=100), dict(tokens=64, vocab=1000)]
REPEAT_FACTOR = {"classifier_kd": 40}
# Dense bf16 tensor-core peak (no sparsity), for the FLOP/s ratio on the GPU.
TENSOR_CORE_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# --------------------------------------------------------------------------- the losses compared


def torch_jsd(student_logits, teacher_logits, labels):
    """TRL's generalized JSD written in plain torch (batchmean over valid tokens)."""
    s = F.log_softmax(student_logits.float() / TEMPERATURE, dim=-1)
    t = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
    beta = torch.tensor(BETA, dtype=s.dtype, device=s.device)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-beta), t + torch.log(beta)]), dim=0)
    jsd = BETA * F.kl_div(m, t, reduction="none", log_target=True) + \
        (1 - BETA) * F.kl_div(m, s, reduction="none", log_target=True)
    mask = labels != IGNORE
    return jsd[mask].sum() / mask.sum().clamp(min=1)


def torch_topk_kl(student_logits, ids, logprobs, labels):
    """Forward KL from a stored top-k teacher, its remaining mass one outcome, in plain torch
    (batchmean over valid tokens)."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_q_ids = log_q.gather(1, ids)
    p = logprobs.exp()
    kl = (p * (logprobs - log_q_ids)).sum(-1)
    log_q_rest = torch.log1p(-log_q_ids.exp().sum(-1).clamp(max=1.0))
    r = (1.0 - p.sum(-1)).clamp(min=0.0)
    kl = kl + torch.xlogy(r, r) - r * log_q_rest
    mask = labels != IGNORE
    return kl[mask].sum() / mask.sum().clamp(min=1)


def make_inputs(case: str, shape: Dict[str, int], dtype: torch.dtype, device: str) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    tokens = shape["tokens"]
    labels = torch.randint(0, shape["vocab"], (tokens,), device=device, generator=g)
    labels[:: 20] = IGNORE
    if case in ("topk_kd", "fused_linear_topk"):
        teacher = torch.randn(tokens, shape["vocab"], device=device, dtype=torch.float32, generator=g)
        top = torch.log_softmax(teacher, dim=-1).topk(TOPK, dim=-1)
        del teacher
        if case == "topk_kd":
            return dict(student=torch.randn(tokens, shape["vocab"], device=device, dtype=dtype, generator=g)
                        .requires_grad_(True), ids=top.indices, logprobs=top.values, labels=labels)
        h, v = shape["hidden"], shape["vocab"]
        return dict(
            student_hidden=torch.randn(tokens, h, device=device, dtype=dtype, generator=g).requires_grad_(True),
            student_weight=(torch.randn(v, h, device=device, dtype=dtype, generator=g) * h ** -0.5)
            .requires_grad_(True), ids=top.indices, logprobs=top.values, labels=labels)
    if case in ("kd_loss", "classifier_kd"):
        return dict(student=torch.randn(tokens, shape["vocab"], device=device, dtype=dtype, generator=g)
                    .requires_grad_(True),
                    teacher=torch.randn(tokens, shape["vocab"], device=device, dtype=dtype, generator=g),
                    labels=labels)
    h, v = shape["hidden"], shape["vocab"]
    scale = h ** -0.5
    return dict(
        student_hidden=torch.randn(tokens, h, device=device, dtype=dtype, generator=g).requires_grad_(True),
        student_weight=(torch.randn(v, h, device=device, dtype=dtype, generator=g) * scale).requires_grad_(True),
        teacher_hidden=torch.randn(tokens, h, device=device, dtype=dtype, generator=g),
        teacher_weight=torch.randn(v, h, device=device, dtype=dtype, generator=g) * scale,
        labels=labels,
    )


def candidates(case: str, device: str) -> Dict[str, Callable[[Dict[str, torch.Tensor]], torch.Tensor]]:
    from kdfast.losses import fused_linear_kd, fused_linear_topk_kd, kd_loss, topk_kd_loss

    if case == "kd_loss":
        found = {
            "kdfast": lambda x: kd_loss(x["student"], x["teacher"], x["labels"], kind="jsd", beta=BETA),
            "torch": lambda x: torch_jsd(x["student"], x["teacher"], x["labels"]),
        }
        return found
    if case == "topk_kd":
        return {
            "kdfast": lambda x: topk_kd_loss(x["student"], x["ids"], x["logprobs"], x["labels"]),
            "torch": lambda x: torch_topk_kl(x["student"], x["ids"], x["logprobs"], x["labels"]),
        }
    if case == "fused_linear_topk":
        return {
            "kdfast": lambda x: fused_linear_topk_kd(x["student_hidden"], x["student_weight"], x["ids"],
                                                     x["logprobs"], x["labels"]),
            "torch": lambda x: torch_topk_kl(x["student_hidden"] @ x["student_weight"].t(), x["ids"],
                                             x["logprobs"], x["labels"]),
        }
    if case == "classifier_kd":
        return {
            "kdfast": lambda x: kd_loss(x["student"], x["teacher"], kind="forward_kl", temperature=HINTON_T,
                                        scale_by_t2=True),
            "torch": lambda x: F.kl_div(F.log_softmax(x["student"] / HINTON_T, dim=-1),
                                        F.log_softmax(x["teacher"] / HINTON_T, dim=-1), log_target=True,
                                        reduction="batchmean") * HINTON_T ** 2,
        }

    def naive(x):
        s = x["student_hidden"] @ x["student_weight"].t()
        with torch.no_grad():
            t = x["teacher_hidden"] @ x["teacher_weight"].t()
        return torch_jsd(s, t, x["labels"])

    found = {
        "kdfast": lambda x: fused_linear_kd(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                            x["teacher_weight"], x["labels"], kind="jsd", beta=BETA),
        "torch": naive,
    }
    if device == "cuda":
        found.update(_liger_candidates())
    return found


def _liger_candidates() -> Dict[str, Callable]:
    found = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=BETA, ignore_index=IGNORE, temperature=TEMPERATURE)
        found["liger_fused_linear_jsd"] = lambda x: jsd(x["student_hidden"], x["student_weight"],
                                                        x["teacher_hidden"], x["teacher_weight"], x["labels"])
    except Exception as exc:  # not installed, or an API change
        print(f"  liger fused-linear JSD unavailable: {exc}", file=sys.stderr)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                          ignore_index=IGNORE, temperature=TEMPERATURE)
        found["liger_chunked_jsd"] = lambda x: chunked(x["student_hidden"], x["student_weight"],
                                                       x["teacher_hidden"], x["teacher_weight"], x["labels"])
    except Exception as exc:
        print(f"  liger chunked JSD unavailable: {exc}", file=sys.stderr)
    return found


# --------------------------------------------------------------------------- measuring


def _grad_inputs(x: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [t for t in x.values() if t.requires_grad]


def _run_once(fn, x) -> torch.Tensor:
    for t in _grad_inputs(x):
        t.grad = None
    loss = fn(x)
    loss.backward()
    return loss.detach()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(case, shape, dtype, device, names, repeats) -> Dict[str, Dict]:
    """Time (and, on a GPU, peak memory) of each candidate in ``names``, in this process.

    The candidates' timed runs are interleaved (one of each per round), so that a machine
    whose speed drifts during the run slows every side alike. Each candidate has its own
    inputs (the same values) and a warm-up first; one that runs out of memory is left out.
    After the warm-up every candidate's loss and gradients are checked against the first
    one's (torch's formula when it is first): a speed-up of a different computation is none.
    """
    prepared, reference, agrees = {}, None, {}
    for name in names:
        x = make_inputs(case, shape, dtype, device)
        fn = candidates(case, device)[name]
        try:
            loss = _run_once(fn, x)  # warm-up (kernels compiled, allocator primed)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            print(f"  {name}: out of memory ({exc})", file=sys.stderr)
            continue
        except Exception as exc:  # a comparison library's failure costs its row, not the others
            if name.startswith("kdfast"):
                raise
            print(f"  {name}: failed, left out ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        grads = [t.grad for t in _grad_inputs(x)]
        if reference is None:
            reference, agrees[name] = (name, loss, grads), True
        else:
            agrees[name] = _agreement(reference, name, loss, grads, dtype)
        del grads
        for t in _grad_inputs(x):
            t.grad = None  # the peak below counts the gradients, as the CPU worker's does
        prepared[name] = (fn, x)
    _sync(device)
    times = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, (fn, x) in prepared.items():
            start = time.perf_counter()
            _run_once(fn, x)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    rows = {name: dict(median_s=statistics.median(t), times_s=t, agrees_with_anchor=agrees[name])
            for name, t in times.items()}
    if device == "cuda":  # one more run each, alone, for its peak above what is held already
        for _, x in prepared.values():  # (the timed runs left their gradients allocated)
            for t in _grad_inputs(x):
                t.grad = None
        for name, (fn, x) in prepared.items():
            # the gradients this run makes count in its peak, as the CPU worker's do; left over
            # from a run before, they would sit in the base instead (and be freed mid-run)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _run_once(fn, x)
            _sync(device)
            rows[name]["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            for t in _grad_inputs(x):
                t.grad = None
    return rows


def _agreement(reference, name, loss, grads, dtype) -> bool:
    """Whether ``name``'s loss and gradients equal the reference candidate's, to the dtype's
    precision relative to each tensor's largest entry; a disagreement is printed."""
    ref_name, ref_loss, ref_grads = reference
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    def off(a, b):
        a, b = a.detach().double(), b.detach().double()
        return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()

    errors = [off(loss, ref_loss)] + [off(g, r) for g, r in zip(grads, ref_grads)]
    if not max(errors) <= tol:
        print(f"  WARNING: {name} disagrees with {ref_name}: relative errors {errors} (tolerance {tol})",
              file=sys.stderr)
        return False
    return True


def profile_breakdown(case, shape, dtype, device, name, top: int = 12) -> None:
    """Print where one forward + backward of a candidate spends its time (kernels on a GPU,
    operators on the CPU): what to look at when a target is missed."""
    from torch.profiler import ProfilerActivity, profile

    x = make_inputs(case, shape, dtype, device)
    fn = candidates(case, device)[name]
    _run_once(fn, x)  # warm-up
    _sync(device)
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        _run_once(fn, x)
        _sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"-- {name}, {case} {shape}: top {top} by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def measure_cpu_peak(case, shape, dtype, name) -> int:
    """Peak RSS above the inputs of one forward + backward, in a fresh process."""
    cmd = [sys.executable, __file__, "--peak-worker", json.dumps(dict(case=case, shape=shape, dtype=str(dtype),
                                                                      name=name, threads=torch.get_num_threads()))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def measure_allocator_peak(case, shape, dtype, name) -> int:
    """Peak bytes torch's CPU allocator held during one forward + backward, above the inputs
    (``_common.peak_memory_bytes``): for the classifier case, whose peak RSS does not move by
    a page."""
    fn = candidates(case, "cpu")[name]
    x = make_inputs(case, shape, dtype, "cpu")
    _run_once(fn, x)  # warm-up
    for t in _grad_inputs(x):
        t.grad = None  # the gradients count, as in the RSS worker
    return peak_memory_bytes(lambda: _run_once(fn, x), torch.device("cpu"))


def _peak_worker(spec: str) -> None:
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])  # as many as the timed process
    dtype = getattr(torch, args["dtype"].replace("torch.", ""))
    fn = candidates(args["case"], "cpu")[args["name"]]
    # One-time costs (extension loading, thread pools, dispatcher caches) on a tiny input first.
    _run_once(fn, make_inputs(args["case"], {k: min(v, 64) for k, v in args["shape"].items()}, dtype, "cpu"))
    x = make_inputs(args["case"], args["shape"], dtype, "cpu")
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS, to the current RSS
        f.write("5")
    _run_once(fn, x)
    print(json.dumps(dict(peak_bytes=max(0, _status_bytes("VmHWM") - base))))


def flops(case: str, shape: Dict[str, int]) -> Optional[float]:
    """GEMM FLOPs of one forward + backward of a fused-linear case (the teacher's forward where
    it has a head, the student's forward, and the two student backward products)."""
    products = {"fused_linear_kd": 4, "fused_linear_topk": 3}.get(case)
    if products is None:
        return None
    return products * 2.0 * shape["tokens"] * shape["hidden"] * shape["vocab"]


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int_at_least(1), default=5)
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/results/bench_kdloss.json")
    p.add_argument("--out", default=None,
                   help="JSON file for the rows (default: benchmarks/results/bench_kdloss.json, written by full runs "
                        "only: every case, without --quick); rows of the same device, case, shape and dtype are "
                        "replaced, all others kept")
    p.add_argument("--profile", action="store_true", help="also print kdfast's time breakdown per shape (profiler)")
    p.add_argument("--peak-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_worker:
        return _peak_worker(args.peak_worker)
    check_device(p, args.device)  # --device cuda without a GPU: a usage error, not a traceback
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        p.error(f"--cases: {'unknown case(s) ' + ', '.join(unknown) if unknown else 'no case given'}; "
                f"expected some of {', '.join(CASES)}")

    device = args.device
    if device == "cuda":
        dtype = torch.bfloat16
        device_name = torch.cuda.get_device_name()
        shapes = [dict(tokens=1024, hidden=4096, vocab=128256), dict(tokens=8192, hidden=4096, vocab=128256)]
        if args.quick:
            shapes = [dict(tokens=512, hidden=1024, vocab=32000)]
    else:
        dtype = torch.float32
        device_name = _device_name(torch.device("cpu"))
        shapes = [dict(tokens=2048, hidden=512, vocab=32000)]
        if args.quick:
            shapes = [dict(tokens=256, hidden=128, vocab=4096)]
    peak_tflops = next((v for k, v in TENSOR_CORE_PEAK_TFLOPS.items() if k in device_name), None)

    # only a full run (every case, full shapes) updates the recorded figures; a partial one writes where --out says
    out = args.out or (None if args.quick or set(cases) != set(CASES) else str(RESULTS))
    out = None if args.no_write else out
    rows = []
    print(f"device: {device_name}, threads: {torch.get_num_threads()}, dtype: {dtype}")
    print(f"{'case':<16} {'shape':<28} {'candidate':<24} {'median ms':>10} {'q1-q3 ms':>17} "
          f"{'peak MiB':>9} {'vs torch':>9} {'mem vs torch':>12} {'TFLOP/s':>8}")
    for case in cases:
        case_shapes = (CLASSIFIER_SHAPES[:1] if args.quick else CLASSIFIER_SHAPES) if case == "classifier_kd" \
            else shapes
        for shape in case_shapes:
            shape_case = {k: v for k, v in shape.items() if case.startswith("fused_linear") or k != "hidden"}
            names = sorted(candidates(case, device), key=lambda n: n != "torch")  # the anchor first
            results = measure(case, shape_case, dtype, device, names, args.repeats * REPEAT_FACTOR.get(case, 1))
            if device == "cpu":
                peak = measure_allocator_peak if case == "classifier_kd" else measure_cpu_peak
                for name, r in results.items():
                    r["peak_bytes"] = peak(case, shape_case, dtype, name)
            if args.profile and "kdfast" in results:
                profile_breakdown(case, shape_case, dtype, device, "kdfast")
            anchor = results.get("torch")
            shape_rows = []
            for name, r in results.items():
                q = quartiles(r["times_s"])
                q1, q3 = q["q1"], q["q3"]
                f = flops(case, shape_case)
                tflops = f / r["median_s"] / 1e12 if f else None
                row = dict(op=case, candidate=name,
                           backend=kdfast_backend("kd_topk" if "topk" in case else "kd_divergence",
                                                  torch.device(device)) if name == "kdfast" else None,
                           shape=shape_case, dtype=str(dtype).replace("torch.", ""),
                           device=device_name, median_s=r["median_s"], q1_s=q1, q3_s=q3, times_s=r["times_s"],
                           interleaved=True, agrees_with_anchor=r["agrees_with_anchor"],
                           peak_bytes=r["peak_bytes"], anchor="torch" if anchor else None,
                           speedup_vs_anchor=anchor["median_s"] / r["median_s"] if anchor else None,
                           memory_ratio_vs_anchor=r["peak_bytes"] / anchor["peak_bytes"] if anchor and
                           anchor["peak_bytes"] else None,
                           tflops=tflops, tensor_core_fraction=tflops / peak_tflops if tflops and peak_tflops
                           and device == "cuda" else None)
                shape_rows.append(row)
                shape_s = "x".join(f"{k[0]}{v}" for k, v in shape_case.items())
                digits = 1 if r["median_s"] >= 0.01 else 3  # sub-millisecond calls in microseconds
                print(f"{case:<16} {shape_s:<28} {name:<24} {1e3 * r['median_s']:>10.{digits}f} "
                      f"{1e3 * q1:>8.{digits}f}-{1e3 * q3:<8.{digits}f} {r['peak_bytes'] / 2**20:>9.1f} "
                      f"{_fmt(row['speedup_vs_anchor'], 'x'):>9} {_fmt(row['memory_ratio_vs_anchor'], 'x'):>12} "
                      f"{_fmt(tflops, ''):>8}")
            rows += shape_rows
            if out:  # each shape's rows as soon as they are measured: a run cut short keeps them
                merge_rows(out, shape_rows)
    if out:
        print(f"wrote {len(rows)} rows to {out}")


def _fmt(v, suffix):
    return "-" if v is None else f"{v:.2f}{suffix}"


if __name__ == "__main__":
    main()
