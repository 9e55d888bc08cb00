"""``kvtier bench io``: disk and host-to-GPU throughput of the store beside plain baselines.

One run writes a file set through a :class:`~kvtier.TieredStore` (its own slab files),
flushes it to disk, drops it from the page cache (``fsync`` + ``POSIX_FADV_DONTNEED``;
O_DIRECT bypasses the cache anyway) and measures, on the same files:

- ``raw_odirect``: the baseline, a few lines of plain code: threads ``preadv`` every slot
  extent with O_DIRECT into page-aligned buffers, nothing else;
- ``kvtier`` disk to host: ``prefetch(to="host")`` sweeps of every key (verified reads into
  the pinned host slab), per backend (POSIX, and kvikio where it imports);
- with a GPU: ``prefetch(to="device")`` sweeps from disk (disk to pinned host to HBM), and
  host-resident chunks to HBM beside one large pinned ``copy_`` of the same bytes and
  beside one ``copy_`` per chunk.

GB/s counts payload bytes (``chunk_bytes`` per chunk) for every path, so paths moving the
same chunks compare directly; a disk slot adds a 4 KiB header block that every disk path
reads. Rates are medians over ``--reps`` sweeps (p20/p80 in the CSV).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kvtier.cli.args import UsageError, byte_size, positive_int
from kvtier.cli.plots import PLOT_HINT, plot_bars
from kvtier.cli.results import add_output_arguments, append_csv, output_file, source_commit
from kvtier.config import StoreConfig, format_bytes
from kvtier.layout import KVLayout
from kvtier.store import ChunkKey, TieredStore
from kvtier.tiers.base import PAGE_BYTES, aligned_empty
from kvtier.tiers.io import kvikio_status

__all__ = ["add_arguments", "bench_io", "plot_io", "run"]

log = logging.getLogger("kvtier.bench")

# Llama-3-8B geometry: 8 KV heads x head dim 128 in bf16 is 4 KiB per token (K and V),
# so a 64-token chunk of one layer is 256 KiB.
_HKV, _D = 8, 128
_TOKEN_BYTES = 2 * _HKV * _D * 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kvtier bench io``."""
    parser.add_argument(
        "--dir", required=True, type=Path, help="folder on the disk to measure, for the file set (removed afterwards)"
    )
    parser.add_argument(
        "--size", default="4GiB", type=byte_size, help="bytes of K/V to write and read per sweep (default 4GiB)"
    )
    parser.add_argument(
        "--chunk-bytes",
        default="256KiB",
        type=byte_size,
        help="bytes per chunk, a multiple of 4 KiB (default 256KiB: 64 tokens of Llama-3-8B)",
    )
    parser.add_argument("--threads", type=positive_int, default=4, help="I/O threads of the baseline and the store")
    parser.add_argument("--reps", type=positive_int, default=5, help="timed sweeps per path (default 5)")
    parser.add_argument(
        "--backend",
        choices=("posix", "kvikio", "all"),
        default="all",
        help="kvtier disk backends to measure (all: POSIX, plus kvikio when it works)",
    )
    add_output_arguments(parser, "io")


