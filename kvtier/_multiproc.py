"""Several processes on one store folder: the lock admits one at a time, and every holder
checks what it finds against a shared journal of what the earlier holders acknowledged.

Each process loops: open the store (a :class:`StoreLockedError` is counted and retried
after a short sleep), read every key and check it, run random writes and drops, then close
cleanly or die without closing (``os._exit``: the kernel keeps the page cache and drops
the lock). The journal (one JSON line per event, appended while holding the lock) says
what is legal for the next holder: after a clean close exactly the last acknowledged
versions; after a death the last acknowledged version of each key, a write or drop the
dead process had begun, or a miss. Used by ``kvtier stress --processes``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from kvtier._crash import LAYOUT, _config, _is, _KEYS, _payload, _read
from kvtier.errors import StoreLockedError
from kvtier.store import TieredStore

__all__ = ["run_processes"]


def _expected(journal: Path) -> tuple[dict[str, int | None], dict[str, set[int | None]], bool]:
    """(last acknowledged version per key, versions begun but not acknowledged, clean close)."""
    acked: dict[str, int | None] = {str(tuple(k)): None for k in _KEYS}
    maybe: dict[str, set[int | None]] = {k: set() for k in acked}
    clean = True
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:  # a line torn by a death mid-append: its op was not acknowledged
                continue
            op = ev["op"]
            if op == "open":
                clean = False
                maybe = {k: set() for k in acked}
                acked.update(ev["state"])
            elif op == "begin":
                maybe[ev["k"]].add(ev["v"])
            elif op == "ack":
                acked[ev["k"]] = ev["v"]
                maybe[ev["k"]].clear()
            elif op == "close":
                clean = True
    return acked, maybe, clean


def _worker(directory: str, journal_path: str, seconds: float, seed: int, out_path: str) -> None:
    rng = random.Random(seed)
    torch.set_num_threads(1)
    logging.getLogger("kvtier").setLevel(logging.ERROR)
    directory_p, journal = Path(directory), Path(journal_path)
    c: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    version = seed * 10_000_000
    while time.monotonic() < deadline:
        try:
            store = TieredStore(LAYOUT, _config(directory_p))
        except StoreLockedError:
            c["lock_refusals"] += 1
            time.sleep(rng.uniform(0.002, 0.02))
            continue
        c["opens"] += 1
        acked, maybe, clean = _expected(journal)
        state: dict[str, int | None] = {}
        for k in _KEYS:
            name = str(tuple(k))
            got = _read(store, k)
            legal = {acked[name]} if clean else {acked[name], None} | maybe[name]
            c["reads"] += 1
            if not any(_is(got, v) for v in legal):
                c["mismatches"] += 1
            # What is there now is the truth the next holder builds on.
            state[name] = next((v for v in legal if _is(got, v)), None) if got is not None else None
        with journal.open("a") as j:
            j.write(json.dumps({"op": "open", "pid": os.getpid(), "state": state}) + "\n")
            j.flush()
            die = rng.random() < 0.25
            for _ in range(rng.randint(5, 40)):
                k = rng.choice(_KEYS)
                name = str(tuple(k))
                if rng.random() < 0.1:
                    for key in _KEYS:
                        if key.seq_id == k.seq_id:
                            j.write(json.dumps({"op": "begin", "k": str(tuple(key)), "v": None}) + "\n")
                    j.flush()
                    store.drop(k.seq_id)
                    for key in _KEYS:
                        if key.seq_id == k.seq_id:
                            j.write(json.dumps({"op": "ack", "k": str(tuple(key)), "v": None}) + "\n")
                    j.flush()
                    continue
                version += 1
                j.write(json.dumps({"op": "begin", "k": name, "v": version}) + "\n")
                j.flush()
                if die and rng.random() < 0.1:
                    c["deaths"] += 1
                    _save(out_path, c)
                    os._exit(0)  # killed mid-write: no close, no flush; the kernel drops the lock
                store.write(k, _payload(version))
                j.write(json.dumps({"op": "ack", "k": name, "v": version}) + "\n")
                j.flush()
                c["writes"] += 1
            if die:
                c["deaths"] += 1
                _save(out_path, c)
                os._exit(0)
            store.close()
            j.write(json.dumps({"op": "close"}) + "\n")
            j.flush()
        c["clean_closes"] += 1
    _save(out_path, c)


def _save(path: str, c: Counter[str]) -> None:
    Path(path).write_text(json.dumps(dict(c)))


def run_processes(directory: Path, processes: int, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Run ``processes`` workers on one folder under ``directory`` for about ``seconds``.

    A worker that dies on purpose is restarted, so ``processes`` contend until the end.

    Returns
    -------
    dict
        ``processes``, ``opens``, ``lock_refusals``, ``deaths``, ``clean_closes``,
        ``writes``, ``reads``, ``mismatches`` (must be 0).
    """
    folder = directory / "shared"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    journal = directory / "journal.jsonl"
    # fork starts a worker in milliseconds (spawn re-imports torch: 2 to 5 s each); a parent
    # that has initialised CUDA cannot fork safely, so it spawns.
    fork_ok = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    ctx = multiprocessing.get_context("fork" if fork_ok else "spawn")
    total: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    running: list[tuple[Any, str]] = []
    started = 0

    def start() -> None:
        nonlocal started
        out = str(directory / f"worker-{started}.json")
        left = max(0.5, deadline - time.monotonic())
        p = ctx.Process(target=_worker, args=(str(folder), str(journal), left, seed * 1000 + started, out))
        p.start()
        running.append((p, out))
        started += 1

    for _ in range(processes):
        start()
    while running:
        p, out = running.pop(0)
        p.join()
        if os.path.exists(out):
            total.update(json.loads(Path(out).read_text()))
            os.remove(out)
        else:
            total["workers_without_report"] += 1
        if time.monotonic() < deadline - (0.5 if fork_ok else 5.0):  # spawn re-imports torch
            start()  # a worker that died keeps its place in the contention
    return {
        "processes": processes,
        "workers_started": started,
        "opens": total["opens"],
        "lock_refusals": total["lock_refusals"],
        "deaths": total["deaths"],
        "clean_closes": total["clean_closes"],
        "writes": total["writes"],
        "reads": total["reads"],
        "mismatches": total["mismatches"] + total["workers_without_report"],
    }
