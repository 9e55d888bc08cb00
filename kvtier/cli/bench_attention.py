"""``kvtier bench attention``: HGA decode and prefill on the kernels beside torch SDPA.

Llama-3.1-8B attention shapes by default (32 query heads, 8 KV heads, head dim 128, bf16),
one layer, contexts 8K .. 1M, batch 1 and 4, all in one run:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with every K/V in HBM
  (decode: one query over all keys; prefill: 64 queries over all keys, not causal);
* ``hga_host``: one HGA decode step (routing + dedup/cache lookup + gather + attention,
  :class:`kvtier.decode_step.LayerDecode` of a one-layer engine from ``engine_from_dense``) with
  closed chunks in pinned host memory and an HBM group cache, replayed as a CUDA graph; ``cold`` empties the cache before every step,
  ``steady`` follows a random walk of the queries (``q += sigma * |q| * noise`` per step,
  normalised) after warm-up steps, and reports the reuse it got;
* per-stage times of the steady step (each stage its own graph);
* the gather's GB/s on the cold working set beside one large pinned copy of the same bytes
  and beside one ``cudaMemcpyAsync`` per group and plane (the baseline that loses);
* ``hga_prefill``: a 64-token block at the end of the context through the kernel path
  (routing + tables + sparse prefill; K/V in HBM; summaries precomputed).

Chunk and group summaries are random (fp32; chunk = sum of its groups): the timing of every
stage is independent of their values, and the reuse between steps comes from the walk.
Rows are appended to a long-format CSV (``bench, op, impl, metric, unit, x_name, x_value,
p20, p50, p80, config_json, gpu, commit, timestamp``) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kvtier.attention import _hga_kernels, _kernel_carry_in, _route, prefill_tables
from kvtier.cli.args import (
    UsageError,
    format_tokens,
    hga_overrides,
    positive_float,
    positive_int,
    positive_ints,
    token_counts,
)
from kvtier.cli.plots import PLOT_HINT, plot_lines
from kvtier.cli.results import CSV_COLUMNS, add_output_arguments, append_csv, output_file, source_commit
from kvtier.config import HGAConfig
from kvtier.decode_step import LayerDecode
from kvtier.engine import engine_from_dense
from kvtier.kernels.sparse_prefill import sparse_prefill
from kvtier.reference.hga import plan_widths

__all__ = ["add_arguments", "run", "main", "plot_decode"]


def _heads(text: str) -> tuple[int, int, int]:
    """``type=`` of --heads: query heads, KV heads, head dim, with KV heads dividing query heads."""
    try:
        hq, hkv, d = positive_ints(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected query heads,KV heads,head dim like 32,8,128, got {text!r}") from None
    if hq % hkv:
        raise argparse.ArgumentTypeError(f"expected KV heads dividing query heads, got {hq} and {hkv}")
    return hq, hkv, d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvtier bench attention``."""
    parser.add_argument("--contexts", default="8K,32K,128K,512K,1M", type=token_counts,
                        help="context lengths in tokens (default 8K,32K,128K,512K,1M)")
    parser.add_argument("--batch", default="1,4", type=positive_ints, help="batch sizes (default 1,4)")
    parser.add_argument("--heads", default="32,8,128", type=_heads, help="query heads, KV heads, head dim")
    parser.add_argument("--steps", type=positive_int, default=48, help="timed decode steps per state")
    parser.add_argument("--warmup-steps", type=positive_int, default=24, help="random-walk steps before steady timing")
    parser.add_argument("--sigma", type=positive_float, default=0.05, help="random-walk step of the queries")
    parser.add_argument("--rope-theta", type=positive_float, default=5e5)
    add_output_arguments(parser, "attention", kinds=("csv",))
    parser.add_argument("--smoke", action="store_true",
                        help="every path once at tiny sizes; without a GPU on Triton's CPU interpreter (about 20 s)")
    parser.add_argument("--hga", default="",
                        help="HGAConfig: a preset (default, paper, lean) and/or overrides, e.g. paper or "
                             "chunk_score=sum,group_score=sum (default: HGAConfig's defaults)")
    parser.add_argument(
        "--no-tune",
        dest="tune",
        action="store_false",
        help="skip timing launch variants of routing and attention (and keep the defaults)",
    )


