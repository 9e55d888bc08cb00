"""A padded batch over one :class:`kvtier.TieredStore`: one :class:`kvtier.engine.HGAEngine` of batch 1 per row.

:class:`HGAEngine` advances every row of its batch by the same positions (one token count per
layer). The rows of a tokenizer-padded batch have different real lengths, and padding tokens
must never be attended, routed or summarised, so :class:`kvtier.hf.TieredCache` serves such a
batch row by row: row b gets an engine of batch 1 whose chunks are stored under ``seq_id`` b
of the shared store (``HGAEngine(first_seq_id=b)``), and each engine receives only its row's
real tokens. Padding never enters an engine, so a row's routing plans, summaries and outputs
are those of the row alone.

Cost: B engine calls per layer and step instead of one (a decode step of batch B runs B
batch-1 steps); equal-length batches keep one batched engine.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier.engine import HGAEngine

__all__ = ["RowEngines", "merge_engine_stats"]

# Counters that add up over row engines (everything else is derived or per-engine).
_SUMMED = (
    "queries", "decode_steps", "groups_gathered", "host_bytes_gathered", "cache_hits", "cache_misses",
    "disk_waits", "disk_wait_s", "prefetch_issued", "prefetch_hits", "host_syncs", "fence_waits",
    "device_resident_bytes",
)  # fmt: skip


def merge_engine_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """One :meth:`HGAEngine.stats` dict for several engines (the rows of a padded batch).

    Counts are summed; ``mean_keys_per_query`` and ``density`` are means weighted by each
    engine's queries; ``device_cache_hit_rate`` and ``prefetch_hit_share`` are recomputed from
    the summed counts; ``tokens`` and ``closed_chunks`` are the longest row's.

    Parameters
    ----------
    stats : list of dict
        :meth:`HGAEngine.stats` of each engine, at least one.

    Returns
    -------
    dict
        The keys of :meth:`HGAEngine.stats`, plus ``row_engines`` (how many were merged).
    """
    if not stats:
        raise ValueError("stats: expected at least one engine's stats, got none")
    out: dict[str, Any] = {key: sum(s[key] for s in stats) for key in _SUMMED}
    queries = out["queries"]
    for key in ("mean_keys_per_query", "density"):
        out[key] = sum(s[key] * s["queries"] for s in stats) / queries if queries else 0.0
    used = sum(s["cache_hits"] + s["groups_gathered"] for s in stats if s["device_cache_hit_rate"] is not None)
    out["device_cache_hit_rate"] = out["cache_hits"] / used if used else None
    asked_disk = out["prefetch_hits"] + out["disk_waits"]
    out["prefetch_hit_share"] = out["prefetch_hits"] / asked_disk if asked_disk else None
    out["tokens"] = max(s["tokens"] for s in stats)
    out["closed_chunks"] = max(s["closed_chunks"] for s in stats)
    out["backend"] = stats[0]["backend"]
    out["cuda_graphs"] = any(s["cuda_graphs"] for s in stats)
    out["row_engines"] = len(stats)
    return out


class RowEngines:
    """B engines of batch 1 over one store, row b's chunks under ``seq_id`` b.

    Parameters
    ----------
    store : TieredStore
        Shared by every row (one host slab, one disk tier, one budget).
    batch_size : int
        B, the rows of the padded batch.
    cache_bytes : int, optional
        Device group cache budget over all rows (each engine gets ``cache_bytes // B``).
    **engine_kwargs
        The rest of :class:`HGAEngine`'s arguments (``hga``, ``num_q_heads``, ``rope``,
        ``device``, ``backend``, ``prefetch``), the same for every row.
    """

    def __init__(self, store: Any, *, batch_size: int, cache_bytes: int | None = None, **engine_kwargs: Any) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        per_row = None if cache_bytes is None else int(cache_bytes) // batch_size
        self.engines: list[HGAEngine] = []
        try:
            for b in range(batch_size):
                self.engines.append(
                    HGAEngine(store, batch_size=1, first_seq_id=b, cache_bytes=per_row, **engine_kwargs)
                )
        except BaseException:
            self.close()
            raise
        self.store = store
        self.batch_size = batch_size
        self.device = self.engines[0].device
        self.backend = self.engines[0].backend

    def num_tokens(self, layer: int, row: int) -> int:
        """Real tokens row ``row`` holds in ``layer``."""
        return self.engines[row].num_tokens(layer)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        real: list[torch.Tensor | None],
        **kwargs: Any,
    ) -> torch.Tensor:
        """Append each row's real new tokens and attend their queries.

        Parameters
        ----------
        layer : int
        q : Tensor ``[B, Hq, L, D]``
            Post-RoPE queries of the call's L new positions (padding included).
        k, v : Tensor ``[B, Hkv, L, D]``
        real : list of B entries
            Per row, the indices ``[n_b]`` (int64, on q's device) of its real new tokens, in
            order, or None when all L are real.
        **kwargs
            Passed to :meth:`HGAEngine.forward` (``scale``, ...).

        Returns
        -------
        Tensor ``[B, Hq, L, D]``: each real query's HGA output over its row's real tokens;
        zeros at padding queries.
        """
        if len(real) != self.batch_size or q.shape[0] != self.batch_size:
            raise ValueError(f"real, q: expected {self.batch_size} rows, got {len(real)} and {q.shape[0]}")
        out = torch.zeros_like(q)
        for b, (engine, idx) in enumerate(zip(self.engines, real)):
            rows = slice(b, b + 1)
            if idx is None:
                out[rows] = engine.forward(layer, q[rows], k[rows], v[rows], **kwargs)
            elif idx.numel():
                got = engine.forward(layer, q[rows][:, :, idx], k[rows][:, :, idx], v[rows][:, :, idx], **kwargs)
                out[rows, :, idx] = got
        return out

    def stats(self) -> dict[str, Any]:
        """:func:`merge_engine_stats` over the rows."""
        return merge_engine_stats([e.stats() for e in self.engines])

    def reset_stats(self) -> None:
        """Zero every row's counters."""
        for e in self.engines:
            e.reset_stats()

    def reset(self) -> None:
        """Forget every row's tokens and drop its chunks from the store."""
        for e in self.engines:
            e.reset()

    def close(self) -> None:
        """Detach every row's engine from the store."""
        for e in self.engines:
            e.close()
