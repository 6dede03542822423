import hashlib
import io
import json
import math
import pathlib
import shutil
import subprocess
import sys
import warnings
import zlib

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from kdfast.datasets import load_digits  # noqa: E402
from kdfast.models import UNet  # noqa: E402
from kdfast.schedulers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from kdfast.train import teacher as teacher_mod  # noqa: E402
from kdfast.train.run import CheckpointError, OutputDirError, ReproducibilityWarning  # noqa: E402
from kdfast.train import (SHIPPED_PATH, Teacher, TeacherAssetError, load_teacher, sample_teacher,  # noqa: E402
                          save_teacher, train_teacher)

TINY = dict(steps=5, batch_size=16, progress=False, num_threads=1)


@pytest.fixture(scope="module")
def tiny_teacher():
    return train_teacher(seed=0, **TINY)


@pytest.fixture(scope="module")
def shipped():
    return load_teacher()


def fixed_batch_loss(model: UNet, schedule) -> float:
    images, labels = load_digits("train")
    gen = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(labels), generator=gen)[:64]
    noise = torch.randn(64, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (64,), generator=gen)
    with torch.no_grad():
        return float(teacher_mod.denoising_loss(model, DDIMScheduler.from_config(schedule), images[idx],
                                                labels[idx], noise, t))