def _layout(chunk_bytes: int) -> KVLayout:
    if chunk_bytes % _TOKEN_BYTES:
        raise ValueError(
            f"--chunk-bytes: expected a multiple of {_TOKEN_BYTES} (one token of 8 KV heads x 128 "
            f"in bf16), got {chunk_bytes}"
        )
    tokens = chunk_bytes // _TOKEN_BYTES
    group = 16 if tokens % 16 == 0 else 1
    return KVLayout(
        num_layers=1,
        num_kv_heads=_HKV,
        head_dim=_D,
        dtype=torch.bfloat16,
        chunk_size=tokens,
        group_size=group,
    )


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def _drop_cache(directory: Path) -> None:
    for path in sorted(directory.glob("slab-*.kvt")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_odirect(
    store: TieredStore, threads: int, into: torch.Tensor | None = None
) -> tuple[float, list[float], bool]:
    """Baseline: read every used slot extent with O_DIRECT, ``threads`` at a time.

    With ``into`` (a diagnostic, not the baseline): ``[m, chunk_bytes]`` uint8 slots, e.g. a
    pinned slab like the host tier's; each read lands its payload in slot ``i % m`` and its
    header in the thread's small buffer, as kvtier's reads do, so the two differ only in
    kvtier's own work (checksums, bookkeeping, batching).
    """
    disk = store._disk
    assert disk is not None
    extents = [disk.locate(s) for s in range(disk.num_slots) if disk._alloc.is_used(s)]
    dests = None if into is None else [memoryview(into[i].numpy()) for i in range(into.shape[0])]
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    direct = hasattr(os, "O_DIRECT")
    fds: dict[Path, int] = {}
    for path, _ in extents:
        if path not in fds:
            try:
                fds[path] = os.open(path, flags)
            except OSError:
                direct = False
                fds[path] = os.open(path, os.O_RDONLY)
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(part: list[tuple[int, tuple[Path, int]]]) -> None:
        buf, _ = aligned_empty(disk.slot_bytes, pin=False)
        view = [memoryview(buf.numpy())]
        head = view[0][: disk.slot_bytes - disk.payload_span]
        mine = []
        for i, (path, offset) in part:
            if dests is not None:
                view = [dests[i % len(dests)], head]
            t0 = time.perf_counter()
            if os.preadv(fds[path], view, offset) != disk.slot_bytes:
                raise OSError(f"short read at {path}:{offset}")
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        numbered = list(enumerate(extents))
        list(pool.map(worker, [numbered[i::threads] for i in range(threads)]))
    elapsed = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return len(extents) * store.layout.chunk_bytes / elapsed / 1e9, latencies, direct


def _sweep(store: TieredStore, keys: list[ChunkKey], to: str, wave: int) -> tuple[float, int]:
    """Prefetch every key in waves (two in flight); return (GB/s, failed count)."""
    t0 = time.perf_counter()
    failed = 0
    pending = []
    for i in range(0, len(keys), wave):
        pending.append(store.prefetch(keys[i : i + wave], to=to))
        if len(pending) == 2:
            failed += len(pending.pop(0).wait())
    for h in pending:
        failed += len(h.wait())
    return len(keys) * store.layout.chunk_bytes / (time.perf_counter() - t0) / 1e9, failed


def _row(
    op: str, impl: str, metric: str, unit: str, values: list[float], ctx: dict[str, Any]
) -> dict[str, Any]:
    return {
        "bench": "io",
        "op": op,
        "impl": impl,
        "metric": metric,
        "unit": unit,
        "x_name": "chunk_bytes",
        "x_value": ctx["chunk_bytes"],
        "p20": _pct(values, 0.2),
        "p50": statistics.median(values),
        "p80": _pct(values, 0.8),
        "config_json": json.dumps(ctx["config"], sort_keys=True),
        "gpu": ctx["gpu"],
        "commit": ctx["commit"],
        "timestamp": ctx["timestamp"],
    }


def _environment(directory: Path) -> dict[str, Any]:
    fs = "?"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if str(directory.resolve()).startswith(mnt) and len(mnt) >= len(best):
                best, fs = mnt, f"{kind} on {dev} ({mnt})"
    except OSError:
        pass
    # The GPU machine gets a copy of the tree without .git: the caller sets KVTIER_COMMIT.
    commit = source_commit()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "filesystem": fs,
        "commit": commit,
        "kvikio": kvikio_status(),
    }


