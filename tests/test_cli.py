import os
import subprocess
import sys
import time

import pytest

import kdfast
from kdfast.cli import info, main


def test_info_reports_builds_and_backend_reasons(unemulated_backends):
    text = info()
    assert f"kdfast {kdfast.__version__}" in text
    assert "kdfast._C (CPU kernels): built" in text
    assert "kdfast._C_cuda" in text
    # every op is listed with each backend's status and the chosen one
    assert "solver_step:" in text and "threshold_scale:" in text
    assert "-> chosen: cpu" in text
    assert "cuda backend runs on CUDA tensors" in text


def test_python_dash_m_kdfast_info(tmp_path):
    # From another directory: `python -m` puts the working directory first on sys.path.
    out = subprocess.run([sys.executable, "-m", "kdfast", "info"], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert "backends for cpu tensors" in out.stdout


def test_info_into_a_closed_pipe_is_quiet(tmp_path):
    # `kdfast info | head -1` printed a BrokenPipeError traceback
    read_end, write_end = os.pipe()
    os.close(read_end)  # (the reader has gone before anything is written)
    try:
        writer = subprocess.run([sys.executable, "-m", "kdfast", "info"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert writer.stderr == "" and writer.returncode == 141, (writer.returncode, writer.stderr)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_info_into_a_full_device_is_one_line(tmp_path):
    # (`kdfast info > /dev/full` printed an OSError traceback)
    with open("/dev/full", "w") as full:
        writer = subprocess.run([sys.executable, "-m", "kdfast", "info"], stdout=full, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path)
    assert writer.returncode == 1
    assert writer.stderr.strip().splitlines() == ["kdfast info: error: [Errno 28] No space left on device"]


@pytest.mark.parametrize("command", [["demo", "--quick"], ["assets", "build", "--quick"]])
def test_an_empty_out_is_a_usage_error(tmp_path, capsys, monkeypatch, command):
    # (it wrote into the current folder and then named files at the file system's root)
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--out", ""]) == 2
    assert "argument --out: must name a folder, got ''" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_backend_that_cannot_run_is_a_one_line_error(tmp_path):
    # (KDFAST_BACKEND=bogus made the demo end in a traceback)
    run = subprocess.run([sys.executable, "-m", "kdfast", "demo", "--quick", "--no-anchor", "--no-progress", "--out",
                          str(tmp_path / "d")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "KDFAST_BACKEND": "bogus"})
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(err) == 1 and err[0].startswith("kdfast demo: error: backend 'bogus'"), err


def test_main_rejects_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdfast: error: argument command: invalid choice: 'frobnicate'")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])  # help still exits (status 0)
    assert exc.value.code == 0


def test_missing_optional_dependency_is_a_one_line_error(monkeypatch, capsys):
    # Without the [demo] extra the command names what to install instead of a traceback.
    import kdfast.demo

    def needs_sklearn(**kwargs):
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn")

    monkeypatch.setattr(kdfast.demo, "run_demo", needs_sklearn)
    assert main(["demo", "--quick", "--no-anchor", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kdfast demo: error: the digits data needs scikit-learn: pip install scikit-learn"]


@pytest.mark.parametrize("command, target", [(["demo", "--quick"], "kdfast.demo.run_demo"),
                                             (["assets", "build", "--quick"], "kdfast.assets_build.build_assets")])
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_is_one_line_and_the_shells_status(tmp_path, capsys, monkeypatch, command, target,
                                                             signal_name):
    import signal
    if signal_name == "SIGTERM" and os.name == "nt":
        pytest.skip("no SIGTERM handlers here")

    def interrupted(**kwargs):
        if signal_name == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # (killed the process, with no message and no clean-up)
        time.sleep(5)

    monkeypatch.setattr(target, interrupted)
    try:
        rc = main([*command, "--no-progress", "--out", str(tmp_path / "o")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main: Python prints its traceback")
    assert rc == (130 if signal_name == "SIGINT" else 143)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kdfast {command[0]}: {'interrupted' if signal_name == 'SIGINT' else 'terminated'}"]


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999", "9223372036854775808"])
def test_demo_refuses_an_out_of_range_seed_as_a_usage_error(tmp_path, capsys, monkeypatch, seed):
    import kdfast.demo

    monkeypatch.setattr(kdfast.demo, "run_demo", lambda **kwargs: pytest.fail("ran with a bad seed"))
    assert main(["demo", "--quick", "--seed", seed, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kdfast demo: error: argument --seed: the seed must be an integer in [0, 2**63 - 1], got {seed} "
                   "(see kdfast demo --help)"]


@pytest.mark.parametrize("where", ["triton", "kernels"])
def test_a_triton_that_fails_to_import_is_reported_not_fatal(tmp_path, where):
    # A broken install raising something other than ImportError (a driver library it cannot
    # load) made `kdfast info` end in a traceback: the triton backend is unusable, with the reason.
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    if where == "triton":
        (fake / "__init__.py").write_text('raise RuntimeError("libcuda.so cannot be loaded")\n')
    else:  # imports, then fails while kdfast.kernels defines its kernels
        (fake / "__init__.py").write_text('__version__ = "3.9.0"\n\n\ndef __getattr__(name):\n'
                                          '    raise RuntimeError("libcuda.so cannot be loaded")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    run = subprocess.run([sys.executable, "-m", "kdfast", "info"], capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert "RuntimeError: libcuda.so cannot be loaded" in run.stdout
    code = ("import torch, kdfast; from kdfast import ops;"
            "print(ops.solver_step(torch.ones(1, 4), torch.ones(1, 4),"
            " torch.tensor(ops.coefficients(0.0, 1.0, sample={'x': 2.0}))).sample.tolist())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "[[2.0, 2.0, 2.0, 2.0]]", run.stderr


def test_the_test_suite_refuses_to_run_without_kernels_an_installed_triton_cannot_load(tmp_path):
    # kdfast leaves such a triton's backend unusable; the tests must not skip every Triton case for it
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "3.9.0"\n\n\ndef __getattr__(name):\n'
                                      '    raise RuntimeError("libcuda.so cannot be loaded")\n')
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                          os.path.join(tests, "test_switches.py")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")})
    assert run.returncode == 4, run.stdout + run.stderr  # pytest's usage error
    assert "the Triton kernels do not load" in run.stdout + run.stderr


def test_demo_passes_its_options_on(tmp_path, monkeypatch):
    from kdfast.demo import DemoError

    got = {}

    def spy(**kwargs):
        got.update(kwargs)
        raise DemoError("stopped by the test")

    monkeypatch.setattr("kdfast.demo.run_demo", spy)
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--seed", "7", "--guidance", "2.5",
                 "--no-progress"]) == 2
    assert got["seed"] == 7 and got["guidance_scale"] == 2.5 and got["out"] == str(tmp_path / "d")