def test_tiny_training_is_deterministic_and_learns(tiny_teacher):
    again = train_teacher(seed=0, **TINY)
    for (name, a), b in zip(tiny_teacher.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert tiny_teacher.config["training"]["loss_history"] == again.config["training"]["loss_history"]
    other = train_teacher(seed=1, **TINY)
    assert not torch.equal(other.model.conv_out.weight, tiny_teacher.model.conv_out.weight)

    untrained = UNet(tiny_teacher.model.config)  # predicts 0 everywhere (zero-initialised output)
    schedule = tiny_teacher.scheduler_config
    assert fixed_batch_loss(tiny_teacher.model, schedule) < 0.95 * fixed_batch_loss(untrained, schedule)
    assert not tiny_teacher.model.training and not any(p.requires_grad for p in tiny_teacher.model.parameters())


def test_training_config_record(tiny_teacher):
    cfg = tiny_teacher.config
    assert cfg["model"]["prediction_type"] == cfg["noise_schedule"]["prediction_type"] == "v_prediction"
    assert cfg["noise_schedule"]["_class_name"] == "DDIMScheduler"
    assert cfg["training"]["steps"] == 5 and len(cfg["training"]["loss_history"]) == 5
    # the noise schedule is a diffusers scheduler config: any kdfast scheduler builds from it
    sched = DPMSolverMultistepScheduler.from_config(tiny_teacher.scheduler_config)
    assert sched.config.beta_schedule == "squaredcos_cap_v2" and sched.config.prediction_type == "v_prediction"


def test_epsilon_teacher_trains(tmp_path):
    trained = train_teacher(prediction_type="epsilon", steps=2, batch_size=8, progress=False,
                            model_config=dict(base_channels=16, channel_mults=(1, 2), attention_heads=2),
                            out=tmp_path / "eps.safetensors")
    loaded = load_teacher(tmp_path / "eps.safetensors")
    assert (tmp_path / "eps_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss plot beside it
    assert trained.model.config == loaded.model.config
    assert loaded.prediction_type == "epsilon" and loaded.scheduler_config["prediction_type"] == "epsilon"
    images, labels = loaded.sample(1, steps=3, classes=[7], scheduler="ddim")
    assert images.shape == (1, 1, 16, 16) and labels.tolist() == [7]


def test_save_load_round_trip(tiny_teacher, tmp_path):
    path = save_teacher(tiny_teacher.model, tiny_teacher.config, tmp_path / "t.safetensors")
    record = json.loads((tmp_path / "t.json").read_text())
    assert "loss_history" not in record["training"] and len(record["weights_sha256"]) == 64
    loaded = load_teacher(path)
    x = torch.randn(4, 1, 16, 16)
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    torch.testing.assert_close(loaded.model_fn(x, t, y), tiny_teacher.model_fn(x, t, y), rtol=0, atol=0)


def test_model_fn_runs_the_inference_form_until_refreshed(tiny_teacher, tmp_path):
    teacher = load_teacher(save_teacher(tiny_teacher.model, tiny_teacher.config, tmp_path / "t.safetensors"))
    x = torch.randn(4, 1, 16, 16)
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    fast = teacher.inference_model
    assert fast is teacher.inference_model and fast is not teacher.model and fast.fused
    with torch.no_grad():
        torch.testing.assert_close(teacher.model_fn(x, t, y), fast(x, t, y), rtol=0, atol=0)
        torch.testing.assert_close(teacher.model_fn(x, t, y), teacher.model(x, t, y), rtol=1e-4, atol=1e-5)
        teacher.model.conv_out.bias.add_(1.0)
        assert torch.equal(teacher.model_fn(x, t, y), fast(x, t, y))  # a frozen copy until refreshed
        teacher.refresh()
        assert teacher.inference_model is not fast
        torch.testing.assert_close(teacher.model_fn(x, t, y), teacher.model(x, t, y), rtol=1e-4, atol=1e-5)


def test_shipped_teacher_samples(shipped):
    assert isinstance(shipped, Teacher)
    assert SHIPPED_PATH.stat().st_size < 8 * 2**20
    images, labels = sample_teacher(n_per_class=1, steps=5)
    assert images.shape == (10, 1, 16, 16) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert labels.dtype == torch.int64 and labels.tolist() == list(range(10))
    assert images.std() > 0.3  # not a blank canvas: digit strokes on a dark background
    again, _ = sample_teacher(n_per_class=1, steps=5)
    torch.testing.assert_close(again, images, rtol=0, atol=0)  # seeded
    more, more_labels = shipped.sample(2, steps=4, scheduler="ddim", classes=[3, 8], guidance_scale=1.0, seed=5)
    assert more.shape == (4, 1, 16, 16) and more_labels.tolist() == [3, 3, 8, 8]


def test_corrupt_or_missing_asset_raises_clear_error(tmp_path):
    path = tmp_path / "digits_teacher.safetensors"
    shutil.copy(SHIPPED_PATH, path)
    shutil.copy(teacher_mod.metadata_path(SHIPPED_PATH), teacher_mod.metadata_path(path))
    load_teacher(path)  # an intact copy loads

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(TeacherAssetError, match="corrupt"):
        load_teacher(path)

    path.write_bytes(bytes(data[:1000]))  # truncated, and not checked against the SHA-256
    with pytest.raises(TeacherAssetError, match="corrupt or not a safetensors"):
        load_teacher(path, verify=False)

    teacher_mod.metadata_path(path).write_text("{not json")
    with pytest.raises(TeacherAssetError, match="config .* corrupt"):
        load_teacher(path)
    teacher_mod.metadata_path(path).unlink()
    with pytest.raises(TeacherAssetError, match="missing"):
        load_teacher(path)
    with pytest.raises(TeacherAssetError, match="not found"):
        load_teacher(tmp_path / "nothing.safetensors")


def test_bad_arguments_name_the_argument(shipped):
    with pytest.raises(ValueError, match="prediction_type"):
        train_teacher(prediction_type="sample", steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_teacher(steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_teacher(batch_size=0)
    with pytest.raises(ValueError, match="cfg_dropout"):
        train_teacher(cfg_dropout=1.5)
    with pytest.raises(ValueError, match="steps"):
        sample_teacher(1, steps=0)
    with pytest.raises(ValueError, match="n_per_class"):
        sample_teacher(0)
    with pytest.raises(ValueError, match="scheduler"):
        sample_teacher(1, scheduler="plms")
    with pytest.raises(ValueError, match="classes"):
        shipped.sample(1, classes=[10])


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=float("inf")), "lr must be a finite number >= 0.0, got inf"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0.0, got nan"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0.0, got nan"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0.0"),
    (dict(steps=2.5), "steps must be a positive integer, got 2.5"),
    (dict(batch_size=True), "batch_size must be a positive integer, got True"),
    (dict(seed=1.5), "seed must be an integer >= 0, got 1.5"),
    (dict(ema_decay="x"), "ema_decay must be a finite number in [0.0, 1.0), got 'x'"),
])
def test_training_numbers_are_checked_not_truncated(kwargs, message):
    # (int() would train 2 steps for 2.5; an infinite learning rate would train to NaN)
    with pytest.raises(ValueError) as exc:
        train_teacher(**{"steps": 1, **kwargs}, progress=False)
    assert message in str(exc.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=0.5), "seed must be an integer >= 0, got 0.5"),
    (dict(classes=[1.5]), "classes must be an integer, got 1.5"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
])
def test_sampling_arguments_are_checked_not_truncated(shipped, kwargs, message):
    with pytest.raises(ValueError) as exc:
        shipped.sample(1, steps=1, **kwargs)
    assert message in str(exc.value)


def test_png_grid(tmp_path):
    images = torch.linspace(-1, 1, 4 * 16 * 16).reshape(4, 1, 16, 16)
    grid = teacher_mod.image_grid(images, nrow=2, pad=1)
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1) and grid.dtype == torch.uint8
    path = teacher_mod.write_png(grid, tmp_path / "g.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    raw = zlib.decompress(data[idat + 4:idat + 4 + length])
    assert len(raw) == grid.shape[0] * (grid.shape[1] + 1)
    rows = torch.tensor(list(raw), dtype=torch.uint8).reshape(grid.shape[0], -1)[:, 1:]
    assert torch.equal(rows, grid)


# A tiny UNet with dropout: resuming must restore the global RNG dropout draws from as well.
RESUMABLE = dict(steps=4, batch_size=8, progress=False, num_threads=1, seed=2,
                 model_config=dict(base_channels=16, channel_mults=(1, 2), attention_heads=2, dropout=0.2))


def _crash_in_step(step: int):
    """A stand-in for the training loss that kills the run at its ``step``-th call."""
    real_loss, calls = teacher_mod.denoising_loss, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    return crash


def test_resumed_training_is_bit_identical(tmp_path, monkeypatch):
    straight = train_teacher(**RESUMABLE)  # no checkpoints: the default path

    ckpt_dir = tmp_path / "ckpt"
    monkeypatch.setattr(teacher_mod, "denoising_loss", _crash_in_step(3))
    with pytest.raises(KeyboardInterrupt):
        train_teacher(checkpoint_dir=ckpt_dir, checkpoint_every=2, **RESUMABLE)
    monkeypatch.undo()  # the real loss again
    assert sorted(p.name for p in ckpt_dir.glob("step-*")) == ["step-00000002.safetensors"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", ReproducibilityWarning)  # the same threads and device: no warning
        resumed = train_teacher(checkpoint_dir=ckpt_dir, checkpoint_every=2, resume=True, **RESUMABLE)
    assert resumed.config["training"]["resumed_at_step"] == 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.config["training"]["loss_history"] == straight.config["training"]["loss_history"]

    records = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == straight.config["training"]["loss_history"]
    assert sorted(p.name for p in ckpt_dir.glob("step-*")) == ["step-00000002.safetensors",
                                                              "step-00000004.safetensors"]
    assert (ckpt_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resuming a finished run trains nothing and returns the same teacher.
    again = train_teacher(checkpoint_dir=ckpt_dir, checkpoint_every=2, resume=True, **RESUMABLE)
    assert torch.equal(again.model.conv_out.weight, straight.model.conv_out.weight)
    # A checkpoint resumes only the run that wrote it.
    with pytest.raises(CheckpointError) as info:
        train_teacher(checkpoint_dir=ckpt_dir, resume=True, **{**RESUMABLE, "steps": 6})
    # the setting that changed, not the whole settings dict
    assert str(info.value).endswith("was written by a different run: run.steps: 4 (checkpoint) vs 6 (now)")


def test_checkpoint_arguments(tmp_path):
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        train_teacher(resume=True, steps=1)
    # refused by name before the folder is made (or locked, leaving a log that refuses the rerun)
    folder = tmp_path / "ck"
    for kwargs, message in ((dict(keep_checkpoints=0), "keep_checkpoints must be a positive integer"),
                            (dict(resume="False"), "resume must be True or False"),
                            (dict(progress="no"), "progress must be True or False"),
                            (dict(num_threads=0), "num_threads must be a positive integer"),
                            (dict(noise_schedule={"num_train_timesteps": 0}), "num_train_timesteps must be"),
                            (dict(noise_schedule={"beta_schedule": "linear", "beta_start": float("nan")}),
                             r"training betas must be finite and in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            train_teacher(steps=1, checkpoint_dir=folder, **kwargs)
        assert not folder.exists()
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_teacher(checkpoint_dir=tmp_path, checkpoint_every=0, steps=1)
    with pytest.raises(SystemExit):
        teacher_mod.main(["--resume"])  # --resume needs --checkpoint-dir


@pytest.fixture
def graph_teacher(shipped, eager_capture):
    """The shipped teacher with no captured loops before or after the test (the stand-in
    graphs must not outlive their fixture)."""
    shipped._captured.clear()
    yield shipped
    shipped._captured.clear()


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "euler_ancestral"])
def test_graph_sampling_captures_once_and_matches_eager(graph_teacher, eager_capture, scheduler):
    shipped = graph_teacher
    args = dict(n_per_class=2, steps=4, scheduler=scheduler, seed=3, batch_size=12)  # batches of 12 and 8
    eager, labels = shipped.sample(**args)
    graphed, graphed_labels = shipped.sample(**args, cuda_graph=True)
    assert len(eager_capture) == 2  # one loop per batch shape
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert graphed_labels.tolist() == labels.tolist()
    again, _ = shipped.sample(**args, cuda_graph=True)  # replays: nothing captured anew
    assert len(eager_capture) == 2
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    other, _ = shipped.sample(**{**args, "seed": 4}, cuda_graph=True)
    torch.testing.assert_close(other, shipped.sample(**{**args, "seed": 4})[0], rtol=0, atol=0)


def test_graph_sampling_keeps_a_few_captures(graph_teacher):
    shipped = graph_teacher
    for steps in range(1, Teacher.MAX_CAPTURED_LOOPS + 3):
        shipped.sample(1, steps=steps, scheduler="ddim", cuda_graph=True)
    assert len(shipped._captured) == Teacher.MAX_CAPTURED_LOOPS
    sched = shipped.make_scheduler("unipc")
    images, _ = shipped.sample(1, steps=3, scheduler=sched, cuda_graph=True)
    torch.testing.assert_close(images, shipped.sample(1, steps=3, scheduler="unipc")[0], rtol=0, atol=0)


def test_graph_sampling_needs_cuda(shipped):
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        shipped.sample(1, steps=2, cuda_graph=True)


@pytest.mark.gpu
def test_gpu_graph_sampling_matches_eager():
    teacher = load_teacher(device="cuda")
    for scheduler in ("dpmsolver++", "euler_ancestral"):
        args = dict(n_per_class=3, steps=6, scheduler=scheduler, seed=1, batch_size=20)
        eager, _ = teacher.sample(**args)
        first, _ = teacher.sample(**args, cuda_graph=True)
        second, _ = teacher.sample(**args, cuda_graph=True)
        torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_graph_sampling_recaptures_a_reused_scheduler(graph_teacher):
    """A scheduler instance reused at another step count is set anew; captures that read its
    old timesteps are dropped rather than replayed."""
    shipped = graph_teacher
    sched = shipped.make_scheduler("dpmsolver++")
    shipped.sample(1, steps=3, scheduler=sched, cuda_graph=True)
    shipped.sample(1, steps=4, scheduler=sched, cuda_graph=True)
    assert [k[1] for k in shipped._captured] == [4]
    images, _ = shipped.sample(1, steps=3, scheduler=sched, cuda_graph=True)  # captured again
    torch.testing.assert_close(images, shipped.sample(1, steps=3, scheduler="dpmsolver++")[0], rtol=0, atol=0)


def test_moving_the_teacher_drops_its_captures(graph_teacher):
    shipped = graph_teacher
    shipped.sample(1, steps=2, scheduler="ddim", cuda_graph=True)
    assert shipped._captured
    shipped.to("cpu")
    assert not shipped._captured


def _copy_shipped(tmp_path):
    path = tmp_path / "digits_teacher.safetensors"
    shutil.copy(SHIPPED_PATH, path)
    shutil.copy(teacher_mod.metadata_path(SHIPPED_PATH), teacher_mod.metadata_path(path))
    return path


@pytest.mark.parametrize("edit, reason", [
    ({"num_train_timesteps": "abc"}, "num_train_timesteps must be an integer >= 1, got 'abc'"),
    ({"beta_schedule": "foo"}, "beta_schedule"),
    ({"num_train_timesteps": 0}, "num_train_timesteps must be an integer >= 1, got 0"),
    ({"timestep_spacing": None}, "noise_schedule"),
])
def test_edited_noise_schedule_is_reported_on_load(tmp_path, edit, reason):
    # The SHA-256 covers the weights only: the schedule in the JSON is checked by building it.
    path = _copy_shipped(tmp_path)
    meta = teacher_mod.metadata_path(path)
    record = json.loads(meta.read_text())
    record["noise_schedule"].update(edit)
    meta.write_text(json.dumps(record))
    with pytest.raises(TeacherAssetError, match="noise_schedule does not build") as exc:
        load_teacher(path)
    assert reason in str(exc.value)
    record["noise_schedule"] = ["not", "a", "mapping"]
    meta.write_text(json.dumps(record))
    with pytest.raises(TeacherAssetError, match="noise_schedule"):
        load_teacher(path)


def test_an_edited_model_in_the_json_is_reported_on_load(tmp_path):
    # the weights' header records the model they were saved with (the SHA-256 covers it): an
    # edited JSON built another network around them (an epsilon teacher sampled noise)
    path = _copy_shipped(tmp_path)
    meta = teacher_mod.metadata_path(path)
    record = json.loads(meta.read_text())
    record["model"]["prediction_type"] = record["noise_schedule"]["prediction_type"] = "epsilon"
    meta.write_text(json.dumps(record))
    with pytest.raises(TeacherAssetError, match=r"its model \(prediction_type\) is not the one recorded in the weights"):
        load_teacher(path)


def test_weights_path_ending_in_json_is_refused(tiny_teacher, tmp_path):
    # metadata_path("t.json") is "t.json": the config would silently overwrite the weights
    for name in ("t.json", "t.JSON"):
        with pytest.raises(ValueError, match="must not end in .json"):
            save_teacher(tiny_teacher.model, tiny_teacher.config, tmp_path / name)
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="must not end in .json"):
        train_teacher(out=tmp_path / "t.json", **TINY)


def test_unusable_out_is_refused_before_training(tmp_path, monkeypatch):
    from kdfast.train.run import OutputDirError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(teacher_mod, "load_digits", lambda *a, **k: pytest.fail("trained before checking out"))
    with pytest.raises(OutputDirError, match="cannot be written"):
        train_teacher(out=blocker / "t.safetensors", **TINY)
    with pytest.raises(OutputDirError, match="existing folder"):
        train_teacher(out=tmp_path, **TINY)
    # the files written beside the weights are checked too, before the training
    for name in ("t.json", "t_loss.png"):
        (tmp_path / name).mkdir()
        with pytest.raises(OutputDirError, match=rf"{name}' is not writable: it is an existing folder"):
            train_teacher(out=tmp_path / "t.safetensors", **TINY)
        (tmp_path / name).rmdir()
    (tmp_path / "ckpt" / "loss.png").mkdir(parents=True)
    with pytest.raises(OutputDirError, match=r"loss.png' is not writable: it is an existing folder"):
        train_teacher(checkpoint_dir=tmp_path / "ckpt", **TINY)
    assert not list(tmp_path.glob("t.*"))


def _main_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        teacher_mod.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be an integer >= 1"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["--steps", "x"], "argument --steps: expected an integer >= 1, got 'x'"),
    (["--seed", "-1"], "argument --seed: the seed must be an integer in [0, 2**63 - 1], got -1"),
    (["--seed", "99999999999999999999999"], "argument --seed: the seed must be an integer in [0, 2**63 - 1]"),
])
def test_module_cli_rejects_bad_numbers(capsys, monkeypatch, argv, message):
    # --out defaults to the shipped asset: were a bad value let through, nothing must be trained or saved
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda **k: pytest.fail("trained despite a bad argument"))
    monkeypatch.setattr(teacher_mod, "save_teacher", lambda *a, **k: pytest.fail("saved despite a bad argument"))
    assert message in _main_error(capsys, argv)


