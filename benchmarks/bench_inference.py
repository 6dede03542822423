"""Teacher inference: kdfast's fused group norm + SiLU and the UNet's inference form against torch.

Two sections, each timed interleaved with its anchor in one run (median and quartiles) under
``torch.inference_mode``, with the peak memory allocated during a call:

- ``op``: :func:`kdfast.ops.group_norm_act` (embedding add + GroupNorm + SiLU in one pass)
  against torch's ``F.silu(F.group_norm(x + shift[..., None, None], ...))``, at the digits
  teacher's feature maps (batch 1000) and at Stable-Diffusion-like ones, contiguous and
  channels-last.
- ``forward``: the digits teacher's forward at the demo's batch (200: 100 images, doubled for
  guidance) and at 1000: ``UNet.for_inference()`` (channels-last + the fused kernel) and torch
  in channels-last alone, each against the network as saved (contiguous, torch modules); and a
  small Stable-Diffusion-shaped diffusers ``UNet2DConditionModel`` (random weights, 32x32
  latents, batch 8) prepared by ``kdfast.inference.prepare_for_inference`` against itself.

    python benchmarks/bench_inference.py            # everything, fp32 (and bf16 ops on a GPU)
    python benchmarks/bench_inference.py --quick    # small shapes, few repeats
Writes JSON rows to benchmarks/results/bench_inference.json (rows of the same device, op,
shape and dtype are replaced, all others kept).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from _common import (check_devices, device_name, int_at_least, kdfast_backend, merge_rows, peak_memory_bytes, quartiles,
                     recorded_results, sync)

from kdfast.ops import group_norm_act

# (name, shape, groups): the digits teacher's ResBlock inputs at batch 1000, then SD-UNet-like maps.
OP_SHAPES = [("digits 32x16x16", (1000, 32, 16, 16), 8), ("digits 64x8x8", (1000, 64, 8, 8), 8),
             ("digits 64x4x4", (1000, 64, 4, 4), 8), ("sd 320x64x64", (2, 320, 64, 64), 32),
             ("sd 640x32x32", (2, 640, 32, 32), 32)]
QUICK_OP_SHAPES = [("digits 32x16x16 (b64)", (64, 32, 16, 16), 8), ("sd 320x16x16", (1, 320, 16, 16), 32)]
FORWARD_BATCHES = (2, 200, 1000)


def exact_convolutions():
    """For the same-run agreement checks (the timings keep torch's defaults): cuDNN convolutions
    default to TF32, whose 10-bit rounding turns the fused norm's last-bit differences into ~2e-3."""
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)


def time_ms(fn: Callable, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def measure(fn, anchor, device, repeats: int):
    """Interleaved timings (both see the same machine state) and peak memory of each."""
    with torch.inference_mode():
        for _ in range(2):
            fn(), anchor()  # warm-up: kernel selection, allocator
        t_fn, t_anchor = [], []
        for _ in range(repeats):
            t_fn.append(time_ms(fn, device))
            t_anchor.append(time_ms(anchor, device))
        mem_fn = peak_memory_bytes(fn, device)
        mem_anchor = peak_memory_bytes(anchor, device)
    return quartiles(t_fn), quartiles(t_anchor), mem_fn, mem_anchor


def row(op, backend, shape, dtype, device, what, q, mem, anchor, qa, mem_a, repeats, **extra) -> dict:
    return {"op": op, "backend": backend, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
            "device": device_name(device), "what": what, "median": q["median"], "q1": q["q1"], "q3": q["q3"],
            "peak_memory_bytes": mem, "anchor": anchor, "anchor_median": qa["median"], "anchor_q1": qa["q1"],
            "anchor_q3": qa["q3"], "anchor_peak_memory_bytes": mem_a, "ratio": qa["median"] / q["median"],
            "repeats": repeats, **extra}


def op_rows(device, shapes, dtypes, repeats, record) -> None:
    for name, shape, groups in shapes:
        for dtype in dtypes:
            for layout in ("contiguous", "channels_last"):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                c = shape[1]
                w, b = (torch.randn(c, generator=g).to(device=device, dtype=dtype) for _ in range(2))
                s = torch.randn(shape[:2], generator=g).to(device=device, dtype=dtype)

                def fused():
                    return group_norm_act(x, groups, w, b, shift=s)

                def torch_ops():
                    return F.silu(F.group_norm(x + s[:, :, None, None], groups, w, b))

                with torch.inference_mode():  # same-run check that the two compute the same thing
                    torch.testing.assert_close(fused().float(), torch_ops().float(),
                                               **({} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}))
                q, qa, mem, mem_a = measure(fused, torch_ops, device, repeats)
                r = row(f"group_norm_act {layout}", kdfast_backend("group_norm_act", device), shape, dtype, device,
                        "forward (ms)", q, mem, "torch: F.silu(F.group_norm(x + shift[:, :, None, None]))", qa,
                        mem_a, repeats, layout=layout, groups=groups)
                record(r)
                print(f"group_norm_act {name:22s} {layout:13s} {r['dtype']:8s} kdfast {q['median']:8.3f} ms "
                      f"[{q['q1']:.3f}, {q['q3']:.3f}]  torch {qa['median']:8.3f} ms  x{r['ratio']:5.2f}  "
                      f"peak {mem / 2**20:6.1f} vs {mem_a / 2**20:6.1f} MiB", flush=True)


