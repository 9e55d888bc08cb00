"""`kvtier bench decode`: the smoke run writes the rows and columns it promises, with sane values."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

import kvtier.cli.bench_decode as bench_decode
from kvtier.cli.results import CSV_COLUMNS
from kvtier.cli import main

SMOKE_CONTEXTS = (64, 160, 256)


@pytest.fixture
def passive(monkeypatch):
    # In-process run: the re-run child is tested on its own below.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_smoke_rows_columns_and_values(tmp_path, passive, capsys):
    assert main(["bench", "decode", "--smoke", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "decode.csv")
    assert rows and list(rows[0]) == list(CSV_COLUMNS)
    assert {r["bench"] for r in rows} == {"decode"}

    def one(mode, op, metric, ctx):
        got = [r for r in rows if (r["impl"], r["op"], r["metric"], int(r["x_value"])) == (mode, op, metric, ctx)]
        assert len(got) == 1, (mode, op, metric, ctx, len(got))
        return got[0]

    cuda = torch.cuda.is_available()
    measured = ("hga", "dense", "offload") if cuda else ("hga", "dense")
    tokens_before = {}
    for mode in measured:
        for ctx in SMOKE_CONTEXTS:
            wall = one(mode, "decode_step", "wall_ms", ctx)
            p20, p50, p80 = (float(wall[k]) for k in ("p20", "p50", "p80"))
            assert 0 < p20 <= p50 <= p80 < 60_000
            assert float(one(mode, "decode_step", "cpu_ms", ctx)["p50"]) > 0
            tps = float(one(mode, "decode_step", "tokens_per_s", ctx)["p50"])
            assert tps == pytest.approx(1000.0 / p50, rel=1e-6)
            conf = json.loads(wall["config_json"])
            assert conf["batch"] == 1 and conf["random_weights"] is True and conf["omp_wait_policy"] == "PASSIVE"
            # Contexts run in order on one cache: prefill reached ctx, earlier steps' tokens included.
            assert ctx <= conf["tokens"] <= ctx + 3 * (conf["steps"] + conf["warmup"])
            tokens_before.setdefault(mode, []).append(conf["tokens"])
            assert float(one(mode, "prefill", "cpu_ms_per_token", ctx)["p50"]) > 0
            assert float(one(mode, "memory", "peak_bytes", ctx)["p50"]) > 0
        assert tokens_before[mode] == sorted(tokens_before[mode])
    # HGA reports where its reads came from; the smoke's tiny device tier cannot hold every chunk.
    for ctx in SMOKE_CONTEXTS:
        host = float(one("hga", "read_per_step", "host_bytes", ctx)["p50"])
        device = float(one("hga", "read_per_step", "device_bytes", ctx)["p50"])
        assert host >= 0 and device >= 0
        # The engine's torch-ops path keeps no device group cache: then there is no hit-rate row.
        rates = [float(r["p50"]) for r in rows if (r["impl"], r["metric"], int(r["x_value"])) == ("hga", "device_hit_rate", ctx)]
        assert len(rates) <= 1 and all(0.0 <= x <= 1.0 for x in rates)
    assert float(one("hga", "read_per_step", "host_bytes", 256)["p50"]) + float(
        one("hga", "read_per_step", "device_bytes", 256)["p50"]) > 0
    if not cuda:
        skipped = [r for r in rows if r["impl"] == "offload"]
        assert {(r["op"], r["metric"]) for r in skipped} == {("status", "skipped")}
        assert len(skipped) == len(SMOKE_CONTEXTS)
        assert "needs CUDA" in json.loads(skipped[0]["config_json"])["reason"]
    report = (tmp_path / "decode.md").read_text()
    assert "OMP_WAIT_POLICY=PASSIVE" in report and "RANDOM" in report and "torch " in report
    assert report.count("\n| 1 | ") == 3 * len(SMOKE_CONTEXTS)
    printed = capsys.readouterr().out
    assert "| B | context | mode |" in printed
    if _has_matplotlib():
        assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contexts", "4X"], "--contexts"),
        (["--modes", "hga,sparse"], "--modes"),
        (["--steps", "0"], "--steps"),
        (["--hga", "top_chunks"], "--hga"),
        (["--hga", "group_score=max"], "--hga: HGAConfig.group_score: expected one of"),
        (["--model", "/nonexistent/model"], "--model"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, passive, capsys):
    assert main(["bench", "decode", "--smoke", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvtier bench decode: ") and message in err and "\n" not in err


@pytest.mark.parametrize("argv", [["--hga", "foo=1"], ["--max-context", "dense=zz"]])
def test_bad_arguments_are_one_line_before_any_rerun(argv, monkeypatch, capsys):
    """Without PASSIVE the command re-runs itself; a bad argument must still be one line, no child."""
    import subprocess

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("re-ran despite a bad argument"))
    assert main(["bench", "decode", "--smoke", *argv]) == 2
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtier bench decode: ")


def test_reruns_itself_with_passive_omp_and_the_same_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    calls = []

    class Done:
        returncode = 7

    def fake_run(cmd, env, check):
        calls.append((cmd, env))
        return Done()

    monkeypatch.setattr(bench_decode.subprocess, "run", fake_run)
    assert main(["bench", "decode", "--smoke", "--out", str(tmp_path), "--contexts", "1K,2K"]) == 7
    (cmd, env), = calls
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and cmd[-2:] == ["-m", "kvtier.cli.bench_decode"]
    seen = []
    monkeypatch.setattr(bench_decode, "bench_decode", lambda args: seen.append(args) or 0)
    monkeypatch.setattr(os, "environ", env)
    assert bench_decode._child_main() == 0
    args = seen[0]
    assert args.out == tmp_path and args.contexts == [1024, 2048] and args.smoke is True and args.disk_dir is None
