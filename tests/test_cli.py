"""The ``kvtier`` command line: command listing, one-line errors with exit status 2, the layering."""

import re
import subprocess
import sys

import pytest

from kvtier.cli import main
from kvtier.cli.args import format_tokens, hga_overrides, token_counts
from kvtier.config import HGAConfig


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "eval", "stress", "bench io", "bench attention"):
        assert f"  {name} " in out


def test_bench_alone_lists_its_subcommands(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "usage: kvtier bench COMMAND" in out and "  io " in out and "  attention " in out
    assert "demo" not in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["frobnicate"], "kvtier: expected a command, one of bench, demo, eval, stress, got 'frobnicate'"),
        (["bench", "frob"], "kvtier bench: expected a command, one of"),
        (["bench", "io", "--size", "2GB_", "--dir", "{tmp}"], "kvtier bench io: --size: expected a byte count"),
        (["bench", "io", "--chunk-bytes", "6000", "--dir", "{tmp}"], "kvtier bench io: --chunk-bytes: expected a multiple of 4096"),
        (["bench", "io", "--threads", "0", "--dir", "{tmp}"], "kvtier bench io: --threads: expected an integer >= 1, got 0"),
        (["bench", "io", "--backend", "nvme", "--dir", "{tmp}"], "kvtier bench io: --backend: expected one of"),
        (["bench", "io"], "kvtier bench io: expected --dir, got none"),
        (["bench", "attention", "--contexts", "8Q"], "kvtier bench attention: --contexts: expected token counts"),
        (["bench", "attention", "--heads", "32,7,128"], "kvtier bench attention: --heads: expected KV heads dividing"),
        (["stress", "--seconds", "-1"], "kvtier stress: --seconds: expected a number > 0, got -1"),
        (["stress", "--fault-rate", "2"], "kvtier stress: --fault-rate: expected a fraction in [0, 1], got 2"),
        (["stress", "--bogus"], "kvtier stress: expected no further arguments (see --help), got --bogus"),
        (["demo", "--tokens", "zero"], "kvtier demo: --tokens: expected an integer >= 1, got 'zero'"),
        (["demo", "--kv-heads", "3"], "kvtier demo: --kv-heads: expected a divisor of --q-heads=8, got 3"),
        (["demo", "--host-bytes", "lots"], "kvtier demo: --host-bytes: expected a byte count"),
        (["eval", "--methods", "hga,magic"], "kvtier eval: --methods: expected one of dense, hga, quest, oracle or hga-"),
        (["eval", "--lengths", "2K"], "kvtier eval: --lengths: expected comma-separated integers, got '2K'"),
        (["eval", "--budget", "710"], "kvtier eval: --budget: expected the windows plus a multiple"),
        (["eval", "--depths", "0.5,3"], "kvtier eval: --depths: expected comma-separated fractions"),
        (["eval", "--budgets", "2048,3"], "kvtier eval: --budgets: expected at least the windows' 256 keys"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, expected, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path / "d")) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), captured.err
    assert "expected" in lines[0] and ", got " in lines[0]
    assert not (tmp_path / "d").exists()  # nothing was created before the arguments were checked


def test_console_entry_point_prints_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "kvtier", "bench", "io", "--size", "2GB_", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "kvtier bench io: --size: expected a byte count like '4GiB' or '512MB', got '2GB_'"


def test_token_labels():
    assert [format_tokens(n) for n in (256, 720, 1536, 8192, 2**20, 12345)] == ["256", "720", "1.5K", "8K", "1M", "12345"]
    assert token_counts("8K, 256,1M") == [8192, 256, 2**20]


def test_synthetic_demo_runs_and_reports_exactness(capsys):
    assert main(["demo", "--synthetic", "--tokens", "300", "--q-heads", "4", "--kv-heads", "2"]) == 0
    out = capsys.readouterr().out
    full = next(line for line in out.splitlines() if line.startswith("full coverage"))
    assert float(full.split()[-2]) < 1e-5  # max relative error against dense
    # 300 tokens are inside the windows and budgets: the "HGA" row is dense and must say so.
    assert "paper defaults (= dense here)" in out and "IS dense attention" in out


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


def test_hga_overrides_presets_and_keys():
    base = HGAConfig(top_chunks=8)
    assert hga_overrides("", base) == base
    assert hga_overrides("top_groups=24, chunk_score=sum", base) == HGAConfig(top_chunks=8, top_groups=24,
                                                                              chunk_score="sum")
    assert hga_overrides("paper", base) == HGAConfig.paper()
    assert hga_overrides("lean,top_chunks=24", base) == HGAConfig.lean(top_chunks=24)
    assert hga_overrides("default,local_chunks=6", base) == HGAConfig(local_chunks=6)
    assert hga_overrides("group_merge=rank", base) == HGAConfig(top_chunks=8, group_merge="rank")
    for text, message in [
        ("fast", "--hga: expected a preset among ['default', 'lean', 'paper'] or key=value, got 'fast'"),
        ("top_chunks=8,paper", "--hga: expected key=value with keys among"),
        ("top_chunks=many", "--hga: expected a number for top_chunks, got 'many'"),
        ("group_score=max", "--hga: HGAConfig.group_score: expected one of"),
        ("group_merge=borda", "--hga: HGAConfig.group_merge: expected one of ('split', 'rank'), got 'borda'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            hga_overrides(text, base)
