"""Configuration objects: every knob of HGA and of the tiered store, validated at construction.

This is the only module that reads ``KVTIER_*`` environment variables (see README).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.errors import ConfigError

__all__ = [
    "HGAConfig",
    "StoreConfig",
    "CHUNK_SCORE_TERMS",
    "GROUP_SCORES",
    "GROUP_MERGES",
    "parse_bytes",
    "format_bytes",
    "env_flag",
]

#: Chunk scores a query can rank candidate chunks by (``HGAConfig.chunk_score``, one or two joined by "+").
CHUNK_SCORE_TERMS = ("sum", "max_group", "running_max", "running_max_group")
#: Group scores (``HGAConfig.group_score``): one, or the split "sum+bound".
GROUP_SCORES = ("sum", "bound", "sum+bound")
#: How "sum+bound" joins its two group rankings (``HGAConfig.group_merge``).
GROUP_MERGES = ("split", "rank")

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, name: str = "bytes") -> int:
    """Parse a byte count: an int, or a string such as ``"8GiB"``, ``"512 MiB"``, ``"2GB"``.

    Binary units (KiB, MiB, GiB, TiB, and the bare K, M, G, T) are powers of 1024;
    decimal units (kB, MB, GB, TB) are powers of 1000.

    Raises
    ------
    TypeError
        If ``value`` is neither an int nor a str.
    ConfigError
        If the string cannot be parsed or the count is negative.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name}: expected an int or a string like '8GiB', got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: expected a byte count >= 0, got {value}")
        return value
    match = _BYTES_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{name}: expected a byte count like '8GiB' or '512MB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def env_flag(name: str, default: str = "") -> str:
    """Read one ``KVTIER_*`` environment variable (the only place kvtier reads the environment)."""
    if not name.startswith("KVTIER_"):
        raise ValueError(f"expected a KVTIER_* variable name, got {name!r}")
    return os.environ.get(name, default)


