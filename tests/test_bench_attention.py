"""`kvtier bench attention --smoke` runs every path once at a tiny size (CPU interpreter in CI)."""

from __future__ import annotations

import csv
import importlib.util

import torch

from kvtier.cli import bench_attention, main


def test_bench_attention_smoke(tmp_path, capsys):
    out = tmp_path / "attention.csv"
    assert main(["bench", "attention", "--smoke", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    ops = {(r["op"], r["impl"]) for r in rows}
    for want in [
        ("decode", "sdpa"),
        ("decode", "hga_host_cold"),
        ("decode", "hga_host_steady"),
        ("gather", "triton_zero_copy"),
        ("prefill16", "hga_kernels"),  # a smoke block is one chunk of queries
        ("decode_stage", "hga_host_steady_attend"),
    ]:
        assert want in ops, want
    text = capsys.readouterr().out
    assert "| B | context |" in text and "| 1 | 256 |" in text  # 256 tokens, not "0K"
    if not torch.cuda.is_available():  # the header says what ran, not what a GPU run would do
        assert "Triton interpreter" in text and "no CUDA graphs" in text and "pageable" in text
        assert "pinned host slab" not in text
    assert f"results: {out} (rows appended), " in text
    if importlib.util.find_spec("matplotlib"):  # the plot goes beside the CSV
        assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"


def test_smoke_without_the_interpreter_reruns_itself_with_it(tmp_path, monkeypatch, capsys):
    """Triton reads TRITON_INTERPRET at import, so a CPU smoke run restarts in a child that has it."""
    calls = []

    def fake_run(argv, env, check):
        calls.append((argv, env))

        class Done:
            returncode = 0

        return Done()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(bench_attention.subprocess, "run", fake_run)
    assert main(["bench", "attention", "--smoke", "--out", str(tmp_path)]) == 0
    (argv, env), = calls
    assert argv[1:] == ["-m", "kvtier", "bench", "attention", "--smoke", "--out", str(tmp_path)]
    assert env["TRITON_INTERPRET"] == "1"
    assert "Triton's CPU interpreter" in capsys.readouterr().out
    # A routing option goes with it (the smoke run with one takes ~20 s on the interpreter).
    hga = "chunk_score=running_max+sum,group_score=bound"
    assert main(["bench", "attention", "--smoke", "--out", str(tmp_path), "--hga", hga]) == 0
    assert calls[1][0][-2:] == ["--hga", hga]


def test_bad_routing_option_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "attention", "--smoke", "--hga", "chunk_score=running_sum"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvtier bench attention: --hga: HGAConfig.chunk_score: expected one of") and "\n" not in err
    assert main(["bench", "attention", "--smoke", "--hga", "top_chunk=3"]) == 2
    assert "--hga: expected key=value with keys among" in capsys.readouterr().err


def test_full_sweep_without_a_gpu_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "attention"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kvtier bench attention: expected a CUDA GPU (or --smoke, which runs anywhere), got none")
