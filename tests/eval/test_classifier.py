import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from kdfast.datasets import load_digits  # noqa: E402
from kdfast.eval import (SHIPPED_PATH, ClassifierAssetError, DigitsClassifier, load_classifier,  # noqa: E402
                         save_classifier, train_classifier)
from kdfast.eval.classifier import metadata_path, random_shift  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    return load_classifier()


def test_shipped_classifier_loads_and_is_accurate(shipped):
    assert isinstance(shipped, DigitsClassifier) and not shipped.training
    x, y = load_digits("heldout", size=16)
    with torch.no_grad():
        logits, feats = shipped(x), shipped.features(x)
    assert logits.shape == (len(x), 10) and feats.shape == (len(x), shipped.config["feature_dim"])
    accuracy = (logits.argmax(1) == y).double().mean().item()
    assert accuracy >= 0.97
    # the asset is small and its JSON records the architecture and what was measured
    assert SHIPPED_PATH.stat().st_size < 1_000_000
    info = json.loads(metadata_path(SHIPPED_PATH).read_text())
    assert info["config"]["feature_dim"] == shipped.config["feature_dim"]
    assert info["metrics"]["heldout_accuracy"] >= 0.97
    assert abs(info["metrics"]["heldout_accuracy"] - accuracy) <= 2 / len(x)  # float differences across machines
    assert 0 < info["metrics"]["real_vs_real_frechet_floor"] < 10


def test_tiny_training_run_returns_a_model_and_is_seeded():
    model, metrics = train_classifier(epochs=1, seed=3, progress=False, feature_dim=32)
    assert isinstance(model, DigitsClassifier) and not model.training
    assert model.config["feature_dim"] == 32
    assert set(metrics) >= {"heldout_accuracy", "train_accuracy", "final_loss", "train_seconds"}
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0 and metrics["epochs"] == 1
    torch.manual_seed(12345)
    caller_state = torch.get_rng_state()
    again, _ = train_classifier(epochs=1, seed=3, progress=False, feature_dim=32)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    # seeded from a forked global RNG: the caller's state is left as it was (it was reseeded to 3)
    assert torch.equal(torch.get_rng_state(), caller_state)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(epochs=0)


