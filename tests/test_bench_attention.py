"""`kvtier bench attention --smoke` runs every path once at a tiny size (CPU interpreter in CI)."""

from __future__ import annotations

import csv

from kvtier.cli import main


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
        ("prefill64", "hga_kernels"),
        ("decode_stage", "hga_host_steady_attend"),
    ]:
        assert want in ops, want
    assert "| B | context |" in capsys.readouterr().out
