import subprocess
import sys

import pytest

from kvtier.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_synthetic_demo_runs_and_reports_exactness(capsys):
    assert main(["demo", "--synthetic", "--tokens", "300", "--q-heads", "4", "--kv-heads", "2"]) == 0
    out = capsys.readouterr().out
    full = next(line for line in out.splitlines() if line.startswith("full coverage"))
    assert float(full.split()[-2]) < 1e-5  # max relative error against dense


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "kvtier", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout
