"""kvtier.models: the one-time model conversion is safe when several processes or threads do it at once."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from kvtier import models


def _fake_produce(calls: list[int], delay: float = 0.2):
    def produce(folder: Path) -> None:
        calls.append(threading.get_ident())
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        time.sleep(delay)  # long enough for the other caller to arrive while this one converts
        (folder / "config.json").write_text("{}")

    return produce


def test_concurrent_conversions_convert_once_and_both_succeed(tmp_path) -> None:
    target = tmp_path / "cache" / "model"
    calls: list[int] = []
    results: list[Path | BaseException] = []

    def worker() -> None:
        try:
            results.append(models._install_once(target, _fake_produce(calls)))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [target] * 3
    assert len(calls) == 1  # the lock made the others wait and find it done
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model", "model.lock"]  # no temporary folder left


def test_a_race_lost_without_the_lock_is_still_success(tmp_path, monkeypatch) -> None:
    """Where flock does not hold (no fcntl, some network file systems) the rename finds the target done."""
    monkeypatch.setattr(models, "_conversion_lock", lambda target: contextlib.nullcontext())
    target = tmp_path / "model"

    def produce(folder: Path) -> None:
        (folder / "config.json").write_text('{"mine": true}')
        target.mkdir()  # meanwhile another process finished first
        (target / "config.json").write_text('{"theirs": true}')

    assert models._install_once(target, produce) == target
    assert (target / "config.json").read_text() == '{"theirs": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path) -> None:
    target = tmp_path / "model"

    def produce(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._install_once(target, produce)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["model.lock"]
    # an incomplete folder in the way is an error, never a model that later loads would trust
    target.mkdir()
    (target / "junk").write_text("x")
    with pytest.raises(OSError):
        models._install_once(target, _fake_produce([], delay=0))
