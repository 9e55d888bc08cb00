"""kvtier/cli/results.py: where results go, which commit ran, and up to which length HGA is dense."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import kvtier
from kvtier import HGAConfig
from kvtier.cli import main
from kvtier.cli.results import add_output_arguments, dense_tokens, output_file, source_commit
from kvtier.reference import hga_attention


@pytest.mark.parametrize(
    "cfg",
    [
        HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=3, top_groups=8),  # groups bind
        HGAConfig(chunk_size=8, group_size=4, sink_chunks=2, local_chunks=1, top_chunks=1, top_groups=8),  # chunks bind
        HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=1, top_chunks=4, top_groups=3),  # < 1 chunk
    ],
)
def test_dense_tokens_is_where_the_reference_starts_dropping_keys(cfg):
    limit = dense_tokens(cfg)
    g = torch.Generator().manual_seed(limit)
    for length, dense in ((limit, True), (limit + 1, False)):
        q, k, v = (torch.randn(1, 2, length, 8, generator=g) for _ in range(3))
        _, stats = hga_attention(q, k, v, config=cfg, rope_theta=1e4)
        assert (stats.density == 1.0) is dense, (length, stats.density)


def test_dense_tokens_of_the_defaults():
    assert dense_tokens(HGAConfig()) == 1216  # (1 sink + 2 local + 15 routed + 1 current) chunks of 64
    assert dense_tokens(HGAConfig.paper()) == 1216  # (2 sink + 8 local + 8 routed + 1 current)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_output_arguments(parser, "io")
    return parser.parse_args(list(argv))


def test_output_files_default_to_a_results_folder_and_follow_the_user():
    a = _args()
    assert output_file(a, "csv", "io") == Path("kvtier-results/io.csv")
    assert output_file(a, "png", "io") == Path("kvtier-results/io.png")
    a = _args("--out", "o", "--csv", "x/rows.csv", "--json", "")
    assert output_file(a, "csv", "io") == Path("x/rows.csv") and output_file(a, "json", "io") is None
    assert output_file(a, "png", "io") == Path("x/io.png")  # beside its CSV


def test_source_commit(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTIER_COMMIT", "abc1234")
    assert source_commit() == "abc1234"
    monkeypatch.delenv("KVTIER_COMMIT")
    # A copy of the package outside any checkout says so, instead of "unknown" or the cwd's commit.
    (tmp_path / "kvtier").mkdir()
    monkeypatch.setattr(kvtier, "__file__", str(tmp_path / "kvtier" / "__init__.py"))
    assert source_commit().startswith(f"none (kvtier {kvtier.__version__} not run from a git checkout")


def test_bench_io_writes_into_kvtier_results_and_tables_the_write_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "io", "--dir", "scratch", "--size", "1MiB", "--chunk-bytes", "128KiB", "--reps", "1",
            "--threads", "1", "--backend", "posix"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "kvtier-results" / "io.json").read_text())
    rows = list(csv.DictReader((tmp_path / "kvtier-results" / "io.csv").open()))
    assert rows and {r["bench"] for r in rows} == {"io"}
    assert "results: kvtier-results/io.csv (rows appended), kvtier-results/io.json, " in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "kvtier-results" / "io.png").read_bytes()[:4] == b"\x89PNG"
    write_line = next(line for line in out.splitlines() if line.startswith("| kvtier write"))
    assert f"| {res['write_GBps']:.2f} |" in write_line
    assert "ran on: GPU none | host slab pageable | O_DIRECT" in out and "GPUDirect Storage no" in out
