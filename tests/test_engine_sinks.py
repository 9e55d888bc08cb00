"""kvtier.engine's torch flow with attention sinks (gpt-oss) and logit soft-capping (Gemma-2) = the reference.

The reference (``kvtier.reference.hga_attention(sinks=, softcap=)``) is the spec; the engine
must match it at sparse budgets, fed in pieces and token by token, with chunks spilled to disk.
"""

from __future__ import annotations

import pytest
import torch

from kvtier import HGAConfig, KVLayout, StoreConfig, TieredStore
from kvtier.engine import HGAEngine
from kvtier.reference import hga_attention as hga_ref

CFG = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=2, top_groups=3, fetch_groups=6)
HQ, HKV, D = 6, 2, 16  # GQA ratio 3
LAYOUT = KVLayout(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, chunk_size=16, group_size=4)
SCALE = 0.37  # not D ** -0.5 (Gemma's query_pre_attn_scalar)


def _qkv(length: int, bsz: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    q = 3 * torch.randn(bsz, HQ, length, D, generator=g)  # large logits, so a cap of 2 bites
    return q, torch.randn(bsz, HKV, length, D, generator=g), torch.randn(bsz, HKV, length, D, generator=g)


def _engine_out(q, k, v, cuts: list[int], tmp_path, backend: str = "torch", **opts) -> torch.Tensor:
    store = TieredStore(LAYOUT, StoreConfig(gpu_bytes=0, host_bytes=10 * LAYOUT.chunk_bytes, disk_dir=tmp_path,
                                            device="cpu"))  # fmt: skip
    with store:
        engine = HGAEngine(store, CFG, num_q_heads=HQ, batch_size=q.shape[0], rope_theta=1e4, backend=backend)
        outs, prev = [], 0
        for cut in [*cuts, q.shape[2]]:
            sl = slice(prev, cut)
            outs.append(engine.forward(0, q[:, :, sl], k[:, :, sl], v[:, :, sl], scale=SCALE, **opts))
            prev = cut
        assert store.stats()["disk"]["chunks"] > 0
        engine.close()
    return torch.cat(outs, dim=2)


SINKS = torch.linspace(-1.0, 2.0, HQ)


@pytest.mark.parametrize("opts", [dict(sinks=SINKS), dict(softcap=2.0), dict(sinks=SINKS, softcap=2.0)],
                         ids=["sinks", "softcap", "both"])  # fmt: skip
@pytest.mark.parametrize("cuts", [[], [37, 38, 39, 100]], ids=["one", "pieces"])
def test_sinks_and_softcap_equal_the_reference(opts, cuts, tmp_path) -> None:
    q, k, v = _qkv(130)
    ref, stats = hga_ref(q, k, v, config=CFG, rope_theta=1e4, scale=SCALE, **opts)
    got = _engine_out(q, k, v, cuts, tmp_path / "a", **opts)
    assert (got - ref).abs().max().item() < 1e-5
    assert stats.density < 0.9  # routing is active
    plain, _ = hga_ref(q, k, v, config=CFG, rope_theta=1e4, scale=SCALE)
    assert (got - plain).abs().max().item() > 1e-2  # dropping the option would be caught


def test_one_token_at_a_time(tmp_path) -> None:
    q, k, v = _qkv(200, bsz=1)
    opts = dict(sinks=SINKS, softcap=2.0)
    ref, _ = hga_ref(q, k, v, config=CFG, rope_theta=1e4, scale=SCALE, **opts)
    got = _engine_out(q, k, v, list(range(1, 200)), tmp_path, **opts)
    assert (got - ref).abs().max().item() < 1e-5


def test_bad_options_and_the_kernel_flow_are_refused(tmp_path) -> None:
    q, k, v = _qkv(20, bsz=1)
    with pytest.raises(ValueError, match=r"sinks: expected a tensor \[6\] \(one logit per query head\), got \[2\]"):
        _engine_out(q, k, v, [], tmp_path / "a", sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="softcap: expected a positive number or None, got 0.0"):
        _engine_out(q, k, v, [], tmp_path / "b", softcap=0.0)
    with pytest.raises(ValueError, match="sinks, softcap: expected neither with backend 'kernels'"):
        _engine_out(q, k, v, [], tmp_path / "c", backend="kernels", sinks=SINKS)
