"""Padded batches through TieredCache (CPU, float32): each row of a padded batch = that row alone.

A padded batch runs one engine of batch 1 per row over the one store (kvtier.rows); the
tests use sparse budgets (routing active) and a host tier of 12 chunks, so chunks spill to
the disk tier, with rows of 150 (unpadded), 97 and 1 tokens of a GQA-2 model.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvtier.hf  # noqa: E402  (registers "hga")
from kvtier import HGAConfig, StoreConfig  # noqa: E402
from kvtier.engine import HGAEngine  # noqa: E402
from kvtier.rows import RowEngines  # noqa: E402

from .families import family_model, padded_batch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

SPARSE = HGAConfig(chunk_size=8, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=2, top_groups=3,
                   fetch_groups=4)  # fmt: skip
CHUNK_BYTES = 2 * 2 * 8 * 16 * 4  # K and V, 2 KV heads, 8 tokens, head dim 16, float32
LENGTHS = (150, 97, 1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = family_model("llama3.1")  # 4 query heads over 2 KV heads
    m.set_attn_implementation("hga")
    return m


@pytest.fixture(scope="module")
def rows() -> list[torch.Tensor]:
    ids = torch.randint(3, 96, (200,), generator=torch.Generator().manual_seed(1))
    return [ids[i * 20 : i * 20 + n] for i, n in enumerate(LENGTHS)]


def _store(tmp_path: Any, name: str) -> StoreConfig:
    return StoreConfig(gpu_bytes=0, host_bytes=12 * CHUNK_BYTES, disk_dir=str(tmp_path / name))


def _run(model: torch.nn.Module, cache: kvtier.hf.TieredCache, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs, **kvtier.hf.cache_kwargs(model, cache)).logits


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, torch.Tensor]]:
    """Every torch-flow block's routing: ``(first_seq_id, layer, first position, group ids)``."""
    seen: list[tuple[int, int, int, torch.Tensor]] = []
    block = HGAEngine._block_torch

    def recording(self: HGAEngine, st: Any, q: torch.Tensor, p0: int, p1: int, scale: float, **kw: Any) -> Any:
        out = block(self, st, q, p0, p1, scale, **kw)
        seen.append((self.first_seq_id, st.index, p0, self.last_group_ids.clone()))
        return out

    monkeypatch.setattr(HGAEngine, "_block_torch", recording)
    return seen


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_each_row_alone(model, rows, side, plans, tmp_path) -> None:
    """Logits (1e-5), routing plans (padding never routed) and the merged stats of a padded batch = each row alone."""
    ids, mask, pos = padded_batch(rows, side)
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        together = _run(model, cache, ids, attention_mask=mask, position_ids=pos)
        assert isinstance(cache.engine, RowEngines)
        stats = cache.stats()
        assert stats["store"]["disk"]["chunks"] > 0  # spilled to the disk tier
        assert stats["density"] < 0.9  # routing is active
    batch_plans = list(plans)
    queries, keys = 0, 0.0
    for i, r in enumerate(rows):
        plans.clear()
        with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, f"row{i}")) as cache:
            alone = _run(model, cache, r[None])
            one = cache.stats()
        real = mask[i].bool()
        assert (together[i, real] - alone[0]).abs().max().item() < 1e-5, i
        mine = [(layer, p0, g) for seq, layer, p0, g in batch_plans if seq == i]
        assert [(layer, p0) for layer, p0, _ in mine] == [(layer, p0) for _, layer, p0, _ in plans]
        assert all(torch.equal(g, h) for (_, _, g), (*_, h) in zip(mine, plans)), i
        queries += one["engine"]["queries"]
        keys += one["mean_keys_per_query"] * one["engine"]["queries"]
    assert stats["engine"]["queries"] == queries
    assert stats["mean_keys_per_query"] == pytest.approx(keys / queries, rel=1e-12)
    assert stats["engine"]["row_engines"] == len(rows)


def test_padded_generation_equals_each_row_alone(model, rows, tmp_path) -> None:
    """generate(attention_mask=...) on a left-padded batch through TieredCache: greedy tokens = each row alone."""
    prompts = [rows[0][:70], rows[1][:41], rows[2]]
    ids, mask, _ = padded_batch(prompts, "left")
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             **kvtier.hf.cache_kwargs(model, cache))  # fmt: skip
        assert cache.stats()["engine"]["decode_steps"] > 0
    for i, p in enumerate(prompts):
        with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, f"row{i}")) as cache:
            alone = model.generate(p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=6,
                                   do_sample=False, **kvtier.hf.cache_kwargs(model, cache))  # fmt: skip
        assert torch.equal(out[i, ids.shape[1] :], alone[0, p.numel() :]), i


def test_reset_covers_every_row(model, rows, tmp_path) -> None:
    """reset() drops every row's chunks and engines; the cache then serves the batch again, identically."""
    ids, mask, pos = padded_batch(rows[1:], "left")
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        first = _run(model, cache, ids, attention_mask=mask, position_ids=pos)
        cache.reset()
        assert cache.engine is None and not cache.store.keys()
        again = _run(model, cache, ids, attention_mask=mask, position_ids=pos)
        assert sorted({key.seq_id for key in cache.store.keys()}) == [0]  # the 1-token row closes no chunk
    assert torch.equal(first, again)