def bench_io(
    directory: Path,
    size: int,
    chunk_bytes: int,
    threads: int = 4,
    reps: int = 5,
    backends: tuple[str, ...] = ("posix",),
) -> dict[str, Any]:
    """Run the benchmark and return the results (see module docstring); removes its files."""
    layout = _layout(chunk_bytes)
    num_chunks = max(8, size // chunk_bytes)
    # Host holds a quarter of the set and the device an eighth, so each sweep really reads
    # the disk: a key is revisited only after more than a host's worth of other keys.
    host_slots = max(4, num_chunks // 4)
    dev_slots = max(2, host_slots // 2)
    has_gpu = torch.cuda.is_available()
    env = _environment(directory)
    ctx = {
        "chunk_bytes": chunk_bytes,
        "gpu": env["gpu"],
        "commit": env["commit"],
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"size": num_chunks * chunk_bytes, "threads": threads, "reps": reps},
    }
    rows: list[dict[str, Any]] = []
    res: dict[str, Any] = {
        "size_bytes": num_chunks * chunk_bytes,
        "chunk_bytes": chunk_bytes,
        "num_chunks": num_chunks,
        "threads": threads,
        "reps": reps,
        "environment": env,
    }
    keys = [ChunkKey(0, 0, i) for i in range(num_chunks)]
    base = torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8)
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir=directory))
    try:
        for b_i, backend in enumerate(backends):
            cfg = StoreConfig(
                gpu_bytes=dev_slots * chunk_bytes if has_gpu else 0,
                host_bytes=host_slots * chunk_bytes,
                disk_bytes=(num_chunks + 8) * (chunk_bytes + 2 * PAGE_BYTES),
                disk_dir=root,
                io_backend=backend,
                io_threads=threads,
            )
            with TieredStore(layout, cfg) as store:
                if b_i == 0:  # write the file set once; later backends reopen it
                    t0 = time.perf_counter()
                    for i, k in enumerate(keys):
                        base[:8] = torch.tensor([i], dtype=torch.int64).view(torch.uint8)
                        store.write(k, base.view(layout.dtype).view(layout.chunk_shape))
                    store.flush()
                    _drop_cache(root)
                    res["write_GBps"] = num_chunks * chunk_bytes / (time.perf_counter() - t0) / 1e9
                # Baseline and kvtier alternate rep by rep, so a disk whose speed drifts
                # (the GPU machine's virtio disk ranged 1.2 to 1.9 GB/s over two runs)
                # treats both alike.
                raw, got, lat, direct, raw_pinned = [], [], [], False, []
                # Diagnostic (GPU machine only): the raw reader into a pinned slab the size of
                # the host tier, i.e. kvtier's destination without kvtier's work.
                pinned_slab = None
                if b_i == 0 and has_gpu and chunk_bytes % PAGE_BYTES == 0:
                    pinned_slab, ok = aligned_empty(host_slots * chunk_bytes, pin=True)
                    pinned_slab = pinned_slab.view(host_slots, chunk_bytes) if ok else None
                for _ in range(reps):
                    _drop_cache(root)
                    gbps, lat, direct = _raw_odirect(store, threads)
                    raw.append(gbps)
                    if pinned_slab is not None:
                        _drop_cache(root)
                        raw_pinned.append(_raw_odirect(store, threads, into=pinned_slab)[0])
                    _drop_cache(root)
                    store.reset_stats()
                    gbps, failed = _sweep(store, keys, "host", max(1, host_slots // 2))
                    if failed:
                        raise RuntimeError(f"bench io: {failed} chunks failed to read ({backend})")
                    got.append(gbps)
                if b_i == 0:
                    res.update(
                        baseline_read_GBps=statistics.median(raw),
                        baseline_o_direct=direct,
                        baseline_chunk_p50_ms=_pct(lat, 0.5) * 1e3,
                        baseline_chunk_p99_ms=_pct(lat, 0.99) * 1e3,
                    )
                rows.append(
                    _row("disk_read", f"raw_odirect_beside_{backend}", "throughput", "GB/s", raw, ctx)
                )
                if raw_pinned:
                    res["diag_raw_into_pinned_slab_GBps"] = statistics.median(raw_pinned)
                    rows.append(
                        _row(
                            "disk_read", "raw_odirect_into_pinned_slab", "throughput", "GB/s", raw_pinned, ctx
                        )
                    )
                    del pinned_slab
                st = store.stats()
                name = f"kvtier_{backend}"
                res[name] = {
                    "read_GBps": statistics.median(got),
                    "baseline_GBps": statistics.median(raw),
                    "ratio": statistics.median(got) / statistics.median(raw),
                    "chunk_p50_ms": st["disk"]["read_latency_p50_ms"],
                    "chunk_p99_ms": st["disk"]["read_latency_p99_ms"],
                    "o_direct": st["disk_io"]["direct"],
                    "io": st["disk_io"]["reason"],
                    "pinned": st["host_pinned"],
                }
                rows.append(_row("disk_read", name, "throughput", "GB/s", got, ctx))
                if b_i == 0:
                    res["kvtier_read_GBps"] = statistics.median(got)
                    res["read_ratio"] = res["kvtier_read_GBps"] / res["baseline_read_GBps"]
                    res["pinned"] = st["host_pinned"]
                    res["o_direct"] = st["disk_io"]["direct"]
                    if has_gpu:
                        res.update(_gpu_paths(store, keys, dev_slots, reps, root, rows, ctx))
                    _verify_sample(store, keys, base, layout)
        if has_gpu and "posix" in backends:
            res.update(
                _pageable_diagnostic(layout, host_slots, num_chunks, root, threads, reps, keys, rows, ctx)
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["gds"] = env["kvikio"]["mode"] == "gds" and "kvikio" in backends
    res["rows"] = rows
    return res


def _pageable_diagnostic(
    layout: KVLayout,
    host_slots: int,
    num_chunks: int,
    root: Path,
    threads: int,
    reps: int,
    keys: list[ChunkKey],
    rows: list[dict[str, Any]],
    ctx: dict[str, Any],
) -> dict[str, Any]:
    """Diagnostic (GPU machine): kvtier disk to host with a pageable host slab, beside the
    baseline rep by rep, on the same files. Beside the pinned-slab raw reader it says whether
    the pinned destination or kvtier's own work costs the reads."""
    cb = layout.chunk_bytes
    cfg = StoreConfig(
        gpu_bytes=0,
        host_bytes=host_slots * cb,
        disk_bytes=(num_chunks + 8) * (cb + 2 * PAGE_BYTES),
        disk_dir=root,
        io_backend="posix",
        io_threads=threads,
    )
    raw, got = [], []
    with TieredStore(layout, cfg, pin_host=False) as store:
        for _ in range(reps):
            _drop_cache(root)
            raw.append(_raw_odirect(store, threads)[0])
            _drop_cache(root)
            gbps, failed = _sweep(store, keys, "host", max(1, host_slots // 2))
            if failed:
                raise RuntimeError(f"bench io: {failed} chunks failed to read (pageable diagnostic)")
            got.append(gbps)
    rows.append(_row("disk_read", "raw_odirect_beside_pageable", "throughput", "GB/s", raw, ctx))
    rows.append(_row("disk_read", "kvtier_posix_pageable_host", "throughput", "GB/s", got, ctx))
    return {
        "diag_pageable": {
            "read_GBps": statistics.median(got),
            "baseline_GBps": statistics.median(raw),
            "ratio": statistics.median(got) / statistics.median(raw),
        }
    }


def _gpu_paths(
    store: TieredStore,
    keys: list[ChunkKey],
    dev_slots: int,
    reps: int,
    root: Path,
    rows: list[dict[str, Any]],
    ctx: dict[str, Any],
) -> dict[str, Any]:
    """Disk to GPU sweeps, then host to GPU beside one large pinned copy and per-chunk copies."""
    out: dict[str, Any] = {}
    cb = store.layout.chunk_bytes
    got = []
    for _ in range(reps):
        _drop_cache(root)
        # Half the device tier per wave: two waves in flight must both fit, since keys in
        # flight are pinned and cannot be evicted by the next wave.
        gbps, failed = _sweep(store, keys, "device", max(1, dev_slots // 2))
        if failed:
            raise RuntimeError(f"bench io: {failed} chunks failed disk-to-GPU")
        got.append(gbps)
    out["kvtier_disk_to_gpu_GBps"] = statistics.median(got)
    rows.append(_row("disk_to_gpu", "kvtier", "throughput", "GB/s", got, ctx))
    # Two waves of host-resident chunks alternate, so every prefetch really copies.
    resident = [k for k in keys if store.host_slots([k]).item() >= 0]
    wave_a, wave_b = resident[:dev_slots], resident[dev_slots : 2 * dev_slots]
    if len(wave_b) < dev_slots:
        return out
    kv, single, per_chunk = [], [], []
    n = dev_slots
    dst = torch.empty(n * cb, dtype=torch.uint8, device="cuda")
    src = store.host_slab[:n].view(-1).view(torch.uint8)
    for rep in range(reps + 1):  # the first round warms up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        failed = store.prefetch(wave_a if rep % 2 == 0 else wave_b, to="device").wait()
        t_kv = time.perf_counter() - t0
        if failed:
            raise RuntimeError(f"bench io: {len(failed)} chunks failed host-to-GPU")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n):
            dst[i * cb : (i + 1) * cb].copy_(src[i * cb : (i + 1) * cb], non_blocking=True)
        torch.cuda.synchronize()
        t_each = time.perf_counter() - t0
        if rep:
            kv.append(n * cb / t_kv / 1e9)
            single.append(n * cb / t_one / 1e9)
            per_chunk.append(n * cb / t_each / 1e9)
    out.update(
        h2d_kvtier_GBps=statistics.median(kv),
        h2d_single_copy_GBps=statistics.median(single),
        h2d_per_chunk_copy_GBps=statistics.median(per_chunk),
        h2d_bytes=n * cb,
        h2d_ratio=statistics.median(kv) / statistics.median(single),
    )
    rows.append(_row("h2d", "kvtier_prefetch", "throughput", "GB/s", kv, ctx))
    rows.append(_row("h2d", "torch_single_pinned_copy", "throughput", "GB/s", single, ctx))
    rows.append(_row("h2d", "torch_copy_per_chunk", "throughput", "GB/s", per_chunk, ctx))
    return out


def _verify_sample(store: TieredStore, keys: list[ChunkKey], base: torch.Tensor, layout: KVLayout) -> None:
    """Spot-check that the benchmark moved the right bytes (first 8 bytes stamp the index)."""
    sample = keys[:: max(1, len(keys) // 16)]
    out = torch.empty(len(sample), *layout.chunk_shape, dtype=layout.dtype)
    if store.read(sample, out):
        raise RuntimeError("bench io: verification read missed chunks")
    for j, k in enumerate(sample):
        got = out[j].view(-1).view(torch.uint8)
        if int(got[:8].view(torch.int64).item()) != k.chunk_idx or not torch.equal(got[8:], base[8:]):
            raise RuntimeError(f"bench io: chunk {tuple(k)} came back with wrong bytes")


def _table(res: dict[str, Any]) -> str:
    base = res["baseline_read_GBps"]
    lines = [
        "| path | GB/s (median) | ms/chunk p50 | ms/chunk p99 | % of baseline | O_DIRECT | pinned | GPUDirect |",
        "|---|---|---|---|---|---|---|---|",
        (
            f"| raw O_DIRECT reader (baseline) | {base:.2f} | {res['baseline_chunk_p50_ms']:.2f} | "
            f"{res['baseline_chunk_p99_ms']:.2f} | 100% | {'yes' if res['baseline_o_direct'] else 'NO'} | - | - |"
        ),
    ]
    if "write_GBps" in res:
        lines.append(
            f"| kvtier write: store.write + flush to disk | {res['write_GBps']:.2f} | - | - | - | "
            f"{'yes' if res['o_direct'] else 'no'} | {'yes' if res['pinned'] else 'NO'} | - |"
        )
    for key, val in res.items():
        if key.startswith("kvtier_") and isinstance(val, dict):
            gds = "yes" if "gds" in val["io"] else ("no (compat)" if "kvikio" in val["io"] else "no")
            lines.append(
                f"| {key.replace('_', ' ')}: disk to host | {val['read_GBps']:.2f} | {val['chunk_p50_ms']:.2f} | "
                f"{val['chunk_p99_ms']:.2f} | {100 * val['ratio']:.0f}% of {val['baseline_GBps']:.2f} | "
                f"{'yes' if val['o_direct'] else 'no'} ({val['io']}) | {'yes' if val['pinned'] else 'NO'} | {gds} |"
            )
    if "diag_raw_into_pinned_slab_GBps" in res:
        g = res["diag_raw_into_pinned_slab_GBps"]
        lines.append(
            f"| diagnostic: raw reader, payloads into a pinned slab | {g:.2f} | - | - | "
            f"{100 * g / base:.0f}% | {'yes' if res['baseline_o_direct'] else 'NO'} | yes | - |"
        )
    if "diag_pageable" in res:
        d = res["diag_pageable"]
        lines.append(
            f"| diagnostic: kvtier disk to host, pageable host slab | {d['read_GBps']:.2f} | - | - | "
            f"{100 * d['ratio']:.0f}% of {d['baseline_GBps']:.2f} | yes | NO | - |"
        )
    if "kvtier_disk_to_gpu_GBps" in res:
        lines.append(
            f"| kvtier disk to GPU | {res['kvtier_disk_to_gpu_GBps']:.2f} | - | - | "
            f"{100 * res['kvtier_disk_to_gpu_GBps'] / base:.0f}% | yes | yes | no |"
        )
    if "h2d_single_copy_GBps" in res:
        one = res["h2d_single_copy_GBps"]
        lines.append(
            f"| one pinned copy_ of {format_bytes(res['h2d_bytes'])} (H2D baseline) | {one:.2f} | - | - | "
            f"H2D 100% | - | yes | - |"
        )
        lines.append(
            f"| kvtier host to GPU (chunks) | {res['h2d_kvtier_GBps']:.2f} | - | - | "
            f"H2D {100 * res['h2d_ratio']:.0f}% | - | yes | - |"
        )
        lines.append(
            f"| one copy_ per chunk | {res['h2d_per_chunk_copy_GBps']:.2f} | - | - | "
            f"H2D {100 * res['h2d_per_chunk_copy_GBps'] / one:.0f}% | - | yes | - |"
        )
    lines.append(
        "ms/chunk: a thread's time per chunk: one read for the baseline; for kvtier one call's time "
        "(adjacent slots are read in one call) over its chunks, checksums included."
    )
    return "\n".join(lines)


def plot_io(res: dict[str, Any], path: str | Path) -> Path | None:
    """PNG of the medians of one run (the JSON of ``--json``): GB/s per path, grouped by direction."""
    reads = {"raw O_DIRECT reader (baseline)": res["baseline_read_GBps"]}
    for key, val in res.items():
        if key.startswith("kvtier_") and isinstance(val, dict):
            reads[key.replace("_", " ")] = val["read_GBps"]
    groups: dict[str, dict[str, float | None]] = {"disk to host": reads}
    if "write_GBps" in res:
        groups["host to disk"] = {"kvtier write + flush": res["write_GBps"]}
    if "kvtier_disk_to_gpu_GBps" in res:
        groups["disk to GPU"] = {"kvtier disk to GPU": res["kvtier_disk_to_gpu_GBps"]}
    if "h2d_single_copy_GBps" in res:
        groups["host to GPU"] = {"one pinned copy_ (baseline)": res["h2d_single_copy_GBps"],
                                 "kvtier host to GPU": res["h2d_kvtier_GBps"],
                                 "one copy_ per chunk": res["h2d_per_chunk_copy_GBps"]}
    env = res.get("environment", {})
    title = (f"kvtier bench io: {format_bytes(res['size_bytes'])} in {format_bytes(res['chunk_bytes'])} chunks, "
             f"GPU {env.get('gpu', '?')}")
    return plot_bars(path, groups, "GB/s (median of the reps, log scale)", title, logy=True)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``kvtier bench io``."""
    size, chunk_bytes = args.size, args.chunk_bytes
    try:
        _layout(chunk_bytes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if size < chunk_bytes:
        raise UsageError(f"--size: expected at least one chunk ({format_bytes(chunk_bytes)}), got {format_bytes(size)}")
    csv_path, json_path = output_file(args, "csv", "io"), output_file(args, "json", "io")
    args.dir.mkdir(parents=True, exist_ok=True)
    status = kvikio_status()
    backends: tuple[str, ...] = ("posix",)
    if args.backend == "kvikio" or (args.backend == "all" and status["available"]):
        backends = ("posix", "kvikio")
    env = _environment(args.dir)
    print(
        f"kvtier bench io | {format_bytes(size)} in {format_bytes(chunk_bytes)} chunks | {args.threads} threads | "
        f"{args.reps} reps\nGPU: {env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | "
        f"kvikio: {status['mode']} ({status['reason']}) | fs: {env['filesystem']} | commit {env['commit']}",
        flush=True,
    )
    res = bench_io(args.dir, size, chunk_bytes, args.threads, args.reps, backends)
    if not res["o_direct"] or not res["baseline_o_direct"]:
        print("!" * 72 + "\n!! O_DIRECT was NOT used: reads may come from the page cache\n" + "!" * 72)
    if torch.cuda.is_available() and not res["gds"]:
        print(
            "!" * 72 + "\n!! GPUDirect Storage was NOT used (no nvidia-fs): disk to GPU goes through "
            "pinned host memory\n" + "!" * 72
        )
    if not res["pinned"]:
        print("!! host memory is pageable" + ("" if torch.cuda.is_available() else " (no GPU: nothing to pin for)"))
    print(_table(res))
    print(
        f"read_ratio (kvtier / raw O_DIRECT) = {res['read_ratio']:.3f}"
        + (f" | h2d_ratio (chunks / one copy) = {res['h2d_ratio']:.3f}" if "h2d_ratio" in res else "")
    )
    print(
        f"ran on: GPU {env['gpu']} | host slab {'pinned' if res['pinned'] else 'pageable'} | "
        f"O_DIRECT {'yes' if res['o_direct'] else 'no'} | GPUDirect Storage {'yes' if res['gds'] else 'no'} | "
        f"backends {', '.join(backends)}"
    )
    rows = res.pop("rows")
    written = []
    if csv_path is not None:
        append_csv(csv_path, rows)
        written.append(f"{csv_path} (rows appended)")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=2, default=str))
        written.append(str(json_path))
    png = plot_io(res, output_file(args, "png", "io"))
    written.append(str(png) if png else PLOT_HINT)
    print("results: " + ", ".join(written))
    return 0
