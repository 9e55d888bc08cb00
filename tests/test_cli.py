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


def test_library_never_imports_the_commands():
    """Imports go one way: kvtier/cli uses the library, nothing outside kvtier/cli imports it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "kvtier").rglob("*.py"), *(root / "kernels").rglob("*.py")]:
        rel = path.relative_to(root)
        if rel.parts[:2] == ("kvtier", "cli") or rel == Path("kvtier/__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{rel}: {n}" for n in names if n == "kvtier.cli" or n.startswith("kvtier.cli.")]
    assert not offenders, offenders