def test_save_load_round_trip(tmp_path, shipped):
    path = save_classifier(shipped, tmp_path / "clf.safetensors", {"heldout_accuracy": 1.0})
    # the same weights give the same bytes (the SHA-256 in the JSON depends on it)
    assert save_classifier(shipped, tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    info = json.loads((tmp_path / "clf.json").read_text())
    assert info["metrics"] == {"heldout_accuracy": 1.0} and info["bytes"] == path.stat().st_size
    loaded = load_classifier(path)
    x = load_digits("heldout", size=16)[0][:32]
    with torch.no_grad():
        assert torch.equal(loaded(x), shipped(x))
    # the weights file alone is enough: the config also lives in its metadata
    (tmp_path / "clf.json").unlink()
    assert load_classifier(path).config == shipped.config
    with pytest.raises(TypeError, match="model"):
        save_classifier(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_corrupt_or_missing_asset_raises_a_clear_error(tmp_path, shipped):
    path = save_classifier(shipped, tmp_path / "clf.safetensors")
    data = path.read_bytes()

    # a flipped byte is caught by the SHA-256 the JSON records
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ClassifierAssetError, match="corrupt"):
        load_classifier(path)

    # without the JSON, bad bytes are caught by the safetensors reader
    metadata_path(path).unlink()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClassifierAssetError, match="not a readable safetensors file"):
        load_classifier(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ClassifierAssetError, match="not a readable safetensors file"):
        load_classifier(path)

    metadata_path(path).write_text("{broken")
    with pytest.raises(ClassifierAssetError, match="not valid JSON"):
        load_classifier(path)
    with pytest.raises(ClassifierAssetError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")

    # weights of another architecture under a config that does not fit them
    from safetensors.torch import save_file
    small = DigitsClassifier(feature_dim=16)
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    save_file(state, str(tmp_path / "mismatch.safetensors"), metadata={"config": json.dumps(shipped.config)})
    with pytest.raises(ClassifierAssetError, match="does not match its architecture"):
        load_classifier(tmp_path / "mismatch.safetensors")


def test_random_shift_moves_digits_and_pads_with_background():
    gen = torch.Generator().manual_seed(0)
    x = load_digits("heldout", size=16)[0][:64]
    assert torch.equal(random_shift(x, 0, gen), x)
    shifted = random_shift(x, 2, gen)
    assert shifted.shape == x.shape and shifted.min() >= -1 and shifted.max() <= 1
    # every output is some shift of its input within +-2 pixels, padded with -1
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for img, src in zip(shifted, padded):
        assert any(torch.equal(img[0], src[0, dy:dy + 16, dx:dx + 16]) for dy in range(5) for dx in range(5))


def test_weights_path_ending_in_json_is_refused(tmp_path, shipped):
    # metadata_path("x.json") is "x.json": the JSON would silently overwrite the weights
    for name in ("x.json", "x.Json"):
        with pytest.raises(ValueError, match="must not end in .json"):
            save_classifier(shipped, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_unusable_out_is_refused_before_training(tmp_path, monkeypatch):
    import kdfast.eval.classifier as classifier
    from kdfast.train.run import OutputDirError

    monkeypatch.setattr(classifier, "train_classifier", lambda **k: pytest.fail("trained before checking the path"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="cannot be written"):
        classifier.build_shipped_asset(blocker / "c.safetensors", progress=False)
    with pytest.raises(ValueError, match="must not end in .json"):
        classifier.build_shipped_asset(tmp_path / "c.json", progress=False)
    (tmp_path / "d.json").mkdir()  # where d.safetensors' JSON goes: found before the training
    with pytest.raises(OutputDirError, match=r"metadata file .*d.json' is not writable: it is an existing folder"):
        classifier.build_shipped_asset(tmp_path / "d.safetensors", progress=False)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: the seed must be an integer in [0, 2**63 - 1], got -1"),
    (["--seed", "99999999999999999999999"], "argument --seed: the seed must be an integer in [0, 2**63 - 1]"),
    (["--out", "{blocker}/c.safetensors"], "error: --out: classifier weights file"),
    (["--out", "{tmp}/c.json"], "must not end in .json"),
    (["--out", "{tmp}/folder.safetensors"], "error: --out: classifier metadata file"),  # folder.json is a folder
])
def test_module_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    import kdfast.eval.__main__ as cli

    monkeypatch.setattr(cli, "build_shipped_asset", lambda *a, **k: pytest.fail("trained despite a bad argument"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "folder.json").mkdir()
    argv = [a.format(blocker=blocker, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_training_progress_bar_only_on_a_terminal(capsys):
    train_classifier(epochs=1, seed=0, progress=True, feature_dim=8, channels=(4, 4))
    captured = capsys.readouterr()  # stderr is not a terminal here: no carriage-return bar in logs
    assert "digits classifier" not in captured.err and captured.out == ""


def test_an_interrupted_save_leaves_the_previous_pair(tmp_path, shipped, monkeypatch):
    import pathlib

    import kdfast.eval.classifier as classifier

    path = save_classifier(shipped, tmp_path / "c.safetensors", {"heldout_accuracy": 1.0})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = DigitsClassifier(**shipped.config)
    other.load_state_dict(shipped.state_dict())
    with torch.no_grad():
        other.head.bias.add_(1.0)

    def half_then_interrupt(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[:len(data) // 2])
        raise KeyboardInterrupt("Ctrl-C while writing the JSON")

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_text", half_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            save_classifier(other, path)
    with monkeypatch.context() as m:
        def disk_full(tensors, filename, metadata=None):
            pathlib.Path(filename).write_bytes(b"partial")
            raise OSError("disk full")

        m.setattr("safetensors.torch.save_file", disk_full)
        with pytest.raises(OSError, match="disk full"):
            save_classifier(other, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary files either
    assert torch.equal(load_classifier(path).head.bias, shipped.head.bias)
    save_classifier(other, path)
    assert torch.equal(classifier.load_classifier(path).head.bias, other.head.bias)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=1.5), "epochs must be a positive integer, got 1.5"),
    (dict(batch_size=1), "batch_size must be an integer >= 2, got 1"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(max_shift=0.5), "max_shift must be an integer >= 0, got 0.5"),
    (dict(lr=float("inf")), "lr must be a finite number >= 0.0, got inf"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0.0, got nan"),
])
def test_training_numbers_are_checked_not_truncated(kwargs, message):
    from kdfast.eval.classifier import train_classifier

    with pytest.raises(ValueError) as exc:
        train_classifier(**kwargs, progress=False)
    assert message in str(exc.value)


def test_module_cli_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    import kdfast.eval.__main__ as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_shipped_asset", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", str(tmp_path / "c.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and err.strip() == "python -m kdfast.eval: interrupted"


@pytest.mark.parametrize("kwargs, message", [
    (dict(dropout=True), "dropout must be a real number, got True"),  # was Dropout(p=True)
    (dict(dropout=float("nan")), "dropout must be a finite number in [0.0, 1.0), got nan"),
    (dict(dropout="0.1"), "dropout must be a real number, got '0.1'"),
    (dict(dropout=1.0), "dropout must be a finite number in [0.0, 1.0), got 1.0"),
    (dict(channels=(8.5, 16)), "channels[0] must be a positive integer, got 8.5"),  # was (8, 16)
    (dict(channels=(0, 16)), "channels[0] must be a positive integer, got 0"),
    (dict(channels=(8, True)), "channels[1] must be a positive integer, got True"),
    (dict(channels=(8,)), "channels must be a sequence of 2 positive integers"),
    (dict(channels=(8, 16, 32)), "channels must be a sequence of 2 positive integers"),
    (dict(channels="ab"), "channels must be a sequence of 2 positive integers"),
    (dict(channels=8), "channels must be a sequence of 2 positive integers"),
    (dict(feature_dim=0), "feature_dim must be a positive integer, got 0"),
    (dict(feature_dim=True), "feature_dim must be a positive integer, got True"),
    (dict(feature_dim=8.5), "feature_dim must be a positive integer, got 8.5"),
    (dict(feature_dim="8"), "feature_dim must be a positive integer, got '8'"),
    (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
    (dict(num_classes=False), "num_classes must be a positive integer, got False"),
    (dict(num_classes=2.5), "num_classes must be a positive integer, got 2.5"),
])
def test_classifier_settings_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError) as exc:
        DigitsClassifier(**kwargs)
    assert message in str(exc.value)


def test_classifier_settings_take_whole_numbers():
    model = DigitsClassifier(channels=[4.0, 8], feature_dim=16.0, dropout=0, num_classes=10.0)
    assert model.config == {"channels": (4, 8), "feature_dim": 16, "dropout": 0.0, "num_classes": 10,
                            "image_size": 16}
    assert all(type(v) is int for v in (*model.config["channels"], model.config["feature_dim"]))


@pytest.mark.parametrize("call, error, message", [
    (lambda tmp, m: load_classifier(123), TypeError, "path must be a str or os.PathLike, got int"),
    (lambda tmp, m: load_classifier(b"clf.safetensors"), TypeError, "path must be a str or os.PathLike, got bytes"),
    (lambda tmp, m: load_classifier(device=True), TypeError, "device must be a str or torch.device"),
    (lambda tmp, m: load_classifier(device="bogus"), ValueError, "device must be a device such as 'cpu'"),
    (lambda tmp, m: save_classifier(m, None), TypeError, "path must be a str or os.PathLike, got NoneType"),
    (lambda tmp, m: save_classifier(m, 123), TypeError, "path must be a str or os.PathLike, got int"),
    (lambda tmp, m: save_classifier(m, tmp / "c.safetensors", "abc"), TypeError,
     "metrics must be a dict (or None), got str"),
    (lambda tmp, m: save_classifier(m, tmp / "c.safetensors", [("a", 1.0)]), TypeError,
     "metrics must be a dict (or None), got list"),
    (lambda tmp, m: save_classifier(m, tmp / "c.safetensors", {"a": torch.ones(2)}), TypeError,
     "metrics['a'] must be a number, string, bool, None, list or dict; got a tensor of shape (2,)"),
    (lambda tmp, m: save_classifier(m, tmp / "c.safetensors", {"a": {"b": object()}}), TypeError,
     "metrics['a']['b'] must be a number, string, bool, None, list or dict"),
    (lambda tmp, m: save_classifier(m, tmp / "c.safetensors", {"a": torch.tensor(1j)}), TypeError,
     "metrics['a'] must be a number, string, bool, None, list or dict"),
    (lambda tmp, m: save_classifier(m, tmp / "c.safetensors", {1: 0.5}), TypeError,
     "metrics keys must be strings (JSON object keys), got 1"),
])
def test_file_arguments_are_checked_by_name(tmp_path, call, error, message):
    model = DigitsClassifier(channels=(4, 4), feature_dim=8)
    with pytest.raises(error) as exc:
        call(tmp_path, model)
    assert message in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_metrics_of_tensors_and_numpy_scalars_are_saved_as_numbers(tmp_path):
    import numpy as np

    model = DigitsClassifier(channels=(4, 4), feature_dim=8)
    metrics = {"accuracy": torch.tensor(0.5), "count": np.int64(3), "loss": np.float32(0.25),
               "nested": {"flags": [np.bool_(True), torch.tensor(2)]}, "note": "x", "none": None}
    save_classifier(model, tmp_path / "c.safetensors", metrics)
    saved = json.loads((tmp_path / "c.json").read_text())["metrics"]
    assert saved == {"accuracy": 0.5, "count": 3, "loss": 0.25, "nested": {"flags": [True, 2]}, "note": "x",
                     "none": None}
    assert type(saved["count"]) is int and type(saved["accuracy"]) is float
    assert load_classifier(tmp_path / "c.safetensors").config == model.config


def test_accuracies_are_measured_on_their_own_splits():
    from kdfast.eval.classifier import IMAGE_SIZE, _accuracy
    model, metrics = train_classifier(epochs=1, seed=3, progress=False, feature_dim=32)
    assert metrics["heldout_accuracy"] == _accuracy(model, *load_digits("heldout", size=IMAGE_SIZE))
    assert metrics["train_accuracy"] == _accuracy(model, *load_digits("train", size=IMAGE_SIZE))
    assert metrics["heldout_accuracy"] != metrics["train_accuracy"]
