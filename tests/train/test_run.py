import io
import json
import math
import os
import random
import time
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

import kdfast.train.run as run  # noqa: E402
from kdfast.train.run import (CheckpointError, Checkpointer, GlobalRNG, MetricsLog, OutputDirError,  # noqa: E402
                              ReproducibilityWarning, atomic_files, check_run_dir, load_checkpoint,
                              prepare_output_dir, progress_bar, seed_everything)


# --------------------------------------------------------------------------- output folders


def test_prepare_output_dir_creates_nested_folders(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b", subdirs=("grids", "x/y"))
    assert out.is_dir() and (out / "grids").is_dir() and (out / "x" / "y").is_dir()
    assert list(out.glob(".write-test*")) == []  # the probe is removed
    assert prepare_output_dir(out) == out  # an existing folder is fine


def test_a_write_probe_that_fails_part_way_is_removed(tmp_path, monkeypatch):
    # (a full disk: the probe file is created, its write fails; it was left behind)
    def full(self, text):
        open(self, "w").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run.Path, "write_text", full)
    with pytest.raises(OutputDirError, match="is not writable: .*No space left"):
        prepare_output_dir(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_lock_file_that_cannot_be_opened_is_an_output_dir_error(tmp_path):
    (tmp_path / "ck" / run.LOCK_FILE).mkdir(parents=True)  # (IsADirectoryError escaped as it was)
    with pytest.raises(OutputDirError, match="cannot be locked: .*Is a directory"):
        run.lock_run_dir(tmp_path / "ck")


def test_a_failed_rename_is_an_output_dir_error(tmp_path, monkeypatch):
    def refused(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run.os, "replace", refused)
    with pytest.raises(OutputDirError, match="cannot write .*a.txt.*Operation not permitted"):
        with atomic_files(tmp_path / "a.txt") as (tmp,):
            tmp.write_text("x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # nor is a temporary left


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match=r"'.*file' is not writable: it is an existing file"):
        prepare_output_dir(blocker)
    with pytest.raises(OutputDirError, match=r"file/out' is not writable: .*(Not a directory|File exists)"):
        prepare_output_dir(blocker / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the file cases cover the error path")
def test_output_dir_under_a_read_only_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match=r"locked/out' is not writable: .*Permission denied"):
        prepare_output_dir(locked / "out")
    with pytest.raises(OutputDirError, match=r"locked' is not writable"):
        prepare_output_dir(locked)  # exists, but nothing can be written into it


def test_output_dir_without_overwrite(tmp_path):
    prepare_output_dir(tmp_path / "empty", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    with pytest.raises(OutputDirError, match="not empty"):
        prepare_output_dir(tmp_path / "full", overwrite=False)


def test_check_output_file(tmp_path):
    path = run.check_output_file(tmp_path / "new" / "w.safetensors")
    assert path.parent.is_dir() and not path.exists()  # the folder is made, the file is not
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match=r"w.safetensors' cannot be written: .*existing file"):
        run.check_output_file(blocker / "w.safetensors")
    with pytest.raises(OutputDirError, match="existing folder"):
        run.check_output_file(tmp_path)
    assert run.check_output_file(blocker) == blocker  # an existing, writable file may be replaced


def test_int_at_least_is_an_argparse_error():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=run.int_at_least(1))
    assert parser.parse_args(["--n", "3"]).n == 3
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--n", bad])
        assert exc.value.code == 2


