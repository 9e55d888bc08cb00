"""Crash test below the page cache (issue 10): random work on a store over a simulated page
cache, a process death or a power loss (also at kill points inside store calls), then every
key checked against the expected-state model of :mod:`kvtier._crash`."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from kvtier._crash import CRASH_KINDS, crash_trial
from kvtier._crash import _read as real_read
from kvtier._faults import VolatileIO


@pytest.mark.parametrize("kind", CRASH_KINDS)
def test_after_any_crash_every_read_is_legal(tmp_path, kind, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="kvtier")
    total: Counter[str] = Counter()
    for seed in range(6):
        total.update(crash_trial(tmp_path / f"t{seed}", seed, kind))
    assert total["mismatches_live"] == total["mismatches_reopen"] == total["mismatches_after_crash"] == 0
    assert total["reads"] > 50
    if kind.startswith("kill"):
        assert total["killed_in_call"] >= 3  # the kill points really landed inside store calls


def test_the_model_catches_a_store_that_trusts_unsynced_writes_after_a_restart(tmp_path, monkeypatch, caplog) -> None:
    """Without the restart rule (slots written after the last sync are refused after a
    power loss), an intermediate version whose replacement was lost comes back."""
    caplog.set_level(logging.ERROR, logger="kvtier")
    monkeypatch.setattr(VolatileIO, "boot_id", lambda self: "never-restarts")
    total: Counter[str] = Counter()
    for seed in (34, 41, 56):  # seeds (of the first 120) whose power loss exposes it
        total.update(crash_trial(tmp_path / f"t{seed}", seed, "power"))
    assert total["mismatches_after_crash"] >= 2


@pytest.mark.parametrize("kind", ["process", "power"])
def test_the_model_catches_a_store_that_loses_synced_chunks(tmp_path, monkeypatch, caplog, kind) -> None:
    """A chunk untouched since the last sync point must come back after any crash: a store
    that reopens empty (every synced chunk lost, each a 'reported miss') is caught."""
    import kvtier._crash as crash

    caplog.set_level(logging.ERROR, logger="kvtier")
    real = crash._Trial.crash

    def crash_then_wipe(self, kind):  # the crash, then a store that lost everything on disk
        monkeypatch.setattr(crash, "_read", lambda store, key: None)
        return real(self, kind)

    monkeypatch.setattr(crash._Trial, "crash", crash_then_wipe)
    total: Counter[str] = Counter()
    for seed in range(6):
        total.update(crash_trial(tmp_path / f"t{seed}", seed, kind))
        monkeypatch.setattr(crash, "_read", real_read)
    assert total["mismatches_after_crash"] >= 3