def _int_field(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"HGAConfig.{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"HGAConfig.{name}: expected an int >= {minimum}, got {value}")


@dataclass(frozen=True, kw_only=True)
class HGAConfig:
    """Every knob of Hierarchical Global Attention; the defaults are the routing measured best.

    The defaults differ from the paper's (:meth:`paper`) in routing only, at the same 1,216
    keys per query: 48 chunks at the first level instead of 16, half of them ranked by their
    best group's Quest bound (``chunk_score="sum+max_group"``); half of the routed groups by
    the bound (``group_score="sum+bound"``); and 1 sink and 2 local chunks instead of 2 and 8,
    their 448 keys routed as 28 more groups (60). Measured on SmolLM2 (docs/fidelity.md,
    section 5): the NLL gap to dense falls from +0.0128 / +0.0334 nats/token (the paper's) to
    +0.0068 / +0.0196 at 4K / 8K (the oracle's 960 true top keys with the same windows:
    +0.0066 / +0.0217), 11 of 12 needles are found at 2K-8K (every one dense finds) against
    5, and 47 of 126 task samples are solved (dense 52, Quest 43). The price is in routing
    bytes: group keys ``[sum, min, max]`` (3 x the paper's group summaries: 6.5 KiB per chunk
    and KV head at D = 128 against 2.5 KiB) and a first-level scan over every candidate's
    bounds as well as its summary (9 x the paper's chunk-level bytes). :meth:`lean` keeps the
    paper's summaries and scans with a wider first level (32 chunks).

    Budgets count whole units (chunks or groups); a budget larger than what exists is
    clipped, so a huge value means full coverage and HGA then equals dense attention.

    Attributes
    ----------
    chunk_size : int
        Tokens per chunk (C), the unit of the first routing level and of storage. Default 64.
    group_size : int
        Tokens per group (gs), the unit of the second routing level and of the gather;
        must divide ``chunk_size``. Default 16.
    sink_chunks : int
        Leading chunks every query attends in full (F). Default 1 (the paper: 2): the
        first chunk holds the first tokens, where pretrained models keep their attention sink,
        and the second chunk's 64 keys do more as 4 routed groups.
    local_chunks : int
        Most recent closed chunks every query attends in full (L). Default 2 (the paper: 8).
    top_chunks : int
        Chunks chosen per query and query head by chunk routing (K_c). Default 48 (the
        paper: 16).
    top_groups : int
        Groups attended per query and query head, chosen inside the routed chunks (K_g).
        Default 60 (the paper: 32).
    fetch_groups : int
        Groups the store is asked to make resident per query and query head: the
        ``top_groups`` attended plus the next best as a prefetch for the following steps.
        It never changes which keys a query attends. Default 64.
    rope_cutoff_rad : float
        Mixed-RoPE cut-off: frequency pair i is summarised token-wise (rotated sum) when
        ``(chunk_size - 1) * omega_i > rope_cutoff_rad`` and by sum-then-rotate at the
        anchor position otherwise. Default 0.5 rad.
    chunk_score : str
        How a query ranks candidate chunks at the first level. One term, or two joined by
        ``"+"`` (the first ``ceil(Kc / 2)`` chunks by the first term, the rest by the second
        among the chunks not yet chosen). Default ``"sum+max_group"``. Terms (see
        ``docs/fidelity.md`` for costs):

        * ``"sum"``: ``q . S_c`` with S_c the mixed-RoPE chunk summary, about the sum of the
          chunk's logits (the paper's rule);
        * ``"max_group"``: the best group score of the chunk, ``max_g score(q, G_g)`` with
          ``group_score``'s score (its bound with ``"sum+bound"``), so one strong group lifts
          its chunk (no new summary bytes);
        * ``"running_max"``: ``max_{s <= t, s in chunk(t)} q_s . S_c``, the causal running max
          over the queries of the query's own chunk up to its position (stateful in decode:
          see :class:`kvtier.reference.RouteCarry`);
        * ``"running_max_group"``: the same running max of ``"max_group"``.
    group_score : str
        How a query ranks the groups of its routed chunks: ``"sum"`` (``q . G_g``, the mixed-RoPE
        group summary; the paper's rule), ``"bound"`` (Quest's bound
        ``sum_i max(q_i min_i, q_i max_i)`` over the elementwise min and max of the group's
        post-RoPE keys: twice the group summary bytes), or ``"sum+bound"``: the first
        ``ceil(Kg / 2)`` groups by the sum, the rest of the ``Kg`` by the bound among the groups
        not yet chosen, then the prefetch groups by the sum (three times the group summary
        bytes: the sum and the bounds; the default).
    group_merge : {"split", "rank"}
        How ``group_score="sum+bound"`` joins its two rankings of the candidate groups.
        ``"split"`` (the default): half of the ``Kg`` by each, as above. ``"rank"``: the ``Kg``
        groups with the least sum of their two ranks (rank 0 the best; ties to the lesser of
        the two ranks, then to the earlier candidate), so a group both scores place in their
        second halves can beat one that only a single score likes; then the prefetch groups by
        the sum. Only with ``"sum+bound"``.
    group_reserve : int
        With ``group_merge="rank"``: groups taken first by each score alone (the sum's best
        ``r``, then the bound's best ``r`` of the rest, ``r = min(group_reserve, Kg // 2)``)
        before the rank sum picks the remaining ``Kg - 2r``; 0 (the default) ranks them all by
        the rank sum, and ``Kg // 2`` is the split (for even ``Kg``).
    max_group_size : int or None
        Tokens of what a ``max_group`` chunk-score term takes the best of: ``None`` (the
        default) for one group, or a multiple of ``group_size`` dividing ``chunk_size``, whose
        adjacent groups then count as one unit (minima by their min, maxima by their max, sums
        added: no new bytes). Units of 16 tokens over groups of 8 rank chunks exactly as groups
        of 16 do under the bound and route twice as many groups half as large at the second
        level (a lead for the 8K gap, docs/fidelity.md section 5). Requires a ``max_group`` term.
    """

    chunk_size: int = 64
    group_size: int = 16
    sink_chunks: int = 1  # the paper's 2 (and 4 fewer routed groups): 17 task samples solved, not 19
    # 4 local chunks with 32 first-level chunks (the default until 2026-12-04) solve the same 47 of
    # 126 task samples and 11 grid needles, but are +0.0211 at 8K against +0.0196 and find 28 of 36
    # needles against 29 with every needle at every cell; 2 local chunks alone need the wider first
    # level: with 32 chunks they miss a needle (docs/fidelity.md, section 5).
    local_chunks: int = 2
    top_chunks: int = 48
    top_groups: int = 60
    fetch_groups: int = 64
    rope_cutoff_rad: float = 0.5
    chunk_score: str = "sum+max_group"
    group_score: str = "sum+bound"
    group_merge: str = "split"
    group_reserve: int = 0
    max_group_size: int | None = None

    def __post_init__(self) -> None:
        _int_field("chunk_size", self.chunk_size, 1)
        _int_field("group_size", self.group_size, 1)
        for name in ("sink_chunks", "local_chunks", "top_chunks", "top_groups", "fetch_groups"):
            _int_field(name, getattr(self, name), 0)
        if self.chunk_size % self.group_size != 0:
            raise ConfigError(
                f"HGAConfig.group_size: expected a divisor of chunk_size={self.chunk_size}, "
                f"got {self.group_size}"
            )
        if self.fetch_groups < self.top_groups:
            raise ConfigError(
                f"HGAConfig.fetch_groups: expected >= top_groups={self.top_groups}, "
                f"got {self.fetch_groups}"
            )
        cutoff = self.rope_cutoff_rad
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not math.isfinite(cutoff) or cutoff < 0:
            raise ConfigError(f"HGAConfig.rope_cutoff_rad: expected a finite float >= 0, got {cutoff!r}")
        terms = self.chunk_score.split("+") if isinstance(self.chunk_score, str) else None
        if terms is None or len(terms) > 2 or len(set(terms)) != len(terms) or any(t not in CHUNK_SCORE_TERMS for t in terms):
            raise ConfigError(
                f"HGAConfig.chunk_score: expected one of {CHUNK_SCORE_TERMS} or two different ones joined "
                f"by '+', got {self.chunk_score!r}"
            )
        if self.group_score not in GROUP_SCORES:
            raise ConfigError(f"HGAConfig.group_score: expected one of {GROUP_SCORES}, got {self.group_score!r}")
        if self.group_merge not in GROUP_MERGES:
            raise ConfigError(f"HGAConfig.group_merge: expected one of {GROUP_MERGES}, got {self.group_merge!r}")
        _int_field("group_reserve", self.group_reserve, 0)
        if self.group_reserve and self.group_merge != "rank":
            raise ConfigError(
                f"HGAConfig.group_reserve: expected group_merge='rank' to reserve groups for, got "
                f"group_merge={self.group_merge!r} with group_reserve={self.group_reserve}"
            )
        if self.group_merge != "split" and len(self.group_score_terms) != 2:
            raise ConfigError(
                f"HGAConfig.group_merge: expected group_score='sum+bound' to merge two rankings, got "
                f"group_merge={self.group_merge!r} with group_score={self.group_score!r}"
            )
        if self.max_group_size is not None:
            _int_field("max_group_size", self.max_group_size, 1)
            if self.max_group_size % self.group_size or self.chunk_size % self.max_group_size:
                raise ConfigError(
                    f"HGAConfig.max_group_size: expected a multiple of group_size={self.group_size} dividing "
                    f"chunk_size={self.chunk_size}, got {self.max_group_size}"
                )
            if not any(t.endswith("max_group") for t in terms):
                raise ConfigError(
                    f"HGAConfig.max_group_size: expected a max_group term in chunk_score to use it, got "
                    f"chunk_score={self.chunk_score!r}"
                )

    @property
    def chunk_score_terms(self) -> tuple[str, ...]:
        """The one or two terms of ``chunk_score``."""
        return tuple(self.chunk_score.split("+"))

    @property
    def group_score_terms(self) -> tuple[str, ...]:
        """The one or two terms of ``group_score``."""
        return tuple(self.group_score.split("+"))

    def group_key_dim(self, head_dim: int) -> int:
        """Width of a group's routing keys: D for the sum, 2D for the bound, 3D for both."""
        return head_dim * {"sum": 1, "bound": 2, "sum+bound": 3}[self.group_score]

    @property
    def running_routing(self) -> bool:
        """Whether a chunk score is a running max over the current chunk's queries (stateful decode)."""
        return any(t.startswith("running_") for t in self.chunk_score_terms)

    @property
    def groups_per_max_group(self) -> int:
        """Adjacent groups a ``max_group`` term scores as one unit (1 unless ``max_group_size`` says more)."""
        return (self.max_group_size or self.group_size) // self.group_size

    @property
    def groups_per_chunk(self) -> int:
        """Groups in one chunk (M = chunk_size / group_size)."""
        return self.chunk_size // self.group_size

    @classmethod
    def paper(cls, **overrides: int | float | str) -> HGAConfig:
        """The paper's configuration: 2 sink and 8 local chunks, 16 routed chunks and 32 groups, summed summaries."""
        paper = dict(sink_chunks=2, local_chunks=8, top_chunks=16, top_groups=32, chunk_score="sum", group_score="sum")
        return cls(**{**paper, **overrides})  # type: ignore[arg-type]

    @classmethod
    def lean(cls, **overrides: int | float | str) -> HGAConfig:
        """The paper's summaries and windows with 32 routed chunks: the least routing bytes per chunk.

        The default before the max-aware scores (NLL gap +0.0094 / +0.0320 at 4K / 8K on
        SmolLM2, 7 of 12 needles): for contexts where the default's 3 x group keys do not fit.
        """
        return cls.paper(**{"top_chunks": 32, **overrides})

    @classmethod
    def full_coverage(cls, **overrides: int | float | str) -> HGAConfig:
        """A configuration whose budgets cover any context: HGA then equals dense attention."""
        big = 1 << 40
        base = dict(top_chunks=big, top_groups=big, fetch_groups=big)
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


_IO_BACKENDS = ("auto", "posix", "kvikio")
_EVICTION = ("lru",)


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Budgets and backends of the tiered K/V store.

    Attributes
    ----------
    gpu_bytes, host_bytes, disk_bytes : int or str
        Budget of each tier in bytes, or a string such as ``"8GiB"``. Parsed to ints at
        construction. ``gpu_bytes=0`` disables the device cache; ``disk_bytes=0`` disables
        the disk tier (the host tier then drops its least recently used chunks when full).
    disk_dir : str or Path or None
        Folder of the disk tier's slab files, locked by one store at a time. None (the
        default): a private temporary folder, removed at close, so a store never runs out
        of room mid-generation while the disk has space.
    io_backend : {"auto", "posix", "kvikio"}
        Disk I/O backend; "auto" picks kvikio when it runs GPUDirect Storage, else POSIX
        (O_DIRECT): kvikio's compatibility mode is POSIX I/O behind another layer.
    eviction : {"lru"}
        Eviction policy of every tier.
    device : str or None
        Device of the device tier; None means "cuda" when available, else "cpu".
    """

    gpu_bytes: int | str = "1GiB"
    host_bytes: int | str = "4GiB"
    disk_bytes: int | str = "64GiB"
    disk_dir: str | Path | None = None
    io_backend: str = "auto"
    eviction: str = "lru"
    device: str | None = None
    io_threads: int = field(default=4)

    def __post_init__(self) -> None:
        for name in ("gpu_bytes", "host_bytes", "disk_bytes"):
            object.__setattr__(self, name, parse_bytes(getattr(self, name), name=f"StoreConfig.{name}"))
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, Path)):
                raise TypeError(
                    f"StoreConfig.disk_dir: expected a str, Path or None, got {type(self.disk_dir).__name__}"
                )
            if str(self.disk_dir) == "":  # Path("") is the current directory: never meant
                raise ConfigError("StoreConfig.disk_dir: expected a folder path or None, got ''")
            object.__setattr__(self, "disk_dir", Path(self.disk_dir))
        if self.io_backend not in _IO_BACKENDS:
            raise ConfigError(f"StoreConfig.io_backend: expected one of {_IO_BACKENDS}, got {self.io_backend!r}")
        if self.eviction not in _EVICTION:
            raise ConfigError(f"StoreConfig.eviction: expected one of {_EVICTION}, got {self.eviction!r}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ConfigError(f"StoreConfig.io_threads: expected an int >= 1, got {self.io_threads!r}")