def test_seed_arg_accepts_torch_seeds_and_refuses_the_rest(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--seed", type=run.seed_arg, default=0)
    assert parser.parse_args(["--seed", "0"]).seed == 0
    assert parser.parse_args(["--seed", str(2**63 - 1)]).seed == run.MAX_SEED == 2**63 - 1
    for bad, reason in (("-1", "the seed must be an integer in [0, 2**63 - 1], got -1"),
                        (str(2**63), f"got {2**63}"),
                        ("99999999999999999999999", "got 99999999999999999999999"),
                        ("1.5", "expected an integer in [0, 2**63 - 1], got '1.5'"),
                        ("x", "got 'x'")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--seed", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2 and err.startswith("p: error: argument --seed: ") and reason in err
    torch.Generator().manual_seed(run.MAX_SEED + 1)  # the bound leaves room for seed + 1


def test_check_run_dir_refuses_an_earlier_run_without_resume(tmp_path):
    assert check_run_dir(tmp_path / "new", resume=False).is_dir()  # created
    (tmp_path / "new" / "loss.png").write_bytes(b"x")  # a plot is not a run's history
    check_run_dir(tmp_path / "new", resume=False)
    for name in ("step-00000004.safetensors", "metrics.jsonl"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text("x")
        with pytest.raises(OutputDirError, match=rf"holds an earlier run \({name}\).*use --resume .* or another "
                                                 "folder"):
            check_run_dir(folder, resume=False)
        assert check_run_dir(folder, resume=True) == folder
        assert (folder / name).read_text() == "x"  # untouched
    with pytest.raises(OutputDirError, match="existing file"):
        check_run_dir(tmp_path / "new" / "loss.png", resume=True)


def test_atomic_files_replace_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "a.json"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(KeyboardInterrupt):
        with atomic_files(a, b) as (ta, tb):
            assert ta.parent == tmp_path and tb.parent == tmp_path and ta != a and tb != b
            ta.write_text("new a")
            tb.write_text("ne")
            raise KeyboardInterrupt  # interrupted while writing the second file
    assert a.read_text() == "old a" and b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json"]  # no temporary files left
    with atomic_files(a, b) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
        assert a.read_text() == "old a"  # nothing visible before the block ends
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json"]
    a.chmod(0o644)
    with atomic_files(a) as (ta,):
        ta.write_text("newer a")
        ta.chmod(0o600)  # as safetensors makes its files
    assert a.read_text() == "newer a" and a.stat().st_mode & 0o777 == 0o644  # a replaced file keeps its mode
    link = tmp_path / "link.bin"
    link.symlink_to(a)
    with atomic_files(link) as (tl,):
        tl.write_text("through the link")
    assert link.is_symlink() and a.read_text() == "through the link"  # the target is replaced, not the link


def test_atomic_files_check_every_destination_before_renaming_any(tmp_path):
    a, b = tmp_path / "w.bin", tmp_path / "w.json"
    a.write_text("old a")
    b.mkdir()  # the second destination cannot take a file
    with pytest.raises(OutputDirError, match=r"w.json': it is an existing folder"):
        with atomic_files(a, b):
            pytest.fail("the block must not run: its work could not be saved")
    assert a.read_text() == "old a"
    b.rmdir()
    with pytest.raises(OutputDirError, match="existing folder"):
        with atomic_files(a, b) as (ta, tb):
            ta.write_text("new a")
            tb.write_text("new b")
            b.mkdir()  # appears while the block runs: still no file is replaced
    assert a.read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.json"]  # no temporary files left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_new_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_files(tmp_path / "new.safetensors", tmp_path / "new.json") as (tw, tj):
            tw.write_text("w")
            tw.chmod(0o600)  # as safetensors makes its files
            tj.write_text("j")
    finally:
        os.umask(old)
    for name in ("new.safetensors", "new.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# --------------------------------------------------------------------------- seeding, progress


def test_seed_everything_is_deterministic():
    def draws():
        gen = seed_everything(7)
        return (random.random(), float(np.random.rand()), float(torch.rand(())), float(torch.rand((), generator=gen)))

    first = draws()
    assert draws() == first
    assert first[3] == float(torch.rand((), generator=torch.Generator().manual_seed(7)))
    seed_everything(8)
    assert random.random() != first[0]
    # (1.7 seeded 1, "3" seeded 3, and -1 torch's stream of 2**64 - 1)
    for bad in (1.7, "3", True, -1, 2**63):
        with pytest.raises(ValueError, match="seed must be an integer"):
            seed_everything(bad)
    seed_everything(np.int64(5))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    assert progress_bar(range(3), file=io.StringIO()).disable  # a log file or CI output
    assert not progress_bar(range(3), file=_Terminal()).disable
    assert progress_bar(range(3), enabled=False, file=_Terminal()).disable
    terminal = _Terminal()
    assert list(progress_bar(range(3), file=terminal, desc="work")) == [0, 1, 2]
    assert "work" in terminal.getvalue()


# --------------------------------------------------------------------------- metrics log


def test_metrics_log_resume_has_no_duplicate_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(1, 6):
            log.log(step, loss=1.0 / step)
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # torn by a crash mid-write
    with MetricsLog(path, resume_step=3) as log:  # the run resumes from its step-3 checkpoint
        assert [r["step"] for r in log.records()] == [1, 2, 3]
        for step in range(4, 7):
            log.log(step, loss=1.0 / step)
        records = log.records()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["loss"] == 1.0 / 5  # floats round-trip exactly
    with MetricsLog(path) as log:  # a new run starts a new log
        assert log.records() == []


def test_a_metrics_log_write_that_fails_is_an_output_dir_error_and_close_still_works(tmp_path, monkeypatch):
    # (a full disk: the buffered line failed again in close(), over the first error, as raw OSErrors)
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.log(1, loss=0.5)
    real_write = os.write

    def full(fd, data):
        real_write(fd, data[:5])  # part of the line reaches the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run.os, "write", full)
    with pytest.raises(OutputDirError, match="cannot write the metrics log .*No space left"):
        log.log(2, loss=0.25)
    monkeypatch.undo()
    log.close()  # nothing pending to fail again
    log.close()
    assert [r["step"] for r in MetricsLog(path, resume_step=5).records()] == [1]  # the torn line is dropped


def _strict_json(line: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_metrics_log_writes_strict_json_for_a_diverged_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    nan, inf = float("nan"), float("inf")
    with MetricsLog(path) as log:
        log.log(1, loss=0.5, lr=1e-3)
        log.log(2, loss=nan, lr=1e-3, grad=[1.0, -inf], parts={"a": inf, "b": 2.0}, note="NaN")
        log.log(3, loss=inf)
        with pytest.raises(ValueError, match="reserved"):
            log.log(4, non_finite=1)
    lines = [_strict_json(line) for line in path.read_text().splitlines()]  # every line parses strictly
    assert lines[0] == {"step": 1, "loss": 0.5, "lr": 1e-3}
    assert lines[1] == {"step": 2, "loss": None, "lr": 1e-3, "grad": [1.0, None], "parts": {"a": None, "b": 2.0},
                        "note": "NaN", "non_finite": {"loss": "NaN", "grad": [None, "-Infinity"],
                                                      "parts": {"a": "Infinity"}}}
    assert lines[2] == {"step": 3, "loss": None, "non_finite": {"loss": "Infinity"}}

    def check(records):
        assert [r["step"] for r in records] == [1, 2, 3]
        assert math.isnan(records[1]["loss"]) and records[1]["grad"] == [1.0, -inf]
        assert records[1]["parts"] == {"a": inf, "b": 2.0} and records[1]["note"] == "NaN"
        assert records[2] == {"step": 3, "loss": inf}
        assert all("non_finite" not in r for r in records)

    with MetricsLog(path, resume_step=3) as log:  # kept records are written again, still strict
        check(log.records())
    [_strict_json(line) for line in path.read_text().splitlines()]
    check(MetricsLog(path, resume_step=5).records())


# --------------------------------------------------------------------------- checkpoints


def _model(width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 2))


def _train_steps(model, optimizer, n: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = model(torch.randn(8, 3, generator=gen)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _optimizer(model):
    # Two parameter groups with different settings, and AMSGrad for an extra state tensor.
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "weight_decay": 0.0}],
                             lr=3e-3, betas=(0.8, 0.95), amsgrad=True)


def test_model_and_optimizer_round_trip_exactly(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    _train_steps(model, optimizer, 3)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, {"model": model, "optimizer": optimizer})

    model2 = _model()
    optimizer2 = _optimizer(model2)
    loaded = ckpt.load({"model": model2, "optimizer": optimizer2})
    assert loaded.step == 3 and loaded.path == ckpt.latest()
    _assert_same(model.state_dict(), model2.state_dict())
    _assert_same(optimizer.state_dict(), optimizer2.state_dict())  # Adam step counts, betas tuples, groups
    assert optimizer2.state_dict()["state"][0]["step"] == 3
    _train_steps(model, optimizer, 2, seed=1)
    _train_steps(model2, optimizer2, 2, seed=1)
    _assert_same(model.state_dict(), model2.state_dict(), "after two more steps")


def test_rng_generators_and_values_round_trip(tmp_path):
    ckpt = Checkpointer(tmp_path)
    gen = torch.Generator().manual_seed(3)
    torch.rand(5, generator=gen)
    seed_everything(11)
    values = {"order": torch.arange(5), "half": torch.ones(2, dtype=torch.bfloat16), "seconds": 1.5, "name": "x",
              "nested": {1: (2, [3.25, None]), "k": True}}
    ckpt.save(1, {"data_rng": gen, "global_rng": GlobalRNG(), **values}, metadata={"note": "hi"})
    expected = (torch.rand(4, generator=gen), random.random(), np.random.rand(3), torch.rand(2))

    gen2 = torch.Generator().manual_seed(99)
    seed_everything(12)
    loaded = ckpt.load({"data_rng": gen2, "global_rng": GlobalRNG()})
    again = (torch.rand(4, generator=gen2), random.random(), np.random.rand(3), torch.rand(2))
    assert torch.equal(again[0], expected[0]) and again[1] == expected[1]
    assert np.array_equal(again[2], expected[2]) and torch.equal(again[3], expected[3])
    _assert_same(loaded.values, values)
    assert loaded.metadata == {"note": "hi"}


def test_a_cuda_rng_state_saved_without_a_gpu_loads_anywhere():
    state = GlobalRNG(cuda=True).state_dict() if not torch.cuda.is_available() else None
    if state is None:
        pytest.skip("needs a machine without a GPU")
    assert state["cuda"] == []  # cuda=True on a machine without a GPU saves no device
    GlobalRNG(cuda=True).load_state_dict(state)  # nothing to restore, so no CUDA initialisation
    GlobalRNG().load_state_dict(state)


def test_a_saved_cuda_rng_state_is_not_dropped(monkeypatch):
    state = GlobalRNG(cuda=False).state_dict()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as saved by a run on one GPU
    if not torch.cuda.is_available():
        # CUDA not initialised (and here, no GPU): the state is not silently skipped
        with pytest.raises(RuntimeError, match=r"CUDA RNG of 1 device\(s\), but 0 CUDA device\(s\) are available"):
            GlobalRNG().load_state_dict(state)
    GlobalRNG(cuda=False).load_state_dict(state)  # an explicit choice to skip it
    # Where a GPU is available but CUDA not yet initialised, it is initialised and the state restored.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: calls.append("init"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("set", states)))
    GlobalRNG().load_state_dict(state)
    assert calls[0] == "init" and calls[1][0] == "set" and torch.equal(calls[1][1][0], state["cuda"][0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="GlobalRNG\\(cuda=False\\)"):
        GlobalRNG(cuda=True).load_state_dict(state)


def test_a_state_saved_without_cuda_loads_where_cuda_is_in_use(monkeypatch):
    # a CPU run's checkpoint resumed on a GPU (the teacher's loop warns about the device and
    # goes on): the default leaves the CUDA RNG as it is; cuda=True requires a saved one
    state = GlobalRNG(cuda=False).state_dict()
    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))
    GlobalRNG().load_state_dict(state)
    assert calls == [] and torch.equal(torch.get_rng_state(), state["torch"])
    with pytest.raises(KeyError, match="no saved RNG state for \\['cuda'\\]"):
        GlobalRNG(cuda=True).load_state_dict(state)


def test_a_changed_thread_count_or_device_warns_on_load(tmp_path):
    model = _model()
    ckpt = Checkpointer(tmp_path)
    env = run.run_environment("cpu")
    assert env == {"torch_threads": torch.get_num_threads(), "device_type": "cpu"}
    ckpt.save(1, {"model": model}, metadata={"run": {"lr": 1.0}, **env})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load({"model": model}, same_bits=env)  # the same: no warning
    other = {"torch_threads": env["torch_threads"] + 1, "device_type": "cuda"}
    with pytest.warns(ReproducibilityWarning, match=rf"torch_threads={env['torch_threads']} \(now "
                                                    rf"{env['torch_threads'] + 1}\), device_type='cpu' \(now "
                                                    r"'cuda'\): the run continues, but not bit for bit"):
        loaded = ckpt.load({"model": model}, same_bits=other)
    assert loaded.step == 1
    ckpt.save(2, {"model": model})  # recorded nothing: said so
    with pytest.warns(ReproducibilityWarning, match="torch_threads not recorded"):
        ckpt.load({"model": model}, same_bits=env)


def test_keep_last_k_and_latest(tmp_path):
    model = _model()
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.latest() is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load({"model": model})
    for step in (10, 20, 30, 40):
        ckpt.save(step, {"model": model})
    assert [p.name for p in ckpt.checkpoints()] == ["step-00000030.safetensors", "step-00000040.safetensors"]
    assert ckpt.latest() == ckpt.path_for(40)
    assert ckpt.load({"model": model}).step == 40
    # Resumed from step 30 and saving step 35: the step-40 checkpoint belongs to the abandoned run.
    ckpt.save(35, {"model": model})
    assert [p.name for p in ckpt.checkpoints()] == ["step-00000030.safetensors", "step-00000035.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030.safetensors", "step-00000035.safetensors"]
    everything = Checkpointer(tmp_path / "all", keep=None)
    for step in range(1, 6):
        everything.save(step, {"model": model})
    assert len(everything.checkpoints()) == 5
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


def test_save_refuses_a_bad_step_before_writing_or_deleting(tmp_path):
    model = _model()
    ckpt = Checkpointer(tmp_path, keep=None)
    for step in (100, 200):
        ckpt.save(step, {"model": model})
    before = sorted(p.name for p in tmp_path.iterdir())
    for step in (-1, 1.5, True, "3", None):
        with pytest.raises(ValueError, match=rf"step must be an integer >= 0, got {step!r}"):
            ckpt.save(step, {"model": model})
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing deleted
    assert ckpt.load({"model": model}).step == 200
    assert ckpt.save(np.int64(0), {"model": model}).name == "step-00000000.safetensors"  # numpy ints are ints


def test_stray_folders_are_not_checkpoints_and_keep_is_a_count(tmp_path):
    model = _model()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, {"model": model})
    (tmp_path / "step-00000099.safetensors").mkdir()  # an unpacked copy, say
    assert ckpt.checkpoints() == [ckpt.path_for(5)] and ckpt.latest() == ckpt.path_for(5)
    assert ckpt.load({"model": model}).step == 5
    for keep in (1.5, "2", 0, True):
        with pytest.raises(ValueError, match=rf"keep must be an integer >= 1 or None, got {keep!r}"):
            Checkpointer(tmp_path, keep=keep)
    assert Checkpointer(tmp_path, keep=np.int64(2)).keep == 2


def test_tuple_keys_and_numpy_arrays_round_trip(tmp_path):
    ckpt = Checkpointer(tmp_path)
    values = {"counts": {(0, 1): 5, ((2, "a"), None): [1], 3: "int key", (): 0},
              "empty": np.zeros((0, 3), np.float32), "ints": np.arange(6, dtype=np.int16).reshape(2, 3).T,
              "long": np.array([1 / 3], np.longdouble), "complex": np.array([1 + 2j], np.complex64)}
    ckpt.save(1, values)
    loaded = ckpt.load().values
    assert loaded["counts"] == values["counts"] and list(loaded["counts"]) == list(values["counts"])
    for key in ("empty", "ints", "long", "complex"):
        got, want = loaded[key], values[key]
        assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want), key
    # What cannot be saved faithfully is refused now, naming it, and nothing is written.
    with pytest.raises(TypeError, match=r"cannot checkpoint 'bad': its key frozenset\(\{1\}\) is a frozenset"):
        ckpt.save(2, {"bad": {frozenset({1}): 1}})
    with pytest.raises(TypeError, match="cannot checkpoint 'obj'.*[Oo]bject arrays"):
        ckpt.save(2, {"obj": np.array([object()])})
    with pytest.raises(TypeError, match="cannot checkpoint 'set': set is not"):
        ckpt.save(2, {"set": {1}})
    assert ckpt.checkpoints() == [ckpt.path_for(1)]


