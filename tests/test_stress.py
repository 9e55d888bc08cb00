"""``kvtier stress`` smoke run: faults are injected and every invariant holds."""

from __future__ import annotations

import json


from kvtier.cli import main
from kvtier.cli.stress import process_trials, stress


def test_stress_short_run_holds_every_invariant(tmp_path) -> None:
    report = stress(tmp_path, seconds=2.0, seed=3, progress=False)
    assert report["ops"] > 200 and report["bytes_verified"] > 0
    assert report["faults_injected"] > 10 and report["crashes"] + report["reopens"] > 0
    assert report["mismatches"] == 0
    assert report["budget_violations"] == 0
    assert report["unexpected_misses"] == 0
    assert list(tmp_path.iterdir()) == []  # its files are removed


def test_stress_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert (
        main(
            ["stress", "--seconds", "0.5", "--dir", str(tmp_path / "d"), "--json", str(out), "--no-progress"]
        )
        == 0
    )
    report = json.loads(out.read_text())
    for key in ("ops", "bytes_verified", "faults_injected", "mismatches", "budget_violations"):
        assert key in report
    assert "OK: every byte verified" in capsys.readouterr().out


def test_stress_crash_mode_reports_in_json(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    argv = ["stress", "--seconds", "2", "--crash", "--dir", str(tmp_path / "d"), "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    crash = json.loads(out.read_text())["crash"]
    assert crash["trials"] >= 2 and crash["mismatches"] == 0 and crash["reads"] > 0


def test_stress_processes_mode(tmp_path) -> None:
    report = process_trials(tmp_path, processes=2, seconds=2.0, seed=1)
    assert report["opens"] >= 2 and report["mismatches"] == 0 and report["reads"] > 0