def test_module_cli_rejects_bad_paths_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda **k: pytest.fail("trained before checking the paths"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = ["--out", str(tmp_path / "t.safetensors"), "--no-progress"]
    last = _main_error(capsys, ["--checkpoint-dir", str(blocker), *out])
    assert last.startswith("python -m kdfast.train.teacher: error: --checkpoint-dir:") and "existing file" in last
    assert "--out: " in _main_error(capsys, ["--out", str(blocker / "t.safetensors")])
    assert "must not end in .json" in _main_error(capsys, ["--out", str(tmp_path / "t.json")])
    assert "--grid: " in _main_error(capsys, ["--grid", str(blocker / "g.png"), *out])
    (tmp_path / "t.json").mkdir()  # where the config JSON goes: found now, not after the training
    last = _main_error(capsys, out)
    assert last.startswith("python -m kdfast.train.teacher: error: --out: ") and "t.json' is not writable" in last
    assert "teacher weights not found" in _main_error(capsys, ["--measure-only", "--out",
                                                                str(tmp_path / "missing.safetensors")])


def test_module_cli_refuses_a_grid_that_is_another_output(tmp_path, capsys, monkeypatch):
    # (written last, the grid replaced the teacher just saved, its JSON or the loss plot)
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda **k: pytest.fail("trained before checking the paths"))
    out = tmp_path / "t.safetensors"
    for grid, what in ((out, "--out"), (tmp_path / "t.json", "--out's JSON"),
                       (tmp_path / "ck" / "loss.png", "--checkpoint-dir's loss.png")):
        last = _main_error(capsys, ["--out", str(out), "--grid", str(grid), "--checkpoint-dir", str(tmp_path / "ck"),
                                    "--no-progress"])
        assert last.startswith("python -m kdfast.train.teacher: error: --grid: ") and f"is also {what}" in last
        assert not (tmp_path / "ck").exists()  # refused before the other paths' checks make folders
    last = _main_error(capsys, ["--measure-only", "--out", str(out), "--grid", str(out)])
    assert "--grid: " in last and "is also --out" in last


