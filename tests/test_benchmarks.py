"""The benchmark scripts run (smoke runs at tiny sizes) and leave the recorded figures alone;
their measuring helpers measure what they say."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args", [
    ("bench_kdloss.py", ["--quick", "--repeats", "1", "--no-write"]),
    ("bench_diffusion_losses.py", ["--quick", "--repeats", "1", "--quiet-load", "1000"]),
    ("bench_solvers.py", ["--quick", "--repeats", "1", "--solvers", "ddim,dpmpp_2m", "--sections", "steps"]),
    ("bench_solvers.py", ["--quick", "--repeats", "1", "--sections", "unet"]),
    ("bench_solvers.py", ["--quick", "--repeats", "1", "--sections", "paradigms,per_token"]),
    ("bench_piflow.py", ["--quick", "--repeats", "1"]),
    ("bench_inference.py", ["--quick", "--repeats", "1"]),
    # partial runs at full size: the recorded figures are a full run's
    ("bench_kdloss.py", ["--cases", "classifier_kd", "--repeats", "1"]),
    ("bench_inference.py", ["--sections", "op", "--device", "cpu", "--repeats", "1"]),
])
def test_benchmark_smoke_run(script, args):
    if script in ("bench_solvers.py", "bench_piflow.py"):
        pytest.importorskip("diffusers")
    results = {p: p.read_bytes() for p in (BENCH / "results").glob("*.json")}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING" not in done.stderr, done.stderr[-2000:]  # e.g. kdfast disagreeing with its anchor
    assert {p: p.read_bytes() for p in (BENCH / "results").glob("*.json")} == results


@pytest.mark.parametrize("script, args", [
    ("bench_kdloss.py", ["--quick", "--repeats", "1"]),
    ("bench_diffusion_losses.py", ["--quick", "--repeats", "1", "--quiet-load", "1000"]),
    ("bench_solvers.py", ["--quick", "--repeats", "1", "--solvers", "euler", "--sections", "steps"]),
    ("bench_inference.py", ["--quick", "--repeats", "1", "--sections", "op"]),
])
def test_benchmark_rows_name_the_kdfast_backend_and_peak_memory(tmp_path, monkeypatch, script, args,
                                                                 unemulated_backends):
    """Rows name the backend kdfast's registry ran (not the candidate), and hold peak memory."""
    if script == "bench_solvers.py":
        pytest.importorskip("diffusers")
    from kdfast import backends

    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert rows
    for row in rows:
        kdfast_row = row.get("candidate", "kdfast") == "kdfast"
        op = {"bench_kdloss.py": "kd_divergence", "bench_diffusion_losses.py": "diffusion_loss",
              "bench_solvers.py": "solver_step", "bench_inference.py": "group_norm_act"}[script]
        assert row["backend"] == (backends.op(op).select("cpu").backend if kdfast_row else None)
        peak = row.get("peak_memory_bytes", row.get("peak_bytes"))
        assert isinstance(peak, int) and peak > 0
    # what the figures are made of: a finite, positive ratio against the anchor per kdfast row
    ratio = {"bench_kdloss.py": "speedup_vs_anchor", "bench_diffusion_losses.py": "ratio",
             "bench_solvers.py": "speedup_per_step", "bench_inference.py": "ratio"}[script]
    for row in rows:
        if row.get("candidate", "kdfast") == "kdfast":
            assert 0 < row[ratio] < float("inf"), row
    if script == "bench_kdloss.py":
        monkeypatch.syspath_prepend(str(BENCH))
        from bench_kdloss import CASES, REPEAT_FACTOR

        assert {r["candidate"] for r in rows} == {"kdfast", "torch"} and {r["op"] for r in rows} == set(CASES)
        # the same loss and gradients as the torch formula, timed interleaved with it (--repeats 1)
        assert all(r["agrees_with_anchor"] and r["interleaved"] and len(r["times_s"]) == REPEAT_FACTOR.get(r["op"], 1)
                   for r in rows)
    if script == "bench_solvers.py":
        (row,) = rows
        assert row["anchor_peak_memory_bytes"] > 0
        # Euler: the fused step (2 reads, 1 write) and scale_model_input (1 read, 1 write), modelled
        assert row["modelled_bytes_per_step"] == row["lower_bound_bytes"] == 5 * 4 * 64 * 64 * 4
        assert "bytes_per_step" not in row
        assert row["max_rel_diff_to_anchor"] < 1e-4  # the loop it timed is diffusers' loop