def test_padding_after_an_unpadded_start_is_refused(model, rows, tmp_path) -> None:
    batch = torch.stack([rows[0][:40], rows[1][:40]])
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        _run(model, cache, batch)
        mask = torch.ones(2, 44, dtype=torch.long)
        mask[1, -4:] = 0
        with pytest.raises(ValueError, match="TieredCache expected no padding after 40 tokens of a batch that started"):
            _run(model, cache, batch[:, :4], attention_mask=mask)


def test_padded_positions_must_be_each_rows_own(model, rows, tmp_path) -> None:
    ids, mask, _ = padded_batch([rows[0][:40], rows[1][:25]], "left")
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        with pytest.raises(ValueError, match=r"position_ids: expected row 1's real tokens at positions 0..24"):
            _run(model, cache, ids, attention_mask=mask)  # arange positions: the padding shifted row 1


def test_right_padded_generation_is_refused_by_its_positions(model, rows, tmp_path) -> None:
    """generate continues a right-padded row at position (last position + 1) = 1, not at its length: refused
    (transformers warns that decoder-only generation needs left padding)."""
    ids, mask, _ = padded_batch([rows[0][:40], rows[1][:25]], "right")
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        with pytest.raises(ValueError, match=r"position_ids: expected row 1's real tokens at positions 25..25"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                           **kvtier.hf.cache_kwargs(model, cache))  # fmt: skip


@pytest.mark.gpu
def test_cuda_padded_rows_equal_each_row_alone(rows, tmp_path) -> None:
    """On the GPU (the engines' kernel flow): each row of a left-padded batch = that row alone, spilled to disk."""
    m = family_model("llama3.1").to("cuda")
    m.set_attn_implementation("hga")
    ids, mask, pos = (t.to("cuda") for t in padded_batch(rows, "left"))
    store = lambda name: StoreConfig(gpu_bytes="64KiB", host_bytes=12 * CHUNK_BYTES,  # noqa: E731
                                     disk_dir=str(tmp_path / name))  # fmt: skip
    with kvtier.hf.TieredCache(m, hga=SPARSE, store=store("batch")) as cache:
        together = _run(m, cache, ids, attention_mask=mask, position_ids=pos)
        assert cache.stats()["engine"]["backend"] == "kernels"
    for i, r in enumerate(rows):
        with kvtier.hf.TieredCache(m, hga=SPARSE, store=store(f"row{i}")) as cache:
            alone = _run(m, cache, r[None].to("cuda"))
        assert (together[i, mask[i].bool()] - alone[0]).abs().max().item() < 1e-4, i


def test_unpadded_rows_must_sit_at_the_caches_positions(model, rows, tmp_path) -> None:
    """Without padding every row shares the engine's positions: other position_ids are refused, never served."""
    batch = torch.stack([rows[0][:40], rows[1][:40]])
    pos = torch.stack([torch.arange(40), torch.arange(5, 45)])
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        with pytest.raises(ValueError, match=r"position_ids: expected row 1's real tokens at positions 0..39"):
            _run(model, cache, batch, position_ids=pos)


@pytest.mark.parametrize("name", ["gemma3", "gpt-oss"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_hybrid_models_equal_the_cacheless_path(name, side, rows, tmp_path) -> None:
    """Sliding layers (transformers' window layer, its padded mask) + HGA layers per row (+ gpt-oss sinks): a padded
    batch through TieredCache = the cache-less path over the same batch (1e-5)."""
    m = family_model(name)
    ids, mask, pos = padded_batch(rows, side)
    kvtier.hf.configure(m, hga=SPARSE)
    with torch.no_grad():
        cacheless = m(ids, attention_mask=mask, position_ids=pos).logits
    with kvtier.hf.TieredCache(m, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        got = _run(m, cache, ids, attention_mask=mask, position_ids=pos)
        assert isinstance(cache.engine, RowEngines)
    real = mask.bool()
    assert (got[real] - cacheless[real]).abs().max().item() < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_fed_in_pieces_equals_one_pass(model, rows, side, tmp_path) -> None:
    """A padded batch fed in pieces (one where the 1-token row is all padding, one of a single position)."""
    ids, mask, pos = padded_batch(rows, side)
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "one")) as cache:
        one = _run(model, cache, ids, attention_mask=mask, position_ids=pos)
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "pieces")) as cache:
        pieces = torch.cat([_run(model, cache, ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b])
                            for a, b in ((0, 80), (80, 81), (81, ids.shape[1]))], dim=1)  # fmt: skip
    real = mask.bool()
    assert (one[real] - pieces[real]).abs().max().item() < 1e-5


def test_a_mask_that_rewrites_the_past_is_refused(model, rows, tmp_path) -> None:
    ids, mask, pos = padded_batch([rows[0][:40], rows[1][:25]], "left")
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=_store(tmp_path, "batch")) as cache:
        _run(model, cache, ids, attention_mask=mask, position_ids=pos)
        later = torch.ones(2, 41, dtype=torch.long)
        later[0, 0] = 0  # row 1's padding became real, row 0 lost a token
        with pytest.raises(ValueError, match="attention_mask: expected row 0's earlier keys to hold 40 real tokens"):
            _run(model, cache, ids[:, -1:], attention_mask=later, position_ids=torch.tensor([[40], [25]]))