def _env() -> dict[str, str]:
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": source_commit(),
        "cuda": str(torch.version.cuda),
        "gpu": "none: CPU, Triton interpreter",
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    return env


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


class _Timer:
    """Times callables: CUDA events on a GPU, wall clock on the CPU interpreter."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def many(self, fn, n: int, before=None) -> list[float]:
        """Milliseconds of ``fn()`` over n runs; ``before(i)`` runs untimed before each."""
        out = []
        if self.cuda:
            ev = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)
            ]
            for i in range(n):
                if before is not None:
                    before(i)
                ev[i][0].record()
                fn()
                ev[i][1].record()
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in ev]
        for i in range(n):
            if before is not None:
                before(i)
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def staged(self, fns, n: int, before) -> list[list[float]]:
        """Milliseconds of each of ``fns`` run in order, n times; ``before(i)`` untimed first."""
        out: list[list[float]] = [[] for _ in fns]
        if self.cuda:
            ev = []
            for i in range(n):
                before(i)
                row = []
                for fn in fns:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    fn()
                    e.record()
                    row.append((s, e))
                ev.append(row)
            torch.cuda.synchronize()
            for row in ev:
                for j, (s, e) in enumerate(row):
                    out[j].append(s.elapsed_time(e))
            return out
        for i in range(n):
            before(i)
            for j, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                out[j].append((time.perf_counter() - t0) * 1e3)
        return out

    def bench(self, fn, n: int = 50) -> list[float]:
        """Warm, then time n runs of an eager callable; on the CPU interpreter one run, unwarmed.

        The interpreter compiles nothing, so a warm-up would only double a smoke run's time.
        """
        if not self.cuda:
            return self.many(fn, 1)
        for _ in range(3):
            fn()
        self.sync()
        return self.many(fn, n)


def _graph(fn, cuda: bool):
    """A replay callable: a captured CUDA graph of ``fn`` on a GPU, ``fn`` itself otherwise."""
    if not cuda:
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compiled already; one more run on the side stream before capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _walk(q: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """One random-walk step of the queries, norms kept."""
    noise = torch.randn(q.shape, generator=gen, device=q.device, dtype=torch.float32)
    qf = q.float()
    nq = qf.norm(dim=-1, keepdim=True)
    step = qf + sigma * nq * noise / noise.norm(dim=-1, keepdim=True)
    return (step * (nq / step.norm(dim=-1, keepdim=True))).to(q.dtype)


def _bench_one(
    bsz: int,
    ctx: int,
    hq: int,
    hkv: int,
    d: int,
    args: argparse.Namespace,
    cfg: HGAConfig,
    timer: _Timer,
    dev: str,
    rows: list[dict],
) -> None:
    """All measurements at one (batch, context)."""
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(ctx + bsz)
    c, g = cfg.chunk_size, cfg.group_size
    m = c // g
    conf = {
        "batch": bsz,
        "context": ctx,
        "hq": hq,
        "hkv": hkv,
        "d": d,
        "dtype": str(dt).removeprefix("torch."),
        "pinned": dev == "cuda",
        "cuda_graphs": timer.cuda,
        "hga": asdict(cfg),
    }
    block = args.prefill_block
    pf = f"prefill{block}"

    def add(op, impl, metric, unit, ms_or_vals, **extra):
        vals = ms_or_vals if isinstance(ms_or_vals, tuple) else _quantiles(ms_or_vals)
        rows.append(
            {
                "op": op,
                "impl": impl,
                "metric": metric,
                "unit": unit,
                "x_name": "context",
                "x_value": ctx,
                "p20": vals[0],
                "p50": vals[1],
                "p80": vals[2],
                "config_json": json.dumps({**conf, **extra}),
            }
        )

    k = torch.randn(bsz, hkv, ctx, d, generator=gen, device=dev).to(dt)
    v = torch.randn(bsz, hkv, ctx, d, generator=gen, device=dev).to(dt)
    q1 = torch.randn(bsz, hq, 1, d, generator=gen, device=dev).to(dt)
    q_blk = torch.randn(bsz, hq, block, d, generator=gen, device=dev).to(dt)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    add("decode", "sdpa", "time", "ms", timer.bench(lambda: sdpa(q1, k, v, enable_gqa=True)))
    add(pf, "sdpa", "time", "ms", timer.bench(lambda: sdpa(q_blk, k, v, enable_gqa=True), n=20))

    pos = ctx - 1
    n = ctx // c  # chunks the engine closes over ctx tokens
    dg = cfg.group_key_dim(d)  # [sum], [min, max] or [sum, min, max] per group
    gs = torch.randn(bsz, hkv, max(1, n), m, dg, generator=gen, device=dev)
    cs = gs[..., :d].sum(dim=3)
    t0 = time.perf_counter()
    engine = engine_from_dense(
        k,
        v,
        config=cfg,
        num_q_heads=hq,
        rope_theta=args.rope_theta,
        pin=dev == "cuda",
        summaries=(cs, gs),
        cache_entries=1024 if timer.cuda else 64,
    )
    dec = engine.decoder(0)  # the kernel decode step of a query at position ctx - 1
    setup_s = time.perf_counter() - t0
    dec.q.copy_(q1)
    dec.step()  # compile every kernel before capture
    timer.sync()
    tuned: dict[str, object] = {}
    if args.tune and timer.cuda:
        tuned = _sweep(dec, args, timer, add, hq // hkv)
        conf["tuned"] = tuned
        dec.step()
        timer.sync()
    step = _graph(dec.step, timer.cuda)
    stages = {
        name: _graph(getattr(dec, name), timer.cuda) for name in ("route", "assign", "gather", "attend")
    }

    group_bytes = 2 * g * d * k.element_size()
    # Cold: nothing cached before each step.
    cold_misses = []

    def cold_before(i):
        if i > 0:
            cold_misses.append(int(dec.misses.sum()))
        dec.q.copy_(_walk(dec.q, 1.0, gen))
        dec.reset_cache()

    add(
        "decode",
        "hga_host_cold",
        "time",
        "ms",
        timer.many(step, args.steps, cold_before),
        setup_s=round(setup_s, 2),
    )
    timer.sync()
    cold_misses.append(int(dec.misses.sum()))
    # Gather alone on a cold working set, and its baselines on the same bytes.
    dec.reset_cache()
    stages["route"]()
    stages["assign"]()
    timer.sync()
    n_groups = int(dec.misses.sum())
    table = dec.table.clone()
    nbytes = n_groups * group_bytes
    gather_ms = timer.many(stages["gather"], args.steps)
    gq = _quantiles(gather_ms)
    add(
        "gather",
        "triton_zero_copy",
        "bandwidth",
        "GB/s",
        tuple(nbytes / (x * 1e6) for x in reversed(gq)),
        groups=n_groups,
        bytes=nbytes,
    )
    if timer.cuda and nbytes > 0:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        cq = _quantiles(timer.bench(lambda: dst.copy_(src, non_blocking=True), n=20))
        add(
            "gather",
            "one_pinned_copy",
            "bandwidth",
            "GB/s",
            tuple(nbytes / (x * 1e6) for x in reversed(cq)),
            bytes=nbytes,
        )
        live = table[table[:, 0] >= 0][:512].tolist()  # cap: one launch per copy makes this slow
        host, dslab = dec.host_slab, dec.device_slab

        def per_group():
            for sb, db, kvh in live:
                for j in (0, 1):
                    dslab[db // m, j, kvh, (db % m) * g : (db % m + 1) * g].copy_(
                        host[sb // m, j, kvh, (sb % m) * g : (sb % m + 1) * g], non_blocking=True
                    )

        mq = _quantiles(timer.bench(per_group, n=5))
        add(
            "gather",
            "memcpy_per_group",
            "bandwidth",
            "GB/s",
            tuple(len(live) * group_bytes / (x * 1e6) for x in reversed(mq)),
            groups=len(live),
        )

    # Steady state: a random walk after warm-up steps.
    dec.reset_cache()
    for _ in range(args.warmup_steps):
        dec.q.copy_(_walk(dec.q, args.sigma, gen))
        step()
    timer.sync()
    steady_misses = []

    def steady_before(i):
        if i > 0:
            steady_misses.append(int(dec.misses.sum()))
        dec.q.copy_(_walk(dec.q, args.sigma, gen))

    add(
        "decode",
        "hga_host_steady",
        "time",
        "ms",
        timer.many(step, args.steps, steady_before),
        sigma=args.sigma,
    )
    timer.sync()
    steady_misses.append(int(dec.misses.sum()))
    cold_mean = sum(cold_misses) / max(1, len(cold_misses))
    reuse = 1.0 - (sum(steady_misses) / max(1, len(steady_misses))) / max(1.0, cold_mean)
    add(
        "decode",
        "hga_host_steady",
        "reuse",
        "fraction",
        (reuse, reuse, reuse),
        sigma=args.sigma,
        cold_groups=cold_mean,
        steady_groups=sum(steady_misses) / max(1, len(steady_misses)),
    )
    names = ("route", "assign", "gather", "attend")
    staged = timer.staged(
        [stages[x] for x in names], args.steps, lambda i: dec.q.copy_(_walk(dec.q, args.sigma, gen))
    )
    for name, st in zip(names, staged):
        add("decode_stage", f"hga_host_steady_{name}", "time", "ms", st)

    # Chunk-routing variants (tile width, selection by sort or max-extraction, warps).
    for per_program in (1, 2, 4) if timer.cuda else ():  # steady gather: mostly table rows to skip
        dec.gather_rows = per_program
        add(
            "gather_variant",
            f"rows{per_program}_steady",
            "time",
            "ms",
            timer.many(_graph(dec.gather, timer.cuda), args.steps),
        )
    if timer.cuda:
        dec.gather_segmented = True
        add(
            "gather_variant",
            "segmented_steady",
            "time",
            "ms",
            timer.many(_graph(dec.gather, timer.cuda), args.steps),
        )
        dec.gather_segmented = False
    dec.gather_rows = 1

    # Prefill: one block of queries (64; a chunk in a smoke run) at the end of the context, K/V in HBM.
    start = ctx - block
    cur = q_blk[:, :, :1]
    walk = [cur]
    for _ in range(block - 1):  # consecutive queries of a block drift like decode queries do
        cur = _walk(cur, args.sigma, gen)
        walk.append(cur)
    qblk = torch.cat(walk, dim=2).contiguous()

    def prefill():
        return _hga_kernels(qblk, k, v, cfg, args.rope_theta, start, summaries=(cs, gs))

    t0 = time.perf_counter()
    _, stats = prefill()
    first_ms = [(time.perf_counter() - t0) * 1e3]
    union = stats.plan.group_ids.reshape(bsz * hq, -1).tolist()
    uniq = sum(len(set(row) - {-1}) for row in union) / max(1, bsz * hq)
    add(
        pf,
        "hga_kernels",
        "time",
        "ms",
        timer.bench(prefill, n=10) if timer.cuda else first_ms,  # the interpreter: that one run
        routed_groups_per_head=round(uniq, 1),
    )
    # Its stages: routing, block tables (torch, one host sync), the attention kernel.
    geo = dict(chunk_size=c, group_size=g, sink_chunks=cfg.sink_chunks, local_chunks=cfg.local_chunks)
    widths = plan_widths(cfg, ctx - 1)
    plan = [torch.full((bsz, hq, block, w_), -1, dtype=torch.int64, device=dev) for w_ in widths]
    plan.append(torch.full((bsz, hq, block, widths[1]), -1, dtype=torch.int32, device=dev))
    run_carry = _kernel_carry_in(cfg, start, qblk, None)  # running scores: the block opens its chunk
    carry = None if run_carry is None else (run_carry, run_carry)
    add(
        f"{pf}_stage",
        "hga_route",
        "time",
        "ms",
        timer.bench(lambda: _route(qblk, cs, gs, start, cfg, widths, tuple(plan), carry=carry), n=10),
    )
    if args.tune and timer.cuda:
        add(
            f"{pf}_stage",
            "hga_route_tf32x3",
            "time",
            "ms",
            timer.bench(
                lambda: _route(qblk, cs, gs, start, cfg, widths, tuple(plan), precision="tf32x3", carry=carry),
                n=10,
            ),
        )
    add(
        f"{pf}_stage",
        "hga_tables",
        "time",
        "ms",
        timer.bench(lambda: prefill_tables(stats.plan.group_ids, start, c), n=10),
    )
    tab, num, vis = prefill_tables(stats.plan.group_ids, start, c)
    obuf = torch.empty_like(qblk)
    add(
        f"{pf}_stage",
        "hga_attend",
        "time",
        "ms",
        timer.bench(lambda: sparse_prefill(qblk, k, v, tab, num, vis, obuf, start_pos=start, **geo), n=10),
    )
    if timer.cuda:
        torch.cuda.empty_cache()


def _sweep(dec: LayerDecode, args: argparse.Namespace, timer: _Timer, add, rep: int) -> dict[str, object]:
    """Time launch variants of the decode step's stages (each its own graph); keep the fastest.

    This is the autotuning of the benchmark: the chosen route and attention settings are
    then used for every measurement at this shape, and recorded in the rows' config.
    """
    best: dict[str, tuple[float, object]] = {}

    def timed(name: str, fn, stage: str = "", setting: object = None) -> None:
        try:
            fn()
            ms = timer.many(_graph(fn, timer.cuda), args.steps)
        except Exception as exc:  # a variant out of resources is a result, not a failure
            print(f"# variant {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            return
        add(*name.split(":", 1), "time", "ms", ms)
        p50 = _quantiles(ms)[1]
        if stage and (stage not in best or p50 < best[stage][0]):
            best[stage] = (p50, setting)

    for bt in (128, 256, 512):
        for kind, opts in (
            ("ieee", dict(precision="ieee")),
            ("tf32x3", dict(precision="tf32x3")),
            ("fma", dict(use_dot=False, block_r=rep)),
        ):
            for nw in (4, 8):
                setting = dict(block_t=bt, num_warps=nw, **opts)
                dec.set_route_tiles(**setting)
                timed(f"route_variant:bt{bt}_{kind}_w{nw}", dec.route, "route", setting)
    route = dict(best["route"][1]) if "route" in best else dict(block_t=None)
    for gw in (1, 2, 4):
        dec.set_route_tiles(**route, group_warps=gw)
        timed(f"route_variant:best_groupwarps{gw}", dec.route, "group_warps", gw)
    route["group_warps"] = best.get("group_warps", (0, 4))[1]
    dec.set_route_tiles(**route)
    base = dec.workspace.shape[2]
    for splits in sorted({max(1, base // 2), base, 2 * base}):
        dec.set_decode_splits(splits)
        timed(f"attend_variant:splits{splits}_bn64", dec.attend, "splits", splits)
    splits = best.get("splits", (0, base))[1]
    dec.set_decode_splits(splits)
    return {"route": route, "splits": splits}


# Budgets small enough that a 256-token context has sinks, a local window and routed chunks.
_SMOKE_HGA = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=3, top_groups=4,
                       fetch_groups=8)


def _rerun_on_interpreter(args: argparse.Namespace) -> int:
    """The smoke run in a child process with ``TRITON_INTERPRET=1``.

    Triton reads the variable when a kernel is defined, i.e. when kvtier is imported, which
    has already happened here; so the child runs the same command with it set.
    """
    print("# no CUDA GPU: running the smoke sizes on Triton's CPU interpreter (TRITON_INTERPRET=1, "
          "in a child process)", flush=True)
    argv = [sys.executable, "-m", "kvtier", "bench", "attention", "--smoke", "--out", str(args.out)]
    if args.csv is not None:
        argv += ["--csv", args.csv]
    if not args.tune:
        argv.append("--no-tune")
    if args.hga:
        argv += ["--hga", args.hga]
    return subprocess.run(argv, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False).returncode


def run(args: argparse.Namespace) -> int:
    """Run the sweep, append to the CSV and print a markdown table; returns 0."""
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise UsageError("expected a CUDA GPU (or --smoke, which runs anywhere), got none")
    try:
        cfg = hga_overrides(args.hga, _SMOKE_HGA if args.smoke else HGAConfig())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return _rerun_on_interpreter(args)
    contexts, batches, (hq, hkv, d) = args.contexts, args.batch, args.heads
    args.prefill_block = 64
    if args.smoke:  # every code path once, small enough for the CPU interpreter in CI
        contexts, batches, (hq, hkv, d) = [256], [1], (4, 2, 32)
        args.steps, args.warmup_steps = 2, 2
        # 16 queries, not 64: routing a block costs ~0.4 s per query on the interpreter.
        args.prefill_block = cfg.chunk_size
    dev = "cuda" if cuda else "cpu"
    env = _env()
    print("# kvtier bench attention | " + " | ".join(f"{k}={v}" for k, v in env.items()))
    if cuda:
        ran = "host slab pinned; decode steps replayed as CUDA graphs"
    else:
        ran = ("device CPU, kernels on the Triton interpreter (times say nothing about GPU speed); "
               "host slab pageable; decode steps called eagerly (no CUDA graphs)")
    print(f"# {cfg}; {ran}" + ("; smoke sizes" if args.smoke else ""))
    timer = _Timer(cuda)
    rows: list[dict] = []
    path = output_file(args, "csv", "attention")
    for bsz in batches:
        for ctx in contexts:
            t0 = time.perf_counter()
            done = len(rows)
            try:
                _bench_one(bsz, ctx, hq, hkv, d, args, cfg, timer, dev, rows)
            except torch.OutOfMemoryError as exc:  # report and go on: smaller configs stay valid
                print(f"# batch {bsz} context {format_tokens(ctx)}: out of memory ({str(exc).splitlines()[0]})")
                if cuda:
                    torch.cuda.empty_cache()
            if path is not None:
                _append_csv(path, rows[done:], env)
            print(f"# batch {bsz} context {format_tokens(ctx)}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(_table(rows))
    written = [f"{path} (rows appended)"] if path is not None else []
    png = plot_decode(rows, output_file(args, "png", "attention"))
    written += [str(png)] if png else [PLOT_HINT]
    print("results: " + ", ".join(written))
    return 0


def _append_csv(path: Path, rows: list[dict], env: dict[str, str]) -> None:
    """Append rows in the long format of the style guide (header when the file is new)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in rows:
        r.update(bench="attention", gpu=env["gpu"], commit=env["commit"], timestamp=stamp)
    append_csv(path, ({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS} for r in rows))