def test_ncu_report_parsing(monkeypatch):
    """ncu_solver_bytes reads Nsight Compute's raw CSV (a GPU-only script; its parsing is not)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import ncu_solver_bytes as N
    header = '"ID","Process ID","Kernel Name",' + ",".join(f'"{m}"' for m in N.METRICS)
    units = '"","","",' + ",".join('"sector"' if "sectors" in m else '"byte"' for m in N.METRICS)
    launches = [f'"{i}","7","void kdfast::solver_step_kernel(Params)","4,096","2,048","131,072","65,536"'
                for i in range(N.STEPS * len(N.SOLVERS))]
    launches += [f'"{i}","7","kdfast::grid_combination::grid_combination_kernel(Params)","{i}","0","0","0"'
                 for i in range(N.PIFLOW_STEPS)]
    text = "\n".join(["==PROF== Connected to process 7", header, units, *launches, "==PROF== Disconnected"])
    rows = N.parse_ncu_csv(text)
    assert len(rows) == N.STEPS * len(N.SOLVERS) + N.PIFLOW_STEPS
    assert rows[0]["lts__t_sectors_srcunit_tex_op_read.sum"] == 4096
    summary = N.summarise(rows, itemsize=4)
    assert [r["op"] for r in summary] == [f"scheduler_step:{name}" for name in N.SOLVERS] + ["scheduler_step:piflow"]
    ddim = summary[0]
    assert ddim["l2_bytes"] == 32 * (4096 + 2048)
    assert ddim["dram_read_bytes"] == 131072 and ddim["dram_write_bytes_during_kernel"] == 65536
    assert ddim["lower_bound_bytes"] == 3 * 2 * 4 * 128 * 128 * 4  # x, model output read; sample written
    piflow = summary[-1]  # the profiled step's launch; all ten grid points have weights there
    assert piflow["l2_bytes"] == 32 * N.PIFLOW_PROFILED
    assert piflow["lower_bound_bytes"] == 12 * 8 * 32 * 32 * 16 * 4
    for missing in (rows[:-1], rows[1:]):
        with pytest.raises(SystemExit, match="launches(.|\n)*ERR_NVGPUCTRPERM"):  # ncu's own words follow
            N.summarise(missing, itemsize=4, ncu_output="==ERROR== ERR_NVGPUCTRPERM")


def test_ncu_is_found_off_path_and_leaves_the_clocks_alone(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import ncu_solver_bytes as N

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    root, toolkit = tmp_path / "nsight-compute", tmp_path / "cuda-bin"
    assert N.find_ncu(str(root), str(toolkit)) is None
    for version in ("2024.3.2", "2025.3.1", "2025.10.0"):
        exe = root / version / "ncu"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    assert N.find_ncu(str(root), str(toolkit)) == str(root / "2025.10.0" / "ncu")  # the newest
    cmd = N.ncu_command("ncu")
    assert cmd[cmd.index("--clock-control") + 1] == "none"
    assert cmd[-1] == "--child"


def test_merge_results_merges_returned_rows_into_the_recorded_ones(monkeypatch, tmp_path, capsys):
    merge = _bench_module(monkeypatch, "merge_results")
    results, returned = tmp_path / "results", tmp_path / "gpu-out"
    results.mkdir(), returned.mkdir()
    cpu = {"device": "AMD EPYC", "op": "kd_loss", "shape": {"tokens": 8}, "dtype": "float32", "v": 1}
    old_gpu = {"device": "NVIDIA H200", "op": "kd_loss", "shape": {"tokens": 8}, "dtype": "bfloat16", "v": 2}
    new_gpu = dict(old_gpu, v=3)
    (results / "bench_kdloss.json").write_text(json.dumps([cpu, old_gpu]))
    (returned / "bench_kdloss.json").write_text(json.dumps([new_gpu]))
    merge.main([str(returned / "bench_kdloss.json"), "--results", str(results)])
    assert json.loads((results / "bench_kdloss.json").read_text()) == [cpu, new_gpu]
    # a file that is not a result file, or holds no rows, is refused before anything is merged
    (returned / "bench_kdloss.json").write_text(json.dumps([dict(old_gpu, v=4)]))
    (returned / "gpu.log").write_text("log")
    (returned / "bench_solvers.json").write_text(json.dumps({"rows": []}))
    for bad, message in (("gpu.log", "not a benchmark result file"), ("bench_solvers.json", "expected a JSON list")):
        with pytest.raises(SystemExit) as exc:
            merge.main([str(returned / "bench_kdloss.json"), str(returned / bad), "--results", str(results)])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert json.loads((results / "bench_kdloss.json").read_text()) == [cpu, new_gpu]
    # a folder: the result files found there, other files (logs, the demo's metrics) left alone
    (returned / "bench_solvers.json").unlink()
    (returned / "demo_metrics.json").write_text("{}")
    merge.main([str(returned), "--results", str(results)])
    assert json.loads((results / "bench_kdloss.json").read_text()) == [cpu, dict(old_gpu, v=4)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        merge.main([str(tmp_path / "empty"), "--results", str(results)])
    assert "holds none of" in capsys.readouterr().err
    # a recorded file that holds no rows is refused before anything is merged (its traceback came
    # after the files before it were merged)
    (returned / "bench_solvers.json").write_text(json.dumps([dict(old_gpu, op="step")]))
    (results / "bench_solvers.json").write_text("garbage")
    (returned / "bench_kdloss.json").write_text(json.dumps([dict(old_gpu, v=5)]))
    with pytest.raises(SystemExit) as exc:
        merge.main([str(returned), "--results", str(results)])
    assert exc.value.code == 2 and "bench_solvers.json: cannot merge into it" in capsys.readouterr().err
    assert json.loads((results / "bench_kdloss.json").read_text()) == [cpu, dict(old_gpu, v=4)]


def _bench_module(monkeypatch, name):
    monkeypatch.syspath_prepend(str(BENCH))
    import importlib

    return importlib.import_module(name)


@pytest.mark.parametrize("script, args, message", [
    ("bench_solvers", ["--quick", "--sections", "steps", "--solvers", "foo"],
     "--solvers: unknown solver(s) foo; expected some of dpmpp_2m,"),
    ("bench_solvers", ["--solvers", ","], "--solvers: no solver given"),
    ("bench_solvers", ["--repeats", "-1"], "argument --repeats: must be an integer >= 1, got -1"),
    ("bench_solvers", ["--device", "foo"], "--device: expected cpu or cuda (or cuda:N), got 'foo'"),
    ("bench_solvers", ["--sections", "x"], "--sections takes some of steps, unet, kdiff, paradigms, per_token, got 'x'"),
    # (an empty table, "wrote 0 rows" and exit 0: --quick has no video latents)
    ("bench_solvers", ["--quick", "--solvers", "helios_dmd", "--sections", "steps"],
     "--quick measures the sd-1x4x64x64 latents only, which helios_dmd does not take"),
    ("bench_kdloss", ["--quick", "--no-write", "--cases", "foo"], "--cases: unknown case(s) foo; expected some of"),
    ("bench_kdloss", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    ("bench_kdloss", ["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    ("bench_solvers", ["--threads", "-2"], "argument --threads: must be an integer >= 1, got -2"),
    ("bench_diffusion_losses", ["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    ("bench_diffusion_losses", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    ("bench_diffusion_losses", ["--device", "foo"], "--device: expected cpu or cuda (or cuda:N), got 'foo'"),
])
def test_benchmark_argument_errors(monkeypatch, capsys, script, args, message):
    module = _bench_module(monkeypatch, script)
    with pytest.raises(SystemExit) as exc:
        module.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["bench_solvers", "bench_kdloss", "bench_diffusion_losses"])
def test_benchmark_cuda_without_a_gpu_is_an_argument_error(monkeypatch, capsys, script):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = _bench_module(monkeypatch, script)
    with pytest.raises(SystemExit) as exc:
        module.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: no CUDA GPU here" in capsys.readouterr().err


# --------------------------------------------------------------------------- the measuring helpers


def test_quartiles_stay_inside_the_samples(monkeypatch):
    common = _bench_module(monkeypatch, "_common")
    assert common.quartiles([1.0, 2.0]) == {"median": 1.5, "q1": 1.25, "q3": 1.75}
    q = common.quartiles([3.0, 1.0, 2.0])
    assert 1.0 <= q["q1"] <= q["median"] == 2.0 <= q["q3"] <= 3.0
    assert common.quartiles([5.0]) == {"median": 5.0, "q1": 5.0, "q3": 5.0}


def test_results_of_different_shapes_are_not_compared(monkeypatch):
    # Helios' DMD step on a 4-D latent gives diffusers a 5-D result: the difference broadcast
    # and read as agreement (1e-7), and the row counted as a fair comparison
    import torch

    solvers = _bench_module(monkeypatch, "bench_solvers")
    x = torch.ones(2, 4, 8, 8)
    assert solvers.relative_difference(x, x + 1e-3) == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ValueError, match="different shapes"):
        solvers.relative_difference(x, torch.ones(2, 2, 4, 8, 8))
    assert "helios_dmd" in solvers.VIDEO_ONLY


def test_cpu_peak_memory_counts_allocations_freed_inside_an_op(monkeypatch):
    """A scope that allocates 4 MiB, frees it and returns 1 MiB peaks at 4 MiB. A per-op
    timeline (each event's net allocation added at its start) would say 1 MiB."""
    import torch

    common = _bench_module(monkeypatch, "_common")
    mib = 2**20
    earlier = torch.empty(8 * mib, dtype=torch.uint8)

    def run():
        nonlocal earlier
        with torch.profiler.record_function("scope"):
            scratch = torch.empty(4 * mib, dtype=torch.uint8)
            del scratch
            kept = torch.empty(mib, dtype=torch.uint8)
        earlier = None  # a tensor from before the call, freed during it: not part of its peak
        more = torch.empty(2 * mib, dtype=torch.uint8)
        return kept, more

    assert common.peak_memory_bytes(run, torch.device("cpu")) == 4 * mib


def test_allocation_replay_orders_by_time_and_ignores_earlier_tensors(monkeypatch):
    common = _bench_module(monkeypatch, "_common")
    # (time, address, bytes): out of order; address 9 was allocated before the window
    records = [(30, 1, -100), (10, 1, 100), (20, 2, 50), (25, 9, -1000), (40, 1, 70), (50, 2, -50)]
    assert common._replay_allocations(records) == 150
    assert common._replay_allocations([]) == 0
    # a free and a reuse of the same address at the same time: the free comes first
    assert common._replay_allocations([(5, 0xA, 64), (9, 0xA, 64), (9, 0xA, -64)]) == 64


def test_merge_rows_replaces_only_rows_with_the_same_key(monkeypatch, tmp_path):
    common = _bench_module(monkeypatch, "_common")
    path = tmp_path / "rows.json"
    old = [
        {"device": "cpu", "op": "scheduler_step:ddim", "shape": [1, 4], "dtype": "float32", "v": 1},
        {"device": "cpu", "op": "scheduler_step:ddim", "shape": [1, 4], "dtype": "bfloat16", "v": 2},
        {"device": "cpu", "op": "kdiffusion_loop:euler", "shape": [1, 4], "dtype": "float32", "v": 3},
        {"device": "gpu", "op": "scheduler_step:ddim", "shape": [1, 4], "dtype": "float32", "v": 4},
        {"device": "cpu", "op": "kd_loss", "shape": {"tokens": 8, "vocab": 4}, "dtype": "float32", "v": 5},
        {"device": "cpu", "op": "kd_loss", "shape": {"tokens": 8, "vocab": 4}, "dtype": "float32", "v": 6},
    ]
    path.write_text(json.dumps(old))
    new = [{"device": "cpu", "op": "scheduler_step:ddim", "shape": [1, 4], "dtype": "float32", "v": 10},
           {"device": "cpu", "op": "kd_loss", "shape": {"vocab": 4, "tokens": 8}, "dtype": "float32", "v": 11}]
    common.merge_rows(str(path), new)
    assert sorted(r["v"] for r in json.loads(path.read_text())) == [2, 3, 4, 10, 11]
    # pi-Flow's grid size is part of a row's identity (its sample's shape does not show it)
    piflow = {"device": "cpu", "op": "piflow_step", "shape": [1, 8], "dtype": "float32"}
    common.merge_rows(str(path), [dict(piflow, n_grid=10, v=20)])
    common.merge_rows(str(path), [dict(piflow, n_grid=4, v=21)])
    assert sorted(r["v"] for r in json.loads(path.read_text())) == [2, 3, 4, 10, 11, 20, 21]


def test_piflow_quartiles_stay_inside_the_samples(monkeypatch):
    piflow = _bench_module(monkeypatch, "bench_piflow")
    assert piflow.quartiles_us([100e-6, 200e-6]) == pytest.approx((125.0, 175.0))


def test_pipelines_call_scale_model_input_where_diffusers_schedulers_have_it(monkeypatch):
    # kdfast's flow-matching schedulers inherit an identity scale_model_input that diffusers'
    # flow pipelines never call: it was timed on kdfast's side only
    import diffusers

    solvers = _bench_module(monkeypatch, "bench_solvers")
    import kdfast.schedulers as kd

    for name in ("FlowMatchEulerDiscreteScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        assert solvers.pipelines_scale_input(getattr(kd, name)) == hasattr(getattr(diffusers, name),
                                                                           "scale_model_input")
    assert not solvers.pipelines_scale_input(kd.FlowMatchEulerDiscreteScheduler)


@pytest.mark.parametrize("script, args, groups", [
    ("bench_solvers", ["--quick", "--repeats", "1", "--solvers", "ddim,euler", "--sections", "steps"], [1, 1]),
    ("bench_kdloss", ["--quick", "--repeats", "1", "--cases", "kd_loss,fused_linear_kd"], [2, 2]),
    ("bench_diffusion_losses", ["--quick", "--repeats", "1", "--quiet-load", "1000"], None),
])
def test_benchmarks_write_rows_as_they_are_measured(monkeypatch, tmp_path, script, args, groups):
    """Each row (group of candidates) is merged into the JSON as soon as it is measured, so a run
    cut short by a time limit (as on a lent GPU) keeps what it measured."""
    if script == "bench_solvers":
        pytest.importorskip("diffusers")
    module = _bench_module(monkeypatch, script)
    common = _bench_module(monkeypatch, "_common")
    calls = []

    def merge(path, rows):
        calls.append(len(rows))
        return common.merge_rows(path, rows)

    monkeypatch.setattr(module, "merge_rows", merge)
    out = tmp_path / "rows.json"
    module.main([*args, "--out", str(out)])
    assert calls == (groups or [1] * len(calls)) and len(calls) > 1
    assert len(json.loads(out.read_text())) == sum(calls)
    assert not list(tmp_path.glob("*.tmp"))


def _fake_scheduler_class(scale: bool, calls: list):
    import torch

    class Out:
        def __init__(self, prev_sample):
            self.prev_sample = prev_sample

    class Fake:
        def set_timesteps(self, n, device=None):
            self.timesteps = torch.arange(n)

        def scale_model_input(self, sample, t):
            calls.append("scale")
            return sample * 0.5 if scale else sample

        def step(self, model_output, t, sample):
            calls.append("step")
            x = sample.to(torch.float32)  # a no-op for a float32 sample: it returns its input
            x = x.reshape(sample.shape).contiguous()  # views and no-op copies move nothing
            return Out((x * 2).to(sample.dtype))

    return Fake


@pytest.mark.parametrize("dtype_name, scale, expected", [
    ("float32", False, 8),  # x * 2: read 4 bytes, write 4 bytes per element
    ("bfloat16", False, 2 + 4 + 8 + 4 + 2),  # upcast (2 -> 4), x * 2 (4 -> 4), downcast (4 -> 2)
    ("float32", True, 16),  # and scale_model_input's sample * 0.5, as pipelines call it each step
])
def test_latent_bytes_count_real_traffic_at_real_dtype_sizes(monkeypatch, dtype_name, scale, expected):
    pytest.importorskip("diffusers")
    import torch

    bench = _bench_module(monkeypatch, "bench_solvers")
    dtype = getattr(torch, dtype_name)
    shape = (1, 4, 8, 8)
    x = torch.randn(shape).to(dtype)
    outputs = [torch.randn(shape).to(dtype) for _ in range(bench.STEPS)]
    calls = []
    fake = _fake_scheduler_class(scale, calls)
    per_step = bench.latent_bytes_per_step(fake, x, outputs, torch.device("cpu"))
    assert per_step == expected * x.numel()
    assert calls == ["scale", "step"] * bench.STEPS


def test_cold_steps_are_each_preceded_by_an_eviction(monkeypatch):
    pytest.importorskip("diffusers")
    import torch

    bench = _bench_module(monkeypatch, "bench_solvers")
    calls = []
    sched = _fake_scheduler_class(False, calls)()
    x = torch.randn(1, 4, 8, 8)
    bench.time_steps_cold(sched, x, [x] * bench.STEPS, torch.device("cpu"), lambda: calls.append("evict"))
    assert calls == ["evict", "scale", "step"] * bench.STEPS
    evictor = bench.CacheEvictor()
    assert evictor.buffer.numel() * evictor.buffer.element_size() >= 2 * bench.last_level_cache_bytes() > 0


def test_kdloss_agreement_check_catches_a_different_computation(monkeypatch, capsys):
    import torch

    bench = _bench_module(monkeypatch, "bench_kdloss")
    loss, grad = torch.tensor(0.5), torch.randn(4, 8)
    reference = ("torch", loss, [grad])
    assert bench._agreement(reference, "kdfast", loss * (1 + 1e-6), [grad * (1 + 1e-6)], torch.float32)
    assert not bench._agreement(reference, "kdfast", loss, [grad * 1.01], torch.float32)
    assert not bench._agreement(reference, "kdfast", loss * 1.01, [grad], torch.float32)
    assert "kdfast disagrees with torch" in capsys.readouterr().err