def test_numpy_bools_and_large_arrays_checkpoint(tmp_path):
    # numpy bools were refused ("bool is not a JSON scalar"); arrays went into the header as
    # base64, which safetensors caps at 100 MB: they are tensors of their .npy bytes now
    from safetensors import safe_open

    ckpt = Checkpointer(tmp_path)
    big = np.arange(2_000_000, dtype=np.int32)
    path = ckpt.save(1, {"flag": np.bool_(True), "keyed": {np.bool_(False): 1}, "big": big})
    with safe_open(str(path), framework="pt") as f:
        assert len(f.metadata()["kdfast"]) < 2000
    loaded = ckpt.load().values
    assert loaded["flag"] is True and loaded["keyed"] == {False: 1} and np.array_equal(loaded["big"], big)


def test_a_resume_mismatch_names_each_changed_setting(tmp_path):
    model = _model()
    ckpt = Checkpointer(tmp_path)
    run_settings = {"steps": 7, "lr": 0.002, "model": {"channels": [32, 64], "dropout": 0.0}, "seed": 5}
    ckpt.save(1, {"model": model}, metadata={"run": run_settings})
    now = {**run_settings, "steps": 9, "model": {"channels": [32, 64], "dropout": 0.1}, "extra": 1}
    with pytest.raises(CheckpointError) as info:
        ckpt.load({"model": model}, expect={"run": now})
    message = str(info.value)
    assert message.endswith("different run: run.steps: 7 (checkpoint) vs 9 (now), run.model.dropout: 0.0 "
                            "(checkpoint) vs 0.1 (now), run.extra: absent (checkpoint) vs 1 (now)")
    assert "0.002" not in message  # unchanged settings are not listed


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"model": model})
    before = ckpt.latest().read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(run, "save_file", crash)
    with pytest.raises(OutputDirError, match="cannot save checkpoint .*step-00000002.safetensors.*disk full"):
        ckpt.save(2, {"model": model})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.safetensors"]

    def full(tensors, filename, metadata=None):  # what safetensors raises for a full disk
        raise run.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(run, "save_file", full)
    with pytest.raises(OutputDirError, match="No space left on device"):  # (a command prints one line)
        ckpt.save(2, {"model": model})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.safetensors"]  # no temporary file left
    assert ckpt.latest().read_bytes() == before


def test_a_save_killed_mid_write_leaves_no_temporary_file_for_good(tmp_path):
    # SIGKILL skips atomic_files' clean-up: the next Checkpointer on the folder removes the
    # temporary files of processes that are gone, once an hour old (a live one's, or a recent one
    # that another machine sharing the folder may be writing, are left alone)
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    orphan = tmp_path / f".step-00000003.safetensors.{dead_pid}.tmp"
    orphan_log = tmp_path / f".metrics.jsonl.{dead_pid}.tmp"  # (the metrics log's, resumed, was never removed)
    live = tmp_path / f".step-00000004.safetensors.{os.getpid()}.tmp"
    mine = tmp_path / f".notes.txt.{dead_pid}.tmp"  # not a checkpoint's: not ours to remove
    recent = tmp_path / f".step-00000005.safetensors.{dead_pid}.tmp"  # perhaps another machine's save, under way
    old = time.time() - run.ORPHAN_AGE - 60
    for path in (orphan, orphan_log, live, mine, recent):
        path.write_bytes(b"partial")
        if path is not recent:
            os.utime(path, (old, old))
    Checkpointer(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name, recent.name])


def test_corrupt_or_mismatched_checkpoint_errors(tmp_path):
    model = _model()
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(5, {"model": model, "optimizer": _optimizer(model)}, metadata={"run": {"lr": 1.0}})
    data = path.read_bytes()

    with pytest.raises(CheckpointError, match=r"(?s)'model' does not fit the saved .*size mismatch"):
        ckpt.load({"model": _model(width=5)})
    with pytest.raises(CheckpointError, match="holds no 'ema'"):
        ckpt.load({"model": _model(), "ema": _model()})
    with pytest.raises(CheckpointError, match=r"different run: run.lr: 1.0 \(checkpoint\) vs 2.0 \(now\)$"):
        ckpt.load({"model": _model()}, expect={"run": {"lr": 2.0}})

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step-00000005.safetensors' is corrupt, truncated"):
        ckpt.load({"model": _model()})
    flipped = bytearray(data)
    flipped[-3] ^= 0x10  # inside the last tensor's data: a valid file with a wrong value
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="CRC-32"):
        ckpt.load({"model": _model()})
    run.save_file({"w": torch.zeros(2)}, str(path))  # a safetensors file, but not a checkpoint
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a kdfast checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def _rewrite_header(path, change):
    """The checkpoint at ``path`` with its header JSON changed by ``change`` (tensors kept)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()["kdfast"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    run.save_file(tensors, str(path), metadata={"kdfast": change(header)})


def test_a_corrupt_header_is_caught_before_anything_is_restored(tmp_path):
    # the CRC-32 covered the tensors alone: a flipped digit in the header (an optimiser setting,
    # an RNG state, the step) loaded silently; a header of the wrong shape raised raw errors
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9)
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(7, {"model": model, "optimizer": optimizer})
    data = path.read_bytes()
    def less_momentum(header):
        assert '["momentum", 0.9]' in header
        return header.replace('["momentum", 0.9]', '["momentum", 0.1]')

    _rewrite_header(path, less_momentum)
    fresh = torch.optim.SGD(_model().parameters(), lr=0.25, momentum=0.9)
    with pytest.raises(CheckpointError, match="does not match its CRC-32"):
        ckpt.load({"optimizer": fresh})
    assert fresh.param_groups[0]["momentum"] == 0.9
    for bad in ("[1]", "null", json.dumps({"format": "kdfast checkpoint", "version": 2}),
                json.dumps({"format": "kdfast checkpoint", "version": 1, "state": {}, "metadata": {},
                            "crc32": run._checksum({})})):
        run.save_file({}, str(path), metadata={"kdfast": bad})
        with pytest.raises(CheckpointError, match="corrupt, truncated or not a kdfast checkpoint"):
            ckpt.load({"model": _model()})
    # a checkpoint of format version 1 (its CRC over the tensors alone) still loads
    path.write_bytes(data)
    tensors = __import__("safetensors.torch").torch.load_file(str(path))
    _rewrite_header(path, lambda h: json.dumps({**json.loads(h), "version": 1, "crc32": run._checksum(tensors)}))
    restored = _model()
    assert ckpt.load({"model": restored}).step == 7
    assert torch.equal(restored[0].weight, model[0].weight)


def test_checkpoint_file_is_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    model = _model()
    path = Checkpointer(tmp_path).save(2, {"model": model})
    tensors = load_file(str(path))  # readable by any safetensors tool
    assert torch.equal(tensors["model/0.weight"], model[0].weight)
    with pytest.raises(TypeError, match="cannot checkpoint 'bad'"):
        Checkpointer(tmp_path).save(3, {"bad": object()})
    header = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["kdfast"])
    assert header["step"] == 2 and header["state"]["model"]["kind"] == "stateful"


def test_a_run_folder_is_locked_while_a_run_holds_it(tmp_path):
    # two runs on one folder mixed their checkpoints and metrics logs, silently
    lock = run.lock_run_dir(tmp_path)
    if lock is None:
        pytest.skip("no fcntl here")
    with pytest.raises(OutputDirError, match=f"in use by another run \\(process {os.getpid()}\\)"):
        run.lock_run_dir(tmp_path)
    lock.close()
    run.lock_run_dir(tmp_path).close()  # free again once the holder is done


def test_sigterm_exits_like_ctrl_c_with_its_own_status(tmp_path, capsys):
    # SIGTERM (timeout, docker, SLURM) killed the process with no message, leaving the
    # checkpoint-sized temporary file of a save under way
    import signal
    if os.name == "nt":
        pytest.skip("no SIGTERM handlers here")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        with run.interrupt_exits("prog"), atomic_files(tmp_path / "out.bin") as (tmp,):
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler raises first)
    assert exc.value.code == 143 and capsys.readouterr().err.strip() == "prog: terminated"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_file_system_without_locks_warns_and_runs_unlocked(tmp_path, monkeypatch):
    # NFS mounted nolock (ENOLCK), FUSE or Lustre without flock: not "in use by another run"
    import errno
    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="cannot be locked"):
        assert run.lock_run_dir(tmp_path) is None