def _table(rows: list[dict]) -> str:
    """Markdown summary: per (batch, context), p50 of each row and ratios to SDPA."""
    keyed: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        conf = json.loads(r["config_json"])
        keyed.setdefault((conf["batch"], r["x_value"]), {})[f"{r['op']}/{r['impl']}/{r['metric']}"] = r["p50"]
    pf = next((r["op"] for r in rows if r["op"].startswith("prefill") and "_" not in r["op"]), "prefill64")
    head = (
        "| B | context | SDPA decode ms | HGA cold ms | HGA steady ms | steady/SDPA | reuse | route | assign | "
        f"gather | attend | gather GB/s | pinned copy GB/s | memcpy/group GB/s | SDPA {pf[7:]}q ms | HGA {pf} ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (b, ctx), d in sorted(keyed.items()):

        def f(key, fmt="{:.3f}", d=d):
            val = d.get(key)
            return fmt.format(val) if val is not None and math.isfinite(val) else "-"

        sd = d.get("decode/sdpa/time")
        st = d.get("decode/hga_host_steady/time")
        ratio = f"{st / sd:.2f}" if sd and st else "-"
        lines.append(
            f"| {b} | {format_tokens(ctx)} | {f('decode/sdpa/time')} | {f('decode/hga_host_cold/time')} | "
            f"{f('decode/hga_host_steady/time')} | {ratio} | {f('decode/hga_host_steady/reuse', '{:.3f}')} | "
            f"{f('decode_stage/hga_host_steady_route/time')} | {f('decode_stage/hga_host_steady_assign/time')} | "
            f"{f('decode_stage/hga_host_steady_gather/time')} | {f('decode_stage/hga_host_steady_attend/time')} | "
            f"{f('gather/triton_zero_copy/bandwidth', '{:.1f}')} | {f('gather/one_pinned_copy/bandwidth', '{:.1f}')} | "
            f"{f('gather/memcpy_per_group/bandwidth', '{:.2f}')} | {f(pf + '/sdpa/time')} | "
            f"{f(pf + '/hga_kernels/time')} |"
        )
    return "\n".join(lines)


_DECODE_LINES = {"sdpa": "SDPA, all K/V in HBM", "hga_host_steady": "HGA steady, K/V in host memory",
                 "hga_host_cold": "HGA cold (empty group cache)"}


def plot_decode(rows: list[dict], path: str | Path) -> Path | None:
    """PNG of the decode step's p50 time against context: SDPA beside HGA cold and steady, per batch.

    ``rows`` are CSV rows (as read back, strings) or this run's rows; for a (batch, context,
    impl) measured more than once the last row wins, so an appended CSV plots its latest run.
    Returns the file, or None without matplotlib.
    """
    points: dict[tuple[str, int], dict[int, float]] = {}
    gpu = ""
    for r in rows:
        if r["op"] != "decode" or r["metric"] != "time" or r["impl"] not in _DECODE_LINES:
            continue
        batch = json.loads(r["config_json"])["batch"]
        points.setdefault((r["impl"], batch), {})[int(r["x_value"])] = float(r["p50"])
        gpu = r.get("gpu", gpu)
    if not points:
        return None
    series = {}
    for (impl, batch), pts in sorted(points.items(), key=lambda kv: (kv[0][1], list(_DECODE_LINES).index(kv[0][0]))):
        xs = sorted(pts)
        series[f"{_DECODE_LINES[impl]}, batch {batch}"] = (xs, [pts[x] for x in xs])
    contexts = sorted({x for pts in points.values() for x in pts})
    return plot_lines(path, series, "context (tokens)", "time per decode step and layer (ms, p50)",
                      f"Decode attention vs context{f' on {gpu}' if gpu else ''}", logx=True, logy=True,
                      xticks=[(c, format_tokens(c)) for c in contexts])


def main(argv: list[str] | None = None) -> int:
    """``python bench/attention.py`` entry point: the same as ``kvtier bench attention``."""
    from kvtier.cli import main as cli_main

    return cli_main(["bench", "attention", *(sys.argv[1:] if argv is None else argv)])