def test_module_cli_resume_from_a_corrupt_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "step-00000002.safetensors").write_bytes(b"garbage")
    last = _main_error(capsys, ["--checkpoint-dir", str(ckpt), "--resume", "--steps", "4", "--no-progress",
                                "--out", str(tmp_path / "t.safetensors")])
    assert last.startswith("python -m kdfast.train.teacher: error: --resume: checkpoint") and "corrupt" in last


def _interrupted_writes(monkeypatch):
    """Every Path.write_text writes half its text, then a Ctrl-C arrives."""
    def half_then_interrupt(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[:len(data) // 2])
        raise KeyboardInterrupt("Ctrl-C while writing")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_interrupt)


def test_an_interrupted_save_leaves_the_previous_pair(shipped, tmp_path, monkeypatch):
    path = _copy_shipped(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = UNet(shipped.model.config)  # other weights, saved over the existing pair
    other.load_state_dict(shipped.model.state_dict())
    with torch.no_grad():
        other.conv_out.weight.add_(1e-3)
    with monkeypatch.context() as m:
        _interrupted_writes(m)  # the JSON write is cut short
        with pytest.raises(KeyboardInterrupt):
            save_teacher(other, shipped.config, path)
    with monkeypatch.context() as m:
        def disk_full(tensors, filename, metadata=None):
            pathlib.Path(filename).write_bytes(b"partial")
            raise OSError("disk full")

        m.setattr(teacher_mod, "save_file", disk_full)  # the weights write fails
        with pytest.raises(OSError, match="disk full"):
            save_teacher(other, shipped.config, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary files either
    load_teacher(path)
    save_teacher(other, shipped.config, path)  # uninterrupted: the new pair, which loads
    assert torch.equal(load_teacher(path).model.conv_out.weight, other.conv_out.weight)


def test_an_interrupted_remeasure_leaves_the_json(tmp_path, monkeypatch):
    path = _copy_shipped(tmp_path)
    meta = teacher_mod.metadata_path(path)
    before = meta.read_bytes()
    monkeypatch.setattr(teacher_mod, "measure_samples", lambda teacher, **kwargs: {"results": [], **kwargs})
    with monkeypatch.context() as m:
        _interrupted_writes(m)
        with pytest.raises(KeyboardInterrupt):
            teacher_mod.remeasure(path)
    assert meta.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, meta.name])
    load_teacher(path)
    assert teacher_mod.remeasure(path, seed=7) == {"results": [], "seed": 7}
    assert load_teacher(path).config["metrics"] == {"results": [], "seed": 7}


def test_shipped_files_are_what_save_teacher_writes(shipped, tmp_path):
    # Saved again with its own config, the shipped teacher gives the shipped bytes, every time
    # (safetensors wrote several metadata keys in an order that changed between saves).
    names = []
    for i in range(6):
        path = save_teacher(shipped.model, shipped.config, tmp_path / f"t{i}.safetensors")
        assert path.read_bytes() == SHIPPED_PATH.read_bytes(), i
        names.append(path)
    assert teacher_mod.metadata_path(names[0]).read_bytes() == teacher_mod.metadata_path(SHIPPED_PATH).read_bytes()


def test_save_teacher_gives_the_same_bytes_in_another_process(shipped, tmp_path):
    code = ("import sys, hashlib; from kdfast.train.teacher import load_teacher, save_teacher; t = load_teacher(); "
            "print(hashlib.sha256(save_teacher(t.model, t.config, sys.argv[1]).read_bytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"p{i}.safetensors")], check=True,
                              capture_output=True, text=True, cwd=tmp_path).stdout.strip() for i in range(2)}
    assert digests == {hashlib.sha256(SHIPPED_PATH.read_bytes()).hexdigest()}


