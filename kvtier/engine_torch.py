"""The torch flow of :class:`kvtier.engine.HGAEngine` (CPU): route, gather the union, attend in float32.

:class:`_TorchFlow` is mixed into the engine; see the :mod:`kvtier.engine` module docstring.
"""

from __future__ import annotations

import torch

from kvtier.engine_state import _Layer
from kvtier.engine_unions import _BIG, _union_by_first_use
from kvtier.layout import Windows, windows_at
from kvtier.reference.hga import RoutePlan, plan_widths, route_block


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit soft-capping ``softcap * tanh(scores / softcap)`` in place (Gemma-2), before masking."""
    if softcap is None:
        return scores
    return scores.div_(softcap).tanh_().mul_(softcap)


class _TorchFlow:
    """One block of positions through torch ops (routing by the reference), on the engine's state."""

    # ------------------------------------------------------------------ torch flow
    def _route_torch(
        self, st: _Layer, q: torch.Tensor, p0: int, win: Windows, widths: tuple[int, int, int]
    ) -> RoutePlan:
        assert st.cs is not None and st.gs is not None
        n = st.num_closed
        plan = route_block(
            q.float(), st.cs[:, :, :n], st.gs[:, :, :n], win, self.hga, widths, first_pos=p0, carry=st.carry
        )
        st.carry = plan.carry
        return plan

    def _ring_hidden(self, st: _Layer, win: Windows, p0: int, p1: int, device: torch.device) -> torch.Tensor:
        """Bool ``[rep * Lb, hot * C]``: the ring keys each query row (``r * Lb + l``) does not attend.

        Every layer of one step has the same ring and positions: the last one is reused.
        """
        key = (tuple(st.ring_chunk), p0, p1, device)
        cached = getattr(self, "_ring_hidden_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        hidden = (~self._ring_mask(st, win, p0, p1, device)).repeat(self.rep, 1)
        self._ring_hidden_cache = (key, hidden)
        return hidden

    def _ring_mask(self, st: _Layer, win: Windows, p0: int, p1: int, device: torch.device) -> torch.Tensor:
        """Bool ``[Lb, hot * C]``: which ring keys each query of the block attends."""
        c = self.hga.chunk_size
        rc = torch.tensor(st.ring_chunk, device=device)
        fixed = (rc >= 0) & ((rc < win.sink_end) | ((rc >= win.local_start) & (rc < win.current)))
        kpos = (rc[:, None] * c + torch.arange(c, device=device)).reshape(-1)
        qpos = torch.arange(p0, p1 + 1, device=device)
        own = (rc == win.current).repeat_interleave(c)[None, :] & (kpos[None, :] <= qpos[:, None])
        return fixed.repeat_interleave(c)[None, :] | own

    def _block_torch(
        self, st: _Layer, q: torch.Tensor, p0: int, p1: int, scale: float, *,
        sinks: torch.Tensor | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        cfg = self.hga
        c, g, m = cfg.chunk_size, cfg.group_size, cfg.groups_per_chunk
        b, hq, lb, d = q.shape
        hkv, rep = self.num_kv_heads, self.rep
        win = windows_at(p0, c, cfg.sink_chunks, cfg.local_chunks)
        widths = plan_widths(cfg, p1)
        plan = self._route_torch(st, q, p0, win, widths)
        ids = plan.group_ids.reshape(b, hkv, rep * lb, widths[1])  # rows r * Lb + l of KV head kvh
        per_pos = ids.reshape(b, hkv, rep, lb, -1).transpose(2, 3).reshape(b, hkv, lb, -1)
        # A block of several positions gets a union of fixed width (every candidate group, at
        # most rep * Lb * Kg): what one position attends then never depends on later ones.
        width = None if lb == 1 else min(rep * lb * widths[1], win.num_candidates * m)
        union, col, u = _union_by_first_use(per_pos, width)
        slab_dev = self.store.host_slab.device
        got: dict[str, torch.Tensor] = {}

        def gather() -> bool:
            if u == 0:
                return True
            table = st.host_cpu if slab_dev.type == "cpu" else st.host_table()
            valid = union < _BIG
            chunk = torch.where(valid, union // m, 0).to(slab_dev)
            rows = torch.arange(b, device=slab_dev)[:, None, None]
            slots = table.to(slab_dev)[rows, chunk]  # type: ignore[union-attr]
            if bool((valid.to(slab_dev) & (slots < 0)).any()):
                return False
            grp = torch.where(valid, union % m, 0).to(slab_dev)
            kvh = torch.arange(hkv, device=slab_dev)[None, :, None]
            slab = self.store.host_slab
            # Rows of G * D contiguous elements (one group of one head, K or V) copied by
            # index_select: element-wise advanced indexing was 4x slower on the CPU.
            row = (slots.clamp(min=0).long() * 2 * hkv + kvh) * m + grp  # K row; V is hkv * m rows on
            row = torch.stack((row, row + hkv * m), dim=-1).reshape(-1)
            rows_kv = slab.view(-1, g * d).index_select(0, row).view(b, hkv, u, 2, g * d)
            if not bool(valid.all()):  # padding columns: zeros (never attended; slab bytes may be NaN)
                rows_kv.masked_fill_(~valid.to(slab_dev)[..., None, None], 0)
            got["kv"] = rows_kv.to(q.device)
            return True

        self._resident(st, plan.group_ids, lambda: self._fetch_set(plan.chunk_ids, plan.fetch_group_ids), gather)
        qf = q.float().reshape(b, hkv, rep * lb, d)
        ring = st.ring
        kw = ring[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, hkv, self.hot * c, d).float()
        vw = ring[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, hkv, self.hot * c, d).float()
        hidden_w = self._ring_hidden(st, win, p0, p1, q.device)  # [rep * Lb, hot * C]
        sw = _capped(torch.matmul(qf, kw.transpose(-1, -2)).mul_(scale), softcap).masked_fill_(hidden_w, float("-inf"))
        top = sw.amax(dim=-1, keepdim=True)  # finite: every query sees its own token
        if u:
            self._gathered += (union < _BIG).sum()
            kv = got["kv"].float()
            kr = kv[:, :, :, 0].reshape(b, hkv, u * g, d)
            vr = kv[:, :, :, 1].reshape(b, hkv, u * g, d)
            cols = col.reshape(b, hkv, lb, rep, -1).transpose(2, 3).reshape(ids.shape)  # back to rows r * Lb + l
            vis = torch.zeros(b, hkv, rep * lb, u + 1, dtype=torch.bool, device=q.device)
            vis.scatter_(3, cols, True)
            vis = vis[..., :u].repeat_interleave(g, dim=3)
            sr = _capped(torch.matmul(qf, kr.transpose(-1, -2)).mul_(scale), softcap).masked_fill_(~vis, float("-inf"))
            top = torch.maximum(top, sr.amax(dim=-1, keepdim=True))
        if sinks is not None:  # one more softmax entry per query head, no value: [1, Hkv, rep * Lb, 1]
            sink = sinks.float().reshape(1, hkv, rep, 1, 1).expand(1, hkv, rep, lb, 1).reshape(1, hkv, rep * lb, 1)
            top = torch.maximum(top, sink)
        # Softmax over [window keys | routed keys] without concatenating them: one shared max.
        ew = sw.sub_(top).exp_()
        den = ew.sum(dim=-1, keepdim=True)
        out = torch.matmul(ew, vw)
        if u:
            er = sr.sub_(top).exp_()
            den += er.sum(dim=-1, keepdim=True)
            out += torch.matmul(er, vr)
        if sinks is not None:
            den += (sink - top).exp_()
        out /= den
        self._count(plan.group_ids, p0, p1)
        self.last_group_ids = plan.group_ids
        return out.reshape(b, hq, lb, d).to(q.dtype)