def forward_rows(device, batches, repeats, record) -> None:
    from kdfast.train.teacher import load_teacher

    plain = load_teacher(device=device).model
    fast = plain.for_inference()
    channels_last_only = plain.for_inference(fused_norms=False)  # the layout's share alone
    tol = {"rtol": 1e-3, "atol": 1e-4} if device.type == "cuda" else {"rtol": 1e-4, "atol": 1e-4}
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn((batch, 1, 16, 16), generator=g).to(device)
        labels = torch.arange(batch, device=device) % 11
        t = torch.tensor(500.0, device=device)
        with torch.inference_mode(), exact_convolutions():
            torch.testing.assert_close(fast(x, t, labels), plain(x, t, labels), **tol)
        for name, model in (("teacher forward: for_inference()", fast),
                            ("teacher forward: channels-last only", channels_last_only)):
            q, qa, mem, mem_a = measure(lambda: model(x, t, labels), lambda: plain(x, t, labels), device, repeats)
            r = row(name, kdfast_backend("group_norm_act", device) if model is fast else None, (batch, 1, 16, 16),
                    torch.float32, device, "forward (ms)", q, mem, "the digits teacher as saved (contiguous, torch "
                    "modules)", qa, mem_a, repeats, ms_per_image=q["median"] / batch)
            record(r)
            print(f"{name:38s} batch {batch:5d}  {q['median']:9.2f} ms [{q['q1']:.2f}, {q['q3']:.2f}]  as saved "
                  f"{qa['median']:9.2f} ms  x{r['ratio']:5.2f}", flush=True)


def diffusers_rows(device, batch: int, size: int, repeats: int, record) -> None:
    """A small Stable-Diffusion-shaped diffusers UNet2DConditionModel (random weights): its
    inference form (kdfast.inference.prepare_for_inference) against the model as built."""
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: the diffusers UNet rows are skipped")
        return
    from kdfast.inference import prepare_for_inference

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        norm_num_groups=32, cross_attention_dim=128, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).to(device).eval()
    fast = prepare_for_inference(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, size, size), generator=g).to(device)
    text = torch.randn((batch, 16, 128), generator=g).to(device)
    t = torch.tensor(500, device=device)
    with torch.inference_mode(), exact_convolutions():
        torch.testing.assert_close(fast(x, t, text).sample, model(x, t, text).sample, rtol=1e-3, atol=1e-4)
    q, qa, mem, mem_a = measure(lambda: fast(x, t, text), lambda: model(x, t, text), device, repeats)
    name = "diffusers UNet2DConditionModel forward: prepare_for_inference()"
    r = row(name, kdfast_backend("group_norm_act", device), (batch, 4, size, size), torch.float32, device,
            "forward (ms)", q, mem, "the same model as built (contiguous, diffusers' modules)", qa, mem_a, repeats,
            parameters=sum(p.numel() for p in model.parameters()))
    print(f"{name:62s} batch {batch:3d} {size}x{size}  {q['median']:8.2f} ms [{q['q1']:.2f}, {q['q3']:.2f}]  as "
          f"built {qa['median']:8.2f} ms  x{r['ratio']:5.2f}", flush=True)
    record(r)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    parser.add_argument("--repeats", type=int_at_least(1), default=None)
    parser.add_argument("--sections", default="op,forward", help="comma-separated: op, forward (default: both)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="all",
                        help="cpu, cuda or cuda:N, or all (default: the CPU, then the GPU when there is one)")
    parser.add_argument("--out", default=None,
                        help="JSON file for the rows (default: benchmarks/results/bench_inference.json, written by "
                             "full runs only: both sections, without --quick)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"op", "forward"})
    if unknown or not sections:
        parser.error(f"--sections: expected a comma-separated subset of op, forward, got {args.sections!r}")
    devices = check_devices(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 11)
    out = args.out
    if out is None and not (args.quick or set(sections) != {"op", "forward"}):
        # only a full run updates the recorded figures; a partial one writes where --out says
        out = recorded_results(__file__)
    rows = []

    def record(r: dict) -> None:  # each row written as measured: a run cut short keeps what it measured
        rows.append(r)
        if out:
            merge_rows(out, [r])

    for device in devices:
        print(f"== {device_name(device)}")
        dtypes = [torch.float32] if device.type == "cpu" or args.quick else [torch.float32, torch.bfloat16]
        if "op" in sections:
            op_rows(device, QUICK_OP_SHAPES if args.quick else OP_SHAPES, dtypes, repeats, record)
        if "forward" in sections:
            forward_rows(device, (8,) if args.quick else FORWARD_BATCHES, repeats, record)
            diffusers_rows(device, 2 if args.quick else 8, 16 if args.quick else 32, repeats, record)
    if out:
        print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
