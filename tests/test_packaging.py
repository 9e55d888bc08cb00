"""The installed wheel must carry the kernels (top-level kernels/ -> kvtier.kernels) and the data."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_and_data(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("kvtier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert kernel_files and {f"kvtier/kernels/{n}" for n in kernel_files} <= names
    assert "kvtier/data/essay.txt" in names and "kvtier/py.typed" in names
    assert any(n.startswith("kvtier/tiers/") for n in names) and "kvtier/reference/hga.py" in names
    assert {"kvtier/cli/__init__.py", "kvtier/cli/demo.py", "kvtier/cli/results.py"} <= names
    # Every shipped folder is declared: setuptools warns "Package ... is absent" otherwise.
    assert "is absent from the" not in res.stdout + res.stderr