def test_a_new_run_refuses_a_folder_holding_an_earlier_one(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    train_teacher(checkpoint_dir=ckpt, checkpoint_every=1, **{**RESUMABLE, "steps": 2})
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert {"step-00000001.safetensors", "step-00000002.safetensors", "metrics.jsonl"} <= set(before)
    monkeypatch.setattr(teacher_mod, "load_digits", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(OutputDirError, match="holds an earlier run .*use --resume .* or another folder"):
        train_teacher(checkpoint_dir=ckpt, checkpoint_every=1, **{**RESUMABLE, "steps": 2})
    (ckpt / "step-00000001.safetensors").unlink()
    (ckpt / "step-00000002.safetensors").unlink()  # the log alone is history too
    del before["step-00000001.safetensors"], before["step-00000002.safetensors"]
    with pytest.raises(OutputDirError, match=r"\(metrics.jsonl\)"):
        train_teacher(checkpoint_dir=ckpt, **{**RESUMABLE, "steps": 2})
    last = _main_error(capsys, ["--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "t.safetensors"),
                                "--no-progress"])
    assert last.startswith("python -m kdfast.train.teacher: error: --checkpoint-dir: checkpoint folder")
    assert "use --resume" in last
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # nothing was touched


def test_resuming_with_another_thread_count_warns(tmp_path, monkeypatch, capsys):
    tiny = {**RESUMABLE, "steps": 2, "num_threads": 1}
    monkeypatch.setattr(teacher_mod, "denoising_loss", _crash_in_step(2))
    with pytest.raises(KeyboardInterrupt):
        train_teacher(checkpoint_dir=tmp_path, checkpoint_every=1, **tiny)
    monkeypatch.undo()  # the real loss again
    with pytest.warns(ReproducibilityWarning, match=r"torch_threads=1 \(now 2\).*not bit for bit"):
        resumed = train_teacher(checkpoint_dir=tmp_path, checkpoint_every=1, resume=True, **{**tiny, "num_threads": 2})
    assert resumed.config["training"]["resumed_at_step"] == 1 and resumed.config["training"]["torch_threads"] == 2


def test_module_cli_warns_in_one_line_when_resuming_with_other_threads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(teacher_mod, "measure_samples", lambda teacher, **kwargs: {"results": []})
    argv = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "1", "--steps", "2",
            "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "t.safetensors")]
    teacher_mod.main([*argv, "--threads", "1"])
    (tmp_path / "ckpt" / "step-00000002.safetensors").unlink()  # as if killed in step 2
    capsys.readouterr()
    teacher_mod.main([*argv, "--threads", "2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m kdfast.train.teacher: warning: checkpoint ")
    assert "torch_threads=1 (now 2)" in err[0]
    assert load_teacher(tmp_path / "t.safetensors").config["training"]["resumed_at_step"] == 1


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_measuring_shows_progress_on_a_terminal(tiny_teacher, monkeypatch, capsys):
    args = dict(n_per_class=1, steps=(1, 2), guidance_scales=(1.0,), evaluator=None)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    metrics = teacher_mod.measure_samples(tiny_teacher, progress=True, **args)
    assert [(r["steps"], r["guidance_scale"]) for r in metrics["results"]] == [(1, 1.0), (2, 1.0)]
    assert "measuring teacher" in terminal.getvalue() and "/2 [" in terminal.getvalue()
    assert capsys.readouterr().out == ""  # no rows printed to stdout
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    teacher_mod.measure_samples(tiny_teacher, progress=False, **args)
    assert quiet.getvalue() == ""


def test_a_checkpoint_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    # two runs on one folder (started together: both passed the earlier-run check) mixed their
    # checkpoints and metrics logs, silently
    from kdfast.train.run import OutputDirError, lock_run_dir
    held = lock_run_dir(tmp_path / "run")
    if held is None:
        pytest.skip("no fcntl here")
    try:
        with pytest.raises(OutputDirError, match="in use by another run"):
            teacher_mod.train_teacher(steps=2, batch_size=2, progress=False, checkpoint_dir=tmp_path / "run")
        with pytest.raises(SystemExit) as exc:
            teacher_mod.main(["--steps", "2", "--batch-size", "2", "--no-progress", "--checkpoint-dir",
                              str(tmp_path / "run"), "--out", str(tmp_path / "t.safetensors")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error: --checkpoint-dir: " in err[0] and "in use by another run" in err[0]
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written
    finally:
        held.close()


def test_module_cli_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher_mod, "train_teacher", interrupted)
    with pytest.raises(SystemExit) as exc:
        teacher_mod.main(["--out", str(tmp_path / "t.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and err.strip() == "python -m kdfast.train.teacher: interrupted"


SMALL = dict(base_channels=16, channel_mults=(1, 2), attention_heads=2)


def test_cfg_dropout_gives_the_null_class_to_that_share_of_labels(monkeypatch):
    # (a draw that was never applied left every training label conditional: no guidance)
    seen, real = [], teacher_mod.denoising_loss

    def spy(model, sched, images, labels, noise, t):
        seen.append(labels.clone())
        return real(model, sched, images, labels, noise, t)

    monkeypatch.setattr(teacher_mod, "denoising_loss", spy)
    train_teacher(steps=2, batch_size=256, cfg_dropout=0.5, progress=False, num_threads=1, model_config=SMALL)
    assert 0.4 < (torch.cat(seen) == 10).float().mean().item() < 0.6
    seen.clear()
    train_teacher(steps=1, batch_size=64, cfg_dropout=0.0, progress=False, num_threads=1, model_config=SMALL)
    assert not (torch.cat(seen) == 10).any()


def test_gradients_are_clipped_to_norm_1_at_every_step(monkeypatch):
    calls, real = [], torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train_teacher(steps=3, batch_size=8, progress=False, num_threads=1, model_config=SMALL)
    assert calls == [1.0, 1.0, 1.0]


def test_ema_keeps_the_decay_share_of_the_old_average():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = teacher_mod._EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.9, (1 + 1) / (10 + 1)) = 2 / 11 of the old average (0)
    assert ema.model.weight.item() == pytest.approx(9 / 11)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_loss_targets_the_noise_or_the_velocity(prediction_type):
    sched = DDIMScheduler.from_config(teacher_mod.noise_schedule_config(prediction_type))

    class Zero(torch.nn.Module):  # predicts 0: the loss is the target's mean square
        config = type("Config", (), {"prediction_type": prediction_type})()

        def forward(self, x, t, labels):
            return torch.zeros_like(x)

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1, torch.randn(8, 1, 16, 16, generator=gen)
    t = torch.tensor([0, 100, 300, 500, 700, 900, 950, 999])
    a = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    target = noise.double() if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    loss = teacher_mod.denoising_loss(Zero(), sched, x0, torch.zeros(8, dtype=torch.long), noise, t)
    assert loss.item() == pytest.approx(target.square().mean().item(), rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_zero_over_the_run(tmp_path):
    train_teacher(steps=20, batch_size=4, lr=1e-3, progress=False, num_threads=1, model_config=SMALL,
                  checkpoint_dir=tmp_path)  # warmup: min(100, 20 // 10) = 2 steps
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [1e-3 * (s + 1) / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 18))
                for s in range(20)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)
    assert records[-1]["lr"] > 0  # (the last step's, before the decay reaches 0)
