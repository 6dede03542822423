import subprocess
import sys

import kdfast
from kdfast.cli import info, main


def test_info_reports_builds_and_backend_reasons():
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


def test_main_rejects_unknown_command(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_optional_dependency_is_a_one_line_error(monkeypatch, capsys):
    # Without the [demo] extra the command names what to install instead of a traceback.
    import kdfast.demo

    def needs_sklearn(**kwargs):
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn")

    monkeypatch.setattr(kdfast.demo, "run_demo", needs_sklearn)
    assert main(["demo", "--quick", "--no-anchor", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kdfast demo: error: the digits data needs scikit-learn: pip install scikit-learn"]
