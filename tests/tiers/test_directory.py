"""The disk folder (issue 10, cases 1, 3, 4, 6, 11): lock, store identity and generation mark,
per-file damage isolation, budget shrink, permissions and symlinks."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from kvtier import ChunkKey, ConfigError, KVLayout, StoreConfig, StoreLockedError, TieredStore
from kvtier._faults import flip_bit_on_disk
from kvtier.tiers import PAGE_BYTES, DiskTier
from kvtier.tiers import disk as disk_mod
from kvtier.tiers import directory as dir_mod

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_size=4, group_size=2)
CB = LAYOUT.chunk_bytes
SLOT = 8192  # payload padded to 4 KiB + header block


def chunk(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (CB,), dtype=torch.uint8, generator=g).view(LAYOUT.dtype).view(LAYOUT.chunk_shape)


def config(path, disk_slots: int = 16) -> StoreConfig:
    return StoreConfig(gpu_bytes=0, host_bytes=CB, disk_bytes=disk_slots * SLOT, disk_dir=path, device="cpu", io_threads=1)


def fill(path, keys, disk_slots: int = 16, seed: int = 0) -> None:
    with TieredStore(LAYOUT, config(path, disk_slots)) as store:
        for i, k in enumerate(keys):
            store.write(k, chunk(seed + i))


def contents(path, keys, disk_slots: int = 16) -> tuple[dict, dict]:
    """(key -> seed index found bit-exact or None, stats) after a reopen."""
    with TieredStore(LAYOUT, config(path, disk_slots)) as store:
        out = torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
        found = {}
        for k in keys:
            found[k] = None if store.read([k], out) else out[0].clone()
        return found, store.stats()


KEYS = [ChunkKey(0, 0, i) for i in range(6)]


# ---------------------------------------------------------------- case 1: the lock
def test_second_opener_is_refused_naming_the_holder(tmp_path) -> None:
    store = TieredStore(LAYOUT, config(tmp_path))
    with pytest.raises(StoreLockedError, match=rf"locked by pid {os.getpid()} on host"):
        TieredStore(LAYOUT, config(tmp_path))
    store.close()
    TieredStore(LAYOUT, config(tmp_path)).close()  # released at close


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from kvtier import KVLayout, StoreConfig, TieredStore
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_size=4, group_size=2)
    cfg = StoreConfig(gpu_bytes=0, host_bytes=layout.chunk_bytes, disk_bytes=16 * 8192, disk_dir=sys.argv[1],
                      device="cpu", io_threads=1)
    store = TieredStore(layout, cfg)
    for i in range(6):
        g = torch.Generator().manual_seed(i)
        raw = torch.randint(0, 256, (layout.chunk_bytes,), dtype=torch.uint8, generator=g)
        store.write((0, 0, i), raw.view(layout.dtype).view(layout.chunk_shape))
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_two_processes_second_refused_then_opens_after_the_first_dies(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=rf"locked by pid {child.pid} "):
            TieredStore(LAYOUT, config(tmp_path))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    found, st = contents(tmp_path, KEYS)
    # Killed without a flush: the 5 chunks it spilled are there, bit-exact; the last one
    # lived only in its host tier and is a miss, never wrong bytes.
    for i, k in enumerate(KEYS[:5]):
        assert found[k] is not None and torch.equal(found[k].view(torch.uint8), chunk(i).view(torch.uint8))
    assert found[KEYS[5]] is None
    assert st["disk_open"]["manifest"] == "not closed cleanly"


def test_folder_that_cannot_be_made_fails_at_open_not_at_the_first_spill(tmp_path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="expected a folder kvtier can create"):
        TieredStore(LAYOUT, config(tmp_path / "file" / "kv"))


def test_unwritable_folder_fails_at_open(tmp_path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="expected a writable folder"):
        TieredStore(LAYOUT, config(d))


# ---------------------------------------------------------------- case 11: identity and position
def _slot_span(path, key):
    disk = DiskTier(LAYOUT, 16 * SLOT, path)
    slot = {r.key: r.slot for r in disk.scan()}[key]
    file, offset = disk.locate(slot)
    disk.close()
    return file, offset


def test_slot_copied_from_another_store_is_refused(tmp_path) -> None:
    fill(tmp_path / "a", KEYS)
    fill(tmp_path / "b", KEYS, seed=100)
    src, off = _slot_span(tmp_path / "b", KEYS[1])
    dst, off_a = _slot_span(tmp_path / "a", KEYS[1])
    with open(src, "rb") as f:
        f.seek(off)
        block = f.read(SLOT)
    with open(dst, "r+b") as f:
        f.seek(off_a)
        f.write(block)
    found, st = contents(tmp_path / "a", KEYS)
    assert found[KEYS[1]] is None
    assert st["disk_open"]["refused_slots"] == {"header of another store": 1}
    assert all(found[k] is not None for k in KEYS[:5] if k != KEYS[1])


def test_slot_moved_to_another_index_is_refused(tmp_path) -> None:
    fill(tmp_path, KEYS)
    file, off0 = _slot_span(tmp_path, KEYS[0])
    _, off3 = _slot_span(tmp_path, KEYS[3])
    with open(file, "r+b") as f:
        f.seek(off0)
        block = f.read(SLOT)
        f.seek(off3)
        f.write(block)  # a misdirected write: KEYS[0]'s slot landed on KEYS[3]'s
    found, st = contents(tmp_path, KEYS)
    assert found[KEYS[3]] is None and found[KEYS[0]] is not None
    assert st["disk_open"]["refused_slots"] == {"header of another slot": 1}


def test_slot_rolled_back_to_an_older_copy_of_itself_is_refused(tmp_path) -> None:
    fill(tmp_path, KEYS)
    file, off = _slot_span(tmp_path, KEYS[2])
    old = open(file, "rb").read()[off : off + SLOT]
    with TieredStore(LAYOUT, config(tmp_path)) as store:
        store.drop(0)
        store.write(KEYS[2], chunk(50))  # a newer version, which lands in another slot
        store.write((1, 0, 0), chunk(51))
    with open(file, "r+b") as f:  # the old slot's clear is "lost": its old bytes come back
        f.seek(off)
        f.write(old)
    found, st = contents(tmp_path, KEYS)
    assert found[KEYS[2]] is not None and torch.equal(found[KEYS[2]].view(torch.uint8), chunk(50).view(torch.uint8))
    assert all(found[k] is None for k in KEYS if k != KEYS[2])
    assert st["disk_open"]["refused_slots"] == {"not in the clean-close index": 1}


def test_generation_above_the_persisted_mark_is_refused(tmp_path) -> None:
    fill(tmp_path, KEYS)
    manifest = (tmp_path / "MANIFEST").read_bytes()
    fill(tmp_path, [ChunkKey(1, 0, 0)] * 2 + [ChunkKey(1, 0, 1)])  # a later generation block
    (tmp_path / "MANIFEST").write_bytes(manifest)  # the manifest rolled back: its mark is lower
    found, st = contents(tmp_path, [ChunkKey(1, 0, 1)])
    assert found[ChunkKey(1, 0, 1)] is None
    assert st["disk_open"]["refused_slots"].get("generation above the persisted mark", 0) >= 1


# ---------------------------------------------------------------- case 4: shrinking the budget
def test_shrunk_budget_retires_slots_and_nothing_stale_returns(tmp_path) -> None:
    keys = [ChunkKey(0, 0, i) for i in range(10)]
    fill(tmp_path, keys)  # 9 spilled and 1 flushed at close: slots 0..9
    slab = tmp_path / "slab-00000.kvt"
    found, st = contents(tmp_path, keys, disk_slots=4)
    assert sum(v is not None for v in found.values()) == 4
    assert st["disk_open"]["retired_slots"] == 6
    assert slab.stat().st_size <= PAGE_BYTES + 4 * SLOT
    found, st = contents(tmp_path, keys, disk_slots=16)  # grown back: only the 4 kept are there
    assert sum(v is not None for v in found.values()) == 4
    assert st["disk_open"]["refused_slots"] == {}


# ---------------------------------------------------------------- case 3: per-file damage
@pytest.fixture
def small_files(monkeypatch):
    """4 slots per slab file, so a few chunks span several files."""
    monkeypatch.setattr(disk_mod, "FILE_TARGET_BYTES", 4 * SLOT)


def _three_files(tmp_path) -> list[ChunkKey]:
    keys = [ChunkKey(0, 0, i) for i in range(11)]
    fill(tmp_path, keys)  # 11 chunks over slab files 0, 1 and 2
    assert sorted(p.name for p in tmp_path.glob("slab-*.kvt")) == [f"slab-0000{i}.kvt" for i in range(3)]
    return keys


@pytest.mark.parametrize("damage", ["empty", "bitflip", "missing", "symlink"])
def test_damaged_file_header_loses_only_that_file(tmp_path, small_files, damage) -> None:
    keys = _three_files(tmp_path)
    target = tmp_path / "slab-00001.kvt"
    if damage == "empty":
        target.write_bytes(b"")  # ENOSPC at creation in the old format
    elif damage == "bitflip":
        flip_bit_on_disk(target, 50, 2)
    elif damage == "missing":
        target.unlink()
    else:
        moved = tmp_path.parent / f"{tmp_path.name}-elsewhere.kvt"
        shutil.move(target, moved)
        target.symlink_to(moved)
    found, st = contents(tmp_path, keys)
    by_file = {k: k.chunk_idx // 4 for k in keys}  # slots were handed out in key order
    assert {k for k, v in found.items() if v is None} == {k for k in keys if by_file[k] == 1}
    for i, k in enumerate(keys):
        if by_file[k] != 1:
            assert torch.equal(found[k].view(torch.uint8), chunk(i).view(torch.uint8))
    if damage != "missing":
        assert len(st["disk_open"]["damaged_files"]) == 1
        assert st["disk_open"]["damaged_files"][0].startswith("slab-00001.kvt")


def test_damaged_file_is_recreated_when_its_slots_are_needed(tmp_path, small_files) -> None:
    keys = _three_files(tmp_path)
    (tmp_path / "slab-00001.kvt").write_bytes(b"\0" * 100)
    with TieredStore(LAYOUT, config(tmp_path)) as store:
        store.drop(0)
        for i, k in enumerate(keys):
            store.write(k, chunk(200 + i))
    found, st = contents(tmp_path, keys)
    assert all(torch.equal(found[k].view(torch.uint8), chunk(200 + i).view(torch.uint8)) for i, k in enumerate(keys))
    assert st["disk_open"]["damaged_files"] == []


# ---------------------------------------------------------------- case 6: permissions, symlinks
def test_folder_0700_files_0600(tmp_path) -> None:
    d = tmp_path / "new" / "kv"
    fill(d, KEYS)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for p in d.iterdir():
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p.name


def test_world_writable_folder_is_refused(tmp_path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(ConfigError, match="expected a folder others cannot write, got .* mode 777"):
        TieredStore(LAYOUT, config(d))


def test_foreign_owned_folder_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dir_mod.os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(ConfigError, match="expected a folder owned by uid"):
        TieredStore(LAYOUT, config(tmp_path))


def test_planted_symlink_for_the_next_slab_file_is_not_followed(tmp_path, small_files) -> None:
    d = tmp_path / "kv"
    fill(d, KEYS[:3])  # file 0 only
    victim = tmp_path / "precious.txt"
    victim.write_text("do not overwrite")
    (d / "slab-00001.kvt").symlink_to(victim)
    dangling = tmp_path / "nothing-here"
    (d / "slab-00002.kvt").symlink_to(dangling)
    keys = [ChunkKey(0, 0, i) for i in range(11)]
    fill(d, keys, seed=300)  # needs files 1 and 2
    assert victim.read_text() == "do not overwrite" and not dangling.exists()
    found, _ = contents(d, keys)
    assert all(torch.equal(found[k].view(torch.uint8), chunk(300 + i).view(torch.uint8)) for i, k in enumerate(keys))
